"""An ImageFolder tree (ImageNet layout) -> FFCV .beton files of RGB images + a JSON sidecar.

    SRC/train/<class>/<image>   ->  OUT_DIR/train.beton + train.beton.json
    SRC/val/<class>/<image>     ->  OUT_DIR/val.beton   + val.beton.json

Classes are the sorted directory names under SRC/train (label = position); val may hold a
subset of them, never another one. Samples are written in (class, sorted file name) order; the
row number is the 'index' field. Fields:
    'image'  RGBImageField(write_mode, max_resolution, jpeg_quality, compress_probability):
             PIL-decoded RGB, longer side shrunk to max_resolution (cv2 INTER_AREA) and stored as
             JPEG ('jpg'), raw pixels ('raw') or JPEG with probability p ('proportion': the
             choice is a hash of the index, so a rewrite stores the same thing)
    'label'  IntField,  'index'  IntField
Sidecar (fullrange-beton-v1, image_format "rgb_jpeg"): name, source, split, num_samples,
shape [null, null, 3] (sizes vary), max_shape, num_classes, classes, class_names, class_counts,
mean/std in pixel units (stats_from: "imagenet" = the standard ImageNet constants, the usual
choice for RGB photos and what torchvision teachers expect; or "computed" = exact per-channel
statistics of the train split's decoded source pixels, before the max-resolution shrink; val
files carry the train statistics), write_options, stored_jpeg (how many samples are JPEG),
fingerprint (sha256 over the write options, the classes and, per sample in order, its path,
label and a BLAKE2b digest of the source file's bytes), beton_bytes, fields.

Writing is parallel (FFCV writer processes), shows a progress bar, and atomic: the beton is
written under a temporary name and renamed into place, then the sidecar. An unreadable image
fails the split with its path (nothing is published); a writer process that dies stops the
write with an error instead of hanging. An existing split written from the same source with the
same options is kept (up to date); a different one is an error unless overwrite=True.
"""
from __future__ import annotations

import _thread
import contextlib
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fullrange.atomic import atomic_path, write_text_atomic

from .hashing import mix, u64
from .writer import (FIELDS, SIDECAR_FORMAT, quiet_ffcv_writer, read_sidecar,
                     sidecar_path)

log = logging.getLogger(__name__)

IMAGE_FORMAT = "rgb_jpeg"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
WRITE_MODES = ("proportion", "jpg", "raw")
IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]  # pixel units 0..255
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
STATS = ("imagenet", "computed")
_DIGEST = 16  # bytes of BLAKE2b per source file
DEAD_WRITER_GRACE_S = 5.0  # no writer process alive this long, write unfinished: it failed


