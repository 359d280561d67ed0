"""CIFAR-10 / CIFAR-100 from their "python version" archives (what the official code's torchvision
datasets download), to .beton files: `python launcher/write_ffcv.py cifar SRC OUT`.

SRC is the unpacked folder: cifar-10-batches-py (data_batch_1..5, test_batch, batches.meta) or
cifar-100-python (train, test, meta; the 100 fine labels). Each batch is a pickled dict with
b"data" uint8 [N, 3072] (channel-major 32x32 planes) and b"labels" / b"fine_labels". The files
are Python pickles: read only archives from a source you trust.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

LAYOUTS = {  # marker file -> (name, train files, val files, label key, meta file, names key)
    "batches.meta": ("cifar10", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels",
                     "batches.meta", b"label_names"),
    "meta": ("cifar100", ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names"),
}


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected a CIFAR python-version batch)")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a CIFAR batch ({type(e).__name__}: {e})") from None


def cifar_layout(src: Path) -> tuple:
    """The layout of an unpacked CIFAR folder; FileNotFoundError when it is neither."""
    for marker, layout in LAYOUTS.items():
        if (src / marker).is_file():
            return layout
    raise FileNotFoundError(f"{src}: no batches.meta (cifar-10-batches-py) or meta (cifar-100-python) "
                            "inside; expected an unpacked CIFAR python-version archive")


def load_cifar(src: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """split "train" or "val" -> (images uint8 [N, 32, 32, 3], labels int64 [N], info)."""
    src = Path(src)
    name, train, val, label_key, meta_file, names_key = cifar_layout(src)
    xs, ys = [], []
    for file in train if split == "train" else val:
        batch = _unpickle(src / file)
        if b"data" not in batch or label_key not in batch:
            raise ValueError(f"{src / file}: lacks b'data' or {label_key!r}")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
    names = [n.decode() for n in _unpickle(src / meta_file).get(names_key, [])]
    info = {"name": name, "source": str(src), "num_classes": len(names) or int(max(y.max() for y in ys)) + 1,
            "class_names": names}
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), info


def write_cifar(src: str | Path, out_dir: str | Path, num_workers: int = 1) -> dict:
    """OUT/train.beton and OUT/val.beton (+ sidecars; mean/std from train) of an unpacked CIFAR
    folder. Returns {"train": path, "val": path, "meta": {split: sidecar}}."""
    from .writer import channel_stats, write_beton

    train_x, train_y, info = load_cifar(src, "train")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mean, std = channel_stats(train_x)
    written = {"meta": {}}
    for split in ("train", "val"):
        x, y, _ = (train_x, train_y, info) if split == "train" else load_cifar(src, "val")
        path = out / f"{split}.beton"
        written["meta"][split] = write_beton(path, x, y, name=info["name"], source=info["source"], split=split,
                                             num_classes=info["num_classes"], mean=mean, std=std,
                                             extra={"class_names": info["class_names"], "stats_from": "train"},
                                             num_workers=num_workers)
        written[split] = str(path)
    return written
