"""The teacher cache on disk: its identity (spec), file names and manifest.

    CACHE/build.json     written when a build starts: spec + layout (views, chunk); a resumed
                         build must match it, so shards of two different builds never mix
    CACHE/shards/view00003_chunk00012.npy      records [n] (see .records) of samples
                         chunk*12 .. chunk*12 + n - 1 seen through augmentation view 3; written
                         under a temporary name, then renamed (a shard file is always whole)
    CACHE/shards/view00003_chunk00012.sha256   its sha256, written after it
    CACHE/manifest.json  written last, atomically: the build plus every shard's sha256.
                         A cache without it is incomplete and no student reads it.

The spec is what a student run must agree with: teacher (model name, sha256 of the weights
file), data (the .beton sidecar's fingerprint, sample and class counts, normalisation),
views (the augmentation recipe and seed, see fullrange.data.ViewSpec.recipe) and k.
"""
from __future__ import annotations

import json
from pathlib import Path

from fullrange.config import ConfigError, RunConfig
from fullrange.data import ViewSpec

from .records import effective_k

FORMAT = "fullrange-teacher-cache-v1"
RECORD = "fp16 logit - logmeanexp(other classes) [k] + uint16 class [k]"
MANIFEST = "manifest.json"
BUILD = "build.json"
SHARDS = "shards"
DEFAULT_CHUNK = 1 << 16  # samples per shard (4 MiB of records at k = 16)


def shard_name(view: int, chunk: int) -> str:
    return f"view{view:05d}_chunk{chunk:05d}.npy"


def views_needed(cfg: RunConfig) -> int:
    """How many views a run reads: data.views when set, else one per epoch."""
    return cfg.data.views or cfg.optim.epochs


def cache_spec(cfg: RunConfig, meta: dict, weights_sha256: str | None) -> dict:
    """The identity a cache built for `cfg` has (meta: the train .beton sidecar).
    weights_sha256 None: the run names no teacher weights file, so none is compared."""
    return {
        "teacher": {"name": cfg.teacher.name, "weights_sha256": weights_sha256},
        "data": {"fingerprint": meta["fingerprint"], "num_samples": int(meta["num_samples"]),
                 "num_classes": int(meta["num_classes"]), "mean": meta["mean"], "std": meta["std"]},
        "views": ViewSpec.from_config(cfg).recipe(meta),
        "k": effective_k(cfg.teacher.topk, int(meta["num_classes"])),
    }


def differences(have: dict, want: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b and not (key == "weights_sha256" and b is None):
            out.append(f"{prefix}{key}: cache {a!r}, run {b!r}")
    return out


def check_spec(cache_dir: Path, have: dict, views: int, want: dict, views_wanted: int) -> None:
    """ConfigError listing every difference between a cache (spec `have`, `views` views) and
    what a run needs (spec `want`, `views_wanted` views)."""
    problems = differences(have, want)
    if views < views_wanted:
        problems.append(f"views: cache has {views}, run needs {views_wanted} (data.views, or optim.epochs "
                        "when data.views is 0)")
    if problems:
        raise ConfigError(f"config key teacher.cache_dir: the teacher cache {cache_dir} does not match this run: "
                          + "; ".join(problems) + ". Build a cache for this config with `accelerate launch "
                          "launcher/cache_teacher.py CONFIG` (another teacher.cache_dir) or use teacher.source=live")


def read_json(path: Path, what: str) -> dict:
    """A JSON file of the cache; ConfigError naming it when missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config key teacher.cache_dir: {path} not found ({what})") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key teacher.cache_dir: {path} is not readable JSON ({what}; {e})") from None
