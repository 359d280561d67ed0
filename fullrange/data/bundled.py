"""Bundled datasets that exist on the machine without any download.

"fmnist"  Fashion-MNIST from the Debian package dataset-fashion-mnist
          (/usr/share/datasets/fashion-mnist/*-ubyte.gz): 60k train / 10k val, 28x28x1.
          If those files are absent, falls back to "digits" with a RuntimeWarning.
"digits"  scikit-learn's load_digits (shipped inside the sklearn wheel): 1797 images kept at
          their real 8x8x1 size (no upscaling: we do not invent pixels). Values 0..16 are
          rescaled to uint8 0..255. Deterministic split: every 6th image (i % 6 == 5) is
          val (299 images), the rest train (1498).

load_bundled(name, split) -> (images uint8 [N, H, W, C], labels int64 [N], info dict).
"""
from __future__ import annotations

import gzip
import logging
import os
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_ENV = "FULLRANGE_FMNIST_DIR"  # overrides FMNIST_DIR (tests, non-Debian installs)
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FMNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                  "sandal", "shirt", "sneaker", "bag", "ankle boot"]
SPLITS = {"train": "train", "val": "val", "test": "val", "t10k": "val"}
NAMES = ("fmnist", "digits")

# idx type codes (third magic byte) -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one gzip-compressed (or plain) idx file into a native-endian numpy array.

    Raises FileNotFoundError naming the path if it is missing, ValueError naming the path if
    it is not a valid idx file (bad gzip stream, bad magic, size not matching the header)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: idx file not found")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: unreadable idx file ({type(e).__name__}: {e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic {raw[:4].hex() or 'empty'}; "
                         "expected 0000 <type code> <ndim>)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes, need {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(f"{path}: idx payload is {len(raw)} bytes, header {shape} "
                         f"of {dtype} says {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def fmnist_dir() -> Path:
    """Where Fashion-MNIST is looked for: $FULLRANGE_FMNIST_DIR or the Debian location."""
    return Path(os.environ.get(FMNIST_ENV, FMNIST_DIR))


def _fmnist_available(root: Path) -> bool:
    return all((root / f).is_file() for pair in FMNIST_FILES.values() for f in pair)


def _load_fmnist(split: str, root: Path):
    img_file, lab_file = (root / f for f in FMNIST_FILES[split])
    images = read_idx(img_file)
    labels = read_idx(lab_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{img_file}: expected uint8 images [N, H, W], got "
                         f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{lab_file}: expected {len(images)} labels, got shape {labels.shape}")
    info = {"source": str(root), "files": [str(img_file), str(lab_file)],
            "class_names": FMNIST_CLASSES}
    return images[..., None], labels.astype(np.int64), info


def _load_digits(split: str):
    from sklearn.datasets import load_digits  # bundled with sklearn, no download

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    is_val = (np.arange(len(images)) % 6) == 5
    keep = is_val if split == "val" else ~is_val
    info = {"source": "sklearn.datasets.load_digits",
            "class_names": [str(i) for i in range(10)],
            "note": "digits kept at native 8x8 (not upscaled); values 0..16 scaled to 0..255; "
                    "val = every 6th image (i % 6 == 5)"}
    return np.ascontiguousarray(images[keep][..., None]), labels[keep], info


def load_bundled(name: str, split: str, root: str | os.PathLike | None = None):
    """Load a bundled dataset split.

    name: "fmnist" or "digits"; split: "train" or "val" ("test"/"t10k" are aliases of "val").
    root: directory of the Fashion-MNIST idx files (default $FULLRANGE_FMNIST_DIR or
    /usr/share/datasets/fashion-mnist).
    Returns images uint8 [N, H, W, C] (C=1), labels int64 [N], and info with keys
    name (dataset actually loaded), requested, split, source, shape [H, W, C], num_samples,
    num_classes, class_names, fallback (bool) and, for digits, note."""
    if name not in NAMES:
        raise ValueError(f"dataset name {name!r}: expected one of {NAMES}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {sorted(SPLITS)}")
    split = SPLITS[split]
    actual, fallback = name, False
    if name == "fmnist":
        root = Path(root) if root is not None else fmnist_dir()
        if _fmnist_available(root):
            images, labels, info = _load_fmnist(split, root)
        else:
            actual, fallback = "digits", True
            msg = (f"Fashion-MNIST not found under {root} (install the Debian package "
                   f"dataset-fashion-mnist or set {FMNIST_ENV}); falling back to sklearn "
                   "digits at their native 8x8x1 size")
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    if actual == "digits":
        images, labels, info = _load_digits(split)
        if not fallback:
            log.info("digits: %s", info["note"])
    info.update(name=actual, requested=name, split=split, fallback=fallback,
                shape=list(images.shape[1:]), num_samples=int(len(images)),
                num_classes=len(info["class_names"]))
    return images, labels, info
