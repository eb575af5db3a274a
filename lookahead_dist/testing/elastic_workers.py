"""Elastic runs on spawned gloo processes that are really killed (SIGKILL), for tests and the stall measurements.

:func:`run_members` starts one process per member, hosts the store in the calling
process (as the supervisor does) and plays the supervisor's part: when a member's
process exits without a result it writes the member's death to the store (unless
``report_deaths=False``, then the survivors find it by its heartbeat) and restarts
it when asked. :func:`trial` is the worker: D-PSGD or SlowMo on the tiny float64
regression, killing itself where the configuration says.
"""

from __future__ import annotations

import copy
import os
import pickle
import signal
import tempfile
import threading
import time
import traceback

import torch

from lookahead_dist.testing.verify import LR, SEED, flat_model, make_problem, sgd

__all__ = ["run_members", "trial", "momentum_of", "measure"]

_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "lookahead_dist.regroup", "lookahead_dist.testing.verify"]


def _entry(fn, member, world, port, out_dir, incarnation, timing, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from lookahead_dist.membership import Membership, connect_store

    result = ("error", "did not finish")
    ms = None
    try:
        store = connect_store("127.0.0.1", port, timing["timeout"])
        ms = Membership(store, member, world, incarnation=incarnation, **timing)
        result = ("ok", fn(ms, *args))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the test
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        with open(os.path.join(out_dir, f"{member}.{incarnation}.pkl"), "wb") as f:
            pickle.dump(result, f)
        if ms is not None:
            try:
                ms.close()
            except Exception:
                pass


def _context():
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_members(
    fn,
    world: int,
    *args,
    timeout: float = 180.0,
    restart: dict | None = None,
    report_deaths: bool = True,
    heartbeat: float = 0.1,
    dead_after: float = 3.0,
    op_timeout: float = 60.0,
):
    """Run ``fn(membership, *args)`` on ``world`` members; returns (results per (member, incarnation), store values).

    ``restart``: {member: seconds} restarts a member that died, that long after its death (once).
    A result is ("ok", value), ("error", text) or ("dead", exit code). Processes still running
    after ``timeout`` are killed and TimeoutError is raised; none is left behind.
    """
    from lookahead_dist.membership import ROOT, connect_store, dead_key

    timing = dict(heartbeat=heartbeat, dead_after=dead_after, timeout=30.0, op_timeout=op_timeout)
    store = connect_store("127.0.0.1", 0, 60.0, is_master=True)
    out_dir = tempfile.mkdtemp(prefix="lookahead_dist-elastic-")
    ctx = _context()
    restart = dict(restart or {})

    def start(m, inc):
        p = ctx.Process(target=_entry, args=(fn, m, world, store.port, out_dir, inc, timing, args), daemon=True)
        p.start()
        return p

    procs = {(m, 0): start(m, 0) for m in range(world)}
    live = set(procs)
    due: dict[tuple[int, int], float] = {}
    results: dict[tuple[int, int], tuple] = {}
    deadline = time.monotonic() + timeout
    try:
        while (live or due) and time.monotonic() < deadline:
            for key in list(live):
                p = procs[key]
                if p.is_alive():
                    continue
                live.discard(key)
                path = os.path.join(out_dir, f"{key[0]}.{key[1]}.pkl")
                if not os.path.exists(path):
                    results[key] = ("dead", p.exitcode)
                    if report_deaths:
                        store.set(dead_key(*key, root=True), "1")
                    if key[0] in restart:
                        due[(key[0], key[1] + 1)] = time.monotonic() + restart.pop(key[0])
            for key, when in list(due.items()):
                if time.monotonic() >= when:
                    del due[key]
                    procs[key] = start(*key)
                    live.add(key)
            time.sleep(0.02)
    finally:
        hung = sorted(k for k in live if procs[k].is_alive())
        for p in procs.values():
            if p.is_alive():
                p.kill()
            p.join()
    if hung:
        raise TimeoutError(f"members {hung} still running after {timeout} s")
    for key in procs:
        if key not in results:
            with open(os.path.join(out_dir, f"{key[0]}.{key[1]}.pkl"), "rb") as f:
                results[key] = pickle.load(f)
    values = {}
    for m in range(world):
        key = f"{ROOT}/test/killed_at/{m}"
        if store.check([key]):
            values[m] = float(store.get(key))
    return results, values


def momentum_of(opt, model) -> torch.Tensor | None:
    """SGD's momentum buffers of ``model``'s parameters, flat in parameter order (None before the first step)."""
    bufs = [opt.state.get(p, {}).get("momentum_buffer") for p in model.parameters()]
    if any(b is None for b in bufs):
        return None
    return torch.cat([b.reshape(-1) for b in bufs]).clone()


def _flat(tensors) -> torch.Tensor | None:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).clone() if tensors else None