def list_classes(train_dir: Path) -> list[str]:
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{train_dir}: not found (expected an ImageFolder tree "
                                "SRC/train/<class>/*.jpg and SRC/val/<class>/*.jpg)")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{train_dir}: no class directories (expected {train_dir}/<class>/*.jpg)")
    return classes


def scan_split(split_dir: str | os.PathLike, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """Relative image paths and labels of one split, in (class, file name) order.
    FileNotFoundError / ValueError name the directory: missing, no images, unknown class."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: not found (expected {split_dir}/<class>/*.jpg)")
    label_of = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if d.name not in label_of:
            raise ValueError(f"{d}: class {d.name!r} is not a class of the train split "
                             f"({len(classes)} classes under {split_dir.parent / 'train'})")
        names = sorted(f.name for f in d.iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        files += [f"{d.name}/{n}" for n in names]
        labels += [label_of[d.name]] * len(names)
    if not files:
        raise ValueError(f"{split_dir}: no images found (expected {split_dir}/<class>/*.jpg "
                         f"with extensions {', '.join(IMAGE_EXTENSIONS)})")
    return files, np.asarray(labels, dtype=np.int64)


class _FolderRows:
    """What FFCV's writer processes index: row i -> (RGB uint8 [H, W, 3], label, i).

    Side effects, in shared memory inherited by the writer processes: a per-row digest of the
    source file, a progress counter, optional pixel sums; unreadable files are appended to
    `errors_dir`/<pid>.txt and written as a 1x1 black image (the split then fails)."""

    def __init__(self, root: Path, files: list[str], labels: np.ndarray, errors_dir: str,
                 compute_stats: bool):
        self.root, self.files, self.labels = root, files, labels
        self.errors_dir, self.compute_stats = errors_dir, compute_stats
        self.digests = multiprocessing.RawArray("B", _DIGEST * len(files))
        self.done = multiprocessing.Value("q", 0)
        self.sums = multiprocessing.Array("q", 7)  # sum c0..2, sum of squares c0..2, pixels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        i = int(i)  # FFCV passes numpy integers
        path = self.root / self.files[i]
        try:
            raw = path.read_bytes()
            with Image.open(io.BytesIO(raw)) as im:
                img = np.asarray(im.convert("RGB"))
            digest = hashlib.blake2b(raw, digest_size=_DIGEST).digest()
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported by path
            with open(os.path.join(self.errors_dir, f"{os.getpid()}.txt"), "a") as f:
                f.write(f"{path}: {type(e).__name__}: {e}".replace("\n", " ") + "\n")
            img, digest = np.zeros((1, 1, 3), np.uint8), bytes(_DIGEST)
        self.digests[i * _DIGEST:(i + 1) * _DIGEST] = digest
        if self.compute_stats:
            x = img.reshape(-1, 3)
            s = x.sum(0, dtype=np.int64)
            s2 = np.einsum("ij,ij->j", x.astype(np.int64), x.astype(np.int64))
            with self.sums.get_lock():
                for c in range(3):
                    self.sums[c] += int(s[c])
                    self.sums[3 + c] += int(s2[c])
                self.sums[6] += len(x)
        # RGBImageField(write_mode='proportion') draws np.random.rand() right after this call,
        # in this process: seeding from the index makes the JPEG/raw choice reproducible.
        np.random.seed(int(mix(u64(i)) >> np.uint64(32)))
        with self.done.get_lock():
            self.done.value += 1
        return img, int(self.labels[i]), int(i)

    def errors(self) -> list[str]:
        lines = []
        for name in sorted(os.listdir(self.errors_dir)):
            with open(os.path.join(self.errors_dir, name)) as f:
                lines += [ln.rstrip("\n") for ln in f if ln.strip()]
        return sorted(lines)

    def stats(self) -> tuple[list[float], list[float]]:
        s = np.array(self.sums[:], dtype=np.float64)
        n = max(s[6], 1.0)
        mean = s[:3] / n
        std = np.sqrt(np.maximum(s[3:6] / n - mean * mean, 0.0))
        return mean.tolist(), std.tolist()


def _page_size(max_resolution: int) -> int:
    """Smallest power-of-two page (>= FFCV's 2 MiB minimum) that holds one raw image."""
    need = 3 * max_resolution * max_resolution + (1 << 16)
    return max(1 << 21, 1 << (need - 1).bit_length())


class _WriterWatchdog:
    """Watches an FFCV DatasetWriter from a thread: feeds a progress bar from the rows' shared
    counter, and interrupts the main thread (turned into a RuntimeError by _writer_watch) when,
    between the writer's first step (prepare, right before it starts its processes) and its last
    (finalize: writing the metadata, which takes a while on ImageNet), no child process has been
    alive for DEAD_WRITER_GRACE_S: FFCV's writer waits forever for samples from a dead worker."""

    def __init__(self, writer, rows: _FolderRows, progress, task):
        self.rows, self.progress, self.task = rows, progress, task
        self.stop, self.started, self.finalizing = threading.Event(), threading.Event(), threading.Event()
        self.died = False
        prepare, finalize = writer.prepare, writer.finalize

        def prepare_flagged(*args, **kwargs):
            out = prepare(*args, **kwargs)
            self.started.set()
            return out

        def finalize_flagged(*args, **kwargs):
            self.finalizing.set()
            return finalize(*args, **kwargs)

        writer.prepare, writer.finalize = prepare_flagged, finalize_flagged  # this instance only
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        gone_since = None
        while not self.stop.wait(0.2):
            if self.progress is not None:
                self.progress.update(self.task, completed=self.rows.done.value)
            alive = bool(multiprocessing.active_children())
            if self.started.is_set() and not alive and not self.finalizing.is_set():
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > DEAD_WRITER_GRACE_S:
                    self.died = True
                    _thread.interrupt_main()
                    return
            else:
                gone_since = None


@contextmanager
def _writer_watch(writer, rows: _FolderRows, total: int, description: str, show: bool):
    """A rich progress bar for the writer (FFCV's own tqdm bar is silenced) and its watchdog."""
    from rich.console import Console

    from fullrange.progress import progress_bar

    progress = progress_bar(Console(stderr=True), True) if show else None
    task = progress.add_task(description, total=total) if progress is not None else None
    watchdog = _WriterWatchdog(writer, rows, progress, task)
    # the watchdog's interrupt is a simulated SIGINT: it must raise KeyboardInterrupt here even
    # where a SIGINT handler of ours (fullrange.preemption) or another library's is installed
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler) if in_main else None
    with quiet_ffcv_writer():
        try:
            if progress is not None:
                progress.start()
            watchdog.thread.start()
            yield
        except KeyboardInterrupt:
            if watchdog.died:
                raise RuntimeError("an FFCV writer process died before finishing its samples "
                                   "(out of memory? see its traceback above)") from None
            raise
        finally:
            watchdog.stop.set()
            if watchdog.thread.is_alive():
                watchdog.thread.join()
            if in_main:
                signal.signal(signal.SIGINT, previous)
            if progress is not None:
                progress.update(task, completed=rows.done.value)
                progress.stop()


def _options(write_mode: str, max_resolution: int, jpeg_quality: int,
             compress_probability: float) -> dict:
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode {write_mode!r}: expected one of {WRITE_MODES}")
    if not 1 <= int(max_resolution) <= 65535:
        raise ValueError(f"max_resolution {max_resolution}: expected 1..65535 pixels")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality {jpeg_quality}: expected 1..100")
    if not 0.0 <= float(compress_probability) <= 1.0:
        raise ValueError(f"compress_probability {compress_probability}: expected 0..1")
    return {"write_mode": write_mode, "max_resolution": int(max_resolution),
            "jpeg_quality": int(jpeg_quality),
            "compress_probability": float(compress_probability)}


def _up_to_date(path: Path, source: Path, options: dict, classes: list[str], n: int,
                overwrite: bool) -> dict | None:
    """The existing sidecar when `path` already holds this split, else None (or an error)."""
    if not (path.exists() or sidecar_path(path).exists()):
        return None
    try:
        meta = read_sidecar(path)
        same = (path.is_file() and meta.get("image_format") == IMAGE_FORMAT
                and meta.get("source") == str(source) and meta.get("write_options") == options
                and meta.get("classes") == classes and meta.get("num_samples") == n
                and path.stat().st_size == meta.get("beton_bytes"))
    except (FileNotFoundError, ValueError):
        same = False
    if same:
        return meta
    if overwrite:
        return None
    raise ValueError(f"{path}: already exists and was not written from {source} with these "
                     "options (or is incomplete); pass --overwrite (overwrite=True) or choose "
                     "another OUT_DIR")


def _free_writer_memory(writer) -> None:
    """FFCV's writer leaves its shared metadata memory behind when a write is aborted."""
    sm = getattr(writer, "metadata_sm", None)
    if sm is not None and not isinstance(sm, int):
        with contextlib.suppress(OSError):  # already gone
            sm.close()
            sm.unlink()


def _write_beton_file(path: Path, rows: "_FolderRows", fields: dict, options: dict, workers: int,
                      description: str, progress: bool) -> tuple[list[int], int]:
    """Write rows to path atomically; returns (max stored shape [H, W, 3], samples stored as JPEG).
    ValueError (nothing written) when any image was unreadable."""
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter

    writer = None
    try:
        with atomic_path(path) as tmp:
            writer = DatasetWriter(str(tmp), fields, page_size=_page_size(options["max_resolution"]),
                                   num_workers=workers)
            with _writer_watch(writer, rows, len(rows), description, progress):
                writer.from_indexed_dataset(rows, chunksize=64)
            errors = rows.errors()
            if errors:
                more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
                raise ValueError(f"{rows.root}: {len(errors)} unreadable image(s), nothing written "
                                 f"to {path}: " + "; ".join(errors[:5]) + more)
            reader = Reader(str(tmp))
            meta_img = reader.metadata[f"f{list(reader.handlers).index('image')}"]
    finally:
        _free_writer_memory(writer)
    return [int(meta_img["height"].max()), int(meta_img["width"].max()), 3], int((meta_img["mode"] == 0).sum())


def _fingerprint(rows: "_FolderRows", files: list[str], labels: np.ndarray, options: dict,
                 classes: list[str]) -> str:
    """sha256 of the write options, the classes and, per sample, its path, label and BLAKE2b."""
    h = hashlib.sha256()
    h.update(json.dumps({"image_format": IMAGE_FORMAT, "write_options": options,
                         "classes": classes}, sort_keys=True).encode())
    digests = bytes(rows.digests)
    for i, (f, y) in enumerate(zip(files, labels.tolist())):
        h.update(f"{f}\0{y}\0".encode())
        h.update(digests[i * _DIGEST:(i + 1) * _DIGEST])
    return h.hexdigest()


def write_imagefolder_split(src_split: Path, path: Path, classes: list[str], options: dict,
                            mean=None, std=None, num_workers: int = 1, split: str = "",
                            progress: bool = True) -> dict:
    """Write one split (see module docstring); mean/std None = compute them from this split.
    Returns the sidecar dict."""
    from ffcv.fields import IntField, RGBImageField

    files, labels = scan_split(src_split, classes)
    errors_dir = tempfile.mkdtemp(prefix="fullrange-write-")
    rows = _FolderRows(src_split, files, labels, errors_dir, compute_stats=mean is None)
    fields = {"image": RGBImageField(write_mode=options["write_mode"],
                                     max_resolution=options["max_resolution"],
                                     jpeg_quality=options["jpeg_quality"],
                                     compress_probability=options["compress_probability"]),
              "label": IntField(), "index": IntField()}
    try:
        max_shape, stored_jpeg = _write_beton_file(path, rows, fields, options, max(1, min(int(num_workers), len(files))),
                                                   f"{split or path.stem}: {src_split}", progress)
    finally:
        shutil.rmtree(errors_dir, ignore_errors=True)
    stats_from = "imagenet"
    if mean is None:
        mean, std = rows.stats()
        stats_from = "computed"
    meta = {"format": SIDECAR_FORMAT, "image_format": IMAGE_FORMAT, "name": "imagefolder",
            "source": str(src_split), "split": split, "num_samples": len(files),
            "shape": [None, None, 3], "max_shape": max_shape, "num_classes": len(classes),
            "classes": classes, "class_names": list(classes),
            "class_counts": np.bincount(labels, minlength=len(classes)).tolist(),
            "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "stats_units": "pixels 0..255", "stats_from": stats_from,
            "write_options": options, "stored_jpeg": stored_jpeg,
            "fingerprint": _fingerprint(rows, files, labels, options, classes),
            "fingerprint_of": "write options, classes, per sample: path, label, BLAKE2b-128 "
                              "of the source file",
            "beton_bytes": path.stat().st_size, "fields": list(FIELDS)}
    write_text_atomic(sidecar_path(path), json.dumps(meta, indent=1))
    log.info("wrote %s (%d samples, %d as JPEG)", path, len(files), stored_jpeg)
    return meta


def write_imagefolder(src: str | os.PathLike, out_dir: str | os.PathLike, *,
                      max_resolution: int = 500, jpeg_quality: int = 90,
                      compress_probability: float = 0.5, write_mode: str = "proportion",
                      num_workers: int | None = None, stats: str = "imagenet",
                      overwrite: bool = False, progress: bool = True) -> dict:
    """SRC/{train,val}/<class>/* -> OUT_DIR/{train,val}.beton (+ .json); see module docstring.

    num_workers: writer processes (default: all CPUs). stats: "imagenet" or "computed".
    Returns {"train": path, "val": path, "meta": {"train": sidecar, "val": sidecar},
    "written": [splits actually written]}. Every input is checked before anything is written."""
    src, out = Path(src).resolve(), Path(out_dir)
    options = _options(write_mode, max_resolution, jpeg_quality, compress_probability)
    if stats not in STATS:
        raise ValueError(f"stats {stats!r}: expected one of {STATS}")
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not found (expected an ImageFolder tree with "
                                "train/<class>/*.jpg and val/<class>/*.jpg)")
    classes = list_classes(src / "train")
    counts = {s: len(scan_split(src / s, classes)[0]) for s in ("train", "val")}
    out.mkdir(parents=True, exist_ok=True)
    paths = {s: out / f"{s}.beton" for s in ("train", "val")}
    meta = {s: _up_to_date(paths[s], (src / s), options, classes, counts[s], overwrite)
            for s in ("train", "val")}
    workers = int(num_workers) if num_workers else (os.cpu_count() or 1)
    written = []
    for split in ("train", "val"):
        if meta[split] is not None:
            log.info("%s is up to date", paths[split])
            continue
        if split == "train":
            mean, std = (None, None) if stats == "computed" else (IMAGENET_MEAN, IMAGENET_STD)
        else:
            mean, std = meta["train"]["mean"], meta["train"]["std"]
        meta[split] = write_imagefolder_split(src / split, paths[split], classes, options,
                                              mean, std, workers, split, progress)
        if split == "val":
            meta["val"]["stats_from"] = meta["train"]["stats_from"] + " (train split)"
            write_text_atomic(sidecar_path(paths["val"]), json.dumps(meta["val"], indent=1))
        written.append(split)
    return {"train": str(paths["train"]), "val": str(paths["val"]), "meta": meta,
            "written": written}
