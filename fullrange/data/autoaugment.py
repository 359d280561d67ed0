"""Replayable AutoAugment (CIFAR10Policy) and Cutout for small raw images, on the device batch.

Every random choice is a pure function of (seed, epoch, sample index): hash words 64-70 of the
splitmix64 key of :mod:`fullrange.data.augment` (whose crop and flip use words 0-2), so the
teacher cache replays a view by calling the same functions with the same triple, in batches
of any size and order. The ops run on uint8 [B, C, H, W] batches (C = 1 or 3) on the CPU or a
CUDA device, one vectorised pass per op present in the batch; each reproduces the Pillow
operation the common CIFAR10Policy calls.

Recipe (AUTOAUGMENT_VERSION "cifar10policy-splitmix64-v1"), with below(w, n) of augment.py:
    policy   = below(word_64, 25)                     the sub-policy (row of the table below)
    apply_s  = below(word_{65+s}, 10) < 10 * p_s      op s = 0, 1 runs (probabilities are tenths)
    negate_s = top bit of word_{67+s}                 the sign of op s, where the op is signed
Op 1 runs on the output of op 0. The official repository imports CIFAR10Policy and Cutout
from its util/image_augment.py; the file of that name in related SNN training code is the
common PyTorch CIFAR10Policy, whose 25 sub-policies (op, probability, magnitude index) are
CIFAR10_POLICY:

     #  op 0                   op 1
     0  Invert       0.1 7     Contrast     0.2 6
     1  Rotate       0.7 2     TranslateX   0.3 9
     2  Sharpness    0.8 1     Sharpness    0.9 3
     3  ShearY       0.5 8     TranslateY   0.7 9
     4  AutoContrast 0.5 8     Equalize     0.9 2
     5  ShearY       0.2 7     Posterize    0.3 7
     6  Color        0.4 3     Brightness   0.6 7
     7  Sharpness    0.3 9     Brightness   0.7 9
     8  Equalize     0.6 5     Equalize     0.5 1
     9  Contrast     0.6 7     Sharpness    0.6 5
    10  Color        0.7 7     TranslateX   0.5 8
    11  Equalize     0.3 7     AutoContrast 0.4 8
    12  TranslateY   0.4 3     Sharpness    0.2 6
    13  Brightness   0.9 6     Color        0.2 8
    14  Solarize     0.5 2     Invert       0.0 3
    15  Equalize     0.2 0     AutoContrast 0.6 0
    16  Equalize     0.2 8     Equalize     0.8 4
    17  Color        0.9 9     Equalize     0.6 6
    18  AutoContrast 0.8 4     Solarize     0.2 8
    19  Brightness   0.1 3     Color        0.7 0
    20  Solarize     0.4 5     AutoContrast 0.9 3
    21  TranslateY   0.9 9     TranslateY   0.7 9
    22  AutoContrast 0.9 2     Solarize     0.8 3
    23  Equalize     0.8 8     Invert       0.1 3
    24  TranslateY   0.7 9     AutoContrast 0.9 1

Row 16 has p = 0.8 for its second op in that file and in older copies of the common
implementation; the AutoAugment paper's code and later copies have 0.6. Rotate is never negated
in that implementation (the TF original negates it at random); ShearX is in no CIFAR sub-policy.

Magnitude index m = 0..9 -> op argument (np.linspace(lo, hi, 10)[m]; s = -1 where negate):
    ShearY      s * linspace(0, 0.3)         (1, 0, 0, s*v, 1, 0) PIL BICUBIC affine
    TranslateX  s * linspace(0, 150/331) * W (1, 0, s*v*W, 0, 1, 0) PIL NEAREST affine
    TranslateY  s * linspace(0, 150/331) * H (1, 0, 0, 0, 1, s*v*H) PIL NEAREST affine
    Rotate      linspace(0, 30) degrees      Image.rotate (NEAREST, about the centre)
    Color, Contrast, Brightness, Sharpness: factor 1 + s * linspace(0, 0.9)   (ImageEnhance)
    Posterize   round(linspace(8, 4)) bits kept;  Solarize  invert pixels >= linspace(256, 0)
    AutoContrast, Equalize, Invert: no argument (ImageOps, cutoff 0)
Geometric ops fill uncovered pixels with FILL = 128 in every channel (the common
fillcolor=(128, 128, 128)). Every op reproduces Pillow (x86-64 builds) exactly, as
tests/test_autoaugment.py checks: integer arithmetic where Pillow's is integer (Equalize, grey
levels, SMOOTH, the 16.16 fixed-point NEAREST sampler of Rotate), float32 where Pillow blends in
float32 (the ImageEnhance ops), float64 in Pillow's order of operations where it truncates a
double (AutoContrast's table, ShearY's bicubic with a = -1 and edge clamping), so the device
needs float64 (CPU, CUDA). Translations use the same fixed-point sampler; Pillow's float path
for them agrees unless an offset + 0.5 lies within 2**-17 of an integer.

Cutout (CUTOUT_VERSION "cutout-splitmix64-v1"): one square hole of side `length`, centre
cy = below(word_69, H), cx = below(word_70, W); the hole covers rows [cy - length//2, cy +
length//2) and likewise columns, clipped to the image (so an odd length cuts length - 1).
The official recipe runs RandomCrop, flip, CIFAR10Policy, ToTensor, Cutout, Normalize: Cutout
multiplies the [0, 1] tensor BEFORE normalisation, so the hole is black (pixel 0), i.e.
-mean/std after normalising. `cutout` therefore zeroes pixels of the uint8 batch (any dtype
works) and belongs after `autoaugment`, before normalisation:
    x = pad_crop_flip(x, i, seed, e, pad); x = autoaugment(x, i, seed, e)
    x = cutout(x, i, seed, e, length=16); x = normalize(x, mean, std)
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .hashing import draws

AUTOAUGMENT_VERSION = "cifar10policy-splitmix64-v1"
CUTOUT_VERSION = "cutout-splitmix64-v1"
FILL = 128

_POLICY_WORD, _APPLY_WORDS, _NEGATE_WORDS, _CUTOUT_WORDS = 64, (65, 66), (67, 68), (69, 70)

CIFAR10_POLICY = (
    (("Invert", 0.1, 7), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, 8), ("Equalize", 0.9, 2)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, 5), ("Equalize", 0.5, 1)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, 7), ("AutoContrast", 0.4, 8)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, 3)),
    (("Equalize", 0.2, 0), ("AutoContrast", 0.6, 0)),
    (("Equalize", 0.2, 8), ("Equalize", 0.8, 4)),
    (("Color", 0.9, 9), ("Equalize", 0.6, 6)),
    (("AutoContrast", 0.8, 4), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, 3)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, 2), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, 8), ("Invert", 0.1, 3)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, 1)),
)

MAGNITUDES = {  # op -> its 10 unsigned magnitudes (index m of the table)
    "ShearY": np.linspace(0, 0.3, 10),
    "TranslateX": np.linspace(0, 150 / 331, 10),
    "TranslateY": np.linspace(0, 150 / 331, 10),
    "Rotate": np.linspace(0, 30, 10),
    "Color": np.linspace(0.0, 0.9, 10),
    "Contrast": np.linspace(0.0, 0.9, 10),
    "Brightness": np.linspace(0.0, 0.9, 10),
    "Sharpness": np.linspace(0.0, 0.9, 10),
    "Posterize": np.round(np.linspace(8, 4, 10)),
    "Solarize": np.linspace(256, 0, 10),
}
_SIGNED_SHIFTS = {"ShearY", "TranslateX", "TranslateY"}
_ENHANCE = {"Color", "Contrast", "Brightness", "Sharpness"}


def op_argument(op: str, m: int, negative: bool) -> float:
    """The argument op `op` gets at magnitude index m with the drawn sign (see the docstring):
    shear, translation as a fraction of the size, degrees, enhance factor, bits or threshold;
    0.0 for the ops that take none."""
    if op not in MAGNITUDES:
        return 0.0
    v = float(MAGNITUDES[op][m])
    sign = -1.0 if negative else 1.0
    if op in _SIGNED_SHIFTS:
        return v * sign
    if op in _ENHANCE:
        return 1.0 + v * sign
    return v


@dataclass(frozen=True)
class PolicyDraw:
    """Drawn AutoAugment parameters of a batch.

    policy: int64 [B] in [0, 25), the row of CIFAR10_POLICY; applied: bool [B, 2], whether op 0
    / op 1 of that row runs; negative: bool [B, 2], the sign drawn for op 0 / op 1 (used only by
    signed ops). All on the same device."""
    policy: torch.Tensor
    applied: torch.Tensor
    negative: torch.Tensor

    def entries(self, stage: int) -> torch.Tensor:
        """int64 [B]: the (policy, stage, sign) entry of the op tables, for op `stage`."""
        return (self.policy * 2 + stage) * 2 + self.negative[:, stage].long()


def _entry_table():
    """Per entry (policy, stage, negative) -> (op name, argument), 25 * 2 * 2 entries."""
    return [(op, op_argument(op, m, neg)) for row in CIFAR10_POLICY for op, _, m in row
            for neg in (False, True)]


_ENTRIES = _entry_table()
_ENTRY_ARGS = torch.tensor([arg for _, arg in _ENTRIES], dtype=torch.float64)
_APPLY_TENTHS = torch.tensor([[round(10 * p) for _, p, _ in row] for row in CIFAR10_POLICY])


def draw_policy(seed: int, epoch: int, indices) -> PolicyDraw:
    """Each sample's sub-policy, op switches and signs. indices: int [B] sample indices on the
    CPU. Returns a PolicyDraw on the CPU; row k depends on (seed, epoch, indices[k]) only."""
    d = draws(seed, epoch, indices, (_POLICY_WORD, *_APPLY_WORDS, *_NEGATE_WORDS),
              (len(CIFAR10_POLICY), 10, 10, 2, 2))
    policy = d[0]
    applied = d[1:3].T < _APPLY_TENTHS[policy]
    return PolicyDraw(policy, applied, d[3:5].T.bool())


def autoaugment(images: torch.Tensor, indices, seed: int, epoch: int) -> torch.Tensor:
    """CIFAR10Policy on each image with its hashed draw.

    images: uint8 [B, C, H, W], C = 1 or 3, on the CPU or a CUDA device. indices: int [B]
    sample indices on the CPU. Returns a new uint8 [B, C, H, W] on images' device."""
    return apply_policy(images, draw_policy(seed, epoch, indices))


