"""Tests of lookahead_dist.lookahead: the serial Lookahead wrapper (paper eq. 5, Algorithm 1)."""

import copy
import io
import pickle
import shutil

import pytest
import torch
from torch import nn

from lookahead_dist.errors import ConfigError
from lookahead_dist.lookahead import Lookahead, lookahead_sync_, slow_dtype

# ----------------------------------------------------------------- helpers


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def batches(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 4, generator=g, dtype=dtype), torch.randn(6, 2, generator=g, dtype=dtype)) for _ in range(n)
    ]


def loss_of(model, X, Y):
    return ((model(X) - Y) ** 2).mean()


def sgd(params, lr=0.05):
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def adam(params, lr=0.01):
    return torch.optim.Adam(params, lr=lr)


INNER = {"sgd": sgd, "adam": adam}


def train(model, opt, data, scheduler=None):
    for X, Y in data:
        opt.zero_grad()
        loss_of(model, X, Y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def reference_run(model, inner, data, tau, alpha, accumulate=1, clip=None):
    """Bare inner optimizer plus a hand-written per-tensor sync after every tau-th step."""
    params = list(model.parameters())
    slow = [p.detach().clone() for p in params]
    for k, (X, Y) in enumerate(data):
        inner.zero_grad()
        for part in range(accumulate):
            loss_of(model, X[part::accumulate], Y[part::accumulate]).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(params, clip)
        inner.step()
        if (k + 1) % tau == 0:
            with torch.no_grad():
                for p, z in zip(params, slow):
                    z.lerp_(p, alpha)
                    p.copy_(z)
    return [p.detach().clone() for p in params]


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y), (x - y).abs().max()


def assert_close(a, b, tol):
    """max |a - b| <= tol * max(1, max |b|) over all tensors (DESIGN.md tolerances)."""
    err = max((x - y).abs().max().item() for x, y in zip(a, b))
    scale = max(1.0, max(y.abs().max().item() for y in b))
    assert err <= tol * scale, (err, scale)


def roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu")


# ------------------------------------------------- 1. a torch.optim.Optimizer


def test_is_an_optimizer_with_every_base_attribute_and_shared_param_groups():
    model = mlp()
    inner = sgd(model.parameters())
    opt = Lookahead(inner, tau=3)
    assert isinstance(opt, torch.optim.Optimizer)
    assert not isinstance(opt, torch.optim.SGD)
    fresh = torch.optim.SGD(mlp().parameters(), lr=0.1)
    missing = [name for name in vars(fresh) if not hasattr(opt, name)]
    assert missing == []
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state and opt.defaults is inner.defaults

    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))
    opt.register_state_dict_pre_hook(lambda o: calls.append(("sd_pre", o)))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("sd_post", o)))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load_pre", o)))
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o)))
    train(model, opt, batches(1))
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert [name for name, _ in calls] == ["pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]
    assert all(o is opt for _, o in calls)
    assert opt.param_groups is inner.param_groups  # inner load_state_dict built a new list
    assert opt.param_groups[0]["params"] == list(model.parameters())


def test_repr_and_step_count():
    model = mlp()
    opt = Lookahead(adam(model.parameters()), tau=4, alpha=0.25, pullback="reset")
    train(model, opt, batches(3))
    assert opt.step_count == 3
    text = repr(opt)
    assert text.startswith("Lookahead(tau=4, alpha=0.25, pullback='reset', step_count=3)")
    assert "Adam" in text and "lr: 0.01" in text


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(tau=0), "tau"),
        (dict(tau=2.0), "tau"),
        (dict(tau=True), "tau"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(alpha="0.5"), "alpha"),
        (dict(pullback="pull"), "pullback"),
        (dict(foreach=1), "foreach"),
    ],
)
def test_bad_arguments_raise_config_error_naming_argument_and_value(kwargs, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        Lookahead(sgd(mlp().parameters()), **kwargs)
    assert isinstance(info.value, ValueError)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_optimizer_must_be_a_torch_optimizer():
    with pytest.raises(ConfigError, match="optimizer must be a torch.optim.Optimizer, got list"):
        Lookahead([torch.zeros(1)])


# --------------------------------------------------------------- 2. schedulers


SCHEDULERS = {
    "lambda": (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.9**e), False),
    "step": (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5), False),
    "onecycle": (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20), False),
    "plateau": (lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0), True),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_schedulers_drive_the_inner_learning_rate_also_after_resume(name):
    make, by_metric = SCHEDULERS[name]
    data = batches(10)

    def run(opt, sched, model, part, inner):
        lrs = []
        for X, Y in part:
            opt.zero_grad()
            loss_of(model, X, Y).backward()
            opt.step()
            sched.step(1.0) if by_metric else sched.step()  # constant metric: plateau every step
            lrs.append(inner.param_groups[0]["lr"])
        return lrs

    bare_model = mlp()
    bare = sgd(bare_model.parameters())
    expected = run(bare, make(bare), bare_model, data, bare)
    assert len(set(expected)) > 1  # the schedule really changes the rate

    model = mlp()
    opt = Lookahead(sgd(model.parameters()), tau=3)
    sched = make(opt)
    got = run(opt, sched, model, data[:4], opt.optimizer)
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})

    model2 = mlp(seed=5)
    model2.load_state_dict(ckpt["model"])
    opt2 = Lookahead(sgd(model2.parameters()), tau=3)
    sched2 = make(opt2)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    got += run(opt2, sched2, model2, data[4:], opt2.optimizer)
    assert got == expected


