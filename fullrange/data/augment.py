"""Replayable augmentation: padded random crop + horizontal flip drawn from a hash.

Every random choice is a pure function of (seed, epoch, sample index), computed by a
counter-based integer hash (splitmix64's finaliser), never by a global RNG. The same triple gives
the same view whatever the batch size, sample order, loader worker count, world size or
device, so a teacher cache and a student see identical views and a resumed run continues
exactly.

Hash (AUGMENT_VERSION = "splitmix64-v1"), all arithmetic modulo 2**64:
    mix(z)  = splitmix64 finaliser of z + 0x9E3779B97F4A7C15
    key     = mix(mix(mix(seed) ^ epoch) ^ index)
    word_k  = mix(key ^ k)            k = 0 (dy), 1 (dx), 2 (flip)
    dy, dx  = ((word >> 32) * (2*pad + 1)) >> 32     (Lemire range reduction, in [0, 2*pad])
    flip    = word_2 >> 63                           (top bit)
Other replayable draws take further words of the same key through `hash_words`; the word
numbers in use: 0-2 here, 8-47 views.py (random resized crop), 64-70 autoaugment.py.
Torch has no uint64, so this runs on int64: multiplication wraps modulo 2**64 like uint64 and
right shifts are arithmetic, so each shift is masked to make it logical. A pure-Python reference
(`_reference_words`) is kept for tests.
"""
from __future__ import annotations

import torch

AUGMENT_VERSION = "splitmix64-v1"

_M64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    c &= _M64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_C1 = _i64(0xBF58476D1CE4E5B9)
_C2 = _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = z + _GOLDEN
    z = (z ^ _shr(z, 30)) * _C1
    z = (z ^ _shr(z, 27)) * _C2
    return z ^ _shr(z, 31)


def _key(seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    idx = indices.to(torch.int64)
    s = _mix(torch.tensor(_i64(seed), dtype=torch.int64, device=idx.device))
    s = _mix(s ^ _i64(epoch))
    return _mix(s ^ idx)


def _below(word: torch.Tensor, n: int) -> torch.Tensor:
    """Map a 64-bit hash word to [0, n) with the high 32 bits (bias <= n / 2**32)."""
    return _shr(_shr(word, 32) * n, 32)


def hash_words(seed: int, epoch: int, indices: torch.Tensor, ks) -> list[torch.Tensor]:
    """The hash words word_k = mix(key ^ k), k in `ks`, of each sample's key (see the module
    docstring): the raw 64-bit draws (as int64 bits) of every replayable augmentation.

    indices: int64 [B]. Returns one int64 [B] per k, on the device of `indices`."""
    key = _key(seed, epoch, torch.as_tensor(indices))
    return [_mix(key ^ k) for k in ks]


def view_epoch(epoch: int, views: int) -> int:
    """The augmentation epoch whose random views training epoch `epoch` sees: `epoch` itself
    when views == 0 (a new view every epoch), else epoch % views (a bank of `views` views per
    sample, cycled; the teacher cache then holds `views` views). The shuffle order always
    follows `epoch`."""
    if views < 0 or epoch < 0:
        raise ValueError(f"view_epoch: epoch {epoch} and views {views} must be >= 0")
    return epoch % views if views else epoch


def view_params(seed: int, epoch: int, indices: torch.Tensor, pad: int):
    """Crop offsets and flip bit of each sample's view.

    indices: int64 [B] sample indices (the beton's 'index' field). pad: padding in pixels.
    Returns (dy int64 [B] in [0, 2*pad], dx int64 [B] in [0, 2*pad], flip bool [B]), on the
    device of `indices`. The crop keeps padded rows dy..dy+H-1 and columns dx..dx+W-1;
    dy = dx = pad is the identity crop. flip does not depend on pad."""
    if not 0 <= pad < 1 << 30:
        raise ValueError(f"pad must be in [0, 2**30), got {pad}")
    indices = torch.as_tensor(indices)
    key = _key(seed, epoch, indices)
    n = 2 * pad + 1
    dy = _below(_mix(key ^ 0), n)
    dx = _below(_mix(key ^ 1), n)
    flip = _shr(_mix(key ^ 2), 63).bool()
    return dy, dx, flip


def pad_crop_flip(images: torch.Tensor, indices: torch.Tensor, seed: int, epoch: int,
                  pad: int, flip: bool = True) -> torch.Tensor:
    """Zero-pad by `pad`, crop back to H x W at the hashed offsets, flip horizontally if the
    hashed bit says so (and `flip`).

    images: [B, C, H, W], any dtype (uint8 or float), any device. indices: int64 [B].
    Returns a new contiguous [B, C, H, W] tensor of the same dtype and device.
    Vectorised: two gathers on the padded batch, no per-image Python loop."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    indices = torch.as_tensor(indices).to(images.device)
    if indices.shape != (b,):
        raise ValueError(f"indices must be [B={b}], got shape {tuple(indices.shape)}")
    dy, dx, fl = view_params(seed, epoch, indices, pad)
    if not flip:
        fl = torch.zeros_like(fl)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad)) if pad else images
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = dy[:, None] + ar_h                                  # [B, H] rows of padded
    cols = dx[:, None] + torch.where(fl[:, None], w - 1 - ar_w, ar_w)  # [B, W]
    wp = w + 2 * pad
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, wp))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def _reference_words(seed: int, epoch: int, index: int) -> tuple[int, int, int]:
    """Pure-Python uint64 reference of the three hash words (for tests)."""

    def mix(z):
        z = (z + 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        return z ^ (z >> 31)

    key = mix(mix(mix(seed & _M64) ^ (epoch & _M64)) ^ (index & _M64))
    return mix(key ^ 0), mix(key ^ 1), mix(key ^ 2)