def _kill(ms, delay: float = 0.0) -> None:
    def go():
        time.sleep(delay)
        ms.store.set(f"test/killed_at/{ms.member}", repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)

    if delay:
        threading.Thread(target=go, daemon=True).start()
    else:
        go()


def trial(ms, cfg: dict) -> dict:
    """One member of an elastic run (configuration keys: algo, topology, steps, lr, tau, alpha, beta, outer,
    fragments, sync_dtype, kills, in_allreduce, seed, step_sleep, await_rejoin, progress_dir); returns its trace,
    restart states, events and finalized model."""
    from lookahead_dist.decentralized import Decentralized
    from lookahead_dist.regroup import Elastic
    from lookahead_dist.slowmo import SlowMo

    prob = make_problem(ms.initial, cfg.get("seed", SEED))
    model = copy.deepcopy(prob.module)
    base = sgd(model.parameters(), cfg.get("lr", LR))
    me = ms.member
    kill = cfg.get("kills", {}).get(me) if ms.incarnation == 0 else None
    in_allreduce = cfg.get("in_allreduce")  # (victim, step): killed inside the slow step's all-reduce
    slow_k = None if in_allreduce is None else in_allreduce[1]
    state = {"k": -1}

    def instrument(comm):
        if in_allreduce is None:
            return comm
        orig = comm.all_reduce_sum

        def all_reduce_sum(tensor, ranks):
            if state["k"] == slow_k and ms.incarnation == 0 and ms.view.generation == 0:
                if me == in_allreduce[0]:
                    ms.store.set(f"test/in_allreduce/{me}", "1")
                    _kill(ms, 0.3)
                else:
                    time.sleep(1.0)  # the victim is blocked inside the all-reduce when it is killed
            return orig(tensor, ranks)

        comm.all_reduce_sum = all_reduce_sum
        return comm

    if cfg["algo"] == "dpsgd":

        def make_opt(comm, topo):
            return Decentralized(base, model, topo, comm=instrument(comm), elastic=True)
    else:
        outer = None
        if cfg.get("outer"):  # DiLoCo's outer step: Nesterov SGD on the pseudo-gradient

            def outer(params):
                return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)

        def make_opt(comm, topo):
            return SlowMo(
                base, model, tau=cfg["tau"], alpha=cfg.get("alpha"), beta=cfg.get("beta"), base=topo,
                comm=instrument(comm), outer=outer, fragments=cfg.get("fragments", 1), elastic=True,
                sync_dtype=cfg.get("sync_dtype"),
            )  # fmt: skip

    el = Elastic(make_opt, cfg["topology"], membership=ms, sync_every=cfg.get("sync_every"))
    out = {"member": me, "incarnation": ms.incarnation, "trace": {}, "restarts": [], "times": {}}

    def restart_state():
        out["restarts"].append(
            {
                "generation": el.view.generation,
                "members": list(el.view.members),
                "step": el.step_count,
                "x": flat_model(model),
                "momentum": momentum_of(base, model),
                # SlowMo's slow copy z and slow momentum u (flat, None for D-PSGD)
                "slow": _flat(getattr(el.opt, "slow", None)),
                "slow_momentum": _flat(getattr(el.opt, "momentum", None)),
            }
        )

    if ms.incarnation > 0:
        restart_state()
    seen = len(el.events)
    steps = cfg["steps"]

    def more():  # with await_rejoin, go on past ``steps`` until the lost members are back (the same on all)
        return el.step_count < steps or (cfg.get("await_rejoin") and el.world_size < ms.initial)

    while True:
        while more():
            k = state["k"] = el.step_count
            if kill is not None and k == kill:
                _kill(ms)
            if cfg.get("progress_dir") and k == 5:
                open(os.path.join(cfg["progress_dir"], f"{me}.running"), "w").close()
            el.opt.zero_grad()
            inputs, targets = prob.data_fn(me, k)
            torch.nn.functional.mse_loss(model(inputs), targets).backward()
            if cfg.get("step_sleep"):
                time.sleep(cfg["step_sleep"])
            el.step()
            out["times"][el.step_count] = time.monotonic()
            if len(el.events) != seen:
                seen = len(el.events)
                restart_state()
            else:
                out["trace"][el.step_count] = flat_model(model)
        if el.finalize():
            break
        seen = len(el.events)
        restart_state()
    out["final"] = flat_model(model)
    out["events"] = el.events
    out["view"] = {"members": list(el.view.members), "generation": el.view.generation}
    return out


