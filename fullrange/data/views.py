"""Replayable views of RGB images of any size: RandomResizedCrop + flip, and the centre crop.

Every random choice is a pure function of (seed, epoch, sample index), drawn from the
splitmix64 counter hash of :mod:`fullrange.data.hashing`, so
a view is the same for the same triple whatever the batch size, loader worker count, world
size or process. The teacher cache, the tests and the FFCV decoder
(:mod:`fullrange.data.decoders`) all call the numba-compiled functions below, so there is one
implementation of the draw.

Random-resized-crop recipe (RRC_VERSION "rrc-splitmix64-v1"), all integers uint64 mod 2**64:
    key, word(k), unit, below   as in fullrange.data.hashing
    flip         = word(2) >> 63                                 (pad_crop_flip's flip bit)
    attempt a = 0..9, b = 8 + 4a:
        area   = H * W * (scale_min + (scale_max - scale_min) * unit(word(b)))
        aspect = exp(log r_min + (log r_max - log r_min) * unit(word(b + 1)))
        w = floor(sqrt(area * aspect) + 0.5); h = floor(sqrt(area / aspect) + 0.5)
        if 0 < w <= W and 0 < h <= H:
            top = below(word(b + 2), H - h + 1); left = below(word(b + 3), W - w + 1); done
    fallback (no attempt fits): the largest centred crop whose aspect ratio is clamped to
        [r_min, r_max] (W/H < r_min: w = W, h = round(W / r_min); W/H > r_max: h = H,
        w = round(H * r_max); else the whole image); top = (H - h) // 2, left = (W - w) // 2.
This is the usual ImageNet RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3)) with
round-half-up instead of Python's round-half-even (ties have probability ~0).

Centre view (validation): a centred square of side floor(crop_ratio * min(H, W) + 0.5)
(at least 1), top = (H - side) // 2, left = (W - side) // 2, then resized to the output size:
"resize the shorter side to 256, centre-crop 224" is crop_ratio = 224/256 with one resize.

The decoder resizes the crop to the output with an antialiased bilinear filter
(fullrange.data.resample, PIL's / torchvision's BILINEAR to within 1 level), then mirrors it:
`resample.resize_crop(img, top, left, h, w, (out_h, out_w), flip)` reproduces it exactly, and
`PIL.Image.fromarray(img).crop((left, top, left + w, top + h)).resize((out_w, out_h),
BILINEAR)` (then FLIP_LEFT_RIGHT) to within 1 level.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .hashing import below, mix, u64, unit, view_key

RRC_VERSION = "rrc-splitmix64-v1"
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
DEFAULT_CROP_RATIO = 224.0 / 256.0
RRC_ATTEMPTS = 10

_U2 = np.uint64(2)
_U8 = np.uint64(8)
_U63 = np.uint64(63)


@njit(cache=True, nogil=True)
def rrc_one(key, height, width, scale_min, scale_max, ratio_min, ratio_max):
    """(top, left, h, w, flip) of one sample's random resized crop; key from view_key()."""
    flip = (mix(key ^ _U2) >> _U63) == np.uint64(1)
    area = np.float64(height) * np.float64(width)
    log_lo = math.log(ratio_min)
    log_hi = math.log(ratio_max)
    for a in range(RRC_ATTEMPTS):
        b = _U8 + np.uint64(4 * a)
        target = area * (scale_min + (scale_max - scale_min) * unit(mix(key ^ b)))
        aspect = math.exp(log_lo + (log_hi - log_lo) * unit(mix(key ^ (b + np.uint64(1)))))
        w = np.int64(math.floor(math.sqrt(target * aspect) + 0.5))
        h = np.int64(math.floor(math.sqrt(target / aspect) + 0.5))
        if 0 < w <= width and 0 < h <= height:
            top = below(mix(key ^ (b + np.uint64(2))), height - h + 1)
            left = below(mix(key ^ (b + np.uint64(3))), width - w + 1)
            return top, left, h, w, flip
    in_ratio = np.float64(width) / np.float64(height)
    if in_ratio < ratio_min:
        w = np.int64(width)
        h = np.int64(math.floor(w / ratio_min + 0.5))
    elif in_ratio > ratio_max:
        h = np.int64(height)
        w = np.int64(math.floor(h * ratio_max + 0.5))
    else:
        w = np.int64(width)
        h = np.int64(height)
    h = max(np.int64(1), min(h, np.int64(height)))
    w = max(np.int64(1), min(w, np.int64(width)))
    return (height - h) // 2, (width - w) // 2, h, w, flip


