"""ImageNet-style data on the CPU: ImageFolder -> .beton writer, the replayable
random-resized-crop decoder, centre-crop validation, loaders on 1 and 2 ranks.

The data is real: each class is a photo that ships with scikit-learn (china, flower) or
scikit-image (astronaut, chelsea, coffee, rocket; when installed), its images random crops of
that photo saved as JPEG (tests/photos.py), plus a grayscale PNG and a CMYK JPEG.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import hash_reference
from fullrange.config import RunConfig
from fullrange.data import (Batch, BatchPreparer, ViewSpec, center_view_params, check_beton, normalize, read_sidecar,
                            rrc_view_params, sidecar_path, train_loader, val_loader, view_params, write_imagefolder)
from fullrange.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from photos import write_photo_tree
from fullrange.data.resample import resize_crop

REPO = Path(__file__).resolve().parents[1]
MAX_RES = 160          # the writer's --max-resolution: larger crops are shrunk, smaller kept
OUT = (40, 48)         # decoder output (h, w): non-square catches h/w mix-ups
SEED = 11


# ---------------------------------------------------------------- fixtures
def _source_files(split_dir: Path) -> list[Path]:
    """Row order the writer promises: sorted class directories, sorted file names."""
    return [f for d in sorted(p for p in split_dir.iterdir() if p.is_dir())
            for f in sorted(d.iterdir())]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    src = root / "src"
    info = write_photo_tree(src, {"train": 8, "val": 3}, min_side=24, max_side=240, seed=0)
    first = info["classes"][0]
    rgb = np.asarray(Image.open(next((src / "train" / first).iterdir())).convert("RGB"))
    Image.fromarray(rgb).convert("L").save(src / "train" / first / "gray.png")   # 1 channel
    Image.fromarray(rgb).convert("CMYK").save(src / "train" / first / "cmyk.jpg")  # 4 channels
    Image.fromarray(rgb[:, ::-1]).save(src / "val" / first / "extra.jpg")  # odd val count
    out = write_imagefolder(src, root / "out", max_resolution=MAX_RES, write_mode="proportion",
                            compress_probability=0.5, num_workers=2, progress=False)
    from ffcv.reader import Reader

    stored = {s: Reader(out[s]).metadata["f0"] for s in ("train", "val")}  # mode, width, height
    return {"root": root, "src": src, "out": out, "classes": info["classes"], "stored": stored,
            "files": {s: _source_files(src / s) for s in ("train", "val")}}


def _collect(loader, epochs=1):
    """{epoch: {index: (image HWC uint8 numpy, label)}} for consecutive epochs."""
    views = {}
    for _ in range(epochs):
        e = loader.epoch
        seen = {}
        for x, y, i in loader:
            assert x.shape[1:] == (3, *OUT) and x.dtype == torch.uint8
            assert x.is_contiguous(memory_format=torch.channels_last)
            for img, lab, ix in zip(x.permute(0, 2, 3, 1).numpy(), y.tolist(), i.tolist()):
                assert ix not in seen  # once per epoch
                seen[ix] = (img.copy(), lab)
        views[e] = seen
    return views


@pytest.fixture(scope="module")
def single(tree):
    """The single-process training views of epochs 0 and 1 (2 workers, batch 8)."""
    loader = train_loader(tree["out"]["train"], batch_size=8, num_workers=2, spec=ViewSpec(seed=SEED, image_size=OUT),
                          distributed=False, drop_last=False)
    assert loader.augmented and len(loader) == -(-len(tree["files"]["train"]) // 8)
    assert loader.view_recipe == {"view": "rrc-splitmix64-v1", "seed": SEED, "scale": [0.08, 1.0],
                                  "ratio": [0.75, 4 / 3], "flip": True, "output_size": list(OUT),
                                  "resample": "triangle-fixed14-v1",
                                  "jpeg": "libjpeg-turbo accurate IDCT"}
    return _collect(loader, epochs=2)


def _stored_pixels(path: Path, mode: int) -> np.ndarray:
    """What the writer stored for one source file, computed independently: PIL RGB decode,
    longer side shrunk to MAX_RES by cv2 INTER_AREA (sizes truncated, as RGBImageField does),
    and for JPEG rows the same cv2 quality-90 encoding, decoded again by PIL."""
    import io

    img = np.asarray(Image.open(path).convert("RGB"))
    h, w = img.shape[:2]
    r = MAX_RES / max(h, w)
    if r < 1:
        img = cv2.resize(img, tuple((r * np.array([w, h])).astype(int)),
                         interpolation=cv2.INTER_AREA)
    if mode == 1:
        return img
    ok, enc = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                           [int(cv2.IMWRITE_JPEG_QUALITY), 90])
    assert ok
    return np.asarray(Image.open(io.BytesIO(enc.tobytes())).convert("RGB"))


def _pil_view(img, top, left, h, w, flip, out=OUT):
    """torchvision's RandomResizedCrop + RandomHorizontalFlip on a PIL image, given the box."""
    view = Image.fromarray(img).crop((left, top, left + w, top + h))
    view = view.resize((out[1], out[0]), Image.BILINEAR)
    if flip:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(view)


