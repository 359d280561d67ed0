"""Crop + resize (+ mirror) of uint8 RGB images with an antialiased bilinear filter, in numba.

The filter is the triangle ("bilinear") kernel widened by the downscale factor, i.e. what
PIL's Image.resize(..., BILINEAR) and torchvision's RandomResizedCrop on PIL images compute:
along each axis, with in = crop length, out = output length, s = in / out, f = max(s, 1):
    centre_i = (i + 0.5) * s                           (crop coordinates, i = 0..out-1)
    taps     x = int(centre_i - f + 0.5) .. int(centre_i + f + 0.5) - 1, clipped to the crop
    weight   max(0, 1 - |x + 0.5 - centre_i| / f), normalised to sum 1, then quantised to
             round(weight * 2**14)
Only pixels inside the crop contribute (crop first, then resize). Arithmetic is integer
(RESAMPLE_VERSION "triangle-fixed14-v1"): rows first, sum of weight * pixel kept with 7
fractional bits, round((sum) / 2**7), into a transposed int32 buffer; then columns,
out = clip((sum + 2**20) >> 21, 0, 255). Integers make the result bit-identical in every
compiled context (float code may be contracted into FMAs differently inside the decoder's
parallel kernel) and on every machine. PIL rounds to whole levels between its passes and uses
22-bit weights, so the two agree to within 1 level.

Both passes are contiguous multiply-adds that LLVM vectorises; cost per image
~ (out_h * w + out_w * out_h) * 3 * taps: 2-3x faster than OpenCV's INTER_AREA on
non-integer downscales (its scalar path) and than PIL on our machines (BENCHMARKS.md).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

RESAMPLE_VERSION = "triangle-fixed14-v1"  # bump when the output pixels of resize_crop change
_WBITS = 14    # weight precision
_MIDBITS = 7   # fractional bits kept between the passes


@njit(cache=True, nogil=True)
def _taps(in_size, out_size, first, weights):
    """Fill first[i] (first source index) and weights[i, :] (int32, summing to ~2**14) for
    each output i; the weights beyond a row's span are 0."""
    scale = in_size / out_size
    f = max(scale, 1.0)
    ntaps = weights.shape[1]
    w = np.empty(ntaps, np.float64)
    for i in range(out_size):
        centre = (i + 0.5) * scale
        lo = max(int(centre - f + 0.5), 0)
        hi = min(int(centre + f + 0.5), in_size)
        total = 0.0
        for t in range(ntaps):
            x = lo + t
            wt = 0.0
            if x < hi:
                d = abs(x + 0.5 - centre) / f
                if d < 1.0:
                    wt = 1.0 - d
            w[t] = wt
            total += wt
        for t in range(ntaps):
            weights[i, t] = np.int32(math.floor(w[t] / total * (1 << _WBITS) + 0.5))
        first[i] = lo


@njit(cache=True, nogil=True)
def max_taps(in_size, out_size):
    return int(math.ceil(max(in_size / out_size, 1.0))) * 2 + 1


@njit(cache=True, nogil=True)
def resize_crop_into(src, top, left, h, w, dst, mirror):
    """dst uint8 [OH, OW, 3] <- src uint8 [H, W, 3][top:top+h, left:left+w] resized, mirrored
    left-right if `mirror`. src must be C-contiguous."""
    oh, ow = dst.shape[0], dst.shape[1]
    width = src.shape[1]
    flat = src.reshape(src.size)
    ty = max_taps(h, oh)
    tx = max_taps(w, ow)
    fy = np.empty(oh, np.int64)
    wy = np.empty((oh, ty), np.int32)
    fx = np.empty(ow, np.int64)
    wx = np.empty((ow, tx), np.int32)
    _taps(h, oh, fy, wy)
    _taps(w, ow, fx, wx)
    row = w * 3
    col = oh * 3
    acc = np.empty(max(row, col), np.int32)
    tmp = np.empty(w * col, np.int32)  # [x, i, c]: rows resized, stored column-major
    out = dst.reshape(oh * ow * 3)
    half_mid = np.int32(1 << (_WBITS - _MIDBITS - 1))
    half_out = np.int32(1 << (_WBITS + _MIDBITS - 1))
    # (loops run over views indexed from 0 so that LLVM can drop numba's negative-index
    # wraparound and vectorise them)
    for i in range(oh):                   # pass 1: along y, contiguous over (x, c)
        a = acc[:row]
        a[:] = half_mid
        for t in range(ty):
            wt = wy[i, t]
            if wt == 0:
                continue
            base = ((top + fy[i] + t) * width + left) * 3
            srow = flat[base:base + row]
            for q in range(row):
                a[q] += wt * np.int32(srow[q])
        tcol = tmp[i * 3:]
        for x in range(w):
            tcol[x * col] = a[x * 3] >> (_WBITS - _MIDBITS)
            tcol[x * col + 1] = a[x * 3 + 1] >> (_WBITS - _MIDBITS)
            tcol[x * col + 2] = a[x * 3 + 2] >> (_WBITS - _MIDBITS)
    for j in range(ow):                   # pass 2: along x, contiguous over (i, c)
        a = acc[:col]
        a[:] = half_out
        for t in range(tx):
            wt = wx[j, t]
            if wt == 0:
                continue
            base = (fx[j] + t) * col
            trow = tmp[base:base + col]
            for q in range(col):
                a[q] += wt * trow[q]
        jj = ow - 1 - j if mirror else j
        ocol = out[jj * 3:]
        for i in range(oh):
            for c in range(3):
                v = a[i * 3 + c] >> (_WBITS + _MIDBITS)
                ocol[i * ow * 3 + c] = np.uint8(min(max(v, 0), 255))


def resize_crop(image: np.ndarray, top: int, left: int, h: int, w: int, out_hw,
                mirror: bool = False) -> np.ndarray:
    """numpy convenience: uint8 [H, W, 3] -> the crop resized to out_hw = (OH, OW), uint8."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.shape}")
    if not (0 <= top and 0 <= left and h >= 1 and w >= 1 and top + h <= image.shape[0]
            and left + w <= image.shape[1]):
        raise ValueError(f"crop (top={top}, left={left}, h={h}, w={w}) outside {image.shape[:2]}")
    out = np.empty((int(out_hw[0]), int(out_hw[1]), 3), np.uint8)
    resize_crop_into(image, int(top), int(left), int(h), int(w), out, bool(mirror))
    return out
