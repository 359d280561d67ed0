"""Teacher cache: top-k records, the views they belong to, resume, mismatch and corruption."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FAULT_LAUNCH, PYTHON, REPO, launcher_env, run_launcher, student_overrides
from fullrange.config import ConfigError, load_config
from fullrange.data import BatchPreparer, ViewSpec, device_batches, read_sidecar, train_loader, view_epoch
from fullrange.losses import full_range_loss, skd_loss
from fullrange.teacher_cache import CacheCorrupt, TeacherCache, compress_logits, rebuild_logits
from fullrange.teachers import load_teacher

CHUNK, BATCH, VIEWS = 64, 32, 2  # 256 samples -> 4 shards per view


def cache_config(tiny_data, teacher_file, cache_dir, **extra):
    """The student config a cache is built for (and read by), as overrides."""
    values = {"teacher.source": "cache", "teacher.cache_dir": str(cache_dir), "data.views": VIEWS,
              "optim.epochs": 3, **extra}
    return student_overrides(tiny_data, teacher_file, cache_dir.parent / "runs", **values)


def build(overrides, env=None, nproc=None):
    """launcher/cache_teacher.py: plain python (one process) or accelerate with nproc processes;
    with FULLRANGE_FAULT in env, through tests/fault_launch.py (tests/faults.py)."""
    args = [str(REPO / "configs/fmnist.yaml"), *overrides, "--chunk", str(CHUNK), "--batch-size", str(BATCH)]
    faulty = "FULLRANGE_FAULT" in (env or {})
    if nproc:
        if faulty:
            return run_launcher(FAULT_LAUNCH, ["cache", *args], nproc=nproc, env=env)
        return run_launcher("cache_teacher.py", args, nproc=nproc, env=env)
    script = [str(REPO / FAULT_LAUNCH), "cache"] if faulty else [str(REPO / "launcher/cache_teacher.py")]
    return subprocess.run([PYTHON, *script, *args], cwd=REPO, env=launcher_env(**(env or {})), capture_output=True,
                          text=True, timeout=600)


def shard_bytes(cache_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache_dir / "shards").glob("*.npy"))}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_data, teacher_file):
    """Two caches of the stand-in teacher: k = 10 = C (exact) and k = 3."""
    root = tmp_path_factory.mktemp("caches")
    out = {}
    for k in (10, 3):
        overrides = cache_config(tiny_data, teacher_file, root / f"k{k}", **{"teacher.topk": k})
        r = build(overrides)
        assert r.returncode == 0, r.stderr[-3000:]
        out[k] = (root / f"k{k}", overrides)
    overrides = cache_config(tiny_data, teacher_file, root / "aa", **{"data.autoaugment": "true", "data.cutout": 8})
    r = build(overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    out["autoaugment"] = (root / "aa", overrides)
    return out


def student_batch(cfg, epoch):
    """The first training batch the student sees at `epoch`: (x [B,C,H,W], y [B], indices [B], view)."""
    meta, spec = read_sidecar(cfg.data.train_path), ViewSpec.from_config(cfg)
    loader = train_loader(cfg.data.train_path, cfg.data.batch_size, 1, spec, distributed=False)
    view = view_epoch(epoch, cfg.data.views)
    loader.set_epoch(epoch, view)
    batch = next(device_batches(loader, torch.device("cpu"), loader.epoch_view))
    x, y = BatchPreparer(meta, spec).train(batch)
    return x, y, batch.host_indices, view


def test_records_hand_computed():
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    values, classes = compress_logits(z, 2)
    m = math.log((math.exp(1) + math.exp(2)) / 2)
    assert classes.tolist() == [[3, 2]]
    assert torch.allclose(values.float(), torch.tensor([[4 - m, 3 - m]]), atol=2e-3)
    p = torch.softmax(rebuild_logits(values, classes, 4), 1)[0]
    q = torch.softmax(z, 1)[0]
    rest = (q[0] + q[1]).item() / 2  # the mass outside the top 2, spread evenly
    assert torch.allclose(p, torch.tensor([rest, rest, q[2].item(), q[3].item()]), atol=1e-3)
    # k = C: the target at any temperature is the teacher's, up to fp16 rounding
    z = torch.randn(5, 7) * 4
    rebuilt = rebuild_logits(*compress_logits(z, 7), 7)
    for tau in (1.0, 3.0):
        assert torch.allclose(F.softmax(rebuilt / tau, 1), F.softmax(z / tau, 1), atol=2e-3)


@pytest.mark.parametrize("which", [10, "autoaugment"])
def test_cached_kd_loss_equals_live_teacher(caches, teacher_file, which):
    """The cache holds the teacher on exactly the views a student sees (with AutoAugment and
    Cutout too: the builder replays them)."""
    cache_dir, overrides = caches[which]
    cfg = load_config(REPO / "configs/fmnist.yaml", overrides)
    teacher = load_teacher(cfg)
    cache = TeacherCache(cache_dir)
    cache.check(cfg, read_sidecar(cfg.data.train_path))
    torch.manual_seed(0)
    for epoch in (0, 1, 2):  # epoch 2 cycles back to view 0
        x, y, idx, view = student_batch(cfg, epoch)
        with torch.no_grad():
            live = teacher(x)
        cached = cache.targets(x, idx, view)
        z = torch.randn(cfg.model.T, len(y), cfg.model.num_classes) * 3
        if which == "autoaugment":  # the augmented views are other views than the plain ones
            plain = TeacherCache(caches[10][0]).targets(x, idx, view)
            assert (cached - plain).abs().max() > 0.02  # (a random teacher: logits of size ~0.1; fp16 ~1e-4)
        for loss_fn in (lambda t: full_range_loss(z, y, t, 0.2, 0.5, 3.0)[1]["twkl"],
                        lambda t: skd_loss(z, y, t, 0.2, 3.0)[1]["kd"]):
            a, b = loss_fn(live), loss_fn(cached)
            assert abs(a - b) <= 2e-3 * abs(a), (epoch, a, b)


def test_cached_logits_belong_to_the_student_view(caches):
    cache_dir, overrides = caches[3]
    cfg = load_config(REPO / "configs/fmnist.yaml", overrides)
    teacher = load_teacher(cfg)
    cache = TeacherCache(cache_dir)
    x, y, idx, view = student_batch(cfg, 1)
    with torch.no_grad():
        live = teacher(x)
    values, classes = cache.lookup(view, idx)
    assert (classes == live.topk(3, 1).indices).all()
    want, _ = compress_logits(live, 3)
    assert torch.allclose(values.float(), want.float(), rtol=2e-3, atol=2e-3)
    # the other view of the same samples is a different crop: its records differ
    other, _ = cache.lookup(1 - view, idx)
    assert (other.float() - want.float()).abs().max() > 1e-2


def test_killed_build_resumes_to_the_same_bytes(tmp_path, tiny_data, teacher_file):
    whole = tmp_path / "two_procs"
    r = build(cache_config(tiny_data, teacher_file, whole), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = tmp_path / "killed"
    overrides = cache_config(tiny_data, teacher_file, resumed)
    r = build(overrides, env={"FULLRANGE_FAULT": "sigkill@3"})
    assert r.returncode == -9, r.stderr[-3000:]
    assert not (resumed / "manifest.json").exists() and len(shard_bytes(resumed)) == 3
    r = build(overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "5 of 8 shards to do" in r.stderr
    assert shard_bytes(resumed) == shard_bytes(whole) and len(shard_bytes(whole)) == 8
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (whole, resumed))
    assert a == b
    r = build(overrides)  # a finished cache is left alone
    assert r.returncode == 0 and "nothing to do" in r.stderr


def test_sigterm_stops_the_build_for_a_requeue(tmp_path, tiny_data, teacher_file):
    out = tmp_path / "preempted"
    overrides = cache_config(tiny_data, teacher_file, out)
    requeue = tmp_path / "requeue.json"
    r = build(overrides, env={"FULLRANGE_FAULT": "sigterm@2", "FULLRANGE_REQUEUE_FILE": str(requeue)})
    assert r.returncode == 75, r.stderr[-3000:]
    assert json.loads(requeue.read_text())["reason"] == "SIGTERM" and len(shard_bytes(out)) == 2
    r = build([*overrides, "seed=1"])  # shards of two builds never mix
    assert r.returncode == 2 and "holds a partial build of another cache (spec.views.seed: cache 0, run 1" in r.stderr
    r = build(overrides)
    assert r.returncode == 0 and (out / "manifest.json").is_file(), r.stderr[-3000:]
    r = build([*overrides, "teacher.topk=5"])  # a finished cache is never overwritten
    assert r.returncode == 2 and "already holds a finished cache" in r.stderr


@pytest.mark.parametrize("override, expected", [
    ("seed=1", "views.seed: cache 0, run 1"),
    ("data.pad=3", "views.pad: cache 2, run 3"),
    ("data.flip=false", "views.flip"),
    ("teacher.topk=5", "k: cache 10, run 5"),
    ("data.views=3", "views: cache has 2, run needs 3"),
    ("teacher.name=resnet18_cifar", "teacher.name"),
])
def test_mismatched_run_is_refused(caches, override, expected):
    cache_dir, overrides = caches[10]
    cfg = load_config(REPO / "configs/fmnist.yaml", [*overrides, override])
    with pytest.raises(ConfigError, match="does not match this run") as e:
        TeacherCache(cache_dir).check(cfg, read_sidecar(cfg.data.train_path))
    assert expected in str(e.value)


def test_other_teacher_or_data_is_refused(caches, tmp_path, tiny_data):
    cache_dir, overrides = caches[10]
    other = tmp_path / "other.pt"
    state = torch.load(overrides_value(overrides, "teacher.checkpoint"), weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, other)
    cfg = load_config(REPO / "configs/fmnist.yaml", [*overrides, f"teacher.checkpoint={other}"])
    with pytest.raises(ConfigError, match="teacher.weights_sha256"):
        TeacherCache(cache_dir).check(cfg, read_sidecar(cfg.data.train_path))
    cfg = load_config(REPO / "configs/fmnist.yaml", [*overrides, f"data.train_path={tiny_data['val']}"])
    with pytest.raises(ConfigError, match="data.fingerprint"):
        TeacherCache(cache_dir).check(cfg, read_sidecar(cfg.data.train_path))


def overrides_value(overrides, key):
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(key + "="))


def test_corrupt_or_unfinished_cache_is_refused(caches, tmp_path):
    cache_dir, _ = caches[10]
    copy = tmp_path / "copy"
    shutil.copytree(cache_dir, copy)
    shard = copy / "shards" / "view00001_chunk00002.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40
    shard.write_bytes(bytes(data))
    cache = TeacherCache(copy)
    cache.lookup(0, torch.arange(10))  # view 0 is intact
    with pytest.raises(CacheCorrupt, match="view00001_chunk00002.npy is corrupt"):
        cache.lookup(1, torch.arange(10))
    (copy / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="manifest.json not found"):
        TeacherCache(copy)


def test_student_trains_from_the_cache_like_the_live_teacher(caches, tmp_path, tiny_data, teacher_file):
    cache_dir, overrides = caches[10]
    config = str(REPO / "configs/fmnist.yaml")
    # a tiny learning rate keeps the two students together, so the KD terms differ only by the
    # cache's fp16 rounding: a wrong view or sample would show as a large difference
    common = ["max_steps_per_epoch=4", "log_every=1", f"out_dir={tmp_path}", "optim.epochs=2", "optim.lr=1e-5"]
    r = run_launcher("train.py", [config, *overrides, *common, "name=cached"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_launcher("train.py", [config, *overrides, *common, "name=live", "teacher.source=live"])
    assert r.returncode == 0, r.stderr[-3000:]
    logs = {}
    for name in ("cached", "live"):
        lines = [json.loads(s) for s in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        logs[name] = np.array([m["twkl"] for m in lines if "twkl" in m])
    assert len(logs["cached"]) == 8
    np.testing.assert_allclose(logs["cached"], logs["live"], rtol=2e-3)
    # a cache that does not match stops the run before training, with nothing written
    r = run_launcher("train.py", [config, *overrides, *common, "name=bad", "seed=5"])
    assert r.returncode != 0 and "does not match this run" in r.stderr
    assert not (tmp_path / "bad").exists()
