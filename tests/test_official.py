"""The students against independent compositions of PAPER.md's architectures, on fixed weights
given in the official code's key layout and loaded through fullrange.models.official.

The references below are written from PAPER.md ("Architectures") with functional ops and the
test LIF reference; they share nothing with fullrange.models but the key names of the official
checkpoints, which they read directly."""
import pytest
import torch
import torch.nn.functional as F

from fullrange.models import build_model
from fullrange.models.official import convert_official, load_official
from fullrange.neuron import lif_reference

CIFAR_NEURON = {"decay": 0.5, "reset": "hard", "backend": "torch"}
IMAGENET_NEURON = {"decay": 0.2, "reset": "soft", "backend": "torch"}


class Weights:
    """A random state_dict in the official layout, built entry by entry."""

    def __init__(self, seed, dtype):
        self.g = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.state = {}

    def _randn(self, *shape, scale=1.0):
        return (torch.randn(*shape, generator=self.g, dtype=torch.float64) * scale).to(self.dtype)

    def conv(self, name, cin, cout, k, bias=False):
        self.state[f"{name}.weight"] = self._randn(cout, cin, k, k, scale=(2.0 / (cin * k * k)) ** 0.5)
        if bias:
            self.state[f"{name}.bias"] = self._randn(cout, scale=0.3)

    def bn(self, name, c):
        self.state[f"{name}.weight"] = 1 + self._randn(c, scale=0.2)
        self.state[f"{name}.bias"] = self._randn(c, scale=0.2)
        self.state[f"{name}.running_mean"] = self._randn(c, scale=0.3)
        self.state[f"{name}.running_var"] = (0.5 + torch.rand(c, generator=self.g, dtype=torch.float64)).to(self.dtype)
        self.state[f"{name}.num_batches_tracked"] = torch.tensor(7)

    def linear(self, name, cin, cout):
        self.state[f"{name}.weight"] = self._randn(cout, cin, scale=cin ** -0.5)
        self.state[f"{name}.bias"] = self._randn(cout, scale=0.1)


def stages(blocks, widths, first_stride):
    """(stage index, block index, in width, out width, stride) of every block."""
    cin = widths[0]
    for i, (n, w) in enumerate(zip(blocks, widths)):
        for j in range(n):
            yield i + 1, j, cin, w, (first_stride[i] if j == 0 else 1)
            cin = w


PREACT = dict(blocks=(3, 4, 6, 3), widths=(64, 128, 256, 512), first_stride=(1, 2, 2, 2))
R19 = dict(blocks=(3, 3, 2), widths=(128, 256, 512), first_stride=(1, 2, 2))


def official_preact34(num_classes, seed, dtype, container=False):
    """Official preact_resnet34 weights: every conv has a bias (each feeds a BN)."""
    w = Weights(seed, dtype)
    w.conv("conv1", 3, 64, 7, bias=True)
    w.bn("bn1", 64)
    for k, j, cin, cout, stride in stages(**PREACT):
        p = f"layer{k}.{j}"
        for n, (a, b) in enumerate(((cin, cout), (cout, cout)), start=1):
            conv, bn = (f"{p}.conv{n}.0", f"{p}.conv{n}.1") if container else (f"{p}.conv{n}", f"{p}.bn{n}")
            w.conv(conv, a, b, 3, bias=True)
            w.bn(bn, b)
        if stride != 1 or cin != cout:
            w.conv(f"{p}.downsample.0", cin, cout, 1, bias=True)
            w.bn(f"{p}.downsample.1", cout)
    w.linear("fc", 512, num_classes)
    return w.state


def official_resnet19(num_classes, seed, dtype):
    w = Weights(seed, dtype)
    w.conv("conv0.0", 3, 128, 3)
    w.bn("conv0.1", 128)
    for k, j, cin, cout, stride in stages(**R19):
        p = f"layer{k}.{j}"
        w.conv(f"{p}.conv1", cin, cout, 3)
        w.bn(f"{p}.bn1", cout)
        w.conv(f"{p}.conv2", cout, cout, 3)
        w.bn(f"{p}.bn2", cout)
        if stride != 1 or cin != cout:
            w.conv(f"{p}.shortcut.0", cin, cout, 1)
            w.bn(f"{p}.shortcut.1", cout)
    w.linear("classifier.0", 512, 256)
    w.linear("classifier.2", 256, num_classes)
    return w.state