# --------------------------------------------------------------- 3. resume


@pytest.mark.parametrize(
    "inner_name, pullback, scheduled",
    [
        ("sgd", "none", False),
        ("sgd", "none", True),
        ("adam", "none", False),
        ("adam", "none", True),
        ("sgd", "pullback", True),
        ("adam", "reset", False),
    ],
)
def test_exact_resume_mid_cycle_into_fresh_objects(inner_name, pullback, scheduled):
    make_inner, tau, data = INNER[inner_name], 5, batches(16)

    def build(model):
        opt = Lookahead(make_inner(model.parameters()), tau=tau, alpha=0.5, pullback=pullback)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7) if scheduled else None
        return opt, sched

    ref_model = mlp()
    ref_opt, ref_sched = build(ref_model)
    train(ref_model, ref_opt, data, ref_sched)

    model = mlp()
    opt, sched = build(model)
    train(model, opt, data[:7], sched)  # 7 % 5 != 0: mid-cycle
    assert opt.step_count % tau != 0
    ckpt = roundtrip(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict() if sched else None}
    )
    own = ckpt["opt"]["lookahead"]
    assert own["step_count"] == 7 and sorted(own["slow_params"]) == [0, 1, 2, 3]
    assert sorted(ckpt["opt"]["state"]) == [0, 1, 2, 3]

    model2 = mlp(seed=9)
    model2.load_state_dict(ckpt["model"])
    opt2, sched2 = build(model2)
    opt2.load_state_dict(ckpt["opt"])
    if sched2:
        sched2.load_state_dict(ckpt["sched"])
    train(model2, opt2, data[7:], sched2)
    assert opt2.step_count == 16
    assert_bitwise(params_of(model2), params_of(ref_model))


def test_bare_inner_checkpoint_loads_into_wrapper_and_back():
    data = batches(4)
    model = mlp()
    bare = adam(model.parameters())
    train(model, bare, data)
    ckpt = roundtrip(bare.state_dict())

    opt = Lookahead(adam(model.parameters()), tau=3)
    opt.load_state_dict(ckpt)
    assert opt.step_count == 0
    for p in model.parameters():
        assert torch.equal(opt.slow_state[p]["slow_param"], p)
        assert torch.equal(opt.state[p]["exp_avg"], bare.state[p]["exp_avg"])

    train(model, opt, data[:2])
    wrapped = roundtrip(opt.state_dict())
    inner_only = Lookahead.inner_state_dict(wrapped)
    assert "lookahead" not in inner_only and "lookahead" in wrapped
    bare2 = adam(model.parameters())
    bare2.load_state_dict(inner_only)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(bare2.state[p][key], opt.state[p][key])


