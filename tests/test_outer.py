"""Outer optimizers (DiLoCo) and streaming fragments on spawned gloo ranks, float64, to 1e-10.

One 4-rank group runs every configuration (lookahead_dist.testing.workers.outer_suite); the oracles are
the reference engine (with the same outer optimizer, or SlowMo's rule), a plain DiLoCo loop written
here from its Algorithm 1, and local SGD with an exact average every tau steps.
"""

import copy
import os

import numpy as np
import pytest
import torch

from lookahead_dist.errors import ConfigError
from lookahead_dist.mixing import Phase, Schedule
from lookahead_dist.outer import fragment_due, fragment_offsets, split_fragments
from lookahead_dist.reference.simulate import Reference, SlowMomentum
from lookahead_dist.testing import workers
from lookahead_dist.testing.local_placement import one_rank_group
from lookahead_dist.testing.spawn import spawn
from lookahead_dist.topology import load

# the outer schedule is stepped after every inner step, the outer optimizer only every tau steps
pytestmark = [
    pytest.mark.dist,
    pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning"),
]

TOL = 1e-10
STEPS = 14
W = 4
CTA = "combine_then_adapt"
SGD_RULE = ("SGD", dict(lr=0.8, momentum=0.5))  # SlowMo's rule with alpha = 0.8, beta = 0.5
NESTEROV = ("SGD", dict(lr=0.7, momentum=0.9, nesterov=True))
ADAM = ("Adam", dict(lr=0.02, betas=(0.8, 0.95)))
ADAMW_INNER = ("AdamW", dict(weight_decay=0.1, betas=(0.9, 0.99)))
PUSH_SUM = "directed_push_sum.yaml"

CONFIGS = {
    "rule_local": dict(tau=3, alpha=0.8, beta=0.5),
    "frag1": dict(tau=3, alpha=0.8, beta=0.5, fragments=1),
    "sgd_local": dict(tau=3, outer=SGD_RULE),
    "sgd_ring": dict(tau=3, outer=SGD_RULE, base="ring.yaml"),
    "sgd_sgp": dict(tau=4, outer=("SGD", dict(lr=1.0, momentum=0.3)), base=PUSH_SUM),
    "sgd_decay": dict(tau=3, outer=SGD_RULE, lr_decay=0.9),
    "sgd_decay_scaled": dict(tau=3, outer=SGD_RULE, lr_decay=0.9, scale_by_gamma=True),
    "diloco": dict(tau=4, inner=ADAMW_INNER, lr=0.01, outer=NESTEROV),
    "average": dict(tau=3, outer=("SGD", dict(lr=1.0))),
    "adam_ring": dict(tau=3, outer=ADAM, base="ring.yaml"),
    "adam_sgp": dict(tau=3, outer=ADAM, base=PUSH_SUM),
    "sharded_adam": dict(tau=3, outer=ADAM, shard=True),
    "sharded_sgp": dict(tau=4, outer=NESTEROV, base=PUSH_SUM, shard=True),
    "outer_sched": dict(tau=3, outer=SGD_RULE, outer_decay=0.8),
    "frag2": dict(tau=4, alpha=0.8, beta=0.5, fragments=2),
    "frag3_ring": dict(tau=3, outer=NESTEROV, fragments=3, base="ring.yaml"),
    "frag2_sgp": dict(tau=4, alpha=1.0, beta=0.3, fragments=2, base=PUSH_SUM),
    "frag2_sgp_adam": dict(tau=3, outer=ADAM, fragments=2, base=PUSH_SUM),
    "outer_overlap_slow": dict(tau=3, outer=NESTEROV, overlap_slow=True),
    "frag_overlap_ring": dict(tau=4, outer=ADAM, fragments=2, base="ring.yaml", overlap=True, overlap_slow=True),
    "frag_overlap_sgp": dict(tau=3, alpha=1.0, beta=0.5, fragments=3, base=PUSH_SUM, overlap=True, overlap_slow=True),
    "resume": dict(tau=4, outer=ADAM, fragments=2, base="ring.yaml", outer_decay=0.9, resume_at=6),
    "resume_overlap": dict(tau=4, outer=NESTEROV, fragments=2, overlap_slow=True, resume_at=6),
    "resume_sharded": dict(tau=3, outer=ADAM, shard=True, base=PUSH_SUM, resume_at=5),
}
SHAPES = [tuple(p.shape) for p in workers.make_problem(W).module.parameters()]