class Reference:
    """PAPER.md's forward as functional ops on [T*B, ...] tensors, reading the official keys."""

    def __init__(self, state, T, neuron, training):
        self.s = {k: v.clone() for k, v in state.items()}  # BN running stats update in place
        self.T, self.neuron, self.training = T, neuron, training

    def conv(self, x, name, stride=1, padding=0):
        return F.conv2d(x, self.s[f"{name}.weight"], self.s.get(f"{name}.bias"), stride, padding)

    def bn(self, x, name):
        s = self.s
        return F.batch_norm(x, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"],
                            s[f"{name}.bias"], self.training, 0.1, 1e-5)

    def lif(self, x):
        spikes, _, _ = lif_reference(x.reshape(self.T, -1, *x.shape[1:]), self.neuron["decay"], 1.0,
                                     self.neuron["reset"], 4.0, False)
        return spikes.reshape(x.shape)

    def linear(self, x, name):
        return F.linear(x, self.s[f"{name}.weight"], self.s[f"{name}.bias"])

    def preact34(self, img, container=False):
        x = img.unsqueeze(0).expand(self.T, *img.shape).reshape(-1, *img.shape[1:])
        x = F.max_pool2d(self.bn(self.conv(x, "conv1", 2, 3), "bn1"), 3, 2, 1)
        for k, j, cin, cout, stride in stages(**PREACT):
            p = f"layer{k}.{j}"
            names = [(f"{p}.conv{n}.0", f"{p}.conv{n}.1") if container else (f"{p}.conv{n}", f"{p}.bn{n}")
                     for n in (1, 2)]
            out = self.bn(self.conv(self.lif(x), names[0][0], stride, 1), names[0][1])
            out = self.bn(self.conv(self.lif(out), names[1][0], 1, 1), names[1][1])
            if stride != 1 or cin != cout:
                x = self.bn(self.conv(x, f"{p}.downsample.0", stride), f"{p}.downsample.1")
            x = out + x  # the residual stream stays real-valued
        x = self.linear(x.mean((2, 3)), "fc")  # GAP -> fc, no neuron before the pooling
        return x.view(self.T, -1, x.shape[-1])

    def resnet19(self, img):
        x = img.unsqueeze(0).expand(self.T, *img.shape).reshape(-1, *img.shape[1:])
        x = self.lif(self.bn(self.conv(x, "conv0.0", 1, 1), "conv0.1"))
        for k, j, cin, cout, stride in stages(**R19):
            p = f"layer{k}.{j}"
            out = self.lif(self.bn(self.conv(x, f"{p}.conv1", stride, 1), f"{p}.bn1"))
            out = self.bn(self.conv(out, f"{p}.conv2", 1, 1), f"{p}.bn2")
            if stride != 1 or cin != cout:
                x = self.bn(self.conv(x, f"{p}.shortcut.0", stride), f"{p}.shortcut.1")
            x = self.lif(out + x)
        x = self.lif(self.linear(x.mean((2, 3)), "classifier.0"))
        x = self.linear(x, "classifier.2")
        return x.view(self.T, -1, x.shape[-1])


