"""The emulated cluster's pieces that need no namespace: rates, times, token bucket sizes, checks, rank environment."""

from __future__ import annotations

import pytest

from lookahead_dist.cluster import netns
from lookahead_dist.cluster.launcher import Options, rank_env, run
from lookahead_dist.cluster.netns import ClusterError, Network, parse_latency, parse_rate, tbf_params, usable_rate
from lookahead_dist.errors import ConfigError, LookaheadDistError


@pytest.mark.parametrize(
    "text, bits",
    [
        ("1gbit", 1e9),
        ("500mbit", 5e8),
        ("2.5gbit", 2.5e9),
        ("100kbit", 1e5),
        ("25GBIT", 25e9),
        (" 10 mbit ", 1e7),
        (3e9, 3e9),
    ],
)
def test_parse_rate(text, bits):
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["1gbps", "fast", "", "0gbit", "-1gbit", "1", "1 gb"])
def test_parse_rate_refuses_naming_the_value(text):
    with pytest.raises(ConfigError, match="--bandwidth") as info:
        parse_rate(text)
    assert isinstance(info.value, LookaheadDistError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("text, seconds", [("200us", 200e-6), ("1ms", 1e-3), ("0", 0.0), ("0.5", 0.5), ("5ns", 5e-9)])
def test_parse_latency(text, seconds):
    assert parse_latency(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["200 parsecs", "-1ms", "soon"])
def test_parse_latency_refuses(text):
    with pytest.raises(ConfigError, match="--latency"):
        parse_latency(text)


def test_usable_rate_is_tcp_payload_of_a_1514_byte_frame():
    assert usable_rate(1e9) == pytest.approx(125e6 * 1448 / 1514)


def test_token_bucket_holds_a_gso_packet_and_10_ms_of_queue():
    burst, limit = tbf_params(1e9)
    assert burst == 96 * 1024 and limit == 1_250_000  # 0.5 ms of 1 Gbit/s is below the 96 KiB floor
    burst, limit = tbf_params(25e9)
    assert burst == int(25e9 / 8 * 0.5e-3) and limit == int(25e9 / 8 * 10e-3)
    burst, limit = tbf_params(1e6)
    assert burst == 96 * 1024 and limit == 2 * burst


def test_names_and_addresses_stay_inside_the_run():
    net = Network("abc123", 3, (77, 5), 1e9)
    assert net.bridge_ns == "ldc-abc123-br" and [net.node_ns(i) for i in range(3)] == [
        "ldc-abc123-n0",
        "ldc-abc123-n1",
        "ldc-abc123-n2",
    ]
    assert [net.address(i) for i in range(3)] == ["10.77.5.1", "10.77.5.2", "10.77.5.3"]
    assert net.enter(1) == ["nsenter", "--net=/run/netns/ldc-abc123-n1", "--"]


def test_rank_env_is_torchruns(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    net = Network("abc123", 2, (77, 5), 1e9)
    opts = Options(nodes=2, procs_per_node=3, rate_bits=1e9, command=["x.py"], master_port=29511)
    env = rank_env(net, opts, node=1, local_rank=2)
    assert {
        k: env[k]
        for k in (
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "LOCAL_WORLD_SIZE",
            "GROUP_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
            "GLOO_SOCKET_IFNAME",
        )
    } == {
        "RANK": "5",
        "LOCAL_RANK": "2",
        "WORLD_SIZE": "6",
        "LOCAL_WORLD_SIZE": "3",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "10.77.5.1",
        "MASTER_PORT": "29511",
        "GLOO_SOCKET_IFNAME": "node1",
    }
    assert "TORCHELASTIC_USE_AGENT_STORE" not in env  # an outer torchrun's store is not this cluster's


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"nodes": 0}, "--nodes"),
        ({"procs_per_node": 0}, "--procs-per-node"),
        ({"command": []}, "script"),
        ({"master_port": 70000}, "--master-port"),
        ({"probe_bytes": 1 << 20}, "probe_bytes"),
    ],
)
def test_options_refuse_bad_values(kw, word):
    args = dict(nodes=2, procs_per_node=1, rate_bits=1e9, command=["x.py"])
    args.update(kw)
    with pytest.raises(ConfigError, match=word):
        Options(**args).validate()


def test_without_privilege_it_fails_at_once_saying_so(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(netns, "_caps", lambda: 0)
    problem = netns.privilege_problem()
    assert "root" in problem and "CAP_NET_ADMIN" in problem and "uid 1000" in problem
    monkeypatch.setattr("lookahead_dist.cluster.launcher.privilege_problem", lambda: problem)
    with pytest.raises(ClusterError, match="needs root"):
        run(Options(nodes=2, procs_per_node=1, rate_bits=1e9, command=["x.py"]))


def test_root_without_net_admin_is_refused(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns, "_caps", lambda: 1 << 21)
    assert "CAP_NET_ADMIN" in netns.privilege_problem()
