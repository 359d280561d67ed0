"""model.memory: bit-packed spike inputs and block recomputation give exactly the default
mode's spikes, logits, gradients and BatchNorm statistics, while keeping less for the backward."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from fullrange.config import ConfigError, load_config
from fullrange.models import build_model
from fullrange.models.memory import (MEMORY_MODES, SpikeConv2d, pack_spikes, residual_blocks, set_memory,
                                     spike_convs, unpack_spikes)
from fullrange.models.spiking_preact_resnet import SpikingPreActResNet
from fullrange.models.spiking_resnet import SpikingResNet


def _spikes(shape, generator, dtype=torch.float32):
    return (torch.rand(shape, generator=generator) < 0.3).to(dtype)


@pytest.mark.parametrize("shape", [(3, 5, 7, 2), (13,), (2, 8), (4, 3, 5, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pack_matches_numpy_packbits_and_round_trips(shape, dtype):
    g = torch.Generator().manual_seed(len(shape))
    x = _spikes(shape, g, dtype)
    bits, meta = pack_spikes(x)
    expected = np.packbits(x.to(torch.float32).numpy().reshape(-1).astype(np.uint8), bitorder="little")
    assert bits.dtype == torch.uint8 and bits.numel() == -(-x.numel() // 8)
    assert np.array_equal(bits.numpy(), expected)
    back = unpack_spikes(bits, meta)
    assert back.dtype == dtype and back.shape == x.shape and torch.equal(back, x)


def test_pack_keeps_channels_last_layout():
    g = torch.Generator().manual_seed(1)
    x = _spikes((2, 3, 4, 5), g).contiguous(memory_format=torch.channels_last)
    bits, meta = pack_spikes(x)
    nhwc = x.permute(0, 2, 3, 1).numpy().reshape(-1).astype(np.uint8)
    assert np.array_equal(bits.numpy(), np.packbits(nhwc, bitorder="little"))
    back = unpack_spikes(bits, meta)
    assert torch.equal(back, x) and back.is_contiguous(memory_format=torch.channels_last)


def _small_models(reset):
    neuron = {"reset": reset, "decay": 0.5 if reset == "hard" else 0.2}
    torch.manual_seed(0)
    cifar = SpikingResNet((1, 2), (8, 16), 5, in_channels=3, stem_channels=8, hidden=12, neuron=neuron)
    torch.manual_seed(0)
    preact = SpikingPreActResNet((1, 1), (8, 16), 5, in_channels=3, neuron=neuron)
    return {"cifar": cifar, "preact": preact}


def _step(model, x, T, autocast=False):
    """Forward + backward of a fixed linear functional of the logits -> (logits, grads, buffers)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, T)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out.float() * weights).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    return out.detach(), grads, buffers


def _assert_same(a, b, exact=True):
    out_a, grads_a, buf_a = a
    out_b, grads_b, buf_b = b
    assert torch.equal(out_a, out_b)
    for k in grads_a:
        if exact and not k.startswith("fc."):  # fc: packed linear uses the mm formulas (last bits)
            assert torch.equal(grads_a[k], grads_b[k]), k
        else:
            torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in buf_a:
        assert torch.equal(buf_a[k], buf_b[k]), k


@pytest.mark.parametrize("reset", ["hard", "soft"])
@pytest.mark.parametrize("family", ["cifar", "preact"])
@pytest.mark.parametrize("mode, blocks", [("spikes_1bit", 0), ("checkpoint", 0), ("spikes_1bit", 1)])
def test_mode_equals_default_in_training(reset, family, mode, blocks):
    base = _small_models(reset)[family].train()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2
    ref = _step(copy.deepcopy(base), x, 3)
    got = _step(set_memory(copy.deepcopy(base), mode, recompute_blocks=blocks), x, 3)
    assert ref[1]["conv1.weight"].abs().sum() > 0  # gradients reach the stem
    _assert_same(ref, got)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("mode, blocks", [("spikes_1bit", 0), ("checkpoint", 0), ("spikes_1bit", 2)])
def test_mode_equals_default_in_channels_last(mode, blocks, autocast):
    torch.manual_seed(0)
    base = build_model("spiking_resnet_tiny", 10, 1).train().to(memory_format=torch.channels_last)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3)).contiguous(
        memory_format=torch.channels_last)
    ref = _step(copy.deepcopy(base), x, 2, autocast=autocast)
    got = _step(set_memory(copy.deepcopy(base), mode, recompute_blocks=blocks), x, 2, autocast=autocast)
    assert ref[0].dtype == (torch.bfloat16 if autocast else torch.float32)
    _assert_same(ref, got)


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_eval_and_inference_are_unchanged(mode):
    base = _small_models("hard")["cifar"].eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    model = set_memory(copy.deepcopy(base), mode)
    with torch.no_grad():
        assert torch.equal(model(x, 4), base(x, 4))
    assert _step(model, x, 4)[0].shape == (4, 2, 5)  # eval mode with autograd runs too