def apply_policy(images: torch.Tensor, draw: PolicyDraw) -> torch.Tensor:
    """Run the drawn sub-policies: images uint8 [B, C, H, W] (C = 1 or 3) -> new uint8 [B, C, H,
    W]. Vectorised per op: the samples whose op s is the same run through it together."""
    _check_images(images)
    if draw.policy.shape != images.shape[:1]:
        raise ValueError(f"draw is for {tuple(draw.policy.shape)} samples, images are "
                         f"{tuple(images.shape)}")
    out = images.contiguous().clone()
    for stage in (0, 1):
        entries = draw.entries(stage).to(images.device)
        op_ids = torch.where(draw.applied[:, stage].to(images.device),
                             _ENTRY_OP_IDS.to(images.device)[entries], -1)
        for op_id in op_ids.unique().tolist():
            if op_id < 0:
                continue
            rows = (op_ids == op_id).nonzero().squeeze(1)
            changed = _OPS[_OP_NAMES[op_id]](out.index_select(0, rows), entries[rows])
            out.index_copy_(0, rows, changed)
    return out


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.dtype != torch.uint8 or images.shape[1] not in (1, 3):
        raise ValueError("images must be uint8 [B, C, H, W] with C = 1 or 3, got "
                         f"{images.dtype} {tuple(images.shape)}")