def test_mismatched_checkpoint_is_refused_before_anything_changes():
    model = mlp()
    opt = Lookahead(sgd(model.parameters()), tau=3)
    train(model, opt, batches(2))
    bad = roundtrip(opt.state_dict())
    bad["lookahead"]["slow_params"][1] = torch.zeros(3)
    before = roundtrip(opt.state_dict())
    with pytest.raises(ConfigError, match=r"\['slow_params'\]\[1\] must have the parameter's shape \(8,\), got \(3,\)"):
        opt.load_state_dict(bad)
    bad["lookahead"]["slow_params"][1] = before["lookahead"]["slow_params"][1]
    bad["lookahead"]["tau"] = 0
    with pytest.raises(ConfigError, match="tau"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["lookahead"]["step_count"] == 2 and after["lookahead"]["tau"] == 3
    assert_bitwise(list(after["lookahead"]["slow_params"].values()), list(before["lookahead"]["slow_params"].values()))
    other = Lookahead(sgd(model.parameters()), tau=7, alpha=0.9)  # the checkpoint's hyperparameters win
    other.load_state_dict(before)
    assert (other.tau, other.alpha, other.step_count) == (3, 0.5, 2)


# ------------------------------------------------------------- 4. slow weights


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
    ],
)
def test_slow_weight_dtype_device_and_leafness(dtype, expected):
    assert slow_dtype(dtype) == expected
    model = mlp(dtype=dtype)
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), tau=2)
    for p in model.parameters():
        z = opt.slow_state[p]["slow_param"]
        assert z.dtype == expected and z.device == p.device
        assert z.is_leaf and not z.requires_grad
        assert torch.equal(z, p.detach().to(expected))
        assert z.data_ptr() != p.data_ptr()


@pytest.mark.parametrize("pullback, copies", [("none", 1), ("reset", 1), ("pullback", 2)])
def test_memory_is_one_parameter_copy_and_inner_state_is_untouched(pullback, copies):
    data = batches(6)
    model, bare_model = mlp(), mlp()
    opt = Lookahead(sgd(model.parameters()), tau=2, pullback=pullback)
    bare = sgd(bare_model.parameters())
    train(model, opt, data)
    train(bare_model, bare, data)
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(t.numel() for e in opt.slow_state.values() for t in e.values()) == copies * n_params
    assert len(opt.slow_state) == len(list(model.parameters()))
    assert [sorted(s) for s in opt.optimizer.state.values()] == [sorted(s) for s in bare.state.values()]


def test_fp16_slow_weights_keep_steps_that_fp16_would_round_away():
    # x in fp16 near 1024 has spacing 1; each step moves it by +1; alpha = 0.25,
    # tau = 1: z <- z + 0.25 (x - z) accumulates in float32, never in float16.
    p = nn.Parameter(torch.full((1,), 1024.0, dtype=torch.float16))
    opt = Lookahead(torch.optim.SGD([p], lr=1.0), tau=1, alpha=0.25)
    z_ref = 1024.0
    for _ in range(6):
        p.grad = torch.full_like(p, -1.0)
        opt.step()
        x_inner = float(torch.tensor(z_ref, dtype=torch.float16)) + 1.0
        z_ref = z_ref + 0.25 * (x_inner - z_ref)
        assert opt.slow_state[p]["slow_param"].item() == z_ref
        assert p.item() == float(torch.tensor(z_ref, dtype=torch.float16))
    assert z_ref > 1024.5 and p.item() == 1025.0  # float16 slow weights would still be 1024


