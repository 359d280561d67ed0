"""CUDA-only checks (`pytest -m gpu`; skipped without CUDA, never run in CI). scripts/gpu_check.sh
runs them with the GPU benchmarks in one command.

- the Triton LIF against the torch backend in fp32 / bf16 / fp16, and its first-use check;
- a bf16 DDP step (nccl, SyncBatchNorm) of every recipe's model at a small size;
- the teacher cache build, a student from it and the sweep on CUDA against the same on the CPU;
- the FFCV -> device path against a CPU decode of the same views, with the GPU lagging behind;
- model.compile (torch.compile of the student, Triton LIF inside) against eager;
- every memory mode (model.memory, and spikes_1bit with model.recompute_blocks) against default
  under bf16 autocast, channels_last;
- the fused Triton BN+LIF (model.fuse_bn_lif) against the modules unfused, fp32 and bf16;
- model.stem_once (the stem LIF on a constant input) against the per-step stem.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, free_port, launcher_env, student_overrides
from fullrange.neuron import lif_reference

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
LOW_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reset, decay", [("hard", 0.5), ("soft", 0.2)])
def test_triton_matches_torch_backend(dtype, reset, decay):
    from fullrange.kernels.lif import lif_multistep_triton
    from fullrange.neuron import _triton_unusable

    assert _triton_unusable(CUDA) is None  # compiled, and passed its first-use check
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 64, 57, generator=g) * 0.8 + 0.6).to(CUDA, dtype)
    grad = torch.randn(x.shape, generator=g).to(CUDA, dtype)
    xk = x.clone().requires_grad_()
    spikes = lif_multistep_triton(xk, decay, 1.0, reset, 4.0, False)
    spikes.backward(grad)
    xr = x.float().requires_grad_()
    ref, _, _ = lif_reference(xr, decay, 1.0, reset, 4.0, False)
    ref.backward(grad.float())
    assert spikes.dtype == dtype and torch.equal(spikes.float(), ref)
    scale = max(1.0, xr.grad.abs().max().item())
    assert (xk.grad.float() - xr.grad).abs().max().item() <= LOW_TOL[dtype] * scale


def test_torch_compile_around_lif():
    from fullrange.models import build_model

    import copy

    torch.manual_seed(0)
    model = build_model("spiking_resnet_tiny", 10, 1, {"backend": "triton"}).to(CUDA)
    twin = copy.deepcopy(model)
    twin.compile()  # model.compile: true
    x = torch.randn(8, 1, 28, 28, device=CUDA)
    eager, compiled = model(x, 4), twin(x, 4)
    assert torch.allclose(eager, compiled, rtol=1e-4, atol=1e-4)
    eager.sum().backward()
    compiled.sum().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mode, blocks", [("spikes_1bit", 0), ("checkpoint", 0), ("spikes_1bit", 2)])
def test_memory_modes_equal_default_on_cuda(mode, blocks):
    import copy

    from fullrange.models import build_model
    from fullrange.models.memory import set_memory

    torch.manual_seed(0)
    base = build_model("spiking_resnet19_cifar", 10, 3).to(CUDA).to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    results = []
    for model in (copy.deepcopy(base), set_memory(copy.deepcopy(base), mode, recompute_blocks=blocks)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, 4)
        (out.float() * torch.linspace(-1, 1, out.numel(), device=CUDA).view_as(out)).sum().backward()
        results.append((out.detach(), [p.grad for p in model.parameters()], list(model.buffers())))
    (o0, g0, b0), (o1, g1, b1) = results
    assert torch.equal(o0, o1)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(g0, g1))
    assert all(torch.equal(a, b) for a, b in zip(b0, b1))


def test_stem_once_on_cuda():
    """model.stem_once on CUDA: the stem LIF on a constant input (MergedLIF.forward_constant /
    constant_input_grad, Triton on the expanded input) equals the LIF on the repeat, fp32
    channels_last (spikes exactly, gradients to 1e-5); and ResNet-19 with the stem once equals
    the per-step stem in float64 (logits, gradients, running statistics to 1e-9)."""
    import copy

    from fullrange.models import build_model
    from fullrange.models.layers import MergedLIF, repeat_time

    lif = MergedLIF(decay=0.5, reset="hard")
    y = (torch.randn(8, 16, 12, 12, device=CUDA) + 0.6).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4 * 8, 16, 12, 12, device=CUDA)
    yr = y.clone().requires_grad_()
    spikes = lif(repeat_time(yr, 4), 4)
    spikes.backward(grad)
    assert torch.equal(lif.forward_constant(y, 4), spikes.detach())
    torch.testing.assert_close(lif.constant_input_grad(y, grad, 4), yr.grad, rtol=0, atol=1e-5)

    torch.manual_seed(0)
    base = build_model("spiking_resnet19_cifar", 10, 3).to(CUDA, torch.float64).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32, device=CUDA, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    results = []
    for once in (False, True):
        model = copy.deepcopy(base)
        model.stem_once = once
        out = model(x, 3)
        (out * torch.linspace(-1, 1, out.numel(), device=CUDA, dtype=torch.float64).view_as(out)).sum().backward()
        results.append((out.detach(), [p.grad for p in model.parameters()], [b.double() for b in model.buffers()]))
    (o0, g0, b0), (o1, g1, b1) = results
    torch.testing.assert_close(o1, o0, rtol=0, atol=1e-9)
    for a, b in zip(g0 + b0, g1 + b1):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_bn_lif_triton_equals_modules_on_cuda(dtype, monkeypatch):
    """A ResNet-19 training step with the fused Triton BN+LIF (model.fuse_bn_lif) against the
    modules unfused, fp32 and bf16 autocast, channels_last: logits, gradients, BN buffers."""
    import copy

    import fullrange.kernels.bn_lif as fused_kernel
    from fullrange.models import build_model
    from fullrange.models.layers import _triton_fused_unusable
    from fullrange.models.memory import set_fusion

    assert _triton_fused_unusable(CUDA) is None
    calls = []
    real = fused_kernel.bn_lif_triton
    monkeypatch.setattr(fused_kernel, "bn_lif_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    base = build_model("spiking_resnet19_cifar", 10, 3).to(CUDA).to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    results = []
    for fuse in (True, False):
        model = set_fusion(copy.deepcopy(base), fuse)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = model(x, 4)
        (out.float() * torch.linspace(-1, 1, out.numel(), device=CUDA).view_as(out)).sum().backward()
        results.append((out.detach().float(), [p.grad for p in model.parameters()], list(model.buffers())))
    assert calls, "the fused Triton kernel did not run"
    (o0, g0, b0), (o1, g1, b1) = results

    def rel(a, b):  # bf16: the modules round BN's output to bf16, the kernel keeps it in fp32
        return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()

    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert rel(o0, o1) < tol
    assert max(rel(a, b) for a, b in zip(g0, g1)) < 10 * tol
    assert max(rel(a, b) for a, b in zip(b0, b1) if b.is_floating_point()) < 1e-3


DDP_STEP = r"""
import os, sys, torch, torch.distributed as dist
from torch import nn
from fullrange.config import load_config
from fullrange.evaluate import logits_over_time
from fullrange.losses import student_loss
from fullrange.models import build_model
from fullrange.optim import build_optimizer
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
for name, size in (("fmnist", 28), ("cifar100_r19", 32), ("imagenet_r34", 64)):
    cfg = load_config(os.path.join(sys.argv[1], "configs", name + ".yaml"))
    model = nn.SyncBatchNorm.convert_sync_batchnorm(
        build_model(cfg.model.name, cfg.model.num_classes, cfg.model.in_channels, vars(cfg.neuron))).cuda()
    model = nn.parallel.DistributedDataParallel(model.to(memory_format=torch.channels_last))
    opt = build_optimizer(model, cfg.optim)
    x = torch.randn(4, cfg.model.in_channels, size, size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.model.num_classes, (4,), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        z = logits_over_time(model, x, cfg.model.T, True)
        c = cfg.loss
        loss, _ = student_loss(c.kind, z, y, torch.randn(4, cfg.model.num_classes, device="cuda"), c.alpha, c.beta,
                               c.tau, 'ensemble')
    loss.backward()
    opt.step()
    bn = next(m for m in model.modules() if isinstance(m, nn.SyncBatchNorm))
    assert torch.isfinite(loss) and bn.running_mean.dtype == torch.float32, name
    print("STEP", name, float(loss))
dist.destroy_process_group()
"""


def test_bf16_ddp_step_of_every_recipe(tmp_path):
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_STEP)
    done = subprocess.run([sys.executable, str(script), str(REPO), str(free_port())], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split()[1] for line in done.stdout.splitlines() if line.startswith("STEP")] == \
        ["fmnist", "cifar100_r19", "imagenet_r34"]


def _launch(script, args, cpu, precision="bf16"):
    cmd = [str(REPO / ".venv" / "bin" / "accelerate") if (REPO / ".venv").exists() else "accelerate", "launch",
           "--num_processes", "1", "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no"]
    cmd += ["--cpu"] if cpu else []
    env = launcher_env(ACCELERATE_USE_CPU="true" if cpu else None)
    return subprocess.run(cmd + [str(REPO / "launcher" / script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cache_student_and_sweep_on_cuda(tmp_path, tiny_data, teacher_file):
    pytest.importorskip("ffcv")
    config = str(REPO / "configs" / "fmnist.yaml")
    results = {}
    for where in ("cuda", "cpu"):
        cache = tmp_path / f"cache_{where}"
        over = student_overrides(tiny_data, teacher_file, tmp_path, name=f"run_{where}", **{
            "teacher.source": "cache", "teacher.cache_dir": str(cache), "data.channels_last": "false"})
        precision = "bf16" if where == "cuda" else "no"
        for script, args in (("cache_teacher.py", [config, *over]), ("train.py", [config, *over]),
                             ("sweep.py", [str(tmp_path / f"run_{where}")])):
            done = _launch(script, args, cpu=where == "cpu", precision=precision)
            assert done.returncode == 0, (where, script, done.stderr[-3000:])
        results[where] = json.loads((tmp_path / f"run_{where}" / "sweep.json").read_text())[f"run_{where}"]
        env = json.loads((tmp_path / f"run_{where}" / "environment.json").read_text())
        assert env["device"].startswith(where) and env["mixed_precision"] == precision
    assert results["cuda"]["total"] == results["cpu"]["total"] == 101
    # the same recipe in bf16 on the GPU and fp32 on the CPU: close, not equal
    assert abs(results["cuda"]["top1"][-1] - results["cpu"]["top1"][-1]) < 10


def test_ffcv_device_path_matches_cpu_decode(tmp_path):
    pytest.importorskip("ffcv")
    from fullrange.data import ViewSpec, device_batches, train_loader, write_imagefolder
    from photos import write_photo_tree

    write_photo_tree(tmp_path / "src", {"train": 16, "val": 2}, min_side=64, max_side=300, seed=0)
    out = write_imagefolder(tmp_path / "src", tmp_path / "out", max_resolution=256, num_workers=4, progress=False)
    spec = ViewSpec(seed=3, image_size=96)

    def views(device, lag):
        loader = train_loader(out["train"], 8, 4, spec, distributed=False, drop_last=False, batches_ahead=2)
        loader.set_epoch(1)
        got = {}
        for batch in device_batches(loader, device, loader.epoch_view):
            if lag:
                torch.cuda._sleep(20_000_000)  # the GPU falls behind: the host must not refill a slot in use
            img = batch.images.float() * 1  # a kernel reading the copy after the lag
            for i, k in enumerate(batch.host_indices.tolist()):
                got[k] = img[i]
        return {k: v.cpu() for k, v in got.items()}

    cpu, cuda = views(torch.device("cpu"), False), views(CUDA, True)
    assert sorted(cpu) == sorted(cuda) and len(cpu) == 16 * len(os.listdir(tmp_path / "src" / "train"))
    assert all(torch.equal(cpu[k], cuda[k]) for k in cpu)