@njit(cache=True, nogil=True)
def center_one(height, width, crop_ratio):
    """(top, left, side, side) of the centred square crop used for validation."""
    side = np.int64(math.floor(crop_ratio * min(height, width) + 0.5))
    side = max(np.int64(1), min(side, np.int64(min(height, width))))
    return (height - side) // 2, (width - side) // 2, side, side


@njit(cache=True, nogil=True)
def _rrc_batch(seed, epoch, indices, heights, widths, scale_min, scale_max, ratio_min,
               ratio_max, out):
    for k in range(len(indices)):
        key = view_key(seed, epoch, np.uint64(indices[k]))
        top, left, h, w, flip = rrc_one(key, np.int64(heights[k]), np.int64(widths[k]),
                                        scale_min, scale_max, ratio_min, ratio_max)
        out[k, 0] = top
        out[k, 1] = left
        out[k, 2] = h
        out[k, 3] = w
        out[k, 4] = 1 if flip else 0


def check_scale_ratio(scale, ratio) -> tuple[tuple[float, float], tuple[float, float]]:
    """Validate RandomResizedCrop's scale and ratio ranges; return them as float pairs."""
    s0, s1 = (float(v) for v in scale)
    r0, r1 = (float(v) for v in ratio)
    if not 0.0 < s0 <= s1 <= 1.0:
        raise ValueError(f"rrc scale {tuple(scale)}: need 0 < min <= max <= 1")
    if not 0.0 < r0 <= r1:
        raise ValueError(f"rrc ratio {tuple(ratio)}: need 0 < min <= max")
    return (s0, s1), (r0, r1)


def rrc_view_params(seed: int, epoch: int, indices, height, width, scale=DEFAULT_SCALE,
                    ratio=DEFAULT_RATIO):
    """The random-resized-crop view of each sample, exactly as the training decoder draws it.

    indices: int [B] sample indices (the beton's 'index' field / row number). height, width:
    each image's stored size, int [B] or scalars (broadcast). scale: fraction of the area,
    ratio: aspect ratio (w/h) range. Returns numpy int64 arrays (top [B], left [B], h [B],
    w [B]) and flip bool [B]: the crop is image[top:top+h, left:left+w], resized to the output
    size, then mirrored left-right where flip (when the loader's flip option is on)."""
    (s0, s1), (r0, r1) = check_scale_ratio(scale, ratio)
    idx = np.asarray(indices).astype(np.int64, copy=False).reshape(-1)
    hs = np.broadcast_to(np.asarray(height, dtype=np.int64), idx.shape)
    ws = np.broadcast_to(np.asarray(width, dtype=np.int64), idx.shape)
    if (hs < 1).any() or (ws < 1).any():
        raise ValueError("rrc_view_params: image heights and widths must be >= 1")
    out = np.empty((len(idx), 5), np.int64)
    _rrc_batch(u64(seed), u64(epoch), idx, np.ascontiguousarray(hs), np.ascontiguousarray(ws),
               s0, s1, r0, r1, out)
    return out[:, 0], out[:, 1], out[:, 2], out[:, 3], out[:, 4].astype(bool)


def center_view_params(height, width, crop_ratio: float = DEFAULT_CROP_RATIO):
    """The validation view: centred square crops. height, width: int [B] (or scalars).
    Returns int64 arrays (top, left, h, w); resize each crop to the output size."""
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio {crop_ratio}: need 0 < crop_ratio <= 1")
    hs = np.atleast_1d(np.asarray(height, dtype=np.int64))
    ws = np.atleast_1d(np.asarray(width, dtype=np.int64))
    hs, ws = np.broadcast_arrays(hs, ws)
    out = np.array([center_one(int(h), int(w), float(crop_ratio)) for h, w in zip(hs, ws)],
                   dtype=np.int64).reshape(-1, 4)
    return out[:, 0], out[:, 1], out[:, 2], out[:, 3]
