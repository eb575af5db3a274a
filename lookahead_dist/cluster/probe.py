"""Raw TCP bandwidth between two nodes, timed at the receiver (standard library only).

Run by path, not as a module, so that it starts in milliseconds without
importing the package (and torch)::

    python probe.py recv ADDR PORT NBYTES   # prints "listening", then one JSON line {"bytes":..., "seconds":...}
    python probe.py send ADDR PORT NBYTES

The receiver's clock starts at the first byte and stops at the last; the
bytes of the first read are not counted (they arrived before the clock
started), so the result is the steady payload rate of one TCP stream.
"""

from __future__ import annotations

import json
import socket
import sys
import time

CHUNK = 1 << 20


def receive(addr: str, port: int, nbytes: int) -> dict:
    with socket.create_server((addr, port)) as srv:
        print("listening", flush=True)
        srv.settimeout(60)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(60)
            buf = bytearray(CHUNK)
            got = conn.recv_into(buf)
            t0 = time.perf_counter()
            first, total = got, got
            while total < nbytes:
                n = conn.recv_into(buf)
                if n == 0:
                    break
                total += n
            t1 = time.perf_counter()
    return {"bytes": total - first, "seconds": t1 - t0, "total": total}


def send(addr: str, port: int, nbytes: int) -> None:
    payload = bytes(CHUNK)
    with socket.create_connection((addr, port), timeout=60) as conn:
        left = nbytes
        while left > 0:
            n = min(left, CHUNK)
            conn.sendall(payload[:n])
            left -= n
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # wait until the receiver has read everything and closed


def main(argv: list[str]) -> int:
    role, addr, port, nbytes = argv[0], argv[1], int(argv[2]), int(argv[3])
    if role == "recv":
        print(json.dumps(receive(addr, port, nbytes)), flush=True)
    else:
        send(addr, port, nbytes)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
