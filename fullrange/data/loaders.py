"""FFCV loaders for the .beton files written by fullrange.data.writer.

Both loaders yield (images uint8 [B, C, H, W], labels int64 [B], indices int64 [B]) as CPU
tensors. images is a permuted view of FFCV's [B, H, W, C] buffer, so it is channels_last in
memory. All three are REUSED buffers (FFCV cycles batches_ahead + 2 slots): move them to the
device or clone them before keeping them past the next step.

How FFCV (1.0.2) orders an epoch (ffcv/loader/loader.py, ffcv/traversal_order/*.py):
- The Loader keeps a counter `next_epoch`, 0 at construction; every `iter(loader)` draws the
  order for `next_epoch` and then increments it. So iterating once per epoch gives epochs
  0, 1, 2, ...; `BetonLoader.set_epoch(e)` sets the counter (resume; or call it every epoch).
- RANDOM, single process: np.random.default_rng(seed + epoch).permutation(indices).
- RANDOM, distributed=True: a torch DistributedSampler(shuffle=True, seed, drop_last=False)
  built at construction (so torch.distributed must already be initialised; world size and rank
  come from it), set_epoch(epoch) each epoch: one permutation torch.randperm with generator
  seed + epoch, identical on all ranks, PADDED by repeating its head up to ceil(N/W)*W, then
  rank r takes positions r, r+W, r+2W, ... Every rank gets ceil(N/W) samples; when W does not
  divide N, ceil(N/W)*W - N samples appear twice per epoch (on different ranks). The Loader's
  drop_last then trims each rank to whole batches. Fine for training, wrong for exact
  evaluation -> val_loader shards itself with `indices=` and never uses distributed=True.
- len(loader) = batches per epoch on this rank (drop_last: floor, else ceil).
Engine pattern: `for e in range(start, epochs): loader.set_epoch(e); for x, y, i in loader:
pad_crop_flip(x, i, seed, e, pad)` -- explicit, resume-safe, and the augmentation epoch is the
ordering epoch. (Breaking out of an epoch early still consumes that epoch number.)
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .writer import FIELDS, read_sidecar


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


def _pipelines() -> dict:
    """Fresh decoder objects for every loader (FFCV operations must not be shared)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.ndarray import NDArrayDecoder
    from ffcv.transforms import ToTensor

    return {"image": [NDArrayDecoder(), ToTensor()],
            "label": [IntDecoder(), ToTensor()],
            "index": [IntDecoder(), ToTensor()]}


class BetonLoader:
    """Thin wrapper over an ffcv Loader: yields (images [B,C,H,W] uint8, labels [B] int64,
    indices [B] int64). `loader` is None when this rank's shard is empty (yields nothing).

    Attributes: meta (sidecar dict), num_samples (samples this rank sees per epoch before
    drop_last), batch_size, loader (the ffcv Loader)."""

    def __init__(self, loader, meta: dict, num_samples: int, batch_size: int):
        self.loader, self.meta = loader, meta
        self.num_samples, self.batch_size = num_samples, batch_size

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will use (FFCV's `next_epoch`)."""
        return 0 if self.loader is None else int(self.loader.next_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use `epoch`'s order (e.g. when resuming)."""
        if self.loader is not None:
            self.loader.next_epoch = int(epoch)

    def __len__(self) -> int:
        return 0 if self.loader is None else len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.loader is None:
            return
        with _keep_torch_threads():
            it = iter(self.loader)
        exhausted = False
        try:
            for images, labels, indices in it:
                yield images.permute(0, 3, 1, 2), labels.view(-1), indices.view(-1)
            exhausted = True  # FFCV closed it itself
        finally:
            if not exhausted:
                it.close()  # consumer broke early: stop FFCV's prefetch thread


def train_loader(path, batch_size: int, num_workers: int, seed: int, distributed: bool,
                 os_cache: bool = True, drop_last: bool = True) -> BetonLoader:
    """Shuffled training loader (FFCV order RANDOM, reshuffled each epoch from seed + epoch).

    distributed=True: FFCV shards the permutation across torch.distributed ranks (padded,
    see module docstring); torch.distributed must be initialised first.
    os_cache=True shares the page cache between processes; False uses FFCV's process cache."""
    from ffcv.loader import Loader, OrderOption

    meta = check_beton(path)
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
                        seed=int(seed), pipelines=_pipelines(), drop_last=drop_last)
    return BetonLoader(loader, meta, n_rank, batch_size)


def shard_indices(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous shard of range(num_samples) for `rank`: sizes differ by at most one, every
    index in exactly one shard, empty when rank >= num_samples."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    lo = rank * num_samples // world_size
    hi = (rank + 1) * num_samples // world_size
    return np.arange(lo, hi, dtype=np.uint64)


def val_loader(path, batch_size: int, num_workers: int, rank: int, world_size: int,
               os_cache: bool = True) -> BetonLoader:
    """Evaluation loader: SEQUENTIAL, drop_last=False, this rank's contiguous shard passed as
    `indices=` so the union over ranks is every sample exactly once, for any world size.
    A rank with an empty shard (world_size > N) yields nothing."""
    from ffcv.loader import Loader, OrderOption

    meta = check_beton(path)
    idx = shard_indices(meta["num_samples"], rank, world_size)
    if len(idx) == 0:
        return BetonLoader(None, meta, 0, batch_size)
    with _keep_torch_threads():
        loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                        os_cache=os_cache, order=OrderOption.SEQUENTIAL, distributed=False,
                        indices=idx, pipelines=_pipelines(), drop_last=False)
    return BetonLoader(loader, meta, len(idx), batch_size)


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
