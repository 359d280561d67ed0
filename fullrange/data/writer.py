"""Write image arrays to an FFCV .beton plus a JSON sidecar describing them.

File layout (one sample = one row):
    'image'  NDArrayField uint8 (H, W, C)   raw pixels, no JPEG (small images)
    'label'  IntField                       class id
    'index'  IntField                       the sample's own row number (replayable augmentation
                                            and teacher-cache lookup key)
Sidecar `<path>.json`: format, image_format ("raw"; fullrange.data.imagefolder writes
"rgb_jpeg" files), name, requested, source, split, num_samples, shape [H, W, C], num_classes,
mean/std per channel in pixel units 0..255 (of the TRAIN split: val files carry the train
statistics), fingerprint (sha256 of shape + labels + pixels), beton_bytes, fields.

Both files are written under a temporary name in the same directory and renamed into place
(os.replace is atomic on POSIX), beton first, sidecar second: a sidecar never describes a
half-written beton, and an interrupted write leaves nothing under the final names.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from fullrange.atomic import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "fullrange-beton-v1"
FIELDS = ("image", "label", "index")
_MIN_PAGE = 1 << 21  # FFCV's minimum page size (2 MiB)


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar that belongs to a .beton: `<path>.json`."""
    return Path(str(path) + ".json")


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (population) of uint8 images [N, H, W, C], in pixel units.
    Exact integer accumulation in chunks, so no float copy of the whole set."""
    c = images.shape[-1]
    s = np.zeros(c, np.float64)
    s2 = np.zeros(c, np.float64)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].reshape(-1, c).astype(np.int64)
        s += x.sum(0)
        s2 += (x * x).sum(0)
    n = images.size // c
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
    return mean.tolist(), std.tolist()


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 over shape, labels (int64 LE) and pixels: identifies the exact sample order."""
    h = hashlib.sha256()
    h.update(json.dumps(list(images.shape)).encode())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


class _Rows:
    """Indexable view handed to FFCV's writer: row i -> (image [H, W, C], label, i)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i]), int(i)


@contextlib.contextmanager
def quiet_ffcv_writer():
    """Silence the tqdm bars of FFCV's DatasetWriter (fullrange shows rich progress instead)."""
    import ffcv.writer

    real_tqdm = ffcv.writer.tqdm
    ffcv.writer.tqdm = lambda *a, **k: real_tqdm(*a, **{**k, "disable": True})
    try:
        yield
    finally:
        ffcv.writer.tqdm = real_tqdm


def write_beton(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, *,
                name: str = "arrays", source: str = "in-memory arrays", split: str | None = None,
                num_classes: int | None = None, mean=None, std=None, extra: dict | None = None,
                num_workers: int = 1) -> dict:
    """Write images uint8 [N, H, W, C] and integer labels [N] to `path` (.beton) + `<path>.json`.

    mean/std: per-channel statistics to record (pixel units); default: computed from `images`
    (pass the train statistics when writing a val split). num_classes: default max(label)+1.
    extra: more keys for the sidecar. num_workers: FFCV writer processes.
    Returns the sidecar dict. Input is validated before anything is written."""
    path = Path(path)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 [N, H, W, C], got "
                         f"{images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError(f"{path}: refusing to write an empty dataset")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers [N={len(images)}], got "
                         f"{labels.dtype} {labels.shape}")
    if labels.min() < 0:
        raise ValueError(f"{path}: labels must be >= 0, found {labels.min()}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: output directory does not exist")
    images = np.ascontiguousarray(images)
    labels = labels.astype(np.int64)
    c = images.shape[-1]
    if mean is None or std is None:
        mean, std = channel_stats(images)
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"{path}: mean/std need {c} channel values, got {mean} / {std}")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.max() >= num_classes:
        raise ValueError(f"{path}: label {labels.max()} >= num_classes {num_classes}")

    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    sample_bytes = int(np.prod(images.shape[1:]))
    page = max(_MIN_PAGE, 1 << (sample_bytes - 1).bit_length())
    fields = {"image": NDArrayField(np.dtype(np.uint8), tuple(images.shape[1:])),
              "label": IntField(), "index": IntField()}
    with atomic_path(path) as tmp:
        writer = DatasetWriter(str(tmp), fields, page_size=page, num_workers=max(1, num_workers))
        with quiet_ffcv_writer():
            writer.from_indexed_dataset(_Rows(images, labels), chunksize=1000)

    meta = {"format": SIDECAR_FORMAT, "image_format": "raw", "name": name, "source": source,
            "split": split,
            "num_samples": int(len(images)), "shape": list(images.shape[1:]),
            "num_classes": num_classes, "mean": mean, "std": std,
            "stats_units": "pixels 0..255", "fingerprint": fingerprint(images, labels),
            "beton_bytes": path.stat().st_size, "fields": list(FIELDS),
            **(extra or {})}
    write_text_atomic(sidecar_path(path), json.dumps(meta, indent=1))
    log.info("wrote %s (%d samples, %s)", path, len(images), images.shape[1:])
    return meta


def read_sidecar(path: str | os.PathLike) -> dict:
    """Read and check the sidecar of a .beton. FileNotFoundError / ValueError name the file."""
    side = sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(f"{side}: sidecar of {path} not found (write it with "
                                "fullrange.data.write_beton / prepare_bundled)")
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{side}: unreadable sidecar ({type(e).__name__}: {e})") from None
    need = ("format", "num_samples", "shape", "num_classes", "mean", "std", "beton_bytes")
    missing = [k for k in need if not isinstance(meta, dict) or k not in meta]
    if missing or meta.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{side}: not a {SIDECAR_FORMAT} sidecar (missing {missing or 'format'})")
    return meta


def prepare_bundled(name: str, out_dir: str | os.PathLike, root=None, num_workers: int = 1) -> dict:
    """Write `out_dir`/train.beton and val.beton (+ sidecars) for a bundled dataset, unless a
    valid pair is already there. Idempotent: existing files are never rewritten.

    name: "fmnist" (falls back to "digits" when absent) or "digits"; root: see load_bundled.
    Returns {"train": path, "val": path, "meta": {"train": sidecar, "val": sidecar}}."""
    from .bundled import load_bundled

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {s: out / f"{s}.beton" for s in ("train", "val")}
    meta = {}
    for split, p in paths.items():
        if p.is_file() and sidecar_path(p).is_file():
            m = read_sidecar(p)
            if m.get("requested", m.get("name")) != name:
                raise ValueError(f"{sidecar_path(p)}: holds dataset {m.get('requested')!r}, "
                                 f"asked for {name!r}; use another out_dir")
            meta[split] = m
    if len(meta) == 2:
        return {"train": str(paths["train"]), "val": str(paths["val"]), "meta": meta}

    train_x, train_y, info = load_bundled(name, "train", root=root)
    mean, std = channel_stats(train_x)
    for split in ("train", "val"):
        if split in meta:
            continue
        if split == "train":
            x, y, inf = train_x, train_y, info
        else:
            x, y, inf = load_bundled(name, "val", root=root)
        extra = {"requested": inf["requested"], "fallback": inf["fallback"],
                 "class_names": inf["class_names"], "stats_from": "train"}
        if "note" in inf:
            extra["note"] = inf["note"]
        meta[split] = write_beton(paths[split], x, y, name=inf["name"], source=inf["source"],
                                  split=split, num_classes=inf["num_classes"], mean=mean,
                                  std=std, extra=extra, num_workers=num_workers)
    return {"train": str(paths["train"]), "val": str(paths["val"]), "meta": meta}
