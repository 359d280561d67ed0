"""Benchmark: the teacher-logit cache against a live teacher, in one run.

    python bench/cache.py                      # CPU defaults (a few minutes on 2 cores)
    python bench/cache.py --r34-batch 32 --r34-size 224 --repeats 20   # on a GPU

Prints three tables:
  bytes      bytes per (view, sample) record for k in {10, 16, 100} (the cache's
             records.record_dtype) against full fp16 logits of 1000 classes (2000 B), and the
             measured bytes per record of a built cache's shard files (.npy header included)
  build      images/s of launcher/cache_teacher.py's builder (build_teacher_cache, one process)
             for the demo teacher (resnet_tiny, 28x28 grey, k=10) and the ImageNet config's
             ResNet-34 (--r34-size RGB, 1000 classes, k=16), on synthetic raw .beton files
  step       student training step time (forward over T, loss, backward, SGD step) with the
             teacher live (its forward in every step) against the cache (memory-mapped lookup of
             the batch's records + rebuild of the [B, C] logits), medians over --repeats
             interleaved steps, and live / cache; beside them the teacher forward alone and the
             cache lookup alone: the demo pair (resnet_tiny -> spiking_resnet_tiny,
             T=4, batch 128, 28x28) and ResNet-34 -> pre-activation spiking ResNet-34 (T=4,
             --r34-batch, --r34-size, 1000 classes, k=16) on random data
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fullrange.config import load_config  # noqa: E402
from fullrange.evaluate import logits_over_time  # noqa: E402
from fullrange.losses import student_loss  # noqa: E402
from fullrange.targets import LiveTeacher  # noqa: E402
from fullrange.models import build_model  # noqa: E402
from fullrange.optim import build_optimizer  # noqa: E402
from fullrange.runtime import make_accelerator  # noqa: E402
from fullrange.teacher_cache import TeacherCache, build_teacher_cache, compress_logits, record_dtype  # noqa: E402
from fullrange.teacher_cache.layout import FORMAT, MANIFEST, SHARDS, shard_name  # noqa: E402
from fullrange.teacher_cache.records import to_records  # noqa: E402
from fullrange.teachers import file_sha256  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=8192, help="synthetic 28x28 samples of the build benchmark")
    p.add_argument("--views", type=int, default=2, help="views the build benchmark computes")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per (pair, source)")
    p.add_argument("--r34-batch", type=int, default=4)
    p.add_argument("--r34-size", type=int, default=112, help="image side of the ResNet-34 pair")
    p.add_argument("--r34-samples", type=int, default=256, help="synthetic images of the ResNet-34 cache build")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def synthetic_beton(out: Path, n: int, side: int, channels: int, classes: int) -> tuple[Path, Path]:
    """Random uint8 images [n, side, side, channels] as raw train/val .beton files."""
    from fullrange.data import write_beton

    rng = np.random.default_rng(0)
    paths = []
    for split, count in (("train", n), ("val", 64)):
        x = rng.integers(0, 256, (count, side, side, channels), dtype=np.uint8)
        y = rng.integers(0, classes, count)
        path = out / f"{split}.beton"
        write_beton(path, x, y, name="synthetic", source="bench/cache.py", split=split, num_classes=classes,
                    mean=[127.5] * channels, std=[73.9] * channels)
        paths.append(path)
    return paths[0], paths[1]


def bench_build(acc, work: Path, config: str, samples: int, views: int, side: int, channels: int,
                classes: int, batch: int) -> tuple[dict, TeacherCache, object]:
    """Build `config`'s teacher cache over a synthetic raw set; returns (row, cache, cfg)."""
    work.mkdir(parents=True)
    train, val = synthetic_beton(work, samples, side, channels, classes)
    cfg = load_config(REPO / config)
    torch.manual_seed(0)
    weights = work / "teacher.pt"
    torch.save(build_model(cfg.teacher.name, classes, channels).state_dict(), weights)
    cfg = load_config(REPO / config, [
        f"data.train_path={train}", f"data.val_path={val}", f"teacher.checkpoint={weights}",
        f"teacher.cache_dir={work / 'cache'}", f"data.views={views}", "data.num_workers=2"])
    start = time.perf_counter()
    build_teacher_cache(cfg, acc, batch_size=batch)
    seconds = time.perf_counter() - start
    cache = TeacherCache(cfg.teacher.cache_dir)
    shard_bytes = sum(p.stat().st_size for p in (Path(cfg.teacher.cache_dir) / SHARDS).glob("*.npy"))
    row = {"teacher": cfg.teacher.name, "image": f"{side}x{side}x{channels}", "samples": samples, "views": views,
           "k": cache.k, "seconds": seconds, "images_per_s": samples * views / seconds,
           "bytes_per_record_on_disk": shard_bytes / (samples * views)}
    return row, cache, cfg


def synthetic_cache(path: Path, n: int, num_classes: int, k: int) -> TeacherCache:
    """A one-view cache of random teacher logits in the builder's layout (for lookup timing)."""
    (path / SHARDS).mkdir(parents=True)
    z = torch.randn(n, num_classes) * 3
    np.save(path / SHARDS / shard_name(0, 0), to_records(*compress_logits(z, k)))
    spec = {"data": {"num_samples": n, "num_classes": num_classes}, "k": k}
    manifest = {"format": FORMAT, "spec": spec, "views": 1, "chunk": n,
                "shards": {shard_name(0, 0): file_sha256(path / SHARDS / shard_name(0, 0))}}
    (path / MANIFEST).write_text(json.dumps(manifest))
    return TeacherCache(path)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def autocast():
    """bf16 autocast on CUDA (as the trainer), nothing on the CPU."""
    return torch.autocast("cuda", torch.bfloat16, enabled=torch.cuda.is_available())


