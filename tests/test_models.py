"""Models: registry, shapes over run-time T, eval-mode causality, training step, torchvision key
names and parameter counts computed by hand from the architectures."""
import copy

import pytest
import torch
from torch import nn

from fullrange.models import MODEL_NAMES, build_model, is_spiking
from fullrange.neuron import LIF

NEURON = {"decay": 0.5, "threshold": 1.0, "reset": "hard", "surrogate_alpha": 4.0,
          "detach_reset": False, "backend": "torch"}
# (in_channels, image size) small enough for a fast CPU test
INPUT = {
    "spiking_resnet18_cifar": (3, 16), "spiking_resnet19_cifar": (3, 16),
    "spiking_resnet_tiny": (1, 28), "spiking_preact_resnet34": (3, 32),
    "resnet18": (3, 64), "resnet34": (3, 64), "resnet18_cifar": (3, 16),
    "resnet34_cifar": (3, 16), "resnet_tiny": (1, 28),
}
SPIKING = [n for n in MODEL_NAMES if is_spiking(n)]
ANN = [n for n in MODEL_NAMES if not is_spiking(n)]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def image(name, batch=2, seed=0):
    c, size = INPUT[name]
    return torch.randn(batch, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2


def warmed_up(model, x, T):
    """Non-trivial BatchNorm running statistics, then eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x, T)
    return model.eval()


def test_registry():
    assert set(INPUT) == set(MODEL_NAMES)
    assert set(SPIKING) == {"spiking_resnet18_cifar", "spiking_resnet19_cifar",
                            "spiking_resnet_tiny", "spiking_preact_resnet34"}
    with pytest.raises(ValueError, match="resnet_tiny"):  # the message lists the known names
        build_model("resnet_99", 10)
    with pytest.raises(ValueError, match="known"):
        is_spiking("nope")
    with pytest.raises(ValueError, match="tau"):
        build_model("spiking_resnet_tiny", 10, 1, {"tau": 2.0})
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet_tiny", 0, 1)
    with pytest.raises(ValueError, match="reset"):
        build_model("spiking_resnet_tiny", 10, 1, {"reset": "medium"})


@pytest.mark.parametrize("name", ANN)
def test_ann_builds_and_runs(name):
    torch.manual_seed(0)
    model = build_model(name, 7, INPUT[name][0], neuron={"decay": 0.1})  # neuron ignored
    out = model(image(name))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", SPIKING)
def test_student_shapes_causality_and_backward(name):
    torch.manual_seed(0)
    model = build_model(name, 7, INPUT[name][0], {**NEURON, "decay": 0.8, "threshold": 0.5})
    x = image(name)
    for T in (1, 3):  # T is a run-time argument of one module
        assert model(x, T).shape == (T, 2, 7)

    model = warmed_up(model, x, 3)
    with torch.no_grad():
        long, short = model(x, 6), model(x, 3)
    torch.testing.assert_close(long[:3], short, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(long[0], long[-1])  # the state really evolves over time

    model.train()
    out = model(x, 2)
    nn.functional.cross_entropy(out.mean(0), torch.tensor([1, 2])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.fc.weight.grad.abs().sum() > 0 and model.conv1.weight.grad.abs().sum() > 0


def test_neuron_kwargs_reach_every_lif():
    model = build_model("spiking_resnet19_cifar", 10, 3, {"decay": 0.3, "reset": "soft"})
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    assert len(lifs) == 1 + 2 * (3 + 3 + 2) + 1  # stem, two per block, hidden head
    assert all(m.decay == 0.3 and m.reset == "soft" and m.threshold == 1.0 for m in lifs)
    preact = build_model("spiking_preact_resnet34", 10)  # ImageNet recipe by default
    lifs = [m for m in preact.modules() if isinstance(m, LIF)]
    assert len(lifs) == 2 * (3 + 4 + 6 + 3)  # two per block; none in the stem or before the pooling
    assert all(m.decay == 0.2 and m.reset == "soft" for m in lifs)


def test_event_input_and_channels_last():
    torch.manual_seed(0)
    x = image("spiking_resnet_tiny")
    model = warmed_up(build_model("spiking_resnet_tiny", 10, 1, NEURON), x, 3)
    with torch.no_grad():
        ref = model(x, 3)
        events = x.unsqueeze(0).expand(3, *x.shape)  # [T, B, C, H, W]
        torch.testing.assert_close(model(events), ref, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="T=4"):
            model(events, 4)
        with pytest.raises(ValueError, match="T"):
            model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.to(memory_format=torch.channels_last), 3)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def count_macs(model, x, T=None):
    """Multiply-accumulates of convs and linears per image (per timestep for students)."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
        else:
            k = mod.in_features
        total[0] += out.numel() * k

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x, T) if T else model(x)
    for h in hooks:
        h.remove()
    return total[0] / (x.shape[0] * (T or 1))


