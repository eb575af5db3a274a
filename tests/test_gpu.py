"""CUDA checks: the local path, flat buffers and Lookahead on one GPU (skipped without CUDA).

* Every shipped topology with all its agents on the one rank of a 1-rank NCCL
  group, one CUDA float64 model per agent, equals the CPU float64 reference to
  1e-10 (the same check as tests/test_local_placement.py, on another device).
* Decentralized on a CUDA model keeps its flat buffers (and the slow agent's
  copy) on the GPU; two agents on one rank is serial Lookahead.
* Lookahead's slow weights follow the model to the GPU.
"""

import copy

import pytest
import torch

from lookahead_dist.testing.local_placement import SHIPPED, TOL, one_rank_group, run_all_on_one_rank

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda", 0)
LR, MOMENTUM, TAU, ALPHA = 0.05, 0.9, 5, 0.5


@pytest.fixture(scope="module")
def nccl_group():
    with one_rank_group("nccl"):
        yield CUDA


@pytest.mark.parametrize("name", SHIPPED)
def test_all_agents_on_one_gpu_equal_reference(nccl_group, name):
    worst = run_all_on_one_rank(name, nccl_group)
    assert worst <= TOL, f"{name}: largest deviation from the reference {worst:.3g}"


@pytest.mark.parametrize("name", SHIPPED)
def test_all_agents_on_one_gpu_overlapped_equal_reference_in_combine_then_adapt_order(nccl_group, name):
    worst = run_all_on_one_rank(name, nccl_group, overlap=True)
    assert worst <= TOL, f"{name}: largest deviation from the combine-then-adapt reference {worst:.3g}"


def _problem():
    from lookahead_dist.reference.problems import tiny_regression

    return tiny_regression(1, seed=3)


def _train(model, opt, prob, steps, device):
    for k in range(steps):
        opt.zero_grad()
        inputs, targets = prob.data_fn(0, k)
        torch.nn.functional.mse_loss(model(inputs.to(device)), targets.to(device)).backward()
        opt.step()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()


def test_decentralized_flat_buffers_live_on_cuda_and_two_agents_equal_lookahead(nccl_group):
    from lookahead_dist.comm import Comm
    from lookahead_dist.decentralized import Decentralized
    from lookahead_dist.lookahead import Lookahead

    prob = _problem()
    steps = 3 * TAU + 2
    model = copy.deepcopy(prob.module).to(CUDA)
    mapping = {
        "generator": {"type": "two_agent", "alpha": ALPHA, "tau": TAU},
        "roles": ["fast", "slow"],
        "placement": [0, 0],
    }
    comm = Comm(heartbeat=0)
    try:
        opt = Decentralized(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), model, mapping, comm=comm)
        for bufs in opt.engine.agents.values():
            assert all(b.device == CUDA for b in bufs)
        buf = opt.flat.params[0].buffer
        assert all(
            buf.data_ptr() <= p.data_ptr() < buf.data_ptr() + buf.numel() * buf.element_size()
            for p in model.parameters()
        )
        _train(model, opt, prob, steps, CUDA)
    finally:
        comm.close()

    serial = copy.deepcopy(prob.module)
    la = Lookahead(torch.optim.SGD(serial.parameters(), lr=LR, momentum=MOMENTUM), tau=TAU, alpha=ALPHA)
    _train(serial, la, prob, steps, torch.device("cpu"))
    ref = _flat(serial)
    assert float((_flat(model) - ref).abs().max()) / max(1.0, float(ref.abs().max())) <= TOL


def test_lookahead_slow_weights_move_with_the_model_to_cuda():
    from lookahead_dist.lookahead import Lookahead

    prob = _problem()
    steps = 2 * TAU + 1
    on_gpu = copy.deepcopy(prob.module)
    opt = Lookahead(torch.optim.SGD(on_gpu.parameters(), lr=LR, momentum=MOMENTUM), tau=TAU, alpha=ALPHA)
    on_gpu.to(CUDA)  # after the wrapper was built: the slow weights were made on the CPU
    _train(on_gpu, opt, prob, steps, CUDA)
    for p in on_gpu.parameters():
        z = opt.slow_state[p]["slow_param"]
        assert z.device == p.device == CUDA and z.dtype == p.dtype
    with opt.slow_weights():
        slow = _flat(on_gpu)

    on_cpu = copy.deepcopy(prob.module)
    ref_opt = Lookahead(torch.optim.SGD(on_cpu.parameters(), lr=LR, momentum=MOMENTUM), tau=TAU, alpha=ALPHA)
    _train(on_cpu, ref_opt, prob, steps, torch.device("cpu"))
    with ref_opt.slow_weights():
        ref_slow = _flat(on_cpu)
    ref = _flat(on_cpu)
    assert float((_flat(on_gpu) - ref).abs().max()) / max(1.0, float(ref.abs().max())) <= TOL
    assert float((slow - ref_slow).abs().max()) / max(1.0, float(ref_slow.abs().max())) <= TOL
    state = opt.state_dict()  # the checkpoint holds the slow weights where they now live
    assert all(t.device == CUDA for t in state["lookahead"]["slow_params"].values())