def time_steps(cfg, student, teacher, cache, x, y, indices, repeats: int) -> dict:
    """Median seconds of one training step with the live teacher and with the cache."""
    optimizer = build_optimizer(student, cfg.optim)
    student.train()
    live = LiveTeacher(teacher)

    def step(source: str) -> float:
        sync()
        start = time.perf_counter()
        with autocast():
            z_a = (live if source == "live" else cache).targets(x, indices, 0)
            c = cfg.loss
            loss, _ = student_loss(c.kind, logits_over_time(student, x, cfg.model.T, True), y, z_a, c.alpha, c.beta,
                                   c.tau, c.sd_target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    def targets(source: str) -> float:
        """The teacher logits alone: the live forward or the cache lookup + rebuild."""
        sync()
        start = time.perf_counter()
        with torch.no_grad(), autocast():
            (live if source == "live" else cache).targets(x, indices, 0)
        sync()
        return time.perf_counter() - start

    for source in ("live", "cache"):  # warm-up
        step(source)
        targets(source)
    times = {"live": [], "cache": [], "teacher": [], "lookup": []}
    for _ in range(repeats):
        for source in ("live", "cache"):
            times[source].append(step(source))
        times["teacher"].append(targets("live"))
        times["lookup"].append(targets("cache"))
    ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    return {"live_ms": ms["live"], "cache_ms": ms["cache"], "live_over_cache": ms["live"] / ms["cache"],
            "teacher_forward_ms": ms["teacher"], "cache_lookup_ms": ms["lookup"]}


def bench_steps(demo_cfg, demo_cache, work: Path, args, device: torch.device) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    cfg = demo_cfg
    student = build_model(cfg.model.name, 10, 1, vars(cfg.neuron)).to(device)
    teacher = build_model("resnet_tiny", 10, 1).eval().requires_grad_(False).to(device)
    b = cfg.data.batch_size
    x = torch.randn(b, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (b,), device=device)
    idx = torch.randperm(demo_cache.num_samples)[:b]
    rows.append({"pair": "resnet_tiny -> spiking_resnet_tiny T=4", "batch": b, "image": 28,
                 **time_steps(cfg, student, teacher, demo_cache, x, y, idx, args.repeats)})
    cfg = load_config(REPO / "configs/imagenet_r34.yaml")
    student = build_model(cfg.model.name, 1000, 3, vars(cfg.neuron)).to(device)
    teacher = build_model(cfg.teacher.name, 1000, 3).eval().requires_grad_(False).to(device)
    b, s = args.r34_batch, args.r34_size
    cache = synthetic_cache(work / "r34_cache", 4096, 1000, cfg.teacher.topk)
    x = torch.randn(b, 3, s, s, device=device)
    y = torch.randint(0, 1000, (b,), device=device)
    idx = torch.randperm(4096)[:b]
    rows.append({"pair": f"resnet34 -> spiking_preact_resnet34 T={cfg.model.T}", "batch": b, "image": s,
                 **time_steps(cfg, student, teacher, cache, x, y, idx, max(3, args.repeats // 3))})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    acc = make_accelerator()
    machine = {"date": str(date.today()), "host": platform.node(), "cpu_threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    sizes = {f"k={k}": record_dtype(k).itemsize for k in (10, 16, 100)}
    sizes["full fp16, 1000 classes"] = 2 * 1000
    with tempfile.TemporaryDirectory() as tmp:
        build_row, demo_cache, demo_cfg = bench_build(acc, Path(tmp) / "demo", "configs/fmnist.yaml", args.samples,
                                                      args.views, 28, 1, 10, 512)
        r34_row, _, _ = bench_build(acc, Path(tmp) / "r34", "configs/imagenet_r34.yaml", args.r34_samples, 1,
                                    args.r34_size, 3, 1000, 32)
        step_rows = bench_steps(demo_cfg, demo_cache, Path(tmp), args, acc.device)

    t = Table(title="bytes per (view, sample)")
    t.add_column("record")
    t.add_column("bytes", justify="right")
    for name, size in sizes.items():
        t.add_row(name, str(size))
    t.add_row(f"built demo cache on disk (k={build_row['k']})", f"{build_row['bytes_per_record_on_disk']:.1f}")
    console.print(t)
    t = Table(title="cache build (one process)")
    for col in ("teacher", "image", "images", "k", "seconds", "images/s"):
        t.add_column(col, justify="right")
    for r in (build_row, r34_row):
        t.add_row(r["teacher"], r["image"], f"{r['samples']} x {r['views']} views", str(r["k"]),
                  f"{r['seconds']:.1f}", f"{r['images_per_s']:.0f}")
    console.print(t)
    t = Table(title="student step: live teacher vs cache (median ms)")
    for col in ("pair", "batch", "image", "step, live ms", "step, cache ms", "live / cache", "teacher fwd ms",
                "cache lookup ms"):
        t.add_column(col, justify="right")
    for r in step_rows:
        t.add_row(r["pair"], str(r["batch"]), str(r["image"]), f"{r['live_ms']:.1f}", f"{r['cache_ms']:.1f}",
                  f"{r['live_over_cache']:.2f}x", f"{r['teacher_forward_ms']:.1f}", f"{r['cache_lookup_ms']:.2f}")
    console.print(t)
    console.print(f"machine: {machine}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "bytes": sizes, "build": [build_row, r34_row],
                                         "steps": step_rows}, indent=1))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