def rel_err(a, b):
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


@pytest.fixture(scope="module")
def runs():
    return spawn(workers.outer_suite, W, CONFIGS, STEPS, timeout=500)


def schedule_of(cfg):
    base = cfg.get("base")
    if base is None:
        return Schedule([np.eye(W)], name="local")
    return load(os.path.join(workers.TOPOLOGIES, base), world_size=W).schedule


def reference_hist(cfg, rule=None, steps=STEPS):
    """The reference engine on ``cfg`` (its outer optimizer), or with SlowMo's rule (alpha, beta) = ``rule``."""
    prob = workers.make_problem(W)
    lr = cfg.get("lr", workers.LR)
    inner = workers.optimizer_from_spec(cfg["inner"], lr=lr) if cfg.get("inner") else (lambda p: workers.sgd(p, lr))
    common = dict(tau=cfg["tau"], fragments=cfg.get("fragments", 1), param_shapes=SHAPES)
    if rule is not None:
        sm = SlowMomentum(alpha=rule[0], beta=rule[1], **common)
    elif cfg.get("outer") is not None:
        outer = workers.optimizer_from_spec(cfg["outer"])
        sm = SlowMomentum(outer=outer, scale_by_gamma=cfg.get("scale_by_gamma", False), **common)
    else:
        sm = SlowMomentum(alpha=cfg["alpha"], beta=cfg["beta"], **common)
    ref = Reference(
        schedule_of(cfg),
        ["fast"] * W,
        prob.x0,
        prob,
        inner,
        slow_momentum=sm,
        order=CTA if cfg.get("overlap") else "adapt_then_combine",
        overlap_slow=bool(cfg.get("overlap_slow")),
    )
    outer_sched = None
    if cfg.get("outer_decay"):
        outer_sched = torch.optim.lr_scheduler.LambdaLR(ref.outer, lambda k: cfg["outer_decay"] ** k)
    hist = [ref.X.clone()]
    for k in range(steps):
        ref.step()
        if cfg.get("lr_decay"):
            for opt in ref.optimizers:
                for g in opt.param_groups:
                    g["lr"] = lr * cfg["lr_decay"] ** (k + 1)
        if outer_sched is not None:
            outer_sched.step()
        hist.append(ref.X.clone())
    return hist


def worst(runs, name, hist, key="hist"):
    return max(rel_err(runs[r][name][key][k], hist[k][r]) for r in range(W) for k in range(len(hist)))


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c.get("resume_at") is None])
def test_distributed_equals_reference_engine(runs, name):
    """Every base (local, ring, push-sum), sharded, fragmented, overlapped: the reference with the same outer."""
    err = worst(runs, name, reference_hist(CONFIGS[name]))
    assert err <= TOL, f"{name}: {err:.3g}"


@pytest.mark.parametrize("name, rule", [("sgd_local", (0.8, 0.5)), ("sgd_ring", (0.8, 0.5)), ("sgd_sgp", (1.0, 0.3))])
def test_outer_sgd_is_slowmo_rule_at_constant_lr(runs, name, rule):
    """outer = SGD(lr=alpha, momentum=beta) on z - x_bar is u <- beta u + (z - x_bar)/gamma, z <- z - alpha gamma u."""
    err = worst(runs, name, reference_hist(CONFIGS[name], rule=rule))
    assert err <= TOL, f"{name}: {err:.3g}"


def test_changing_lr_needs_the_gamma_scaling(runs):
    """With a decaying inner lr the plain outer SGD is not the rule (the momentum is not rescaled by
    gamma_{t-1} / gamma_t); with scale_by_gamma it is, for any schedule."""
    rule = reference_hist(CONFIGS["sgd_decay"], rule=(0.8, 0.5))
    assert worst(runs, "sgd_decay", rule) > 1e-8
    err = worst(runs, "sgd_decay_scaled", rule)
    assert err <= TOL, f"{err:.3g}"


