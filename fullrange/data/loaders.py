"""FFCV loaders for the .beton files written by fullrange.data.writer and .imagefolder.

The sidecar's image_format picks the image pipeline:
- "raw" (small fixed-size arrays, e.g. Fashion-MNIST): the pixels as stored; BatchPreparer
  augments them on the device (pad_crop_flip), `BetonLoader.augmented` is False.
- "rgb_jpeg" (ImageFolder / ImageNet): train decodes with ReplayableRRCDecoder (the replayable
  random resized crop + flip of the ViewSpec), val with CenterCropDecoder;
  `BetonLoader.augmented` is True for train.

Loaders yield (images uint8 [B, C, H, W] (channels_last memory), labels int64 [B], indices int64
[B]) on the CPU. They are REUSED buffers: fullrange.data.device_batches moves them safely.

Order: `BetonLoader.set_epoch(epoch, view, start_batch)` before each epoch. The shuffle is a
function of (seed, epoch) (FFCV's RANDOM order; distributed: a DistributedSampler permutation,
padded to whole shards, which is fine for training but double-counts in evaluation, so
val_loader shards itself with `indices=`); `view` is the augmentation epoch of the decoder's
random views (default: epoch); start_batch resumes inside an epoch without reading the batches
before it. len(loader) = batches per epoch on this rank.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .spec import ViewSpec
from .views import check_scale_ratio
from .writer import FIELDS, read_sidecar

IMAGE_FORMATS = ("raw", "rgb_jpeg")


def image_format(meta: dict) -> str:
    """The sidecar's image_format ("raw" when absent: files written before it existed)."""
    return meta.get("image_format", "raw")


