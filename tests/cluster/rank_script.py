"""A rank without torch for the emulated-cluster tests: it reports in, then crashes or waits to be stopped.

Usage: python rank_script.py DIR MODE
Each rank writes DIR/rank<RANK>.json (pid, environment, node address) and then:
MODE=crash: rank 1 exits with code 3 at once, the others sleep; MODE=sleep: every rank sleeps.
"""

import json
import os
import sys
import time


def main():
    out, mode = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    info = {
        "pid": os.getpid(),
        **{k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "GLOO_SOCKET_IFNAME")},
    }
    tmp = os.path.join(out, f".rank{rank}.json")
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.rename(tmp, os.path.join(out, f"rank{rank}.json"))
    if mode == "crash" and rank == 1:
        sys.exit(3)
    time.sleep(600)


if __name__ == "__main__":
    main()