def test_nesterov_outer_over_adamw_is_diloco_algorithm_1(runs):
    """DiLoCo (Douillard et al. 2023, Algorithm 1), written out: W replicas take tau AdamW steps from theta,
    Delta = theta - mean_i theta_i, theta <- Nesterov(theta, Delta), every replica <- theta."""
    cfg = CONFIGS["diloco"]
    prob = workers.make_problem(W)
    eta, mu = NESTEROV[1]["lr"], NESTEROV[1]["momentum"]
    models = [copy.deepcopy(prob.module) for _ in range(W)]
    inners = [torch.optim.AdamW(m.parameters(), lr=cfg["lr"], **ADAMW_INNER[1]) for m in models]
    theta = [p.detach().clone() for p in prob.module.parameters()]
    velocity = [torch.zeros_like(t) for t in theta]
    hist = [torch.stack([workers.flat_model(m) for m in models])]
    for k in range(STEPS):
        for r, (m, opt) in enumerate(zip(models, inners)):
            opt.zero_grad()
            x, y = prob.data_fn(r, k)
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
        if (k + 1) % cfg["tau"] == 0:
            with torch.no_grad():
                for i, t in enumerate(theta):
                    delta = t - torch.stack([list(m.parameters())[i] for m in models]).mean(dim=0)
                    velocity[i] = mu * velocity[i] + delta
                    t -= eta * (delta + mu * velocity[i])
                for m in models:
                    for p, t in zip(m.parameters(), theta):
                        p.copy_(t)
        hist.append(torch.stack([workers.flat_model(m) for m in models]))
    err = worst(runs, "diloco", hist)
    assert err <= TOL, f"{err:.3g}"
    assert float((hist[-1] - hist[0]).abs().max()) > 1e-3  # it trained


def test_outer_sgd_lr_one_is_local_sgd_with_exact_average(runs):
    tau = CONFIGS["average"]["tau"]
    sched = Schedule([Phase(np.eye(W), tau - 1), Phase(np.full((W, W), 1.0 / W), 1)])
    prob = workers.make_problem(W)
    trace = Reference(sched, ["fast"] * W, prob.x0, prob, workers.sgd, record_every=1).run(STEPS)
    err = worst(runs, "average", [trace.X[k] for k in range(STEPS + 1)])
    assert err <= TOL, f"{err:.3g}"


def test_one_fragment_is_todays_slowmo_bitwise(runs):
    for r in range(W):
        for a, b in zip(runs[r]["frag1"]["hist"], runs[r]["rule_local"]["hist"]):
            assert torch.equal(a, b)
        assert runs[r]["frag1"]["bytes"] == runs[r]["rule_local"]["bytes"]


def test_fragments_sync_their_slices_at_their_steps(runs):
    """After fragment f's sync the ranks agree on its slice; the other fragment's slice still differs."""
    cfg = CONFIGS["frag2"]
    bounds = split_fragments([int(np.prod(s)) for s in SHAPES], 2)
    starts = np.cumsum([0] + [int(np.prod(s)) for s in SHAPES])
    slices = [slice(int(starts[bounds[f]]), int(starts[bounds[f + 1]])) for f in range(2)]
    offsets = fragment_offsets(cfg["tau"], 2)
    assert offsets == [0, 2]
    for k in range(1, STEPS + 1):
        f = fragment_due(k, cfg["tau"], offsets)
        if f is None:
            continue
        xs = [runs[r]["frag2"]["hist"][k] for r in range(W)]
        assert all(torch.equal(x[slices[f]], xs[0][slices[f]]) for x in xs), k
        assert any(not torch.equal(x[slices[1 - f]], xs[0][slices[1 - f]]) for x in xs), k


def test_bytes_sent_count_each_fragment_sync(runs):
    """A sync of b bytes over p ranks sends 2 (p - 1) / p b; fragments move only their own bytes."""
    sizes = [int(np.prod(s)) * 8 for s in SHAPES]
    bounds = split_fragments(sizes, 2)
    frag_bytes = [sum(sizes[bounds[f] : bounds[f + 1]]) for f in range(2)]
    tau, offsets = CONFIGS["frag2"]["tau"], fragment_offsets(CONFIGS["frag2"]["tau"], 2)
    expect = 0
    for k in range(1, STEPS + 1):
        f = fragment_due(k, tau, offsets)
        if f is not None:
            expect += 2 * (W - 1) * frag_bytes[f] // W
    whole = 2 * (W - 1) * sum(sizes) // W * (STEPS // CONFIGS["rule_local"]["tau"])
    for r in range(W):
        assert runs[r]["frag2"]["bytes"] == expect
        assert runs[r]["rule_local"]["bytes"] == whole
        assert runs[r]["sgd_local"]["bytes"] == whole


