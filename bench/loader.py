"""Benchmark: the ImageNet training pipeline (decode + random resized crop + flip to 224, uint8
out), fullrange's FFCV loader against torch's DataLoader + PIL on the same JPEGs, in one run.

    python bench/loader.py                         # 600 JPEGs cut from the bundled photos
    python bench/loader.py --data /path/to/imagenet --images 2000 --workers 8

Pipelines, each with --workers workers and --batch-size:
  fullrange ffcv jpg         train_loader on a .beton written with --write-mode jpg: every
                             sample is a JPEG (the source re-encoded at quality 90, same size),
                             so this decodes the same kind of JPEG as the peer
  fullrange ffcv proportion  the ImageNet recipe (--write-mode proportion, half the samples
                             stored as raw pixels, the other half JPEG q90)
  torch DataLoader + PIL     a map-style Dataset over the source JPEG files: PIL open +
                             convert("RGB"), the same crop box (rrc_view_params, so identical
                             views), crop + resize((224, 224), BILINEAR) + FLIP_LEFT_RIGHT where
                             flipped (the PIL calls of torchvision's RandomResizedCrop and
                             RandomHorizontalFlip; torchvision itself is not needed), numpy ->
                             uint8 tensor; worker processes (spawned), default collate
Both yield uint8 batches [B, 224, 224, 3] on the CPU. Throughput = images per second of whole
epochs after one warm-up epoch each (compiles, worker start-up, page cache); epochs of the
pipelines are interleaved and the median over --repeats is reported, so load from other users
of a shared machine hits all of them alike. The last column is each pipeline's throughput
divided by the DataLoader + PIL one.

Without --data, --images JPEGs of ImageNet-like size (500 x 375, quality 90) are cut from the
photos that ship with scikit-learn / scikit-image (tests/photos.py) into a temp dir.
"""
from __future__ import annotations

import argparse
import json
import os
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None,
                   help="an ImageFolder tree with train/ (default: one built from the bundled "
                        "photos)")
    p.add_argument("--images", type=int, default=600,
                   help="images to build (without --data) or to use")
    p.add_argument("--workers", type=int, default=2, help="loader workers of every pipeline")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=224, help="output side")
    p.add_argument("--repeats", type=int, default=5, help="timed epochs per pipeline")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


class PilRRC(torch.utils.data.Dataset):
    """The peer: one JPEG file -> uint8 [size, size, 3] with the given crop box and flip."""

    def __init__(self, files, boxes, flips, size):
        self.files, self.boxes, self.flips, self.size = files, boxes, flips, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            img = im.convert("RGB")
        top, left, h, w = self.boxes[i]
        out = img.crop((left, top, left + w, top + h)).resize((self.size, self.size),
                                                              Image.BILINEAR)
        if self.flips[i]:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(out))


