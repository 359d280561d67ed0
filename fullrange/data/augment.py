"""Replayable augmentation of small raw images: padded random crop + horizontal flip.

Every random choice is a pure function of (seed, epoch, sample index) through the counter
hash of fullrange.data.hashing, never a global RNG: the same triple gives the same view
whatever the batch size, sample order, loader worker count, world size or device, so a teacher
cache and a student see identical views and a resumed run continues exactly.

Recipe (AUGMENT_VERSION "splitmix64-v1"): dy = below(word 0, 2*pad + 1), dx = below(word 1,
2*pad + 1), flip = below(word 2, 2) (word 2's top bit). The draws are computed on the host from
the batch's CPU indices (a few integers per sample), the crop and flip run on the batch's device.
"""
from __future__ import annotations

import torch

from .hashing import HASH_VERSION, draws

AUGMENT_VERSION = HASH_VERSION


def view_epoch(epoch: int, views: int) -> int:
    """The augmentation epoch whose random views training epoch `epoch` sees: `epoch` itself
    when views == 0 (a new view every epoch), else epoch % views (a bank of `views` views per
    sample, cycled; the teacher cache then holds `views` views). The shuffle order always
    follows `epoch`."""
    if views < 0 or epoch < 0:
        raise ValueError(f"view_epoch: epoch {epoch} and views {views} must be >= 0")
    return epoch % views if views else epoch


def view_params(seed: int, epoch: int, indices, pad: int):
    """Crop offsets and flip bit of each sample's view.

    indices: int [B] sample indices (the beton's 'index' field) on the CPU. pad: padding in
    pixels. Returns CPU tensors (dy int64 [B] in [0, 2*pad], dx int64 [B] in [0, 2*pad],
    flip bool [B]). The crop keeps padded rows dy..dy+H-1 and columns dx..dx+W-1; dy = dx = pad
    is the identity crop. flip does not depend on pad."""
    if not 0 <= pad < 1 << 30:
        raise ValueError(f"pad must be in [0, 2**30), got {pad}")
    dy, dx, flip = draws(seed, epoch, indices, (0, 1, 2), (2 * pad + 1, 2 * pad + 1, 2))
    return dy, dx, flip.bool()


def pad_crop_flip(images: torch.Tensor, indices, seed: int, epoch: int,
                  pad: int, flip: bool = True) -> torch.Tensor:
    """Zero-pad by `pad`, crop back to H x W at the hashed offsets, flip horizontally if the
    hashed bit says so (and `flip`).

    images: [B, C, H, W], any dtype (uint8 or float), any device. indices: int [B] on the CPU.
    Returns a new contiguous [B, C, H, W] tensor of the same dtype and device.
    Vectorised: two gathers on the padded batch, no per-image Python loop."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if tuple(torch.as_tensor(indices).shape) != (b,):
        raise ValueError(f"indices must be [B={b}], got shape {tuple(torch.as_tensor(indices).shape)}")
    dy, dx, fl = (t.to(images.device, non_blocking=True) for t in view_params(seed, epoch, indices, pad))
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