# ---------------------------------------------------------------- writer
def test_writer_sidecar_reproducible_and_up_to_date(tree, tmp_path):
    out, n = tree["out"], len(tree["files"]["train"])
    meta = read_sidecar(out["train"])
    assert meta["image_format"] == "rgb_jpeg" and meta["classes"] == tree["classes"]
    assert meta["class_names"] == tree["classes"] and meta["num_samples"] == n
    assert meta["class_counts"][0] == 10 and set(meta["class_counts"][1:]) == {8}
    assert meta["mean"] == IMAGENET_MEAN and meta["std"] == IMAGENET_STD
    assert meta["stats_from"] == "imagenet" and read_sidecar(out["val"])["mean"] == IMAGENET_MEAN
    assert meta["write_options"] == {"write_mode": "proportion", "max_resolution": MAX_RES,
                                     "jpeg_quality": 90, "compress_probability": 0.5}
    modes = tree["stored"]["train"]["mode"]
    assert meta["stored_jpeg"] == int((modes == 0).sum()) and 0 < meta["stored_jpeg"] < n
    assert meta["max_shape"][2] == 3 and max(meta["max_shape"][:2]) <= MAX_RES
    assert check_beton(out["train"])["fingerprint"] == meta["fingerprint"]
    assert not [p for p in Path(out["train"]).parent.iterdir() if p.name.endswith(".tmp")]
    # labels follow the sorted class directories
    _, y = _labels(out["val"])
    expect = [tree["classes"].index(f.parent.name) for f in tree["files"]["val"]]
    assert y.tolist() == expect

    mtimes = [Path(out[s]).stat().st_mtime_ns for s in ("train", "val")]
    again = write_imagefolder(tree["src"], Path(out["train"]).parent, max_resolution=MAX_RES,
                              num_workers=2, progress=False)
    assert again["written"] == [] and again["meta"]["train"] == meta
    assert [Path(out[s]).stat().st_mtime_ns for s in ("train", "val")] == mtimes
    with pytest.raises(ValueError, match=r"train\.beton: already exists"):
        write_imagefolder(tree["src"], Path(out["train"]).parent, max_resolution=100,
                          progress=False)

    # a rewrite elsewhere stores the same thing (the JPEG/raw choice is hashed from the
    # index); computed statistics are exact over the decoded source pixels
    other = write_imagefolder(tree["src"], tmp_path / "again", max_resolution=MAX_RES,
                              num_workers=1, stats="computed", progress=False)
    m2 = other["meta"]["train"]
    assert m2["fingerprint"] == meta["fingerprint"] and m2["stats_from"] == "computed"
    from ffcv.reader import Reader

    assert np.array_equal(Reader(other["train"]).metadata["f0"]["mode"], modes)
    pix = np.concatenate([np.asarray(Image.open(f).convert("RGB")).reshape(-1, 3)
                          for f in tree["files"]["train"]]).astype(np.float64)
    np.testing.assert_allclose(m2["mean"], pix.mean(0), rtol=1e-9)
    np.testing.assert_allclose(m2["std"], pix.std(0), rtol=1e-7)
    assert other["meta"]["val"]["mean"] == m2["mean"]


def _labels(path):
    loader = val_loader(path, batch_size=64, num_workers=1, rank=0, world_size=1,
                        spec=ViewSpec(val_image_size=OUT))
    ys, ix = [], []
    for _, y, i in loader:
        ys.append(y.clone()), ix.append(i.clone())
    i = torch.cat(ix)
    assert torch.equal(i, torch.arange(len(i)))
    return i.numpy(), torch.cat(ys).numpy()