@pytest.mark.parametrize("name", ["resume", "resume_overlap", "resume_sharded"])
def test_resume_with_outer_state_is_bitwise(runs, name):
    start = CONFIGS[name]["resume_at"]
    for r in range(W):
        full, resumed = runs[r][name]["full"], runs[r][name]["resumed"]
        assert len(resumed) == STEPS - start + 1
        for k, x in enumerate(resumed):
            assert torch.equal(x, full[start + k]), (name, r, start + k)
    err = worst(runs, name, reference_hist(CONFIGS[name]), key="full")
    assert err <= TOL, f"{name}: {err:.3g}"


def test_outer_lr_scheduler_changes_the_run(runs):
    """The scheduler on opt.outer is followed (the reference with the same scheduler is matched above)."""
    assert worst(runs, "outer_sched", reference_hist(CONFIGS["sgd_local"])) > 1e-8


def test_batchnorm_statistics_are_averaged_not_stepped(runs):
    """tau = 2: at steps 1 and 3 every rank's running statistics become the ranks' mean (a Nesterov step would
    move them past it); at steps 0 and 2 they are left alone."""
    for k in range(4):
        for stat in range(2):
            before = torch.stack([runs[r]["bn"][k][0][stat] for r in range(W)])
            for r in range(W):
                after = runs[r]["bn"][k][1][stat]
                if k % 2 == 1:
                    assert rel_err(after, before.mean(dim=0)) <= 1e-12, (k, stat, r)
                else:
                    assert torch.equal(after, before[r])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(outer=NESTEROV, alpha=0.5), r"alpha and beta must stay None with it \(got alpha=0.5, beta=None\)"),
        (dict(outer=NESTEROV, beta=0.9), r"\(got alpha=None, beta=0.9\)"),
        (dict(scale_by_gamma=True), "scale_by_gamma=True scales an outer optimizer, but outer is None"),
        (dict(outer=("LBFGS", {})), "LBFGS needs a closure"),
        (dict(outer=("SparseAdam", {})), "SparseAdam takes sparse gradients"),
        (dict(outer=("Muon", {}), shard=True), r"shapes \[\(13,\)\]\): ValueError: Muon .* shard=True"),
        (dict(outer=("Adafactor", {}), shard=True), "Adafactor is not element-wise, and shard=True"),
        (dict(outer=("Adafactor", {}), fragments=2), "Adafactor is not element-wise, and fragments=2"),
        (dict(fragments=13), r"fragments must be an integer in \[1, tau\] = \[1, 12\], got 13"),
        (dict(fragments=5, tau=8), "5 fragments need at least 5 tensors, the model has 4"),
        (dict(fragments=2, shard=True), "fragments=2 and shard=True cannot be combined"),
        (dict(fragments=2, optimizer_state="average"), "fragments=2 needs optimizer_state='keep'"),
    ],
)
def test_invalid_outer_settings_are_clear_errors(kw, match):
    from lookahead_dist.slowmo import SlowMo

    if "outer" in kw:
        kw = {**kw, "outer": workers.optimizer_from_spec(kw["outer"])}
    with one_rank_group("gloo"):
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        with pytest.raises(ConfigError, match=match):
            SlowMo(torch.optim.SGD(model.parameters(), lr=0.1), model, **kw)


def test_outer_optimizer_views_alias_the_slow_copy():
    from lookahead_dist.slowmo import SlowMo

    seen = []

    def factory(params):
        seen.extend(params)
        return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)

    with one_rank_group("gloo"):
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
        opt = SlowMo(torch.optim.SGD(model.parameters(), lr=0.1), model, tau=2, outer=factory)
        assert [p.shape for p in seen] == [p.shape for p in model.parameters()]
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(seen, model.parameters()))
        assert torch.equal(torch.cat([p.reshape(-1) for p in seen]), opt.slow[0])
        assert opt.slow[0].data_ptr() == seen[0].data_ptr()
        assert "outer" in opt.state_dict()["slowmo"] and opt.alpha is None and opt.beta is None