def test_tiny_models_are_cheap():
    x = torch.zeros(1, 1, 28, 28)
    snn, ann = build_model("spiking_resnet_tiny", 10, 1), build_model("resnet_tiny", 10, 1)
    macs = count_macs(snn, x, 1)
    assert macs == count_macs(ann, x)
    # stem 16@28x28; blocks 16@14x14 (s2), 32@7x7 (s2), 64@7x7 (s1), each with a 1x1 shortcut
    by_hand = (9 * 1 * 16 * 784
               + 9 * 16 * 16 * 196 + 9 * 16 * 16 * 196 + 16 * 16 * 196
               + 9 * 16 * 32 * 49 + 9 * 32 * 32 * 49 + 16 * 32 * 49
               + 9 * 32 * 64 * 49 + 9 * 64 * 64 * 49 + 32 * 64 * 49
               + 64 * 10)
    assert macs == by_hand and macs <= 6e6


# ----------------------------------------------------------------------------- torchvision
def torchvision_resnet_keys(stage_blocks, num_classes=1000):
    """state_dict keys and shapes of torchvision's BasicBlock ResNet (ImageNet stem)."""
    def bn(prefix, c):
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}

    keys = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    cin = 64
    for i, (n, c) in enumerate(zip(stage_blocks, (64, 128, 256, 512))):
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            keys[f"{p}.conv1.weight"] = (c, cin if j == 0 else c, 3, 3)
            keys.update(bn(f"{p}.bn1", c))
            keys[f"{p}.conv2.weight"] = (c, c, 3, 3)
            keys.update(bn(f"{p}.bn2", c))
            if j == 0 and i > 0:
                keys[f"{p}.downsample.0.weight"] = (c, cin, 1, 1)
                keys.update(bn(f"{p}.downsample.1", c))
        cin = c
    keys["fc.weight"], keys["fc.bias"] = (num_classes, 512), (num_classes,)
    return keys


@pytest.mark.parametrize("name, stages", [("resnet34", (3, 4, 6, 3)), ("resnet18", (2, 2, 2, 2))])
def test_teacher_matches_torchvision_state_dict(name, stages):
    sd = build_model(name, 1000).state_dict()
    expected = torchvision_resnet_keys(stages)
    assert list(sd) == list(expected)  # same names, same order
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # a torchvision-format file loads strictly
    build_model(name, 1000).load_state_dict({k: torch.zeros(s) if s else torch.tensor(0)
                                             for k, s in expected.items()})


def test_cifar_teacher_keys():
    sd = build_model("resnet34_cifar", 100).state_dict()
    expected = torchvision_resnet_keys((3, 4, 6, 3), 100)
    expected["conv1.weight"] = (64, 3, 3, 3)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


# ----------------------------------------------------------------------------- parameter counts
def conv(cin, cout, k):
    return cin * cout * k * k


def bn(c):
    return 2 * c


def basic_blocks(cin, widths, stages):
    """Params of BasicBlock stages (stride/shape change -> 1x1 conv + BN shortcut)."""
    total = 0
    for c, n in zip(widths, stages):
        for j in range(n):
            total += conv(cin, c, 3) + bn(c) + conv(c, c, 3) + bn(c)
            if cin != c or (j == 0 and c != widths[0]):
                total += conv(cin, c, 1) + bn(c)
            cin = c
    return total


def test_param_counts_by_hand():
    # torchvision resnet34 / resnet18 with 1000 classes: 21,797,672 / 11,689,512 parameters
    r34 = conv(3, 64, 7) + bn(64) + basic_blocks(64, (64, 128, 256, 512), (3, 4, 6, 3)) \
        + 512 * 1000 + 1000
    assert r34 == 21_797_672 == n_params(build_model("resnet34", 1000))
    assert n_params(build_model("resnet18", 1000)) == 11_689_512

    # ResNet-19: stem 3x3x3->128 + BN, stages 128/256/512 x [3,3,2], Linear(512,256), Linear(256,C)
    r19 = conv(3, 128, 3) + bn(128) + basic_blocks(128, (128, 256, 512), (3, 3, 2)) \
        + 512 * 256 + 256 + 256 * 100 + 100
    assert r19 == 12_721_124 == n_params(build_model("spiking_resnet19_cifar", 100))

    # CIFAR ResNet-18 (10 classes): the well-known 11,173,962
    assert n_params(build_model("spiking_resnet18_cifar", 10)) == 11_173_962 \
        == n_params(build_model("resnet18_cifar", 10))

    # pre-activation ResNet-34: torchvision resnet34 + the stem conv bias (64)
    assert n_params(build_model("spiking_preact_resnet34", 1000)) == 21_797_672 + 64