# ---------------------------------------------------------------- view parameters
def _rrc_reference(seed, epoch, index, H, W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Pure-Python (int + math) statement of the recipe in fullrange/data/views.py."""
    import math

    word = lambda k: hash_reference.word(seed, epoch, index, k)  # noqa: E731
    unit = lambda k: (word(k) >> 11) * 2.0 ** -53  # noqa: E731
    flip = bool(word(2) >> 63)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for a in range(10):
        b = 8 + 4 * a
        area = H * W * (scale[0] + (scale[1] - scale[0]) * unit(b))
        aspect = math.exp(lo + (hi - lo) * unit(b + 1))
        w = math.floor(math.sqrt(area * aspect) + 0.5)
        h = math.floor(math.sqrt(area / aspect) + 0.5)
        if 0 < w <= W and 0 < h <= H:
            return ((word(b + 2) >> 32) * (H - h + 1)) >> 32, \
                ((word(b + 3) >> 32) * (W - w + 1)) >> 32, h, w, flip
    if W / H < ratio[0]:
        w, h = W, math.floor(W / ratio[0] + 0.5)
    elif W / H > ratio[1]:
        w, h = math.floor(H * ratio[1] + 0.5), H
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w, flip


def test_rrc_view_params_match_reference_and_recipe():
    rng = np.random.default_rng(0)
    n = 3000
    idx = rng.integers(0, 2 ** 40, n)
    H = rng.integers(1, 700, n)
    W = rng.integers(1, 700, n)
    H[:40], W[40:80] = 1, 1              # slivers: every attempt fails -> centre fallback
    for seed, epoch, scale, ratio in [(0, 0, (0.08, 1.0), (3 / 4, 4 / 3)),
                                      (2 ** 63 + 5, 2 ** 33, (0.25, 0.5), (0.5, 2.0))]:
        got = rrc_view_params(seed, epoch, idx, H, W, scale, ratio)
        for k in range(n):
            ref = _rrc_reference(seed, epoch, int(idx[k]), int(H[k]), int(W[k]), scale, ratio)
            assert tuple(int(g[k]) for g in got) == tuple(int(r) for r in ref), k
    top, left, h, w, flip = rrc_view_params(3, 1, np.arange(20000), 375, 500)
    assert (top >= 0).all() and (top + h <= 375).all() and (left + w <= 500).all()
    frac, aspect = h * w / (375 * 500), w / h
    assert 0.07 < frac.min() < 0.1 and frac.max() > 0.95 and abs(flip.mean() - 0.5) < 0.02
    assert aspect.min() > 0.74 and aspect.max() < 1.35
    # the flip bit is pad_crop_flip's flip bit: one hash scheme for both recipes
    assert np.array_equal(flip[:500], view_params(3, 1, torch.arange(500), 4)[2].numpy())
    other = rrc_view_params(3, 2, np.arange(20000), 375, 500)
    assert (np.stack(other[:4]) == np.stack([top, left, h, w])).all(0).mean() < 0.01
    t, l, s, s2 = center_view_params([375, 500, 7], [500, 375, 7], 224 / 256)
    assert (s == s2).all() and s.tolist() == [328, 328, 6] and t.tolist() == [23, 86, 0]
    assert l.tolist() == [86, 23, 0]


def test_resample_matches_pil_bilinear():
    img = np.asarray(Image.open(Path(__import__("sklearn").__file__).parent / "datasets" / "images"
                                / "china.jpg").convert("RGB"))[:300, :400]
    rng = np.random.default_rng(1)
    outs = [(224, 224), (40, 48), (7, 300), (300, 2), (1, 1), (413, 97)]
    for trial in range(120):
        h, w = int(rng.integers(1, 301)), int(rng.integers(1, 401))
        top, left = int(rng.integers(0, 301 - h)), int(rng.integers(0, 401 - w))
        out, flip = outs[trial % len(outs)], trial % 3 == 0
        got = resize_crop(img, top, left, h, w, out, flip)
        ref = _pil_view(img, top, left, h, w, flip, out)
        assert got.shape == (*out, 3) and np.abs(got.astype(int) - ref).max() <= 1, (h, w, out)
    with pytest.raises(ValueError, match="outside"):
        resize_crop(img, 250, 0, 60, 10, (4, 4))


# ---------------------------------------------------------------- decoder
def test_decoded_views_equal_independent_crops(tree, single):
    """Each decoded view equals torchvision's recipe done with PIL on the stored pixels, from
    the same view parameters, to within 1 level (PIL rounds between its two resize passes and
    uses fixed-point weights; we keep float32), and resample.resize_crop bit-exactly."""
    files, stored = tree["files"]["train"], tree["stored"]["train"]
    labels = [tree["classes"].index(f.parent.name) for f in files]
    for epoch in (0, 1):
        views = single[epoch]
        assert sorted(views) == list(range(len(files)))  # every sample once per epoch
        idx = np.arange(len(files))
        params = rrc_view_params(SEED, epoch, idx, stored["height"], stored["width"])
        for ix in idx:
            img, lab = views[ix]
            assert lab == labels[ix]
            pixels = _stored_pixels(files[ix], int(stored["mode"][ix]))
            assert pixels.shape[:2] == (stored["height"][ix], stored["width"][ix])
            p = [int(a[ix]) for a in params]
            diff = np.abs(img.astype(int) - _pil_view(pixels, *p))
            assert diff.max() <= 1 and diff.mean() < 0.3, (epoch, ix, diff.max())
            assert np.array_equal(img, resize_crop(pixels, *p[:4], OUT, bool(p[4])))
    flips = [bool(p) for p in rrc_view_params(SEED, 0, np.arange(len(files)), 1, 1)[4]]
    assert 0 < sum(flips) < len(flips)
    changed = [not np.array_equal(single[0][i][0], single[1][i][0]) for i in single[0]]
    assert sum(changed) > 0.9 * len(changed)  # the epoch reached the decoder


def test_views_independent_of_workers_batch_and_cache(tree, single):
    loader = train_loader(tree["out"]["train"], batch_size=5, num_workers=1, spec=ViewSpec(seed=SEED, image_size=OUT),
                          distributed=False, os_cache=False, drop_last=False, batches_ahead=1)
    loader.set_epoch(1)
    got = _collect(loader)[1]
    loader.set_epoch(0)  # resume: replay epoch 0
    got0 = _collect(loader)[0]
    for epoch, views in ((1, got), (0, got0)):
        assert sorted(views) == sorted(single[epoch])
        for ix, (img, lab) in views.items():
            assert np.array_equal(img, single[epoch][ix][0]) and lab == single[epoch][ix][1]
    noflip = train_loader(tree["out"]["train"], batch_size=64, num_workers=1,
                          spec=ViewSpec(seed=SEED, image_size=OUT, flip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0)),
                          distributed=False, drop_last=False)
    x, _, i = next(iter(noflip))
    st = tree["stored"]["train"]
    for img, ix in zip(x.permute(0, 2, 3, 1).numpy(), i.tolist()):
        p = [int(a[0]) for a in rrc_view_params(SEED, 0, [ix], st["height"][ix], st["width"][ix],
                                                (1.0, 1.0), (1.0, 1.0))]
        pixels = _stored_pixels(tree["files"]["train"][ix], int(st["mode"][ix]))
        assert np.array_equal(img, resize_crop(pixels, *p[:4], OUT, False))


def test_val_centre_crop_exact_and_sharded(tree):
    files, stored = tree["files"]["val"], tree["stored"]["val"]
    n = len(files)
    assert n % 2 == 1
    seen = []
    for rank in range(3):
        loader = val_loader(tree["out"]["val"], batch_size=4, num_workers=2, rank=rank,
                            world_size=3, spec=ViewSpec(val_image_size=OUT, val_crop_ratio=0.875))
        assert not loader.augmented
        for x, y, i in loader:
            for img, ix in zip(x.permute(0, 2, 3, 1).numpy(), i.tolist()):
                t, l, h, w = (int(a[0]) for a in center_view_params(
                    stored["height"][ix], stored["width"][ix], 0.875))
                pixels = _stored_pixels(files[ix], int(stored["mode"][ix]))
                assert np.abs(img.astype(int) - _pil_view(pixels, t, l, h, w, False)).max() <= 1
                assert np.array_equal(img, resize_crop(pixels, t, l, h, w, OUT))
                seen.append(ix)
    assert sorted(seen) == list(range(n))  # every sample exactly once over 3 ranks


DIST_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch.distributed as dist
    from fullrange.data import ViewSpec, train_loader, val_loader
    rank, world, rdv, out, train, val = sys.argv[1:7]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method="file://" + rdv, rank=rank, world_size=world)
    loader = train_loader(train, batch_size=6, num_workers=1, spec=ViewSpec(seed=int(sys.argv[7]), image_size=(40, 48)),
                          distributed=True, drop_last=False)
    res = {}
    for epoch in range(2):
        xs, ix = [], []
        for x, _, i in loader:
            xs.append(x.permute(0, 2, 3, 1).numpy().copy()), ix.append(i.numpy().copy())
        res[f"x{epoch}"], res[f"i{epoch}"] = np.concatenate(xs), np.concatenate(ix)
    v = val_loader(val, batch_size=4, num_workers=1, rank=dist.get_rank(),
                   world_size=dist.get_world_size(), spec=ViewSpec(val_image_size=(40, 48)))
    res["vi"] = np.concatenate([i.numpy().copy() for _, _, i in v])
    np.savez(out, **res)
    dist.destroy_process_group()
""")


