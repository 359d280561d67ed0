"""fullrange.optim.MemoryOrderSGD and GuardedStep against torch.optim.SGD: the same weights and
momentum after several steps, in torch's state_dict layout, without the fused kernel's copies
of channels_last weights; a step with a non-finite gradient leaves everything untouched."""
import copy

import pytest
import torch
from torch import nn

from fullrange.config import OptimConfig
from fullrange.optim import GuardedStep, MemoryOrderSGD, build_optimizer, param_groups


class _NoScaler:
    scaler = None


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, bias=False), nn.Flatten(),
                         nn.Linear(16 * 8 * 8, 5))  # for a 12 x 12 input


def _grads(model, step):
    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        grad = torch.randn(p.shape, generator=g)
        layout = p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
        p.grad = grad.contiguous(memory_format=torch.channels_last) if layout else grad


@pytest.mark.parametrize("nesterov, fused", [(False, True), (True, True), (False, False)])
def test_memory_order_sgd_equals_torch_sgd(nesterov, fused):
    base = _net()
    ours = copy.deepcopy(base).to(memory_format=torch.channels_last)
    theirs = copy.deepcopy(base)
    cfg = OptimConfig(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=5e-4)
    opt_ours = build_optimizer(ours, cfg, fused=fused)
    opt_theirs = torch.optim.SGD(param_groups(theirs, 5e-4), lr=0.1, momentum=0.9, nesterov=nesterov, fused=fused)
    assert isinstance(opt_ours, MemoryOrderSGD)
    for step in range(3):
        _grads(ours, step)
        _grads(theirs, step)
        opt_ours.step()
        opt_theirs.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), name
        buf_a, buf_b = opt_ours.state[a]["momentum_buffer"], opt_theirs.state[b]["momentum_buffer"]
        assert buf_a.shape == a.shape and torch.equal(buf_a, buf_b), name
        if a.dim() == 4:
            assert a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
            assert buf_a.is_contiguous(memory_format=torch.channels_last)
    in_groups = [p for g in opt_ours.param_groups for p in g["params"]]  # the state_dict's order
    assert [s["momentum_buffer"].shape for s in opt_ours.state_dict()["state"].values()] == [p.shape for p in in_groups]


def test_no_copies_of_channels_last_weights():
    """torch's fused CPU SGD copies a channels_last weight to contiguous and back; this one does
    not (what it saves: BENCHMARKS.md)."""
    model = nn.Conv2d(64, 64, 3).to(memory_format=torch.channels_last)
    for opt_class in (torch.optim.SGD, MemoryOrderSGD):
        opt = opt_class(model.parameters(), lr=0.1, momentum=0.9, fused=True)
        _grads(model, 0)
        opt.step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
        names = {e.key for e in prof.key_averages()}
        assert ("aten::clone" in names) == (opt_class is torch.optim.SGD), names


def test_guarded_step_skips_a_non_finite_gradient():
    model = _net().to(memory_format=torch.channels_last)
    opt = build_optimizer(model, OptimConfig(lr=0.1, momentum=0.9))
    step = GuardedStep(_NoScaler(), opt, list(model.parameters()), 0.0)
    _grads(model, 0)
    step()
    before = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _grads(model, 1)
    model[0].weight.grad[0, 0, 0, 0] = float("nan")
    assert not torch.isfinite(step())
    after = model.state_dict(), opt.state_dict()
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]), k
    for k, v in before[1]["state"].items():
        assert torch.equal(v["momentum_buffer"], after[1]["state"][k]["momentum_buffer"]), k
    _grads(model, 2)
    assert torch.isfinite(step())
    assert not torch.equal(model[0].weight, before[0]["0.weight"])