def check_beton(path: str | os.PathLike) -> dict:
    """Validate a .beton and its sidecar before any loader is built; return the sidecar.

    FileNotFoundError if the beton or `<path>.json` is missing; ValueError if either is
    unreadable, truncated (size differs from the sidecar) or lacks the fields image/label/index."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: .beton not found (write it with "
                                "fullrange.data.prepare_bundled or write_beton)")
    meta = read_sidecar(p)
    size = p.stat().st_size
    if size != meta["beton_bytes"]:
        raise ValueError(f"{p}: {size} bytes but its sidecar says {meta['beton_bytes']}: "
                         "truncated or replaced; rewrite it")
    from ffcv.reader import Reader

    try:
        reader = Reader(str(p))
        fields = list(reader.handlers)
        n = int(reader.num_samples)
    except Exception as e:  # numpy/ffcv raise many kinds on a corrupt header
        raise ValueError(f"{p}: not a readable FFCV .beton ({type(e).__name__}: {e})") from None
    if fields != list(FIELDS) or n != meta["num_samples"]:
        raise ValueError(f"{p}: expected fields {list(FIELDS)} and {meta['num_samples']} "
                         f"samples, found {fields} and {n}")
    if image_format(meta) not in IMAGE_FORMATS:
        raise ValueError(f"{p}: sidecar image_format {image_format(meta)!r}, expected one of "
                         f"{IMAGE_FORMATS}")
    return meta


@contextlib.contextmanager
def _keep_torch_threads():
    """FFCV's Compiler.set_num_threads(num_workers) also calls torch.set_num_threads, on
    Loader construction and on every iter(): that would silently change the trainer's intra-op
    thread count (on a busy CPU, torch ops after it ran 20-50x slower in our measurement).
    Restore the caller's setting; numba's worker threads are left as FFCV set them."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _pipelines(image_decoder=None) -> dict:
    """Fresh decoder objects for every loader (FFCV operations must not be shared).
    image_decoder: an RGB view decoder (rgb_jpeg files), None for raw arrays."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.ndarray import NDArrayDecoder
    from ffcv.pipeline.pipeline_spec import PipelineSpec
    from ffcv.transforms import ToTensor

    # An explicit PipelineSpec decoder: FFCV only takes the first op of a plain list as the
    # decoder when it is an instance of the field's default decoder class.
    image = ([NDArrayDecoder(), ToTensor()] if image_decoder is None else
             PipelineSpec("image", decoder=image_decoder, transforms=[ToTensor()]))
    return {"image": image,
            "label": [IntDecoder(), ToTensor()],
            "index": [IntDecoder(), ToTensor()]}


def _check_common(batch_size: int, num_workers: int, batches_ahead: int) -> None:
    if batch_size < 1 or num_workers < 1 or batches_ahead < 1:
        raise ValueError(f"batch_size {batch_size}, num_workers {num_workers}, batches_ahead "
                         f"{batches_ahead}: each must be >= 1")


def _wait_for_batch(it) -> None:
    """Block until FFCV's epoch thread has a batch (or its end marker) queued. FFCV's own
    __next__ waits forever when that thread died (a decoder that raised, a failed compile):
    raise instead, pointing at the traceback the thread printed."""
    q = getattr(it, "output_queue", None)
    if q is None or not hasattr(it, "is_alive"):
        return
    with q.not_empty:
        while not q._qsize():
            if not it.is_alive():
                raise RuntimeError("the FFCV loader thread stopped before the end of the epoch "
                                   "(its exception is printed above)")
            q.not_empty.wait(0.5)


class BetonLoader:
    """Thin wrapper over an ffcv Loader: yields (images [B,C,H,W] uint8, labels [B] int64,
    indices [B] int64). `loader` is None when this rank's shard is empty (yields nothing).

    Attributes: meta (sidecar dict), num_samples (samples this rank sees per epoch before
    drop_last), batch_size, loader (the ffcv Loader), decoder (the image view decoder of
    rgb_jpeg files, else None), augmented (True when the decoder already applied the random
    view: the consumer must not augment again)."""

    def __init__(self, loader, meta: dict, num_samples: int, batch_size: int, decoder=None,
                 augmented: bool = False, view: int | None = None):
        self.loader, self.meta = loader, meta
        self.num_samples, self.batch_size = num_samples, batch_size
        self.decoder, self.augmented = decoder, augmented
        self.view = view  # the decoder's augmentation epoch; None: the ordering epoch
        self.start_batch = 0  # batches of the next iteration to skip without reading them

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will use (FFCV's `next_epoch`)."""
        return 0 if self.loader is None else int(self.loader.next_epoch)

    @property
    def epoch_view(self) -> int:
        """The augmentation epoch of the next iteration's random views: the `view` given to
        set_epoch, else the ordering epoch."""
        return self.epoch if self.view is None else self.view

    def set_epoch(self, epoch: int, view: int | None = None, start_batch: int = 0) -> None:
        """Make the next iteration use `epoch`'s order (e.g. when resuming) and, for rgb_jpeg
        files, the random views of augmentation epoch `view` (default: `epoch`; see
        fullrange.data.augment.view_epoch for cycling a few views over many epochs).
        start_batch: the next iteration begins at that batch of the epoch (a resume inside an
        epoch); the batches before it are neither read nor decoded."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if self.loader is not None:
            self.loader.next_epoch = int(epoch)
        self.view = None if view is None else int(view)
        self.start_batch = int(start_batch)

    def _epoch_iterator(self):
        """FFCV's Loader.__iter__ (1.0.2), except that the epoch's order starts at
        start_batch * batch_size: the same batches as a full epoch after skipping start_batch."""
        loader, start, self.start_batch = self.loader, self.start_batch, 0
        if not start:
            return iter(loader)
        from ffcv.loader.epoch_iterator import EpochIterator
        from ffcv.pipeline.compiler import Compiler

        Compiler.set_num_threads(loader.num_workers)
        order = loader.next_traversal_order()[:len(loader) * loader.batch_size]
        loader.next_epoch += 1
        if loader.code is None or loader.recompile:
            loader.generate_code()
        return EpochIterator(loader, order[start * loader.batch_size:])

    def __len__(self) -> int:
        return 0 if self.loader is None else len(self.loader)

    @property
    def view_recipe(self) -> dict | None:
        """The decoder's view recipe (rgb_jpeg files), None for raw files (see pad_crop_flip)."""
        return self.decoder.recipe() if self.decoder is not None else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.loader is None:
            return
        failed_before = 0
        if self.decoder is not None:  # the views of this iteration use its ordering epoch
            self.decoder.set_epoch(self.loader.next_epoch if self.view is None else self.view)
            failed_before = self.decoder.failed_decodes
        with _keep_torch_threads():
            it = self._epoch_iterator()
        exhausted = False
        try:
            while True:
                _wait_for_batch(it)
                try:
                    images, labels, indices = next(it)
                except StopIteration:
                    break
                yield images.permute(0, 3, 1, 2), labels.view(-1), indices.view(-1)
            exhausted = True  # FFCV closed it itself
            failed = self.decoder.failed_decodes - failed_before if self.decoder is not None else 0
            if failed:
                warnings.warn(f"{self.loader.reader.file_name}: {failed} sample(s) failed to "
                              "decode this epoch (corrupt JPEG data) and were given as black "
                              "images; rewrite the .beton", RuntimeWarning, stacklevel=2)
        finally:
            if not exhausted:
                it.close()  # consumer broke early: stop FFCV's prefetch thread


def train_decoder(meta: dict, spec: ViewSpec):
    """A fresh ReplayableRRCDecoder for rgb_jpeg files (spec's crop, flip and output size), None
    for raw files."""
    if image_format(meta) != "rgb_jpeg":
        return None
    from .decoders import ReplayableRRCDecoder

    scale, ratio = check_scale_ratio(spec.scale, spec.ratio)
    return ReplayableRRCDecoder(spec.image_size, spec.seed, scale, ratio, spec.flip)


