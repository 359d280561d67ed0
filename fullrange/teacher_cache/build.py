"""Build a teacher cache: the teacher's top-k logits for every (view, training sample), once.

The work is cut into units (view v, chunk c): samples c*chunk .. (c+1)*chunk - 1 seen through
augmentation epoch v, exactly the pixels a student sees at an epoch whose view is v (same
loader decoder or pad_crop_flip, same normalisation and dtype as fullrange.data.BatchPreparer). Rank 0
lists the units without a shard file; in round r, rank i computes unit r * world + i. Each unit
is its own sequence of batches from the chunk's first sample, so its records do not depend on
the world size or on where an interrupted build stopped: a resumed build ends with the same
bytes as an uninterrupted one. After every round the ranks agree on a stop (SIGTERM/SIGUSR1:
exit 75 with finished shards kept, as in fullrange.preemption). The manifest is written last
(see .layout).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from rich.console import Console

from fullrange.atomic import atomic_path, write_text_atomic
from fullrange.config import ConfigError, RunConfig
from fullrange.data import BatchPreparer, ViewSpec, check_beton, device_batches, view_loader
from fullrange.preemption import EXIT_REQUEUE, Preempted, StopCheck, StopSignals, write_requeue_file
from fullrange.progress import progress_bar
from fullrange.runtime import autocast, input_dtype
from fullrange.teachers import file_sha256, load_teacher

from .layout import (BUILD, DEFAULT_CHUNK, FORMAT, MANIFEST, RECORD, SHARDS, cache_spec, differences, read_json,
                     shard_name, views_needed)
from .records import compress_logits, record_dtype, to_records


def _write_shard(path: Path, records: np.ndarray) -> None:
    """records -> path (.npy) via a temporary name, then its sha256 beside it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, records)
    write_text_atomic(path.with_suffix(".sha256"), file_sha256(path) + "\n")


def _pending_units(shards: Path, views: int, num_chunks: int) -> list[tuple[int, int]]:
    return [(v, c) for v in range(views) for c in range(num_chunks) if not (shards / shard_name(v, c)).is_file()]


def _shard_checksums(shards: Path, views: int, num_chunks: int) -> dict[str, str]:
    """{shard file name: sha256}; hashes a shard whose .sha256 is missing (a crash between the
    two renames)."""
    out = {}
    for v in range(views):
        for c in range(num_chunks):
            path = shards / shard_name(v, c)
            side = path.with_suffix(".sha256")
            out[path.name] = side.read_text().strip() if side.is_file() else file_sha256(path)
    return out


def _finished(out: Path, build: dict) -> bool:
    """True when `out` holds a finished cache of this build (same spec, at least its views).
    ConfigError when it holds a finished cache or a partial build of anything else."""
    if (out / MANIFEST).is_file():
        have = read_json(out / MANIFEST, "the manifest of a finished cache")
        if have.get("spec") == build["spec"] and have.get("views", 0) >= build["views"]:
            return True
        raise ConfigError(f"config key teacher.cache_dir: {out} already holds a finished cache for another "
                          "teacher, data, seed, recipe, k or fewer views (nothing was overwritten); choose "
                          "another teacher.cache_dir")
    if (out / BUILD).is_file():
        changed = differences(read_json(out / BUILD, "a started build"), build)
        if changed:
            raise ConfigError(f"config key teacher.cache_dir: {out} holds a partial build of another cache "
                              f"({'; '.join(changed)}); resume it with the same config and options, or "
                              "delete it, or choose another teacher.cache_dir")
    return False