def _args(entries: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The op argument of each entry, [n] of `dtype` on the device of `entries`."""
    return _ENTRY_ARGS.to(dtype).to(entries.device)[entries]


# ---- ops: x uint8 [n, C, H, W], entries int64 [n] (PolicyDraw.entries) -> uint8 [n, C, H, W]

def _invert(x, entries):
    return 255 - x


def _posterize(x, entries):
    drop = 8 - _args(entries, torch.int64)
    keep = (255 - ((1 << drop) - 1)).to(torch.uint8)
    return x & keep[:, None, None, None]


def _solarize(x, entries):
    threshold = _args(entries, torch.float32)[:, None, None, None]
    return torch.where(x >= threshold, 255 - x, x)


def _autocontrast(x, entries):
    """Per channel: stretch [lo, hi] to [0, 255] as int(v * scale - lo * scale) in float64."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    lo = flat.amin(2, keepdim=True).double()
    hi = flat.amax(2, keepdim=True).double()
    span = (hi - lo).clamp(min=1.0)
    scale = torch.full_like(span, 255.0) / span  # a true division (255.0 / t multiplies by 1/t)
    levels = torch.arange(256, dtype=torch.float64, device=x.device)
    lut = (levels * scale + (-lo * scale)).clamp(0, 255).long()
    lut = torch.where(hi > lo, lut, levels.long())
    return lut.gather(2, flat.long()).to(torch.uint8).view_as(x)


def _equalize(x, entries):
    """Per channel, Pillow's ImageOps.equalize: step = (pixels - count of the top value) // 255,
    lut[v] = (step // 2 + pixels below v) // step, the identity when step == 0."""
    flat = x.reshape(x.shape[0] * x.shape[1], -1).long()
    hist = torch.zeros(flat.shape[0], 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    top = hist.gather(1, flat.amax(1, keepdim=True))
    step = (flat.shape[1] - top) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))
    return lut.gather(1, flat).to(torch.uint8).view_as(x)