def train_loader(path, batch_size: int, num_workers: int, spec: ViewSpec, distributed: bool,
                 os_cache: bool = True, drop_last: bool = True, batches_ahead: int = 3) -> BetonLoader:
    """Shuffled training loader (FFCV order RANDOM, reshuffled each epoch from spec.seed + epoch).

    distributed=True: FFCV shards the permutation across torch.distributed ranks (padded,
    see module docstring); torch.distributed must be initialised first.
    os_cache=True shares the page cache between processes; False uses FFCV's process cache.
    batches_ahead: batches FFCV prepares ahead of the consumer.
    rgb_jpeg files are decoded with the replayable random resized crop + flip of `spec`; raw
    files yield the stored pixels (augment with pad_crop_flip: fullrange.data.BatchPreparer)."""
    from ffcv.loader import Loader, OrderOption

    _check_common(batch_size, num_workers, batches_ahead)
    meta = check_beton(path)
    decoder = train_decoder(meta, spec)
    if distributed:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("train_loader(distributed=True) needs torch.distributed "
                               "initialised first (accelerate / torchrun do it)")
        world = dist.get_world_size()
        n_rank = -(-meta["num_samples"] // world)
    else:
        n_rank = meta["num_samples"]
    with _keep_torch_threads():
        loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                        os_cache=os_cache, order=OrderOption.RANDOM, distributed=distributed,
                        seed=int(spec.seed), pipelines=_pipelines(decoder), drop_last=drop_last,
                        batches_ahead=batches_ahead)
    return BetonLoader(loader, meta, n_rank, batch_size, decoder, augmented=decoder is not None)


def view_loader(path, indices, batch_size: int, num_workers: int, spec: ViewSpec, view: int,
                os_cache: bool = True, batches_ahead: int = 3) -> BetonLoader:
    """The training views of augmentation epoch `view` for `indices` (int [n], any order),
    yielded in that order (SEQUENTIAL, drop_last=False): what the teacher cache runs the
    teacher on. rgb_jpeg files are decoded with the training decoder at epoch `view`
    (`augmented` is True); raw files yield the stored pixels, which BatchPreparer augments as
    the trainer does."""
    from ffcv.loader import Loader, OrderOption

    _check_common(batch_size, num_workers, batches_ahead)
    meta = check_beton(path)
    idx = np.asarray(indices, dtype=np.uint64).reshape(-1)
    if len(idx) == 0:
        return BetonLoader(None, meta, 0, batch_size)
    if int(idx.max()) >= meta["num_samples"]:
        raise ValueError(f"{path}: index {int(idx.max())} out of range for {meta['num_samples']} samples")
    decoder = train_decoder(meta, spec)
    with _keep_torch_threads():
        loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                        os_cache=os_cache, order=OrderOption.SEQUENTIAL, distributed=False,
                        indices=idx, pipelines=_pipelines(decoder), drop_last=False,
                        batches_ahead=batches_ahead)
    return BetonLoader(loader, meta, len(idx), batch_size, decoder, augmented=decoder is not None,
                       view=int(view))


def shard_indices(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous shard of range(num_samples) for `rank`: sizes differ by at most one, every
    index in exactly one shard, empty when rank >= num_samples."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    lo = rank * num_samples // world_size
    hi = (rank + 1) * num_samples // world_size
    return np.arange(lo, hi, dtype=np.uint64)


def val_loader(path, batch_size: int, num_workers: int, rank: int, world_size: int,
               spec: ViewSpec = ViewSpec(), os_cache: bool = True, batches_ahead: int = 3) -> BetonLoader:
    """Evaluation loader: SEQUENTIAL, drop_last=False, this rank's contiguous shard passed as
    `indices=` so the union over ranks is every sample exactly once, for any world size.
    A rank with an empty shard (world_size > N) yields nothing.
    rgb_jpeg files only: the centred square of side spec.val_crop_ratio * shorter side, resized
    to spec.val_image_size; 224/256 is ImageNet's "resize 256, centre-crop 224"."""
    from ffcv.loader import Loader, OrderOption

    _check_common(batch_size, num_workers, batches_ahead)
    meta = check_beton(path)
    idx = shard_indices(meta["num_samples"], rank, world_size)
    if len(idx) == 0:
        return BetonLoader(None, meta, 0, batch_size)
    decoder = None
    if image_format(meta) == "rgb_jpeg":
        from .decoders import CenterCropDecoder

        decoder = CenterCropDecoder(spec.val_image_size, spec.val_crop_ratio)
    with _keep_torch_threads():
        loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                        os_cache=os_cache, order=OrderOption.SEQUENTIAL, distributed=False,
                        indices=idx, pipelines=_pipelines(decoder), drop_last=False,
                        batches_ahead=batches_ahead)
    return BetonLoader(loader, meta, len(idx), batch_size, decoder)


def normalize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor, dtype: torch.dtype = torch.float32,
              channels_last: bool = False) -> torch.Tensor:
    """(images - mean) / std per channel, computed in float32 on images' device, then cast.

    images: uint8 (or float) [B, C, H, W]; mean/std: C values in pixel units (the sidecar's).
    Returns dtype [B, C, H, W]; channels_last=True returns torch.channels_last memory."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    c = images.shape[1]
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).reshape(1, -1, 1, 1)
    if m.shape[1] != c or s.shape[1] != c:
        raise ValueError(f"mean/std need {c} values, got {m.numel()} / {s.numel()}")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = images.to(torch.float32, memory_format=fmt)
    x = (x - m) * (1.0 / s)
    return x.to(dtype, memory_format=fmt)