def test_slow_weights_follow_parameters_that_change_dtype_after_construction():
    # Module.to(dtype or device) keeps the Parameter objects and swaps their data;
    # the slow weights (and snapshots) are checked at the next sync and follow.
    model = mlp()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5), tau=2, pullback="pullback")
    train(model, opt, batches(1))
    model.double()
    for p in model.parameters():
        p.grad = None
    opt.optimizer.state.clear()  # the inner buffers are float32; start them afresh
    train(model, opt, batches(1, dtype=torch.float64))  # step 2: a sync
    for p in model.parameters():
        entry = opt.slow_state[p]
        assert entry["slow_param"].dtype == torch.float64 and torch.equal(entry["slow_param"], p)
        assert entry["momentum_snapshot"].dtype == torch.float64
    model.half()
    with opt.slow_weights():
        pass
    assert all(opt.slow_state[p]["slow_param"].dtype == torch.float32 for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_slow_weights_follow_model_to_cuda():
    model = mlp()
    opt = Lookahead(sgd(model.parameters()), tau=2)
    model.cuda()
    data = [(X.cuda(), Y.cuda()) for X, Y in batches(2)]
    train(model, opt, data)
    for p in model.parameters():
        assert opt.slow_state[p]["slow_param"].device == p.device


# ------------------------------------------- 5. groups, grads, closure, copies


def test_reset_slow_weights_and_groups_added_to_the_inner_optimizer_directly():
    model = mlp()
    opt = Lookahead(sgd(model[0].parameters()), tau=2)
    pretrained = mlp(seed=7)
    model.load_state_dict(pretrained.state_dict())  # new weights after the wrapper was built
    opt.reset_slow_weights()
    opt.optimizer.add_param_group({"params": list(model[2].parameters())})  # bypasses the wrapper
    slow = opt.state_dict()["lookahead"]["slow_params"]  # created when next needed
    assert_bitwise([slow[i] for i in range(4)], params_of(pretrained))


def test_add_param_group_gets_slow_weights_and_is_synced():
    model = mlp()
    first, second = model[0], model[2]
    opt = Lookahead(sgd(first.parameters()), tau=2)
    train(model, opt, batches(1))
    start = params_of(second)
    opt.add_param_group({"params": second.parameters(), "lr": 0.2})
    assert opt.param_groups[1]["lr"] == 0.2 and opt.optimizer.param_groups[1]["lr"] == 0.2
    for p, s in zip(second.parameters(), start):
        assert torch.equal(opt.slow_state[p]["slow_param"], s)
    train(model, opt, batches(1, seed=3))  # step 2: a sync
    for p, s in zip(second.parameters(), start):
        z = opt.slow_state[p]["slow_param"]
        assert torch.equal(z, p) and not torch.equal(z, s)
    assert sorted(opt.state_dict()["lookahead"]["slow_params"]) == [0, 1, 2, 3]


def test_zero_grad_and_closure():
    model = mlp()
    opt = Lookahead(sgd(model.parameters()), tau=2)
    X, Y = batches(1)[0]
    loss_of(model, X, Y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())

    def closure():
        opt.zero_grad()
        loss = loss_of(model, X, Y)
        loss.backward()
        return loss

    expected = loss_of(model, X, Y).item()
    assert opt.step(closure).item() == expected
    assert opt.step_count == 1


def test_deepcopy_and_pickle_are_independent():
    data = batches(5)
    model = mlp()
    opt = Lookahead(sgd(model.parameters()), tau=3, pullback="pullback")
    torch.optim.lr_scheduler.StepLR(opt, step_size=2)  # puts a wrapped step on the instance
    train(model, opt, data[:2])
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.step_count == 2 and clone.tau == 3 and clone.pullback == "pullback"
        clone_params = [p for g in clone.param_groups for p in g["params"]]
        assert all(p in clone.slow_state and p in clone.state for p in clone_params)
        assert_bitwise(clone_params, list(model.parameters()))
        for p in clone_params:  # a step on the clone moves only the clone
            p.grad = torch.ones_like(p)
        before = params_of(model)
        clone.step()
        assert clone.step_count == 3
        assert opt.step_count == 2
        assert_bitwise(params_of(model), before)
    ref_model = mlp()
    ref_opt = Lookahead(sgd(ref_model.parameters()), tau=3, pullback="pullback")
    train(ref_model, ref_opt, data)
    train(model, opt, data[2:])  # the original still works
    assert_bitwise(params_of(model), params_of(ref_model))


# ----------------------------------------------------------- 6. GradScaler


def test_grad_scaler_skipped_step_does_not_advance_the_counter():
    data = batches(7)
    model = mlp()
    opt = Lookahead(sgd(model.parameters()), tau=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for k, (X, Y) in enumerate(data):
        opt.zero_grad()
        loss = loss_of(model, X, Y)
        if k == 2:
            loss = loss * float("inf")  # inf gradients: the scaler skips optimizer.step
        before = params_of(model)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if k == 2:
            assert opt.step_count == 2 and scaler.get_scale() == 2.0**7
            assert_bitwise(params_of(model), before)
    assert opt.step_count == 6

    ref_model = mlp()  # the same run without the skipped batch (power-of-two scales are exact)
    expected = reference_run(ref_model, sgd(ref_model.parameters()), data[:2] + data[3:], 3, 0.5)
    assert_bitwise(params_of(model), expected)


# ---------------------------------------------- 7. schedule and degenerate cases


def test_first_sync_after_exactly_tau_steps_anchored_at_the_start():
    tau, alpha = 4, 0.3
    model = mlp()
    start = params_of(model)
    opt = Lookahead(sgd(model.parameters()), tau=tau, alpha=alpha)
    for p, s in zip(model.parameters(), start):
        assert torch.equal(opt.slow_state[p]["slow_param"], s)
    data = batches(tau)
    train(model, opt, data[: tau - 1])
    for p, s in zip(model.parameters(), start):
        assert torch.equal(opt.slow_state[p]["slow_param"], s) and not torch.equal(p, s)
    inner_x = {}
    handle = opt.optimizer.register_step_post_hook(
        lambda o, a, k: inner_x.update({id(p): p.detach().clone() for p in model.parameters()})
    )
    train(model, opt, data[tau - 1 :])
    handle.remove()
    for p, s in zip(model.parameters(), start):
        z = opt.slow_state[p]["slow_param"]
        assert torch.equal(z, torch.lerp(s, inner_x[id(p)], alpha))
        assert torch.equal(p, z)


@pytest.mark.parametrize("inner_name", ["sgd", "adam"])
def test_alpha_one_is_the_inner_optimizer_alone_bitwise(inner_name):
    data = batches(12)
    model, bare_model = mlp(), mlp()
    train(model, Lookahead(INNER[inner_name](model.parameters()), tau=3, alpha=1.0), data)
    train(bare_model, INNER[inner_name](bare_model.parameters()), data)
    assert_bitwise(params_of(model), params_of(bare_model))


def test_tau_one_mixes_every_step():
    data = batches(5)
    model, ref_model = mlp(), mlp()
    opt = Lookahead(adam(model.parameters()), tau=1, alpha=0.5)
    for X, Y in data:
        opt.zero_grad()
        loss_of(model, X, Y).backward()
        opt.step()
        for p in model.parameters():
            assert torch.equal(opt.slow_state[p]["slow_param"], p)
    assert_bitwise(params_of(model), reference_run(ref_model, adam(ref_model.parameters()), data, 1, 0.5))


def test_gradient_accumulation_and_clipping_count_optimizer_steps():
    data, tau = batches(7), 3
    model, ref_model = mlp(), mlp()
    opt = Lookahead(sgd(model.parameters(), lr=0.2), tau=tau, alpha=0.4)
    for X, Y in data:
        opt.zero_grad()
        for part in range(2):  # two micro-batches, one step
            loss_of(model, X[part::2], Y[part::2]).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
    assert opt.step_count == 7
    expected = reference_run(ref_model, sgd(ref_model.parameters(), lr=0.2), data, tau, 0.4, accumulate=2, clip=0.05)
    assert_bitwise(params_of(model), expected)


@pytest.mark.skipif(
    not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")),
    reason="torch.compile's CPU backend needs a C++ compiler",
)
def test_torch_compile_of_step_matches_eager():
    # Inductor rounds SGD's update differently from eager (1 ulp even for bare SGD),
    # so the comparison is to the float64 tolerance, not bitwise.
    def run(compiled):
        model = mlp(dtype=torch.float64)
        opt = Lookahead(sgd(model.parameters()), tau=2, alpha=0.5)
        step = torch.compile(opt.step) if compiled else opt.step
        for X, Y in batches(5, dtype=torch.float64):
            opt.zero_grad()
            loss_of(model, X, Y).backward()
            step()
        return params_of(model), opt.step_count

    torch._dynamo.reset()
    (eager, n_eager), (compiled, n_compiled) = run(False), run(True)
    assert n_eager == n_compiled == 5
    assert_close(compiled, eager, 1e-12)


# ------------------------------------------------------- 8. first moments


def _moments(opt, key):
    return {id(p): opt.optimizer.state[p][key].clone() for p in opt.optimizer.state}


@pytest.mark.parametrize("inner_name, key", [("sgd", "momentum_buffer"), ("adam", "exp_avg")])
@pytest.mark.parametrize("pullback", ["none", "reset", "pullback"])
def test_first_moment_policy_at_a_sync(inner_name, key, pullback):
    tau, alpha = 2, 0.3
    model = mlp()
    opt = Lookahead(INNER[inner_name](model.parameters()), tau=tau, alpha=alpha, pullback=pullback)
    seen = {}
    opt.optimizer.register_step_post_hook(
        lambda o, a, k: seen.update(
            m=_moments(opt, key),
            v=_moments(opt, "exp_avg_sq") if inner_name == "adam" else {},
            step=_moments(opt, "step") if inner_name == "adam" else {},
        )
    )
    snapshot = {id(p): torch.zeros_like(p) for p in model.parameters()}
    for k, (X, Y) in enumerate(batches(6)):
        opt.zero_grad()
        loss_of(model, X, Y).backward()
        opt.step()
        synced = (k + 1) % tau == 0
        for p in model.parameters():
            m, before = opt.state[p][key], seen["m"][id(p)]
            if not synced or pullback == "none":
                assert torch.equal(m, before)
            elif pullback == "reset":
                assert not m.any()
            else:
                expected = alpha * before + (1 - alpha) * snapshot[id(p)]
                torch.testing.assert_close(m, expected, rtol=1e-6, atol=1e-7)
                s = opt.slow_state[p]["momentum_snapshot"]
                assert torch.equal(s, m) and s.data_ptr() != m.data_ptr()
                snapshot[id(p)] = m.clone()
            if pullback == "pullback" and not synced:  # the snapshot never follows the live buffer
                assert torch.equal(opt.slow_state[p]["momentum_snapshot"], snapshot[id(p)])
            if inner_name == "adam":  # second moments and step counts are never touched
                assert torch.equal(opt.state[p]["exp_avg_sq"], seen["v"][id(p)])
                assert torch.equal(opt.state[p]["step"], seen["step"][id(p)])


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1), "SGD param group 0 has momentum=0"),
        (lambda ps: torch.optim.Adagrad(ps, lr=0.1), "Adagrad has none"),
    ],
)
@pytest.mark.parametrize("pullback", ["reset", "pullback"])
def test_pullback_needs_a_first_moment_buffer(make, name, pullback):
    with pytest.raises(ConfigError, match=name):
        Lookahead(make(mlp().parameters()), pullback=pullback)
    Lookahead(make(mlp().parameters()), pullback="none")  # fine without