def _saved_bytes(model, x, T=None):
    """Bytes of the unique non-parameter storages autograd saves in model(x, T) (model(x) if T is None)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x) if T is None else model(x, T)
    return sum(n for ptr, n in storages.items() if ptr not in params)


def test_spike_conv_saves_its_input_as_bits():
    conv = SpikeConv2d(4, 6, 3, padding=1, bias=False)
    x = _spikes((5, 4, 9, 9), torch.Generator().manual_seed(5)).requires_grad_()
    conv.pack_input = False
    assert _saved_bytes(conv, x) == x.numel() * 4
    conv.pack_input = True
    assert _saved_bytes(conv, x) == -(-x.numel() // 8)


@pytest.mark.parametrize("kernel, stride, size", [(1, 2, 14), (1, 2, 7), (1, 3, 10), (3, 2, 9)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_spike_conv_input_gradient_equals_autograds(kernel, stride, size, layout):
    """SpikeConv2d's own backward (a strided 1x1 conv: the pointwise path in every mode; any conv
    when packing) against nn.Conv2d under autograd: the same output, input and weight
    gradients (to float rounding), in the input's layout; odd sizes and stride 3 included."""
    torch.manual_seed(0)
    ref = nn.Conv2d(6, 5, kernel, stride=stride, padding=kernel // 2, bias=True)
    conv = SpikeConv2d(6, 5, kernel, stride=stride, padding=kernel // 2, bias=True)
    conv.load_state_dict(ref.state_dict())
    x = _spikes((4, 6, size, size), torch.Generator().manual_seed(3)).contiguous(memory_format=layout)
    grad = torch.randn(ref(x).shape, generator=torch.Generator().manual_seed(4))
    xr = x.clone().requires_grad_()
    out_ref = ref(xr)
    out_ref.backward(grad)
    for pack in (False, True):
        conv.pack_input = pack
        conv.zero_grad()
        xs = x.clone().requires_grad_()
        out = conv(xs)
        assert ("SpikeInputConv" in out.grad_fn.name()) == (pack or kernel == 1)
        out.backward(grad)
        assert torch.equal(out, out_ref)
        assert xs.grad.is_contiguous(memory_format=layout)
        torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(conv.bias.grad, ref.bias.grad, rtol=1e-6, atol=1e-6)
        if kernel == 1:  # only the pixels on the stride's grid are read: the rest get exact zeros
            assert torch.count_nonzero(xs.grad) <= xs.grad[:, :, ::stride, ::stride].numel()


@pytest.mark.parametrize("stride, size", [(2, 14), (2, 9), (3, 10)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_block_input_convs_equal_autograds(stride, size, layout, precision):
    """spike_convs runs a block's first conv (3x3) and its downsample (1x1, strided) on one spike
    input as one autograd node that builds x's gradient in one tensor (the downsample's added
    onto its stride's grid). Against the two nn.Conv2d under autograd, which sum two
    input-sized gradients: the same outputs, input and weight gradients, in the input's layout,
    packed or not, under bf16 autocast too (whose input gradient autograd sums in fp32)."""
    torch.manual_seed(0)
    refs = (nn.Conv2d(6, 5, 3, stride=stride, padding=1, bias=False), nn.Conv2d(6, 5, 1, stride=stride, bias=True))
    convs = (SpikeConv2d(6, 5, 3, stride=stride, padding=1, bias=False), SpikeConv2d(6, 5, 1, stride=stride, bias=True))
    for conv, ref in zip(convs, refs):
        conv.load_state_dict(ref.state_dict())
    x = _spikes((4, 6, size, size), torch.Generator().manual_seed(3)).contiguous(memory_format=layout)
    out_shape = refs[0](x).shape
    grads = [torch.randn(out_shape, generator=torch.Generator().manual_seed(4 + i)) for i in range(2)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    xr = x.clone().requires_grad_()
    with autocast:  # a non-leaf input, as in a model (autocast caches the cast of a leaf only)
        outs_ref = [ref(xr * 1) for ref in refs]
    torch.autograd.backward(outs_ref, grads)
    assert xr.grad.dtype == torch.float32
    for pack in (False, True):
        for conv in convs:
            conv.pack_input = pack
            conv.zero_grad()
        xs = x.clone().requires_grad_()
        with autocast:
            outs = spike_convs(xs * 1, convs)
        assert outs[0].grad_fn is outs[1].grad_fn and "SpikeInputConvs" in outs[0].grad_fn.name()
        torch.autograd.backward(outs, grads)
        for out, out_ref in zip(outs, outs_ref):
            assert out.dtype == out_ref.dtype and torch.equal(out, out_ref)
        assert xs.grad.dtype == torch.float32 and xs.grad.is_contiguous(memory_format=layout)
        torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-6, atol=1e-6)
        for conv, ref in zip(convs, refs):
            torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(convs[1].bias.grad, refs[1].bias.grad, rtol=1e-6, atol=1e-6)
    convs[0].pack_input = False
    with pytest.raises(ValueError, match="must all pack it"):
        spike_convs(x.clone().requires_grad_(), convs)


def test_checkpoint_keeps_only_block_inputs():
    torch.manual_seed(0)
    base = build_model("spiking_resnet_tiny", 10, 1).train()
    x = torch.rand(8, 1, 28, 28)
    default = _saved_bytes(base, x, 4)
    one_bit = _saved_bytes(set_memory(copy.deepcopy(base), "spikes_1bit"), x, 4)
    ckpt = _saved_bytes(set_memory(copy.deepcopy(base), "checkpoint"), x, 4)
    # checkpoint: the stem's input (the image [B, 1, 28, 28]: the stem runs once) in fp32, the three
    # blocks' spike inputs [T*B, ...] as bits, the pooled features the classifier reads (fp32)
    rows = 4 * 8
    expected = 8 * 28 * 28 * 4 + rows * ((16 * 28 * 28 + 16 * 14 * 14 + 32 * 7 * 7) // 8 + 64 * 4)
    assert ckpt == expected
    assert one_bit < 0.8 * default and ckpt < 0.05 * default
    # the first block recomputed: it no longer keeps its three convolution outputs at 14x14 (fp32)
    # nor its second conv's input bits; its own input's bits it keeps (shared with spikes_1bit's
    # copy, one storage); the stem and the other blocks keep what spikes_1bit keeps
    mixed_model = set_memory(copy.deepcopy(base), "spikes_1bit", recompute_blocks=1)
    assert [b.memory for b in residual_blocks(mixed_model)] == ["checkpoint", "spikes_1bit", "spikes_1bit"]
    assert not any(c.pack_input for c in mixed_model.layer1.modules() if isinstance(c, SpikeConv2d))
    mixed = _saved_bytes(mixed_model, x, 4)
    assert mixed == one_bit - rows * (3 * 16 * 14 * 14 * 4 + 16 * 14 * 14 // 8)


def test_recompute_blocks_needs_spikes_1bit_and_enough_blocks():
    model = build_model("spiking_resnet_tiny", 10, 1)
    for mode, n in (("checkpoint", 1), ("default", 2), ("spikes_1bit", 4)):
        with pytest.raises(ValueError, match="model.recompute_blocks"):
            set_memory(model, mode, recompute_blocks=n)
    base = ["model.memory=spikes_1bit", "loss.kind=ce"]
    assert load_config(None, [*base, "model.recompute_blocks=3"]).model.recompute_blocks == 3
    with pytest.raises(ConfigError, match="spiking_resnet_tiny has 3 residual blocks, got 4"):
        load_config(None, [*base, "model.recompute_blocks=4"])
    with pytest.raises(ConfigError, match="model.recompute_blocks: recomputes blocks of a model.memory=spikes_1bit"):
        load_config(None, ["loss.kind=ce", "model.recompute_blocks=1"])


def test_set_memory_refuses_ann_and_unknown_mode():
    with pytest.raises(ValueError, match="model.memory"):
        set_memory(build_model("resnet_tiny", 10, 1), "checkpoint")
    with pytest.raises(ValueError, match="model.memory must be one of"):
        set_memory(build_model("spiking_resnet_tiny", 10, 1), "half")
    with pytest.raises(ConfigError, match="model.memory"):
        load_config(None, ["model.name=resnet_tiny", "loss.kind=ce", "model.memory=checkpoint"])
    with pytest.raises(ConfigError, match="model.memory"):
        load_config(None, ["model.memory=bits"])


def test_run_config_builds_the_student_in_its_memory_mode_and_compiled():
    from types import SimpleNamespace

    from rich.console import Console

    from fullrange.engine import build_model_for

    acc = SimpleNamespace(num_processes=1, device=torch.device("cpu"), distributed_type="NO", is_main_process=True)
    cfg = load_config(None, ["loss.kind=ce", "model.memory=checkpoint", "model.compile=true"])
    model = build_model_for(cfg, acc, Console(quiet=True))
    assert model.memory == "checkpoint" and all(b.memory == "checkpoint" for b in model.layer1)
    assert model._compiled_call_impl is not None  # nn.Module.compile: compiled on first call
    assert list(model.state_dict()) == list(build_model("spiking_resnet_tiny", 10, 1).state_dict())
    assert model.stem_once  # the default
    per_step = build_model_for(load_config(None, ["loss.kind=ce", "model.stem_once=false"]), acc, Console(quiet=True))
    assert per_step.stem_once is False