def build_tree(root: Path, images: int) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from photos import bundled_photos, write_photo_tree  # the test suite's photo trees

    per_class = -(-images // len(bundled_photos()))
    write_photo_tree(root, {"train": per_class, "val": 1}, min_side=200, max_side=640,
                     resize_to=(500, 375), quality=90, seed=0)
    return root


def check_same_views(loader, dataset) -> None:
    """Both pipelines compute the same views: on the samples the beton stores raw (the source
    pixels) the ffcv output equals the PIL one to within 1 level; JPEG samples were re-encoded
    at quality 90 by the writer, so they only agree closely."""
    loader.set_epoch(0)
    raw = loader.decoder is not None and loader.meta["stored_jpeg"] < loader.meta["num_samples"]
    modes = loader.loader.reader.metadata["f0"]["mode"]  # field 0 = image: 0 JPEG, 1 raw
    worst_raw, mean_jpg = 0, []
    for x, _, idx in loader:
        for img, i in zip(x.permute(0, 2, 3, 1).numpy(), idx.tolist()):
            d = np.abs(img.astype(int) - dataset[i].numpy())
            if modes[i] == 1:
                worst_raw = max(worst_raw, int(d.max()))
            else:
                mean_jpg.append(float(d.mean()))
        break
    loader.set_epoch(0)
    if raw and worst_raw > 1 or (mean_jpg and max(mean_jpg) > 4):
        raise SystemExit(f"views differ: raw rows max |diff| {worst_raw}, JPEG rows mean "
                         f"|diff| up to {max(mean_jpg, default=0):.2f}")
    print(f"same views: raw rows max |diff| {worst_raw}, JPEG rows mean |diff| "
          f"{np.mean(mean_jpg) if mean_jpg else 0:.2f} (writer re-encodes at q90)", file=sys.stderr)


def epoch_rate(loader) -> float:
    n, t = 0, time.perf_counter()
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        n += x.shape[0]
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    args = parse_args(argv)
    from fullrange.data import ViewSpec, read_sidecar, rrc_view_params, train_loader, write_imagefolder
    from fullrange.data.imagefolder import list_classes, scan_split

    tmp = tempfile.TemporaryDirectory(prefix="fullrange-bench-")
    src = args.data or build_tree(Path(tmp.name) / "src", args.images)
    classes = list_classes(src / "train")
    files, _ = scan_split(src / "train", classes)
    n = min(args.images, len(files))
    if n < len(files):  # a subset: a tree of its first n files, linked, not copied
        sub = Path(tmp.name) / "subset"
        for f in files[:n]:
            (sub / "train" / f).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src / "train" / f, sub / "train" / f)
        for c in classes:
            (sub / "val" / c).mkdir(parents=True, exist_ok=True)
        first = files[0]
        os.symlink(src / "train" / first, sub / "val" / first)
        src, files = sub, files[:n]
    print(f"{n} JPEGs from {src} ({len(classes)} classes), {args.workers} workers, "
          f"batch {args.batch_size}, {args.size}x{args.size} uint8 out", file=sys.stderr)

    seed = 0
    pipelines = {}
    for mode in ("jpg", "proportion"):
        out = write_imagefolder(src, Path(tmp.name) / mode, write_mode=mode, max_resolution=500,
                                num_workers=args.workers, progress=False)
        meta = read_sidecar(out["train"])
        pipelines[f"fullrange ffcv {mode}"] = (
            train_loader(out["train"], args.batch_size, args.workers, ViewSpec(seed=seed, image_size=args.size),
                         distributed=False, drop_last=False),
            meta["stored_jpeg"])

    from PIL import Image

    sizes = np.array([Image.open(src / "train" / f).size for f in files])  # (w, h)
    top, left, h, w, flip = rrc_view_params(seed, 0, np.arange(n), sizes[:, 1], sizes[:, 0])
    dataset = PilRRC([str(src / "train" / f) for f in files],
                     np.stack([top, left, h, w], 1).tolist(), flip.tolist(), args.size)
    pipelines["torch DataLoader + PIL"] = (
        torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                    num_workers=args.workers, persistent_workers=args.workers > 0,
                                    multiprocessing_context="spawn" if args.workers > 0 else None),
        n)

    check_same_views(pipelines["fullrange ffcv proportion"][0], dataset)
    for loader, _ in pipelines.values():  # warm-up: compile, fork workers, page cache
        epoch_rate(loader)
    rates = {name: [] for name in pipelines}
    for _ in range(args.repeats):
        for name, (loader, _) in pipelines.items():
            rates[name].append(epoch_rate(loader))
    peer = statistics.median(rates["torch DataLoader + PIL"])

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"decode + RRC + flip -> {args.size}px uint8, {n} images, "
                        f"{args.workers} workers ({platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} CPUs)")
    for col in ("pipeline", "stored as JPEG", "images/s (median)", "range", "x DataLoader+PIL"):
        table.add_column(col, justify="left" if col == "pipeline" else "right")
    results = {}
    for name, (_, jpeg) in pipelines.items():
        med = statistics.median(rates[name])
        results[name] = {"images_per_s": med, "all": rates[name], "stored_jpeg": jpeg,
                         "ratio": med / peer}
        table.add_row(name, f"{jpeg}/{n}", f"{med:.0f}",
                      f"{min(rates[name]):.0f}-{max(rates[name]):.0f}", f"{med / peer:.2f}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"date": date.today().isoformat(), "images": n,
                                         "workers": args.workers, "batch_size": args.batch_size,
                                         "size": args.size, "cpus": os.cpu_count(),
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
