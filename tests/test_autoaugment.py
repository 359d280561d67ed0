"""Replayable AutoAugment (CIFAR10Policy) and Cutout: every op against Pillow / numpy fed the
same drawn parameters, the draws as functions of (seed, epoch, index), their frequencies.

All comparisons are exact (no tolerance): the module follows Pillow's integer, float32 and
float64 arithmetic op by op (see fullrange/data/autoaugment.py), on real photo crops at CIFAR's
32x32, Fashion-MNIST's grey 28x28 and a non-square 20x36, plus constant / two-level /
narrow-range / noise images for the histogram ops' edge cases."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from fullrange.data import autoaugment as aa
import hash_reference

# The reference restates the common CIFAR10Policy's ranges and Pillow calls independently.
REF_RANGES = {
    "ShearY": np.linspace(0, 0.3, 10), "TranslateX": np.linspace(0, 150 / 331, 10),
    "TranslateY": np.linspace(0, 150 / 331, 10), "Rotate": np.linspace(0, 30, 10),
    "Color": np.linspace(0.0, 0.9, 10), "Contrast": np.linspace(0.0, 0.9, 10),
    "Brightness": np.linspace(0.0, 0.9, 10), "Sharpness": np.linspace(0.0, 0.9, 10),
    "Posterize": np.round(np.linspace(8, 4, 10), 0).astype(int),
    "Solarize": np.linspace(256, 0, 10),
}
ENHANCERS = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
             "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
PLAIN = {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize,
         "Invert": ImageOps.invert}
OP_NAMES = sorted({op for row in aa.CIFAR10_POLICY for op, _, _ in row})


def pil_op(img: Image.Image, op: str, m: int, negative: bool) -> Image.Image:
    """One op of the common CIFAR10Policy, with the sign given instead of drawn."""
    sign = -1 if negative else 1
    v = REF_RANGES[op][m] if op in REF_RANGES else None
    fill = 128 if img.mode == "L" else (128, 128, 128)
    w, h = img.size
    if op == "ShearY":
        return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, v * sign, 1, 0),
                             Image.Resampling.BICUBIC, fillcolor=fill)
    if op == "TranslateX":
        return img.transform(img.size, Image.Transform.AFFINE, (1, 0, v * w * sign, 0, 1, 0),
                             fillcolor=fill)
    if op == "TranslateY":
        return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, v * h * sign),
                             fillcolor=fill)
    if op == "Rotate":  # rotate_with_fill: RGBA rotation composited onto grey 128
        rotated = img.convert("RGBA").rotate(v)
        grey = Image.new("RGBA", rotated.size, (128,) * 4)
        return Image.composite(rotated, grey, rotated).convert(img.mode)
    if op in ENHANCERS:
        return ENHANCERS[op](img).enhance(1 + v * sign)
    if op == "Posterize":
        return ImageOps.posterize(img, int(v))
    if op == "Solarize":
        return ImageOps.solarize(img, v)
    return PLAIN[op](img)


def to_pil(x: torch.Tensor) -> Image.Image:
    a = x.numpy()
    return Image.fromarray(a[0]) if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0))


def from_pil(img: Image.Image) -> torch.Tensor:
    a = np.array(img)
    return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())


def _photo_crops(n: int, h: int, w: int, grey: bool, seed: int) -> torch.Tensor:
    """uint8 [n, C, h, w]: crops of two real photos shrunk to CIFAR-like scale."""
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(load_sample_image(f)).resize((96, 64), Image.Resampling.BOX)
              for f in ("china.jpg", "flower.jpg")]
    if grey:
        photos = [p.convert("L") for p in photos]
    crops = []
    for k in range(n):
        top, left = rng.integers(0, 64 - h + 1), rng.integers(0, 96 - w + 1)
        crops.append(from_pil(photos[k % 2].crop((left, top, left + w, top + h))))
    return torch.stack(crops)


def _edge_cases(c: int, h: int, w: int) -> torch.Tensor:
    """uint8 [4, c, h, w]: a constant image, two levels, a narrow range, full-range noise."""
    rng = np.random.default_rng(1)
    const = np.full((c, h, w), 77)
    two = np.where(rng.random((c, h, w)) < 0.5, 30, 200)
    narrow = rng.integers(100, 110, (c, h, w))
    noise = rng.integers(0, 256, (c, h, w))
    return torch.from_numpy(np.stack([const, two, narrow, noise]).astype(np.uint8))


@pytest.fixture(scope="module")
def batches() -> dict[str, torch.Tensor]:
    """RGB 32x32 (CIFAR's shape), grey 28x28 (Fashion-MNIST's), RGB 20x36 (not square)."""
    return {
        "rgb32": torch.cat([_photo_crops(36, 32, 32, False, 0), _edge_cases(3, 32, 32)]),
        "grey28": torch.cat([_photo_crops(20, 28, 28, True, 1), _edge_cases(1, 28, 28)]),
        "rgb20x36": _photo_crops(12, 20, 36, False, 2),
    }


def _draw_for(p: int, stage: int, negative: bool, n: int) -> aa.PolicyDraw:
    """A draw that runs only op `stage` of sub-policy p, with the given sign, on n samples."""
    applied = torch.zeros(n, 2, dtype=torch.bool)
    applied[:, stage] = True
    return aa.PolicyDraw(torch.full((n,), p), applied, torch.full((n, 2), negative))


@pytest.mark.parametrize("op", OP_NAMES)
def test_each_op_matches_pillow(op, batches):
    cases = [(p, s, m) for p, row in enumerate(aa.CIFAR10_POLICY)
             for s, (name, _, m) in enumerate(row) if name == op]
    for name, x in batches.items():
        for p, s, m in cases:
            for negative in (False, True):
                ours = aa.apply_policy(x, _draw_for(p, s, negative, len(x)))
                ref = torch.stack([from_pil(pil_op(to_pil(img), op, m, negative)) for img in x])
                bad = int((ours != ref).sum())
                assert bad == 0, f"{op} m={m} negative={negative} on {name}: {bad} values differ"


def test_autoaugment_matches_pillow_policy(batches):
    """The whole pipeline: the hashed draw, then op 0 and op 1 of the drawn sub-policy."""
    base = batches["rgb32"]
    indices = torch.arange(400) * 3 + 11
    x = base[torch.arange(400) % len(base)]
    draw = aa.draw_policy(5, 2, indices)
    ours = aa.autoaugment(x, indices, 5, 2)
    for k in range(400):
        img = to_pil(x[k])
        for s, (op, _, m) in enumerate(aa.CIFAR10_POLICY[int(draw.policy[k])]):
            if draw.applied[k, s]:
                img = pil_op(img, op, m, bool(draw.negative[k, s]))
        assert torch.equal(ours[k], from_pil(img)), f"sample {k}: policy {int(draw.policy[k])}"
    assert draw.applied.all(1).any() and (ours != x).flatten(1).any(1).float().mean() > 0.5


def test_draws_follow_the_hash_reference():
    idx = torch.tensor([0, 1, 12345, 2**40 + 7])
    draw, (cy, cx) = aa.draw_policy(3, 9, idx), aa.cutout_centres(3, 9, idx, 32, 28)
    for k, i in enumerate(idx.tolist()):
        w = [hash_reference.word(3, 9, i, j) for j in range(64, 71)]
        assert int(draw.policy[k]) == hash_reference.below(w[0], 25)
        tenths = [round(10 * p) for _, p, _ in aa.CIFAR10_POLICY[int(draw.policy[k])]]
        assert draw.applied[k].tolist() == [hash_reference.below(w[1 + s], 10) < tenths[s] for s in (0, 1)]
        assert draw.negative[k].tolist() == [w[3] >> 63 == 1, w[4] >> 63 == 1]
        assert (int(cy[k]), int(cx[k])) == (hash_reference.below(w[5], 32), hash_reference.below(w[6], 28))


def test_draws_depend_only_on_seed_epoch_index():
    idx = torch.arange(3000) * 7 + 3
    full = aa.draw_policy(1, 2, idx)
    perm = torch.randperm(3000, generator=torch.Generator().manual_seed(0))
    shuffled = aa.draw_policy(1, 2, idx[perm])
    for a, b in ((full.policy, shuffled.policy), (full.applied, shuffled.applied),
                 (full.negative, shuffled.negative)):
        assert torch.equal(a[perm], b)
    for k in (0, 1234, 2999):
        one = aa.draw_policy(1, 2, idx[k:k + 1])
        assert int(one.policy) == int(full.policy[k])
        assert torch.equal(one.applied[0], full.applied[k])
        assert torch.equal(one.negative[0], full.negative[k])
    for other in (aa.draw_policy(1, 3, idx), aa.draw_policy(2, 2, idx)):
        assert float((other.policy != full.policy).float().mean()) > 0.9
    cy, cx = aa.cutout_centres(1, 2, idx, 32, 32)
    cys, cxs = aa.cutout_centres(1, 2, idx[perm], 32, 32)
    assert torch.equal(cy[perm], cys) and torch.equal(cx[perm], cxs)


def test_outputs_independent_of_batch_composition(batches):
    x = batches["rgb32"]
    idx = torch.arange(len(x)) + 500
    out = aa.autoaugment(x, idx, 7, 0)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    assert torch.equal(aa.autoaugment(x[perm], idx[perm], 7, 0), out[perm])
    assert torch.equal(aa.autoaugment(x[5:9], idx[5:9], 7, 0), out[5:9])
    cut = aa.cutout(x, idx, 7, 0)
    assert torch.equal(aa.cutout(x[perm], idx[perm], 7, 0), cut[perm])


def test_policy_and_switch_frequencies():
    n = 250_000
    draw = aa.draw_policy(0, 4, torch.arange(n))
    counts = torch.bincount(draw.policy, minlength=25).double()
    chi2 = float(((counts - n / 25) ** 2 / (n / 25)).sum())
    assert chi2 < 51.2, f"chi-square {chi2:.1f} over 24 dof (p < 0.001)"
    for p, row in enumerate(aa.CIFAR10_POLICY):
        rows = draw.policy == p
        for s, (_, prob, _) in enumerate(row):
            rate = float(draw.applied[rows, s].double().mean())
            sigma = (prob * (1 - prob) / float(rows.sum())) ** 0.5
            assert abs(rate - prob) <= 5 * sigma + 1e-12, f"policy {p} op {s}: {rate} vs {prob}"
    assert abs(float(draw.negative.double().mean()) - 0.5) < 5 * (0.25 / (2 * n)) ** 0.5


def test_probabilities_are_tenths_and_docstring_states_the_table():
    for row in aa.CIFAR10_POLICY:
        for _, prob, m in row:
            assert abs(10 * prob - round(10 * prob)) < 1e-9 and 0 <= m <= 9
    rows = re.findall(r"^\s+(\d+)\s+(\w+)\s+([\d.]+)\s+(\d)\s+(\w+)\s+([\d.]+)\s+(\d)\s*$",
                      aa.__doc__, re.MULTILINE)
    stated = tuple(((a, float(pa), int(ma)), (b, float(pb), int(mb)))
                   for _, a, pa, ma, b, pb, mb in rows)
    assert [int(r[0]) for r in rows] == list(range(25)) and stated == aa.CIFAR10_POLICY


def test_op_arguments():
    assert aa.op_argument("Rotate", 2, True) == pytest.approx(20 / 3)  # never negated
    assert aa.op_argument("ShearY", 8, True) == pytest.approx(-0.8 / 3)
    assert aa.op_argument("TranslateX", 9, False) == pytest.approx(150 / 331)
    assert aa.op_argument("Sharpness", 9, True) == pytest.approx(0.1)
    assert aa.op_argument("Posterize", 7, False) == 5.0
    assert aa.op_argument("Solarize", 8, False) == pytest.approx(256 / 9)
    assert aa.op_argument("Equalize", 8, True) == 0.0


def _reference_cutout(img: np.ndarray, cy: int, cx: int, length: int) -> np.ndarray:
    """The official Cutout on one [C, H, W] image with the given centre."""
    h, w = img.shape[1:]
    mask = np.ones((h, w), np.float32)
    y1, y2 = np.clip(cy - length // 2, 0, h), np.clip(cy + length // 2, 0, h)
    x1, x2 = np.clip(cx - length // 2, 0, w), np.clip(cx + length // 2, 0, w)
    mask[y1:y2, x1:x2] = 0.0
    return img * mask


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 20, 36)])
@pytest.mark.parametrize("length", [16, 15, 1, 50])
def test_cutout_matches_reference(shape, length):
    gen = torch.Generator().manual_seed(length)
    x = torch.randint(1, 256, (64, *shape), dtype=torch.uint8, generator=gen)
    idx = torch.arange(64) * 13
    out = aa.cutout(x, idx, 4, 1, length)
    cy, cx = aa.cutout_centres(4, 1, idx, *shape[1:])
    for k in range(64):
        ref = _reference_cutout(x[k].numpy().astype(np.float32), int(cy[k]), int(cx[k]), length)
        assert np.array_equal(out[k].numpy(), ref.astype(np.uint8)), f"sample {k}"
    assert out.dtype == torch.uint8
    assert torch.equal(aa.cutout(x.float(), idx, 4, 1, length), out.float())


def test_cutout_centres_uniform():
    n = 128_000
    cy, cx = aa.cutout_centres(2, 0, torch.arange(n), 32, 20)
    for centres, size in ((cy, 32), (cx, 20)):
        counts = torch.bincount(centres, minlength=size).double()
        assert counts.numel() == size
        chi2 = float(((counts - n / size) ** 2 / (n / size)).sum())
        assert chi2 < {32: 61.1, 20: 43.8}[size], f"chi-square {chi2:.1f}"


def test_cutout_before_normalise_is_the_official_order():
    """ToTensor -> Cutout -> Normalize (the official order) equals normalising the uint8 batch
    cut here: the hole is black, -mean/std after normalisation."""
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(3))
    idx = torch.arange(16)
    mean = torch.tensor([0.5071, 0.4867, 0.4408])[:, None, None]
    std = torch.tensor([0.2675, 0.2565, 0.2761])[:, None, None]
    ours = (aa.cutout(x, idx, 0, 0).float() / 255 - mean) / std
    cy, cx = aa.cutout_centres(0, 0, idx, 32, 32)
    official = torch.stack([
        (torch.from_numpy(_reference_cutout(x[k].numpy() / 255.0, int(cy[k]), int(cx[k]), 16))
         .float() - mean) / std for k in range(16)])
    assert torch.allclose(ours, official, atol=1e-5)
    hole = aa.cutout_mask(0, 0, idx, 32, 32)
    assert torch.allclose(ours.permute(1, 0, 2, 3)[:, hole], (-mean / std).reshape(3, 1))


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        aa.autoaugment(torch.zeros(2, 3, 8, 8), torch.arange(2), 0, 0)
    with pytest.raises(ValueError):
        aa.autoaugment(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), torch.arange(2), 0, 0)
    with pytest.raises(ValueError):
        aa.cutout(torch.zeros(2, 3, 8, 8), torch.arange(3), 0, 0)


@pytest.mark.gpu
def test_cuda_matches_cpu(batches):
    for x in batches.values():
        idx = torch.arange(len(x)) + 99
        cpu = aa.cutout(aa.autoaugment(x, idx, 3, 1), idx, 3, 1)
        gpu = aa.cutout(aa.autoaugment(x.cuda(), idx, 3, 1), idx, 3, 1)  # indices stay on the CPU
        assert torch.equal(gpu.cpu(), cpu)