def _build_plan(cfg: RunConfig, chunk: int, batch_size: int | None) -> tuple[dict, dict]:
    """(the train sidecar, the build record) of cfg's cache; ConfigError for bad input."""
    if not cfg.teacher.name or not cfg.teacher.checkpoint or not cfg.teacher.cache_dir:
        raise ConfigError("config keys teacher.name, teacher.checkpoint and teacher.cache_dir: building a "
                          "teacher cache needs the teacher's model name, its weights file and the cache directory")
    try:
        meta = check_beton(cfg.data.train_path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config key data.train_path: {e}") from None
    load_teacher(cfg)  # the weights file fits the model
    batch = batch_size or cfg.data.val_batch_size
    if batch < 1:
        raise ConfigError(f"--batch-size: expected >= 1, got {batch}")
    if chunk < 1:
        raise ConfigError(f"--chunk: expected samples per shard >= 1, got {chunk}")
    spec = cache_spec(cfg, meta, file_sha256(cfg.teacher.checkpoint))
    num_chunks = -(-spec["data"]["num_samples"] // chunk)
    build = {"format": FORMAT, "spec": spec, "views": views_needed(cfg), "chunk": chunk, "batch_size": batch,
             "num_chunks": num_chunks, "record": RECORD, "record_bytes": record_dtype(spec["k"]).itemsize}
    return meta, build


def _start_build(out: Path, build: dict, acc: Accelerator) -> list[tuple[int, int]]:
    """Write build.json (main process) and return the (view, chunk) units without a shard."""
    acc.wait_for_everyone()  # every rank has read the directory before rank 0 writes to it
    shards = out / SHARDS
    if acc.is_main_process:
        shards.mkdir(parents=True, exist_ok=True)
        for stale in shards.glob(".*.tmp"):  # left by a killed build
            stale.unlink(missing_ok=True)
        write_text_atomic(out / BUILD, json.dumps(build, indent=1) + "\n")
    acc.wait_for_everyone()
    listing = [_pending_units(shards, build["views"], build["num_chunks"]) if acc.is_main_process else None]
    broadcast_object_list(listing, from_process=0)
    return listing[0]


class _UnitWriter:
    """Computes the records of one unit (view, chunk) with the teacher, exactly as a student sees
    that chunk in that view (same loader decoder or pad_crop_flip, normalisation and dtype)."""

    def __init__(self, cfg: RunConfig, acc: Accelerator, meta: dict, build: dict):
        teacher = load_teacher(cfg).to(acc.device)
        if cfg.data.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        self.cfg, self.acc, self.meta, self.build, self.teacher = cfg, acc, meta, build, teacher
        self.spec, self.precision = ViewSpec.from_config(cfg), acc.mixed_precision

    def records(self, view: int, c: int, advance) -> np.ndarray:
        """The records of chunk c in view `view`, in sample order; batches start at the chunk.
        advance(n): n more samples done."""
        cfg, chunk, n = self.cfg, self.build["chunk"], self.meta["num_samples"]
        loader = view_loader(cfg.data.train_path, np.arange(c * chunk, min(n, (c + 1) * chunk)),
                             self.build["batch_size"], cfg.data.num_workers, self.spec, view,
                             os_cache=cfg.data.os_cache, batches_ahead=cfg.data.batches_ahead)
        prep = BatchPreparer(self.meta, self.spec, dtype=input_dtype(self.precision),
                             channels_last=cfg.data.channels_last, augment=not loader.augmented)
        parts = []
        for batch in device_batches(loader, self.acc.device, view):
            x, _ = prep.train(batch)
            with torch.no_grad(), autocast(self.acc.device, self.precision):
                parts.append(to_records(*compress_logits(self.teacher(x), self.build["spec"]["k"])))
            advance(len(batch.host_indices))
        return np.concatenate(parts)


def _publish(out: Path, build: dict, console: Console) -> None:
    """Write the manifest (every shard's sha256), last and atomically: the cache is then finished."""
    shards, views, num_chunks = out / SHARDS, build["views"], build["num_chunks"]
    missing = _pending_units(shards, views, num_chunks)
    if missing:
        raise RuntimeError(f"teacher cache {out}: shards {missing[:4]}... missing after every rank finished")
    manifest = {**build, "shards": _shard_checksums(shards, views, num_chunks)}
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    console.print(f"teacher cache {out}: published {views * num_chunks} shards ({build['record_bytes']} B per "
                  "sample-view)")


def build_teacher_cache(cfg: RunConfig, acc: Accelerator, chunk: int = DEFAULT_CHUNK,
                        batch_size: int | None = None, hooks: Sequence[Callable[[int], None]] = ()) -> Path:
    """Compute (or finish) the cache of cfg.teacher over cfg.data.train_path; returns its
    directory. Every rank calls this. batch_size: per process (default data.val_batch_size).
    hooks: called with the round number after every round of shards (tests inject faults)."""
    console, main = Console(stderr=True), acc.is_main_process
    meta, build = _build_plan(cfg, chunk, batch_size)
    out = Path(cfg.teacher.cache_dir)
    if _finished(out, build):
        if main:
            console.print(f"teacher cache {out} is complete; nothing to do")
        return out
    todo = _start_build(out, build, acc)
    writer = _UnitWriter(cfg, acc, meta, build)
    n, world, rank = meta["num_samples"], acc.num_processes, acc.process_index
    rows = sum(min(chunk, n - c * chunk) for _, c in todo[rank::world])
    if main:
        console.print(f"[bold]teacher cache[/] {out}: {cfg.teacher.name} top-{build['spec']['k']} over {n} samples x "
                      f"{build['views']} views ({len(todo)} of {build['views'] * build['num_chunks']} shards to do, "
                      f"{world} process(es))")
    rounds = -(-len(todo) // world)  # round r: rank i computes unit r * world + i
    with StopSignals() as signals, progress_bar(console, main) as progress:
        stop_check = StopCheck(signals, acc.device, rank, world)
        task = progress.add_task("teacher logits", total=rows)
        for r in range(rounds):
            if r * world + rank < len(todo):
                view, c = todo[r * world + rank]
                records = writer.records(view, c, lambda k: progress.advance(task, k))
                _write_shard(out / SHARDS / shard_name(view, c), records)
            for hook in hooks:
                hook(r + 1)
            stop, _ = stop_check.check(r, force=True)  # every rank leaves after the same round
            if stop and r + 1 < rounds:
                if main:
                    write_requeue_file({"reason": stop, "cache": str(out), "shards_left": len(todo) - (r + 1) * world})
                raise Preempted(f"preempted ({stop}) while building the teacher cache {out}; finished shards are "
                                f"kept; run the same command again to finish it (exit {EXIT_REQUEUE}: requeue)", out)
    acc.wait_for_everyone()
    if main:
        _publish(out, build, console)
    acc.wait_for_everyone()
    return out