def _blend(degenerate, image, factor):
    """Pillow's Image.blend(degenerate, image, factor) on uint8 [n, C, H, W] with factor
    float32 [n]: trunc(d + f * (i - d)) clipped to [0, 255], in float32 as Pillow computes it."""
    d = degenerate.float()
    out = d + factor[:, None, None, None] * (image.float() - d)
    return out.clamp(0, 255).to(torch.uint8)


def _grey(x):
    """Pillow's RGB -> L (ITU-R 601-2 in 16.16 fixed point) as int64 [n, 1, H, W]; L stays."""
    if x.shape[1] == 1:
        return x.long()
    r, g, b = x.long().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16)[:, None]


def _color(x, entries):
    return _blend(_grey(x).expand_as(x), x, _args(entries, torch.float32))


def _contrast(x, entries):
    grey = _grey(x)
    count = grey[0].numel()
    mean = (2 * grey.sum((1, 2, 3)) + count) // (2 * count)  # int(mean + 0.5)
    return _blend(mean[:, None, None, None].expand_as(x), x, _args(entries, torch.float32))


def _brightness(x, entries):
    return _blend(torch.zeros_like(x), x, _args(entries, torch.float32))


def _smooth(x):
    """Pillow's ImageFilter.SMOOTH (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, / 13, rounded); the
    one-pixel border is copied."""
    h, w = x.shape[2:]
    v = x.long()
    total = 4 * v[:, :, 1:h - 1, 1:w - 1]
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            total = total + v[:, :, dy:h - 2 + dy, dx:w - 2 + dx]
    out = x.clone()
    out[:, :, 1:h - 1, 1:w - 1] = ((2 * total + 13) // 26).to(torch.uint8)
    return out


def _sharpness(x, entries):
    return _blend(_smooth(x), x, _args(entries, torch.float32))



def _cubic(v0, v1, v2, v3, d):
    """Pillow's transform BICUBIC kernel (a = -1) between v1 and v2 at fraction d."""
    p2 = v2 - v0
    p3 = 2 * (v0 - v1) + v2 - v3
    p4 = v1 - v0 - v2 + v3
    return v1 + d * (p2 + d * (p3 + d * p4))


def _shear_y(x, entries):
    """Output pixel (y, x) samples column x at row s * (x + 0.5) + y (pixel centres), bicubic
    along the column with edge clamping; FILL where that row lies outside [0, H). In float64
    with Pillow's order of operations, so it truncates exactly as Pillow does."""
    n, c, h, w = x.shape
    shear = _args(entries, torch.float64)[:, None, None]
    cols = torch.arange(w, dtype=torch.float64, device=x.device) + 0.5
    rows = torch.arange(h, dtype=torch.float64, device=x.device)[:, None] + 0.5
    src = shear * cols + rows                                  # [n, H, W]
    inside = (src >= 0) & (src < h)
    pos = src - 0.5
    top = pos.floor()
    frac = (pos - top)[:, None]
    top = top.long()
    pixels = x.double()
    taps = [pixels.gather(2, (top + k).clamp(0, h - 1)[:, None].expand(n, c, h, w))
            for k in (-1, 0, 1, 2)]
    out = _cubic(*taps, frac).clamp(0, 255).to(torch.uint8)
    return out.masked_fill(~inside[:, None], FILL)


def _nearest_affine(x, coeffs):
    """Pillow's fixed-point NEAREST affine: coeffs int64 [n, 6] = 16.16 (a0, a1, a2, a3, a4, a5)
    with the pixel-centre offsets folded into a2, a5; output (y, x) takes input column
    (a2 + y a1 + x a0) >> 16 and row (a5 + y a4 + x a3) >> 16, FILL outside."""
    n, c, h, w = x.shape
    a0, a1, a2, a3, a4, a5 = (v[:, None, None] for v in coeffs.unbind(1))
    ys = torch.arange(h, device=x.device)[:, None]
    xs = torch.arange(w, device=x.device)
    col = (a2 + ys * a1 + xs * a0) >> 16                       # [n, H, W]
    row = (a5 + ys * a4 + xs * a3) >> 16
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    src = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).reshape(n, 1, h * w)
    out = x.reshape(n, c, h * w).gather(2, src.expand(n, c, h * w)).view(n, c, h, w)
    return out.masked_fill(~inside[:, None], FILL)