def test_add_param_group_without_momentum_is_refused_for_pullback():
    model = mlp()
    opt = Lookahead(sgd(model[0].parameters()), pullback="reset")
    with pytest.raises(ConfigError, match="momentum=0"):
        opt.add_param_group({"params": model[2].parameters(), "momentum": 0})
    assert len(opt.param_groups) == 1


def test_frozen_and_gradless_parameters_are_synced_and_stay_bitwise_unchanged():
    model = mlp()
    extra = nn.Parameter(torch.randn(3))  # in the optimizer, never used: grad stays None
    model[0].weight.requires_grad_(False)
    frozen_start, extra_start = model[0].weight.detach().clone(), extra.detach().clone()
    params = list(model.parameters()) + [extra]
    opt = Lookahead(torch.optim.Adam(params, lr=0.1), tau=2, alpha=0.3, pullback="pullback")
    train(model, opt, batches(6))
    assert extra.grad is None and model[0].weight.grad is None
    for p, start in ((model[0].weight, frozen_start), (extra, extra_start)):
        assert torch.equal(p, start) and torch.equal(opt.slow_state[p]["slow_param"], start)
        assert p not in opt.state  # the inner optimizer never saw them


# ------------------------------------------------------ 9. evaluation context


def test_slow_weights_context_swaps_in_z_and_restores_x_bitwise():
    model = mlp()
    model.half()
    model[0].float()  # mixed float16 / float32 parameters
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), tau=4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()  # mid-cycle: x != z
    fast = params_of(model)
    with opt.slow_weights():
        for p in model.parameters():
            z = opt.slow_state[p]["slow_param"]
            assert torch.equal(p, z.to(p.dtype))
    assert_bitwise(params_of(model), fast)
    with pytest.raises(RuntimeError, match="boom"):
        with opt.slow_weights():
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(3)
            raise RuntimeError("boom")
    assert_bitwise(params_of(model), fast)