@pytest.mark.parametrize("container", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_preact_resnet34_is_the_official_architecture(container, training):
    """float64, so that folding the conv biases into running_mean (a different rounding) cannot
    flip a spike; the logits then agree to 1e-9, in eval mode (running statistics) and in training
    mode (batch statistics), and the running means keep tracking running_mean - bias."""
    T, num_classes = 2, 10
    official = official_preact34(num_classes, seed=1, dtype=torch.float64, container=container)
    model = build_model("spiking_preact_resnet34", num_classes, 3, IMAGENET_NEURON).double()
    model.load_state_dict(convert_official({"best_net": official, "best_acc": 70.0}, "spiking_preact_resnet34",
                                           model))
    model.train(training)
    img = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    ref = Reference(official, T, IMAGENET_NEURON, training)
    want = ref.preact34(img, container)
    with torch.no_grad():
        got = model(img, T)
    assert got.shape == (T, 2, num_classes)
    assert want.abs().max() > 0.1 and (want[0] != want[1]).any()  # a non-trivial network
    assert torch.allclose(got, want, rtol=0, atol=1e-9), (got - want).abs().max()
    bias, mean = ("layer2.0.conv1.0.bias", "layer2.0.conv1.1.running_mean") if container else \
        ("layer2.0.conv1.bias", "layer2.0.bn1.running_mean")
    assert torch.allclose(model.layer2[0].bn1.running_mean, ref.s[mean] - ref.s[bias], rtol=0, atol=1e-12)


def test_resnet19_matches_the_official_layout_bit_for_bit():
    """With model.stem_once false (the official op order: the stem on the T copies of the image)
    bit for bit; with the default stem_once (the stem once per image: BatchNorm's statistics
    over B instead of T*B rows round differently) to 1e-5."""
    T, num_classes = 2, 10
    official = official_resnet19(num_classes, seed=3, dtype=torch.float32)
    model = build_model("spiking_resnet19_cifar", num_classes, 3, CIFAR_NEURON)
    model.load_state_dict(convert_official({f"module.{k}": v for k, v in official.items()},
                                           "spiking_resnet19_cifar", model))
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2
    for training in (False, True):
        want = Reference(official, T, CIFAR_NEURON, training).resnet19(img)
        assert want.abs().max() > 0.1
        for stem_once in (False, True):
            model.train(training)
            model.stem_once = stem_once
            with torch.no_grad():
                got = model(img, T)
            if stem_once:
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            else:
                assert torch.equal(got, want), (training, (got - want).abs().max())


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("stem_once", [False, True])
def test_resnet19_gradients_match_the_official_layout(backend, stem_once):
    """One training step's gradients against autograd through the reference (float64, channels_last,
    the CPU LIF kernel or the torch backend): the student's own backward paths (the strided
    blocks' first conv and downsample as one node, the pool, the stem LIF on a constant input)
    give the weights the reference's gradients, mapped back through the official key layout."""
    T, num_classes = 2, 10
    official = official_resnet19(num_classes, seed=3, dtype=torch.float64)
    neuron = {**CIFAR_NEURON, "backend": backend}
    model = build_model("spiking_resnet19_cifar", num_classes, 3, neuron).double()
    model.load_state_dict(convert_official(official, "spiking_resnet19_cifar", model))
    model = model.to(memory_format=torch.channels_last).train()
    model.stem_once = stem_once
    g = torch.Generator().manual_seed(4)
    img = (torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64) * 2).contiguous(memory_format=torch.channels_last)
    weights = torch.randn(T, 2, num_classes, generator=g, dtype=torch.float64)
    (model(img, T) * weights).sum().backward()
    ref = Reference(official, T, neuron, training=True)
    params = [k for k in ref.s if k.endswith((".weight", ".bias"))]
    for k in params:
        ref.s[k].requires_grad_()
    (ref.resnet19(img.contiguous()) * weights).sum().backward()
    want = convert_official({k: ref.s[k].grad if k in params else v for k, v in ref.s.items()},
                            "spiking_resnet19_cifar", model)
    grads = dict(model.named_parameters())
    assert grads["layer2.0.downsample.0.weight"].grad.abs().max() > 1e-3  # gradient reaches the strided blocks
    for key, p in grads.items():
        torch.testing.assert_close(p.grad, want[key], rtol=1e-9, atol=1e-11, msg=key)


def test_converter_rejects_other_layouts(tmp_path):
    model = build_model("spiking_resnet19_cifar", 10, 3, CIFAR_NEURON)
    official = official_resnet19(10, seed=0, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        convert_official({**official, "extra.weight": torch.zeros(1)}, "spiking_resnet19_cifar", model)
    with pytest.raises(ValueError, match="classifier.2"):
        convert_official({"best_net": official}, "spiking_resnet18_cifar",
                         build_model("spiking_resnet18_cifar", 10, 3, CIFAR_NEURON))
    with pytest.raises(ValueError, match="known: "):
        convert_official(official, "spiking_resnet_tiny", model)
    path = tmp_path / "model_weights.pth"
    torch.save({"best_net": official, "best_epoch": 3}, path)
    loaded = load_official(path, "spiking_resnet19_cifar", model)
    assert torch.equal(loaded.fc.weight, official["classifier.2.weight"])