def test_two_ranks_same_views_each_sample_once(tree, single, tmp_path):
    n = len(tree["files"]["train"])
    assert n % 2 == 0  # so that FFCV's DistributedSampler pads nothing
    script = tmp_path / "worker.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path / "rdv"),
                               str(tmp_path / f"r{r}.npz"), tree["out"]["train"],
                               tree["out"]["val"], str(SEED)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    logs = [p.communicate(timeout=150)[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    res = [np.load(tmp_path / f"r{r}.npz") for r in range(2)]
    for epoch in (0, 1):
        a, b = (r[f"i{epoch}"].tolist() for r in res)
        assert len(a) == len(b) == n // 2 and not set(a) & set(b)
        assert sorted(a + b) == list(range(n))  # every sample once per epoch over the ranks
        for r in res:
            for img, ix in zip(r[f"x{epoch}"], r[f"i{epoch}"].tolist()):
                assert np.array_equal(img, single[epoch][ix][0]), (epoch, ix)
    assert res[0]["i0"].tolist() != res[0]["i1"].tolist()  # reshuffled per epoch
    vals = res[0]["vi"].tolist() + res[1]["vi"].tolist()
    assert sorted(vals) == list(range(len(tree["files"]["val"])))  # validation exact


# ---------------------------------------------------------------- errors and CLI
def test_clear_errors_name_the_path(tree, tmp_path, capsys, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nope\.beton"):
        train_loader(tmp_path / "nope.beton", 8, 1, ViewSpec(), distributed=False)
    bad = tmp_path / "bad.beton"
    data = Path(tree["out"]["train"]).read_bytes()
    sidecar_path(bad).write_text(sidecar_path(tree["out"]["train"]).read_text())
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"bad\.beton.*truncated"):
        train_loader(bad, 8, 1, ViewSpec(), distributed=False)
    bad.write_bytes(b"\x05" * len(data))
    with pytest.raises(ValueError, match=r"bad\.beton: not a readable FFCV"):
        val_loader(bad, 8, 1, rank=0, world_size=1)

    # a JPEG whose bytes were damaged after writing: a black image and a warning naming the file
    from ffcv.reader import Reader

    meta = Reader(tree["out"]["val"]).metadata["f0"]
    row = int(np.flatnonzero(meta["mode"] == 0)[0])
    damaged = bytearray(Path(tree["out"]["val"]).read_bytes())
    start = int(meta["data_ptr"][row])
    damaged[start:start + 64] = bytes(64)
    hurt = tmp_path / "hurt.beton"
    hurt.write_bytes(bytes(damaged))
    sidecar_path(hurt).write_text(sidecar_path(tree["out"]["val"]).read_text())
    loader = val_loader(hurt, batch_size=64, num_workers=1, rank=0, world_size=1, spec=ViewSpec(val_image_size=OUT))
    with pytest.warns(RuntimeWarning, match=r"hurt\.beton: 1 sample\(s\) failed to decode"):
        (x, _, i), = [(x.clone(), y, i.clone()) for x, y, i in loader]  # one batch
    assert i.tolist() == list(range(len(i)))
    assert int(x[row].max()) == 0 and int(x[row ^ 1].max()) > 0

    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "train" / "cat" / "notes.txt").write_text("not an image")
    (empty / "val" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(f"{empty / 'train'}: no images found")):
        write_imagefolder(empty, tmp_path / "o1", progress=False)
    from fullrange.cli import write_ffcv_main

    assert write_ffcv_main(["imagefolder", str(empty), str(tmp_path / "o1")]) == 2
    assert f"{empty / 'train'}: no images found" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"nowhere"):
        write_imagefolder(tmp_path / "nowhere", tmp_path / "o1", progress=False)

    broken = tmp_path / "broken"
    for split in ("train", "val"):
        (broken / split / "cat").mkdir(parents=True)
        Image.new("RGB", (20, 10), (200, 30, 30)).save(broken / split / "cat" / "ok.jpg")
    (broken / "val" / "dog").mkdir()
    Image.new("RGB", (20, 10)).save(broken / "val" / "dog" / "x.jpg")
    with pytest.raises(ValueError, match=r"val/dog: class 'dog' is not a class"):
        write_imagefolder(broken, tmp_path / "o2", progress=False)
    (broken / "val" / "dog" / "x.jpg").unlink()
    (broken / "val" / "dog").rmdir()
    (broken / "train" / "cat" / "zz_bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match=r"1 unreadable image.*zz_bad\.jpg"):
        write_imagefolder(broken, tmp_path / "o2", num_workers=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == []  # nothing published

    # a writer process that dies (killed, out of memory) fails the write instead of hanging
    from fullrange.data import imagefolder

    (broken / "train" / "cat" / "zz_bad.jpg").unlink()
    get = imagefolder._FolderRows.__getitem__
    monkeypatch.setattr(imagefolder, "DEAD_WRITER_GRACE_S", 0.5)
    monkeypatch.setattr(imagefolder._FolderRows, "__getitem__",
                        lambda self, i: os._exit(3) if int(i) == 0 else get(self, i))
    with pytest.raises(RuntimeError, match="writer process died"):
        write_imagefolder(broken, tmp_path / "o2", num_workers=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == []


def test_cli_imagefolder_up_to_date(tree, capsys):
    from fullrange.cli import write_ffcv_main

    out = Path(tree["out"]["train"]).parent
    assert write_ffcv_main(["imagefolder", str(tree["src"]), str(out), "--max-resolution",
                            str(MAX_RES), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "train.beton" in text and "up to date" in text
    assert write_ffcv_main(["imagefolder", str(tree["src"]), str(out), "--jpeg-quality", "80"]) == 2
    assert "train.beton: already exists" in capsys.readouterr().err


# ---------------------------------------------------------------- trainer side
def test_batch_preparer_skips_augmentation_when_decoded():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 8, 10), generator=g, dtype=torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    i = torch.arange(100, 104)
    batch = Batch(x, torch.arange(4), i, i, view=3)
    meta, spec = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}, ViewSpec(seed=0, pad=4, flip=True)
    done = BatchPreparer(meta, spec, augment=False)
    assert torch.equal(done.train(batch)[0], normalize(x, IMAGENET_MEAN, IMAGENET_STD))
    live = BatchPreparer(meta, spec)
    assert not torch.equal(live.train(batch)[0], normalize(x, IMAGENET_MEAN, IMAGENET_STD))
    bf = BatchPreparer(meta, ViewSpec(pad=0, flip=False), channels_last=True, dtype=torch.bfloat16)
    out = bf.eval(batch)[0]
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)


def test_view_spec_defaults_and_keys():
    spec = ViewSpec.from_config(RunConfig())
    assert spec.image_size == 224 and spec.val_image_size == 224
    assert spec.scale == (0.08, 1.0) and spec.val_crop_ratio == 224 / 256
    cfg = RunConfig()
    cfg.seed, cfg.data.image_size, cfg.data.val_image_size, cfg.data.rrc_scale_min = 3, 160, 192, 0.35
    cfg.data.val_crop_ratio, cfg.data.flip = 0.9, False
    assert ViewSpec.from_config(cfg) == ViewSpec(seed=3, pad=4, flip=False, image_size=160, scale=(0.35, 1.0),
                                                 ratio=(3 / 4, 4 / 3), val_image_size=192, val_crop_ratio=0.9)