# -------------------------------------- 10. Algorithm 1 as a nested loop (float64)


def _net(w, X):
    return torch.tanh(X @ w[0].T + w[1]) @ w[2].T + w[3]


def _grad(w, X, Y):
    w = [t.detach().requires_grad_(True) for t in w]
    ((_net(w, X) - Y) ** 2).mean().backward()
    return [t.grad for t in w]


def _sgd_base(lr=0.05, mu=0.9):
    bufs = {}

    def step(x, g):
        for i, (xi, gi) in enumerate(zip(x, g)):
            bufs[i] = gi.clone() if i not in bufs else mu * bufs[i] + gi
            x[i] = xi - lr * bufs[i]

    return step


def _adam_base(lr=0.01, b1=0.9, b2=0.999, eps=1e-8):
    m, v, t = {}, {}, [0]

    def step(x, g):
        t[0] += 1
        for i, (xi, gi) in enumerate(zip(x, g)):
            m[i] = (1 - b1) * gi + (b1 * m[i] if i in m else 0)
            v[i] = (1 - b2) * gi * gi + (b2 * v[i] if i in v else 0)
            m_hat, v_hat = m[i] / (1 - b1 ** t[0]), v[i] / (1 - b2 ** t[0])
            x[i] = xi - lr * m_hat / (v_hat.sqrt() + eps)

    return step