def _pil_matrix(op: str, arg: float, height: int, width: int) -> tuple[float, ...]:
    """The inverse affine map (a, b, c, d, e, f) Pillow applies: input = (a x + b y + c,
    d x + e y + f) at output point (x, y); the identity for non-geometric ops."""
    if op == "TranslateX":
        return (1.0, 0.0, arg * width, 0.0, 1.0, 0.0)
    if op == "TranslateY":
        return (1.0, 0.0, 0.0, 0.0, 1.0, arg * height)
    if op != "Rotate":
        return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    angle = -math.radians(arg % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2, height / 2
    return (a, b, a * -cx + b * -cy + 0.0 + cx, d, e, d * -cx + e * -cy + 0.0 + cy)


def _fixed(v: float) -> int:
    return math.floor(v * 65536.0 + 0.5)


@functools.lru_cache(maxsize=16)
def _fixed_affine_table(height: int, width: int) -> torch.Tensor:
    """int64 [entries, 6]: Pillow's 16.16 coefficients of every entry's affine map."""
    rows = []
    for op, arg in _ENTRIES:
        a, b, c, d, e, f = _pil_matrix(op, arg, height, width)
        rows.append([_fixed(a), _fixed(b), _fixed(c + a * 0.5 + b * 0.5),
                     _fixed(d), _fixed(e), _fixed(f + d * 0.5 + e * 0.5)])
    return torch.tensor(rows, dtype=torch.int64)


def _shift_or_rotate(x, entries):
    """TranslateX, TranslateY and Rotate: each entry's fixed-point map for this image size."""
    coeffs = _fixed_affine_table(*x.shape[2:]).to(x.device)[entries]
    return _nearest_affine(x, coeffs)


_OPS = {
    "Invert": _invert, "Posterize": _posterize, "Solarize": _solarize,
    "AutoContrast": _autocontrast, "Equalize": _equalize, "Color": _color,
    "Contrast": _contrast, "Brightness": _brightness, "Sharpness": _sharpness,
    "ShearY": _shear_y, "TranslateX": _shift_or_rotate, "TranslateY": _shift_or_rotate,
    "Rotate": _shift_or_rotate,
}
_OP_NAMES = sorted(_OPS)
_ENTRY_OP_IDS = torch.tensor([_OP_NAMES.index(op) for op, _ in _ENTRIES])


# ---- Cutout ----

def cutout_centres(seed: int, epoch: int, indices, height: int, width: int):
    """Hole centres: (cy int64 [B] in [0, height), cx int64 [B] in [0, width)) on the CPU, for
    indices int [B] on the CPU."""
    cy, cx = draws(seed, epoch, indices, _CUTOUT_WORDS, (height, width))
    return cy, cx


def cutout_mask(seed: int, epoch: int, indices, height: int, width: int, length: int = 16,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [B, H, W] on `device`, True inside each sample's hole: rows [cy - length//2,
    cy + length//2) and the same columns around cx, clipped to the image."""
    if length < 0:
        raise ValueError(f"cutout length must be >= 0, got {length}")
    cy, cx = (t.to(device, non_blocking=True) for t in cutout_centres(seed, epoch, indices, height, width))
    half = length // 2
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= cy[:, None] - half) & (rows < cy[:, None] + half)
    in_cols = (cols >= cx[:, None] - half) & (cols < cx[:, None] + half)
    return in_rows[:, :, None] & in_cols[:, None, :]


def cutout(images: torch.Tensor, indices, seed: int, epoch: int, length: int = 16) -> torch.Tensor:
    """Zero one hashed length x length hole per image (all channels).

    images: [B, C, H, W] of any dtype, any device; call it on the uint8 batch before
    normalisation to reproduce the official recipe (hole = black). indices: int [B] on the CPU.
    Returns a new tensor of the same shape, dtype and device."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if tuple(torch.as_tensor(indices).shape) != tuple(images.shape[:1]):
        raise ValueError(f"indices must be [B={images.shape[0]}], got {tuple(torch.as_tensor(indices).shape)}")
    hole = cutout_mask(seed, epoch, indices, images.shape[2], images.shape[3], length, images.device)
    return images.masked_fill(hole[:, None], 0)