def measure(world: int = 8, steps: int = 60, kill_step: int = 30, **kw) -> list[dict]:
    """Stall and throughput of one killed member in three settings (the table of docs/ELASTIC.md)."""
    runs = [
        ("D-PSGD, one-peer exp., death reported by the launcher", dict(algo="dpsgd", topology="one_peer_exponential")),
        ("D-PSGD over a ring, death found by heartbeat (dead_after 2 s)", dict(algo="dpsgd", topology="ring")),
        ("SlowMo over a ring, killed inside the slow all-reduce", dict(algo="slowmo", topology="ring", tau=4)),
    ]
    rows = []
    for i, (name, cfg) in enumerate(runs):
        cfg = dict(cfg, steps=steps, **kw)
        if i == 2:
            cfg["in_allreduce"] = (3, kill_step - 1 - (kill_step % 4))
        else:
            cfg["kills"] = {3: kill_step}
        results, killed = run_members(trial, world, cfg, report_deaths=i != 1, dead_after=2.0)
        ok = [v for status, v in results.values() if status == "ok"]
        ev = [v["events"][0] for v in ok]
        s = ev[0]["to_step"]
        # steps/s away from the start-up (members start at different times) and from the change
        before = [(v["times"][s - 2] - v["times"][10]) / (s - 12) for v in ok]
        after = [(v["times"][steps] - v["times"][s + 5]) / (steps - s - 5) for v in ok]
        rows.append(
            {
                "run": name,
                "survivors": len(ok),
                "detect_s": max(e["detected_at"] for e in ev) - killed[3],
                **{k: max(e[k] for e in ev) for k in ("leave_s", "agree_s", "group_s", "replan_s", "stall_s")},
                "steps_per_s_before": 1.0 / (sum(before) / len(before)),
                "steps_per_s_after": 1.0 / (sum(after) / len(after)),
            }
        )
    return rows


def main(argv=None) -> int:
    """``python -m lookahead_dist.testing.elastic_workers CONFIG_JSON OUT_DIR``: one member under the launcher;
    ``... --measure``: print the rows of :func:`measure` as JSON lines."""
    import json
    import sys

    from lookahead_dist.membership import Membership

    argv = list(argv if argv is not None else sys.argv[1:])
    if argv[:1] == ["--measure"]:
        for row in measure():
            print(json.dumps(row))
        return 0
    cfg_text, out_dir = argv[:2]
    cfg = json.loads(cfg_text)
    cfg["kills"] = {int(k): v for k, v in cfg.get("kills", {}).items()}
    torch.set_num_threads(1)
    ms = Membership.from_env(heartbeat=0.1, dead_after=3.0, timeout=30.0, op_timeout=60.0)
    try:
        result = ("ok", trial(ms, cfg))
    except Exception as exc:
        result = ("error", f"{type(exc).__name__}: {exc}")
    with open(os.path.join(out_dir, f"{ms.member}.{ms.incarnation}.pkl"), "wb") as f:
        pickle.dump(result, f)
    try:
        ms.close()
    except Exception:
        pass
    print(f"member {ms.member}: {result[0]}", flush=True)
    return 0 if result[0] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