def _train_steps(model, x, T, steps=2):
    """Two training forwards + backwards (grads accumulate), then one eval forward."""
    model.train()
    for _ in range(steps):
        model(x, T).square().mean().backward()
    with torch.no_grad():
        return model.eval()(x, T)


_STEM_ONCE_VARIANTS = [(0.1, "auto"), (None, "auto"), (0.1, "torch")]


@pytest.mark.parametrize("name, T, momentum, backend", [
    *[("spiking_resnet_tiny", 4, *v) for v in _STEM_ONCE_VARIANTS],
    *[("spiking_preact_resnet34", 2, *v) for v in _STEM_ONCE_VARIANTS],
    ("spiking_resnet19_cifar", 3, 0.1, "auto"),  # its stem is the tiny one's, 10 s a variant in float64
])
def test_stem_once_equals_the_stem_on_every_copy(name, T, momentum, backend):
    """model.stem_once runs the stem on the image instead of its T copies. In float64 (no spike
    near enough to the threshold for rounding to flip it) it gives the per-step stem's logits,
    gradients and running statistics (BatchNorm's unbiased variance over T*B*H*W samples, one
    num_batches_tracked per batch, momentum=None's cumulative average too) to 1e-10, in
    channels_last as well; and its stem convolution sees B rows, not T*B. The stem LIF's
    constant-input path runs on the CPU kernel ("auto") and on the torch backend."""
    torch.manual_seed(0)
    per_step = build_model(name, 10, INPUT[name][0], {**NEURON, "backend": backend}).double()
    for m in per_step.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    per_step.stem_once = False
    once = copy.deepcopy(per_step)
    once.stem_once = True
    x = image(name, batch=3).double()
    rows = []
    once.conv1.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    for layout in (torch.contiguous_format, torch.channels_last):
        a, b = (copy.deepcopy(m).to(memory_format=layout) for m in (per_step, once))
        xl = x.contiguous(memory_format=layout)
        torch.testing.assert_close(_train_steps(b, xl, T), _train_steps(a, xl, T), rtol=0, atol=1e-10)
        for (key, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-9, atol=1e-10, msg=key)
        for (key, sa), sb in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(sb, sa, rtol=1e-12, atol=1e-12, msg=key)
        assert a.layer1[0].conv1.weight.grad.abs().max() > 0  # a non-trivial network
    assert rows and set(rows) == {3}
    # events [T, B, ...] differ per step: their stem runs per step
    with torch.no_grad():
        events = x.unsqueeze(0).expand(T, *x.shape).contiguous()
        torch.testing.assert_close(once.train()(events), per_step.train()(events), rtol=0, atol=1e-10)
    assert rows[-1] == T * 3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_global_avg_pool_equals_adaptive_avg_pool(layout, dtype, device):
    """The students' pool: nn.AdaptiveAvgPool2d(1)'s output and input gradient bit for bit, the
    gradient written in the input's layout (one pass; ATen's is NCHW, copied again by a
    channels_last consumer). Without autograd, and on a 3-d input, it is the module itself."""
    from fullrange.models.layers import GlobalAvgPool

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 7, 3, generator=g).to(device, dtype).contiguous(memory_format=layout)
    grad = torch.randn(6, 5, 1, 1, generator=g).to(device, dtype)
    outs, grads = [], []
    for pool in (nn.AdaptiveAvgPool2d(1), GlobalAvgPool()):
        xi = x.clone().requires_grad_() * 1  # a non-leaf input, as in a student
        out = pool(xi)
        outs.append(out)
        grads.append(torch.autograd.grad(out, xi, grad)[0])
    assert "GlobalAvgPool" in outs[1].grad_fn.name()
    assert torch.equal(outs[1], outs[0]) and torch.equal(grads[1], grads[0])
    assert grads[1].is_contiguous(memory_format=layout)
    with torch.no_grad():
        assert torch.equal(GlobalAvgPool()(x), nn.AdaptiveAvgPool2d(1)(x))
    assert torch.equal(GlobalAvgPool()(x[0]), nn.AdaptiveAvgPool2d(1)(x[0]))
    assert GlobalAvgPool().state_dict() == {}
