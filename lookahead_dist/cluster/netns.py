"""The emulated cluster's network: one namespace per node, a bridge in a namespace of its own, tbf on each NIC.

Layout of a run with id ``RID`` and N nodes (every name and address lives
inside namespaces this module creates; the host's interfaces, addresses and
routes are never touched)::

    namespace ldc-RID-br   bridge "br0", ports port0 .. port{N-1}   (no address)
    namespace ldc-RID-n<i> veth "node<i>" (peer of port<i>), address 10.A.B.(i+1)/24, lo up
                           egress qdisc: tbf rate R burst B limit L  (netem child for a delay, where it exists)

The veth pairs are created from inside the bridge namespace with the node's end
moved straight into the node's namespace, so no interface ever appears in the
host's namespace. Ranks of one node reach each other through the node's own
address: the kernel delivers a packet to a local address over ``lo``, so that
traffic never crosses the shaped veth (the NVLink stand-in). Only each node's
egress is shaped; a node's ingress is the other nodes' egress, which is what
bounds the symmetric patterns of decentralized training (ring, exchange,
all-reduce), but a many-to-one burst is not limited at the receiving NIC.

Token bucket choices (documented in :func:`tbf_params`): the burst is large
enough that a whole 64 KiB GSO packet fits (otherwise tbf segments every
packet in software, which costs CPU the 2-core machines here do not have) and
otherwise half a millisecond at the rate; the queue limit holds 10 ms at the
rate. tbf charges each packet its length as sent on the wire minus FCS and
preamble: 1514 bytes (14 Ethernet + 20 IP + 32 TCP with timestamps + 1448
payload) at MTU 1500, so TCP moves ``rate x 1448 / 1514`` payload bytes.

Assumes iproute2's ``ip`` and ``tc`` and util-linux's ``nsenter``/``unshare``
on PATH, and root or CAP_NET_ADMIN + CAP_SYS_ADMIN.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

from lookahead_dist.costmodel import WIRE_FRACTION, usable_bandwidth
from lookahead_dist.errors import ConfigError, LookaheadDistError
from lookahead_dist.planner import parse_rate, parse_time

__all__ = [
    "ClusterError",
    "Network",
    "PREFIX",
    "WIRE_FRACTION",
    "parse_rate",
    "parse_latency",
    "usable_rate",
    "tbf_params",
    "privilege_problem",
    "netem_problem",
    "run_namespaces",
    "remove_namespaces",
]

PREFIX = "ldc-"  # every namespace this package creates is named ldc-<run id>-<br|n<i>>
NETNS_DIR = "/run/netns"
MTU = 1500
BURST_MIN = 96 * 1024  # bytes: a 64 KiB GSO packet plus its per-segment headers (about 68.5 KiB) fits
BURST_TIME = 0.5e-3  # seconds of the rate in the bucket, where that is more than BURST_MIN
LIMIT_TIME = 10e-3  # seconds of the rate the queue holds before tbf refuses a packet


class ClusterError(LookaheadDistError, RuntimeError):
    """The emulated cluster cannot run here: no privilege, a missing qdisc, a failed command, a bad link."""


def parse_latency(text, name: str = "--latency") -> float:
    """Seconds from '200us', '1ms', '0.5ms', '0' (a bare number is seconds): the planner's parse_time."""
    return parse_time(text, name)


def usable_rate(rate_bits: float) -> float:
    """TCP payload bytes per second through a link shaped to ``rate_bits`` (1448 of every 1514 bytes)."""
    return usable_bandwidth(rate_bits)


def tbf_params(rate_bits: float) -> tuple[int, int]:
    """(burst, limit) in bytes for tbf at ``rate_bits``.

    burst = max(96 KiB, 0.5 ms of the rate): a 64 KiB GSO packet must fit the
    bucket or tbf segments it in software; a message shorter than the burst
    passes at memory speed, so measure with messages much longer than it.
    limit = max(2 x burst, 10 ms of the rate): the bytes queued before tbf
    refuses a packet. A refused packet from a local socket is not a loss on
    the wire (TCP learns it synchronously and backs off), and TCP small queues
    bound each socket's share, so 10 ms suffices and keeps small messages from
    waiting behind a long queue.
    """
    per_s = rate_bits / 8
    burst = int(max(BURST_MIN, per_s * BURST_TIME))
    limit = int(max(2 * burst, per_s * LIMIT_TIME))
    return burst, limit