@pytest.mark.parametrize("inner_name, base", [("sgd", _sgd_base), ("adam", _adam_base)])
def test_matches_algorithm_1_nested_loop_in_float64(inner_name, base):
    tau, alpha, T, extra = 4, 0.6, 5, 2
    data = batches(T * tau + extra, dtype=torch.float64)
    model = mlp(dtype=torch.float64)
    z = [p.detach().clone() for p in model.parameters()]
    opt = Lookahead(INNER[inner_name](model.parameters()), tau=tau, alpha=alpha)
    train(model, opt, data)

    base_step, k = base(), 0
    for t in range(T + 1):
        x = list(z)  # line 2: x_{t,0} <- z_{t-1}
        inner_steps = tau if t < T else extra
        for _ in range(inner_steps):  # lines 3-5
            base_step(x, _grad(x, *data[k]))
            k += 1
        if t < T:  # line 6: z_t = z_{t-1} + alpha (x_{t,tau} - x_{t,0})
            z = [zi + alpha * (xi - zi) for zi, xi in zip(z, x)]
    assert k == len(data)
    assert_close(params_of(model), x, 1e-12)
    assert_close([opt.slow_state[p]["slow_param"] for p in model.parameters()], z, 1e-12)


# ------------------------------------------------------- 11. multi-tensor path


def test_foreach_and_per_tensor_paths_agree_in_float64():
    data = batches(9, dtype=torch.float64)
    results = []
    for foreach in (None, True, False):
        model = mlp(dtype=torch.float64)
        opt = Lookahead(adam(model.parameters()), tau=2, alpha=0.4, pullback="pullback", foreach=foreach)
        train(model, opt, data)
        results.append(params_of(model) + [opt.state[p]["exp_avg"].clone() for p in model.parameters()])
    assert_close(results[1], results[2], 1e-12)
    assert_close(results[0], results[2], 1e-12)


def test_sync_groups_mixed_devices_and_dtypes():
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float64, torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.float32]
    fast = [torch.randn(5, generator=g).to(dt) for dt in dtypes]
    slow = [torch.randn(5, generator=g).to(slow_dtype(dt)) for dt in dtypes]
    out = {}
    for foreach in (True, False):
        x, z = [t.clone() for t in fast], [t.clone() for t in slow]
        lookahead_sync_(x, z, 0.3, foreach=foreach)
        out[foreach] = (x, z)
        for xi, zi, x0, z0 in zip(x, z, fast, slow):
            expected = z0.double() + 0.3 * (x0.double() - z0.double())
            assert zi.dtype == z0.dtype and xi.dtype == x0.dtype
            torch.testing.assert_close(zi.double(), expected, rtol=1e-6, atol=1e-6)
            assert torch.equal(xi, zi.to(xi.dtype))
    assert_bitwise(out[True][0] + out[True][1], out[False][0] + out[False][1])
