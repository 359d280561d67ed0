"""Read a finished teacher cache: KD targets for a student's batch, no teacher needed.

Shards are memory-mapped read-only (any number of processes and runs read one cache at once);
every shard a run reads has its sha256 checked against the manifest before training starts
(TeacherCache.check), so a corrupt or replaced shard stops the run with one line naming it.
Only the shards of the view in use stay open.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fullrange.config import ConfigError, RunConfig
from fullrange.teachers import file_sha256

from .layout import FORMAT, MANIFEST, SHARDS, cache_spec, check_spec, read_json, shard_name, views_needed
from .records import from_records, rebuild_logits


class CacheCorrupt(ConfigError):
    """A shard's bytes do not match the manifest's checksum (or the shard is missing): bad input,
    one line and exit 2 like any other."""


class TeacherCache:
    """A finished cache directory. Attributes: path, manifest, k, views, num_samples,
    num_classes, chunk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConfigError(f"config key teacher.cache_dir: {self.path} not found (build it first: "
                              "`accelerate launch launcher/cache_teacher.py CONFIG`)")
        self.manifest = read_json(self.path / MANIFEST, "a finished cache has one; an unfinished build does not: "
                                  "run launcher/cache_teacher.py again to finish it")
        if self.manifest.get("format") != FORMAT:
            raise ConfigError(f"config key teacher.cache_dir: {self.path / MANIFEST} has format "
                              f"{self.manifest.get('format')!r}, expected {FORMAT!r}")
        spec = self.manifest["spec"]
        self.k, self.views, self.chunk = spec["k"], self.manifest["views"], self.manifest["chunk"]
        self.num_samples, self.num_classes = spec["data"]["num_samples"], spec["data"]["num_classes"]
        self._view, self._shards, self._verified = -1, {}, set()

    def check(self, cfg: RunConfig, meta: dict) -> None:
        """ConfigError unless this cache was built for cfg's teacher, data (meta: the train
        sidecar), seed, augmentation recipe and k, with at least the views cfg reads. The
        teacher weights are compared when cfg.teacher.checkpoint names a file."""
        weights = cfg.teacher.checkpoint
        if weights and not Path(weights).is_file():
            raise ConfigError(f"config key teacher.checkpoint: {weights} not found (with teacher.source=cache it "
                              "identifies the teacher: give the file the cache was built from, or '' to skip)")
        want = cache_spec(cfg, meta, file_sha256(weights) if weights else None)
        check_spec(self.path, self.manifest["spec"], self.views, want, views_needed(cfg))
        self.verify(views_needed(cfg))

    def _verified_path(self, name: str) -> Path:
        """A shard's path, its sha256 checked against the manifest once per process."""
        path = self.path / SHARDS / name
        expected = self.manifest["shards"].get(name)
        if not path.is_file() or expected is None:
            raise CacheCorrupt(f"config key teacher.cache_dir: teacher cache {self.path}: shard {name} is missing; "
                               "rebuild the cache (launcher/cache_teacher.py into a new teacher.cache_dir)")
        if name not in self._verified:
            found = file_sha256(path)
            if found != expected:
                raise CacheCorrupt(f"config key teacher.cache_dir: teacher cache {self.path}: shard {name} is corrupt "
                                   f"(sha256 {found[:16]}..., manifest {expected[:16]}...); rebuild the cache "
                                   "(launcher/cache_teacher.py into a new teacher.cache_dir)")
            self._verified.add(name)
        return path

    def verify(self, views: int) -> None:
        """Check the shards of views 0..views-1 against the manifest (CacheCorrupt names the first
        missing or corrupt one), before a run starts."""
        for view in range(min(views, self.views)):
            for c in range(-(-self.num_samples // self.chunk)):
                self._verified_path(shard_name(view, c))

    def _open_view(self, view: int) -> None:
        self._shards = {c: np.load(self._verified_path(shard_name(view, c)), mmap_mode="r")
                        for c in range(-(-self.num_samples // self.chunk))}
        self._view = view

    def lookup(self, view: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached records of samples `indices` (int [B]) in view `view`:
        (values fp16 [B, k], classes int64 [B, k]) on the CPU."""
        if not 0 <= view < self.views:
            raise ValueError(f"teacher cache {self.path} has views 0..{self.views - 1}, asked for view {view}")
        if view != self._view:
            self._open_view(view)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # a CPU tensor or array
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise ValueError(f"teacher cache {self.path}: sample index out of range 0..{self.num_samples - 1}")
        chunk_of, row = np.divmod(idx, self.chunk)
        out = np.empty(len(idx), self._shards[0].dtype)
        for c in np.unique(chunk_of):
            sel = chunk_of == c
            out[sel] = self._shards[int(c)][row[sel]]
        return from_records(out)

    def targets(self, x: torch.Tensor, indices: torch.Tensor, view: int) -> torch.Tensor:
        """fullrange.targets.TeacherTargets: the rebuilt teacher logits [B, C] (float32, on x's
        device) of samples `indices` (int64 [B], CPU) in view `view`. On CUDA the records are
        copied from pinned memory without waiting (the host allocator keeps each pinned block
        until its copy is done)."""
        values, classes = self.lookup(view, indices)
        if x.is_cuda:
            values, classes = values.pin_memory(), classes.pin_memory()
        return rebuild_logits(values.to(x.device, non_blocking=True), classes.to(x.device, non_blocking=True),
                              self.num_classes)