def _run(cmd: list[str], what: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"{what} failed: `{' '.join(cmd)}` said: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def privilege_problem() -> str | None:
    """Why namespaces, veth and tbf cannot be made here (None if they can): checked, then tried in a scratch namespace.

    The try runs ``ip link add ... type veth`` and ``tc ... tbf`` inside
    ``unshare --net``: an anonymous namespace that vanishes with the command.
    """
    missing = [tool for tool in ("ip", "tc", "nsenter", "unshare") if shutil.which(tool) is None]
    if missing:
        return (
            f"the emulated cluster needs iproute2's ip and tc and util-linux's nsenter and unshare; "
            f"not found: {missing}"
        )
    cap_net_admin, cap_sys_admin = 1 << 12, 1 << 21
    caps = _caps()
    if os.geteuid() != 0 and (caps & cap_net_admin == 0 or caps & cap_sys_admin == 0):
        return (
            f"the emulated cluster needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network "
            f"namespaces, veth links and tc qdiscs; this process runs as uid {os.geteuid()} without them "
            f"(run it as root, e.g. with sudo)"
        )
    if caps & cap_net_admin == 0:
        return "the emulated cluster needs CAP_NET_ADMIN to create veth links and tc qdiscs; this process lacks it"
    script = (
        "ip link add ldc-a type veth peer name ldc-b && ip link set ldc-a up && "
        "tc qdisc add dev ldc-a root tbf rate 1mbit burst 32kb limit 64kb"
    )
    try:
        proc = subprocess.run(
            ["unshare", "--net", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError as exc:
        return f"the emulated cluster needs util-linux's unshare/nsenter and iproute2's ip/tc on PATH ({exc})"
    except subprocess.TimeoutExpired:
        return "creating a scratch network namespace did not finish within 30 s"
    if proc.returncode != 0:
        return (
            f"network namespaces with veth links and tbf are not permitted here (a scratch namespace "
            f"said: {(proc.stderr or proc.stdout).strip()}); run as root with CAP_NET_ADMIN and CAP_SYS_ADMIN"
        )
    return None


def netem_problem() -> str | None:
    """Why a delay cannot be shaped here (None if the netem qdisc works): tried on ``lo`` of a scratch namespace."""
    proc = subprocess.run(
        ["unshare", "--net", "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if proc.returncode == 0:
        return None
    said = (proc.stderr or proc.stdout).strip().splitlines()
    return (
        f"a link latency needs the netem qdisc, and this kernel does not provide it (tc said: "
        f"{said[0] if said else 'exit code %d' % proc.returncode}; the kernel lacks sch_netem). "
        f"Run without --latency (links then add only the kernel's own microseconds), or on a kernel with netem"
    )


@dataclass
class Network:
    """The namespaces, links and addresses of one run (``build`` makes them, ``remove_namespaces`` undoes them)."""

    run_id: str
    nodes: int
    subnet: tuple[int, int]  # (A, B) of 10.A.B.0/24
    rate_bits: float
    latency_s: float = 0.0

    @property
    def bridge_ns(self) -> str:
        return f"{PREFIX}{self.run_id}-br"

    def node_ns(self, i: int) -> str:
        return f"{PREFIX}{self.run_id}-n{i}"

    def ifname(self, i: int) -> str:
        """The node's NIC inside its namespace (what GLOO_SOCKET_IFNAME names)."""
        return f"node{i}"

    def address(self, i: int) -> str:
        return f"10.{self.subnet[0]}.{self.subnet[1]}.{i + 1}"

    def netns_path(self, ns: str) -> str:
        return os.path.join(NETNS_DIR, ns)

    def enter(self, i: int) -> list[str]:
        """Command prefix that runs a program inside node ``i``'s namespace (same pid: nsenter execs)."""
        return ["nsenter", f"--net={self.netns_path(self.node_ns(i))}", "--"]

    def build(self) -> None:
        """Create the bridge namespace, one namespace per node, the veth pairs, addresses and qdiscs."""
        if not 1 <= self.nodes <= 250:
            raise ConfigError(f"--nodes: must be between 1 and 250 (one /24 per run), got {self.nodes}")
        br = self.bridge_ns
        _run(["ip", "netns", "add", br], "creating the bridge namespace")
        _run(["ip", "-n", br, "link", "set", "lo", "up"], "bringing up lo in the bridge namespace")
        _run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"], "creating the bridge")
        _run(["ip", "-n", br, "link", "set", "br0", "up"], "bringing up the bridge")
        burst, limit = tbf_params(self.rate_bits)
        for i in range(self.nodes):
            ns, dev, port = self.node_ns(i), self.ifname(i), f"port{i}"
            _run(["ip", "netns", "add", ns], f"creating node {i}'s namespace")
            _run(["ip", "-n", ns, "link", "set", "lo", "up"], f"bringing up lo of node {i}")
            _run(
                [
                    "ip",
                    "-n",
                    br,
                    "link",
                    "add",
                    port,
                    "mtu",
                    str(MTU),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    dev,
                    "mtu",
                    str(MTU),
                    "netns",
                    ns,
                ],
                f"creating node {i}'s veth pair",
            )
            _run(["ip", "-n", br, "link", "set", port, "master", "br0"], f"attaching node {i} to the bridge")
            _run(["ip", "-n", br, "link", "set", port, "up"], f"bringing up bridge port {i}")
            # no IPv6 link-local address: gloo must find exactly the IPv4 address on the interface
            _run(["ip", "-n", ns, "link", "set", dev, "addrgenmode", "none"], f"configuring node {i}'s NIC")
            _run(["ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", dev], f"addressing node {i}")
            _run(["ip", "-n", ns, "link", "set", dev, "up"], f"bringing up node {i}'s NIC")
            tbf = ["tbf", "rate", f"{int(self.rate_bits)}bit", "burst", str(burst), "limit", str(limit)]
            if self.latency_s > 0:  # tbf at the root, netem delaying what tbf lets through
                _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", *tbf], f"shaping node {i}")
                _run(
                    [
                        "tc",
                        "-n",
                        ns,
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "parent",
                        "1:1",
                        "handle",
                        "10:",
                        "netem",
                        "delay",
                        f"{self.latency_s * 1e6:.0f}us",
                        "limit",
                        "100000",
                    ],
                    f"delaying node {i}",
                )
            else:
                _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *tbf], f"shaping node {i}")


def run_namespaces(run_id: str | None = None) -> list[str]:
    """Namespaces this package created (all runs, or one run's), from ``ip netns list``."""
    proc = _run(["ip", "netns", "list"], "listing network namespaces", check=False)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    want = f"{PREFIX}{run_id}-" if run_id else PREFIX
    return sorted(n for n in names if n.startswith(want))


def pids_in(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns`` (a scan of /proc, as ``ip netns pids`` does)."""
    try:
        st = os.stat(os.path.join(NETNS_DIR, ns))
    except OSError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                s = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (s.st_ino, s.st_dev) == (st.st_ino, st.st_dev) and int(entry) != os.getpid():
                out.append(int(entry))
    return out


def remove_namespaces(names: list[str], grace_s: float = 0.0) -> list[str]:
    """Kill every process inside ``names`` (SIGTERM, ``grace_s``, then SIGKILL) and delete the namespaces.

    Deleting a node's namespace destroys its veth and with it the peer port;
    deleting the bridge namespace destroys the bridge. Returns the namespaces
    that could not be deleted (empty on success).
    """
    procs = {ns: pids_in(ns) for ns in names}
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        alive = [p for ps in procs.values() for p in ps]
        if not alive:
            break
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(pids_in(ns) for ns in names):
            time.sleep(0.02)
        procs = {ns: pids_in(ns) for ns in names}
    failed = []
    for ns in names:
        if _run(["ip", "netns", "del", ns], f"deleting namespace {ns}", check=False).returncode != 0:
            if os.path.exists(os.path.join(NETNS_DIR, ns)):
                failed.append(ns)
    return failed
