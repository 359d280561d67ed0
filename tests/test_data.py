"""fullrange.data: bundled datasets, .beton writer, loaders, replayable augmentation (CPU)."""
import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fullrange.data import (ViewSpec, check_beton, load_bundled, normalize, pad_crop_flip, prepare_bundled,
                            read_idx, read_sidecar, sidecar_path, train_loader, val_loader,
                            view_params, write_beton)
import hash_reference
from fullrange.data.hashing import draws
from fullrange.data.bundled import FMNIST_DIR, _fmnist_available

HAVE_FMNIST = _fmnist_available(FMNIST_DIR)
REPO = Path(__file__).resolve().parents[1]


def _arrays(n, shape=(12, 10, 3), seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = rng.integers(0, 7, size=n).astype(np.int64)
    return images, labels


@pytest.fixture(scope="module")
def small_beton(tmp_path_factory):
    """300 random 12x10x3 samples (non-square, 3 channels: catches H/W/C mix-ups)."""
    d = tmp_path_factory.mktemp("beton")
    images, labels = _arrays(300)
    path = d / "small.beton"
    write_beton(path, images, labels, name="random", num_classes=7)
    return path, images, labels


def _collect(loader):
    xs, ys, ixs = [], [], []
    for x, y, i in loader:
        xs.append(x.clone()), ys.append(y.clone()), ixs.append(i.clone())
    if not xs:
        return None, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(xs), torch.cat(ys), torch.cat(ixs)


# ---------------------------------------------------------------- bundled datasets
@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian dataset-fashion-mnist not installed")
def test_fmnist_idx_shapes_and_histogram():
    x, y, info = load_bundled("fmnist", "train")
    assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8
    assert y.dtype == np.int64 and np.array_equal(np.bincount(y), [6000] * 10)
    assert info["name"] == "fmnist" and not info["fallback"] and info["shape"] == [28, 28, 1]
    xv, yv, _ = load_bundled("fmnist", "val")
    assert xv.shape == (10000, 28, 28, 1) and np.array_equal(np.bincount(yv), [1000] * 10)


def test_digits_and_fallback(tmp_path):
    x, y, info = load_bundled("digits", "train")
    xv, yv, _ = load_bundled("digits", "val")
    assert x.shape == (1498, 8, 8, 1) and xv.shape == (299, 8, 8, 1) and x.dtype == np.uint8
    assert info["shape"] == [8, 8, 1] and x.max() == 255 and "8x8" in info["note"]
    assert set(np.unique(np.concatenate([y, yv]))) == set(range(10))
    with pytest.warns(RuntimeWarning, match="falling back"):
        xf, yf, inf = load_bundled("fmnist", "val", root=tmp_path)  # empty dir: no idx files
    assert inf["fallback"] and inf["name"] == "digits" and inf["requested"] == "fmnist"
    assert np.array_equal(xf, xv) and np.array_equal(yf, yv)
    with pytest.raises(ValueError, match="dataset name"):
        load_bundled("cifar", "train")


def test_read_idx_roundtrip_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "a-idx3-ubyte.gz"
    with gzip.open(good, "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + np.array(arr.shape, ">u4").tobytes() + arr.tobytes())
    assert np.array_equal(read_idx(good), arr)
    with pytest.raises(FileNotFoundError, match="missing-idx"):
        read_idx(tmp_path / "missing-idx.gz")
    notgz = tmp_path / "notgz.gz"
    notgz.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="notgz.gz"):
        read_idx(notgz)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + np.array(arr.shape, ">u4").tobytes() + arr.tobytes()[:-1])
    with pytest.raises(ValueError, match="short.gz.*payload"):
        read_idx(short)
    magic = tmp_path / "magic.gz"
    with gzip.open(magic, "wb") as f:
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic.gz.*bad magic"):
        read_idx(magic)


# ---------------------------------------------------------------- writer
def test_written_beton_reads_back_exactly(small_beton):
    path, images, labels = small_beton
    meta = read_sidecar(path)
    assert meta["num_samples"] == 300 and meta["shape"] == [12, 10, 3] and meta["num_classes"] == 7
    np.testing.assert_allclose(meta["mean"], images.reshape(-1, 3).mean(0), rtol=1e-12)
    np.testing.assert_allclose(meta["std"], images.reshape(-1, 3).std(0), rtol=1e-9)
    assert meta["beton_bytes"] == path.stat().st_size
    x, y, i = _collect(val_loader(path, batch_size=64, num_workers=1, rank=0, world_size=1))
    assert x.shape == (300, 3, 12, 10) and x.dtype == torch.uint8
    assert torch.equal(i, torch.arange(300))
    assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(images))
    assert torch.equal(y, torch.from_numpy(labels))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_failed_write_keeps_existing_file(tmp_path, monkeypatch):
    images, labels = _arrays(50)
    path = tmp_path / "d.beton"
    write_beton(path, images, labels)
    before = path.read_bytes(), sidecar_path(path).read_text()

    from ffcv.writer import DatasetWriter

    def boom(self, *a, **k):
        Path(self.fname).write_bytes(b"half")  # a partial temp file exists when it dies
        raise RuntimeError("disk full")

    monkeypatch.setattr(DatasetWriter, "from_indexed_dataset", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_beton(path, images[::-1].copy(), labels)
    assert (path.read_bytes(), sidecar_path(path).read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.beton", "d.beton.json"]
    with pytest.raises(ValueError, match="uint8"):
        write_beton(tmp_path / "e.beton", images.astype(np.float32), labels)
    assert not (tmp_path / "e.beton").exists()


def test_prepare_bundled_idempotent(tmp_path):
    out = prepare_bundled("digits", tmp_path / "dg")
    tr, va = Path(out["train"]), Path(out["val"])
    mt = tr.stat().st_mtime_ns, va.stat().st_mtime_ns
    assert out["meta"]["train"]["num_samples"] == 1498 and out["meta"]["val"]["num_samples"] == 299
    assert out["meta"]["val"]["mean"] == out["meta"]["train"]["mean"]  # train statistics
    assert out["meta"]["train"]["name"] == "digits" and out["meta"]["train"]["shape"] == [8, 8, 1]
    again = prepare_bundled("digits", tmp_path / "dg")
    assert again == out and (tr.stat().st_mtime_ns, va.stat().st_mtime_ns) == mt
    with pytest.raises(ValueError, match="holds dataset 'digits'"):
        prepare_bundled("fmnist", tmp_path / "dg")


# ---------------------------------------------------------------- augmentation
def _numpy_view(img_chw, dy, dx, flip, pad):
    p = np.pad(img_chw, ((0, 0), (pad, pad), (pad, pad)))
    h, w = img_chw.shape[1:]
    crop = p[:, dy:dy + h, dx:dx + w]
    return crop[:, :, ::-1] if flip else crop


@pytest.mark.parametrize("pad,dtype", [(4, torch.uint8), (2, torch.float32), (0, torch.uint8)])
def test_pad_crop_flip_matches_numpy_reference(pad, dtype):
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (64, 3, 9, 11), generator=g).to(dtype)
    idx = torch.randperm(10_000, generator=g)[:64]
    out = pad_crop_flip(imgs, idx, seed=7, epoch=3, pad=pad)
    assert out.shape == imgs.shape and out.dtype == dtype
    dy, dx, fl = view_params(7, 3, idx, pad)
    assert int(dy.min()) >= 0 and int(dy.max()) <= 2 * pad and int(dx.max()) <= 2 * pad
    for b in range(64):
        ref = _numpy_view(imgs[b].numpy(), int(dy[b]), int(dx[b]), bool(fl[b]), pad)
        assert np.array_equal(out[b].numpy(), ref)
    noflip = pad_crop_flip(imgs, idx, seed=7, epoch=3, pad=pad, flip=False)
    for b in range(0, 64, 5):
        assert np.array_equal(noflip[b].numpy(),
                              _numpy_view(imgs[b].numpy(), int(dy[b]), int(dx[b]), False, pad))


def test_views_independent_of_batching_and_order():
    g = torch.Generator().manual_seed(2)
    imgs = torch.randint(0, 256, (64, 1, 8, 8), generator=g, dtype=torch.uint8)
    idx = torch.arange(1000, 1064)
    whole = pad_crop_flip(imgs, idx, seed=11, epoch=5, pad=3)
    perm = torch.randperm(64, generator=g)
    pieces = torch.empty_like(whole)
    for s in range(0, 64, 7):
        sel = perm[s:s + 7]
        pieces[sel] = pad_crop_flip(imgs[sel], idx[sel], seed=11, epoch=5, pad=3)
    assert torch.equal(whole, pieces)


def test_hash_matches_uint64_reference_and_is_uniform():
    idx = torch.tensor([0, 1, 2, 12345, 2**40 + 3, 2**62])
    for seed, epoch in [(0, 0), (3, 7), (2**63 + 9, 2**33)]:
        got = draws(seed, epoch, idx, (0, 1, 2, 2), (2**32, 2**32, 2**32, 2))  # n = 2**32: the top 32 bits
        for j, i in enumerate(idx.tolist()):
            want = [hash_reference.word(seed, epoch, i, k) for k in (0, 1, 2)]
            assert got[:3, j].tolist() == [w >> 32 for w in want] and int(got[3, j]) == want[2] >> 63
    n, pad = 90_000, 4
    dy, dx, fl = view_params(0, 0, torch.arange(n), pad)
    k = 2 * pad + 1
    for counts in (torch.bincount(dy, minlength=k), torch.bincount(dx, minlength=k),
                   torch.bincount(dy * k + dx, minlength=k * k)):
        e = n / counts.numel()
        chi2 = float(((counts - e) ** 2 / e).sum())
        dof = counts.numel() - 1
        assert chi2 < dof + 6 * (2 * dof) ** 0.5, chi2  # ~6 sigma: never flaky, catches bias
    assert abs(float(fl.float().mean()) - 0.5) < 0.01
    base = torch.stack([dy, dx, fl.long()])
    for other in (view_params(0, 1, torch.arange(n), pad), view_params(1, 0, torch.arange(n), pad)):
        same = (torch.stack([other[0], other[1], other[2].long()]) == base).all(0).float().mean()
        assert float(same) < 0.02  # chance agreement is 1/162


# ---------------------------------------------------------------- loaders
def test_train_loader_epochs(small_beton):
    path, images, labels = small_beton
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # FFCV calls torch.set_num_threads(num_workers); our wrapper must undo it
        loader = train_loader(path, batch_size=32, num_workers=2, spec=ViewSpec(seed=5), distributed=False,
                              drop_last=False)
        assert torch.get_num_threads() == 1
        _check_train_epochs(loader, path, images, labels)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def _check_train_epochs(loader, path, images, labels):
    assert len(loader) == 10 and loader.epoch == 0
    orders = []
    for epoch in range(2):
        x, y, i = _collect(loader)
        assert torch.equal(torch.sort(i).values, torch.arange(300))  # each sample once
        assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(images)[i])
        assert torch.equal(y, torch.from_numpy(labels)[i])
        orders.append(i)
    assert not torch.equal(orders[0], orders[1]) and loader.epoch == 2
    for _ in loader:  # leave an epoch early: the prefetch thread is stopped, next epoch whole
        break
    assert loader.epoch == 3
    loader.set_epoch(1)  # resume: replay epoch 1's order
    assert torch.equal(_collect(loader)[2], orders[1])
    loader.set_epoch(1, start_batch=3)  # resume inside epoch 1: its batches from the 4th on
    x, y, i = _collect(loader)
    assert torch.equal(i, orders[1][96:]) and loader.epoch == 2
    assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(images)[i])
    assert len(_collect(loader)[2]) == 300  # start_batch applies to one iteration only
    dropped = train_loader(path, batch_size=32, num_workers=1, spec=ViewSpec(seed=5), distributed=False)
    assert len(dropped) == 9
    i = _collect(dropped)[2]
    assert len(i) == 288 and torch.equal(i, orders[0][:288])  # same seed, same epoch-0 order


@pytest.mark.parametrize("n,world_size", [(101, 1), (101, 2), (101, 3), (3, 5)])
def test_val_loader_counts_every_sample_once(tmp_path, n, world_size):
    """Odd N; (3, 5): world_size > N, two ranks have empty shards and yield nothing."""
    images, labels = _arrays(n, shape=(4, 4, 1), seed=world_size)
    path = tmp_path / "odd.beton"
    write_beton(path, images, labels)
    seen = []
    for rank in range(world_size):
        loader = val_loader(path, batch_size=8, num_workers=1, rank=rank, world_size=world_size)
        x, y, i = _collect(loader)
        assert len(i) == loader.num_samples and len(loader) == -(-len(i) // 8)
        if len(i):
            assert torch.equal(y, torch.from_numpy(labels)[i])
        else:
            assert len(loader) == 0 and loader.loader is None
        seen.append(i)
    assert sum(len(i) == 0 for i in seen) == max(0, world_size - n)
    allidx = torch.cat(seen)
    assert torch.equal(torch.sort(allidx).values, torch.arange(n))  # exactly once


DIST_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from fullrange.data import ViewSpec, train_loader
    rank, world, rdv, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method="file://" + rdv, rank=rank, world_size=world)
    res = {}
    for name in sys.argv[5:]:
        loader = train_loader(name, batch_size=16, num_workers=1, spec=ViewSpec(seed=3), distributed=True,
                              drop_last=False)
        res[name] = [[int(v) for _, _, i in loader for v in i] for _ in range(2)]
    json.dump(res, open(out, "w"))
    dist.destroy_process_group()
""")


def test_distributed_train_loader_two_ranks(tmp_path):
    even, odd = tmp_path / "even.beton", tmp_path / "odd.beton"
    write_beton(even, *_arrays(200, shape=(4, 4, 1)))
    write_beton(odd, *_arrays(201, shape=(4, 4, 1)))
    script = tmp_path / "worker.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path / "rdv"),
                               str(tmp_path / f"out{r}.json"), str(even), str(odd)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    logs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    r0, r1 = (json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2))
    for epoch in range(2):
        a, b = set(r0[str(even)][epoch]), set(r1[str(even)][epoch])
        assert len(r0[str(even)][epoch]) == len(a) == 100 == len(b)
        assert not a & b and a | b == set(range(200))  # disjoint, covering
        # odd N: FFCV (DistributedSampler) pads to ceil(N/W)*W = 202: each rank gets 101,
        # all 201 covered, exactly one sample seen twice (on the two ranks).
        c, d = r0[str(odd)][epoch], r1[str(odd)][epoch]
        assert len(c) == len(d) == 101 and set(c) | set(d) == set(range(201))
        assert len(set(c) & set(d)) == 1
    assert r0[str(even)][0] != r0[str(even)][1]  # reshuffled per epoch


def test_distributed_needs_process_group(small_beton):
    with pytest.raises(RuntimeError, match="torch.distributed"):
        train_loader(small_beton[0], 32, 1, spec=ViewSpec(seed=0), distributed=True)


def test_missing_or_corrupt_beton_errors(tmp_path, small_beton):
    with pytest.raises(FileNotFoundError, match="nope.beton"):
        train_loader(tmp_path / "nope.beton", 8, 1, spec=ViewSpec(seed=0), distributed=False)
    images, labels = _arrays(20)
    path = tmp_path / "c.beton"
    write_beton(path, images, labels)
    side = sidecar_path(path)
    good_side = side.read_text()
    side.unlink()
    with pytest.raises(FileNotFoundError, match=r"c\.beton\.json"):
        val_loader(path, 8, 1, rank=0, world_size=1)
    side.write_text("{not json")
    with pytest.raises(ValueError, match=r"c\.beton\.json"):
        val_loader(path, 8, 1, rank=0, world_size=1)
    side.write_text(good_side)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=r"c\.beton.*truncated"):
        train_loader(path, 8, 1, spec=ViewSpec(seed=0), distributed=False)
    path.write_bytes(b"\x07" * len(data))  # garbage of the right size
    with pytest.raises(ValueError, match=r"c\.beton: not a readable FFCV"):
        check_beton(path)


def test_normalize():
    x = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8)
    mean, std = [10.0, 20.0, 30.0], [2.0, 4.0, 8.0]
    ref = (x.double() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-5)
    cl = normalize(x, mean, std, dtype=torch.bfloat16, channels_last=True)
    assert cl.dtype == torch.bfloat16 and cl.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="3 values"):
        normalize(x, [0.0], [1.0, 1.0])


@pytest.mark.parametrize("layout", ["cifar10", "cifar100"])
def test_cifar_archive_to_beton(tmp_path, layout):
    """A CIFAR python-version folder (synthetic, same format) -> .beton files holding the same pixels."""
    import pickle

    from fullrange.cli import write_ffcv_main
    from fullrange.data import read_sidecar, val_loader

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    key, files = (b"labels", {"data_batch_1": 6, "data_batch_2": 4, "test_batch": 5}) if layout == "cifar10" else \
        (b"fine_labels", {"train": 10, "test": 5})
    planes = {}
    for name, n in files.items():
        planes[name] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(src / name, "wb") as f:
            pickle.dump({b"data": planes[name], key: rng.integers(0, 7, n).tolist()}, f)
    meta_name, names_key = ("batches.meta", b"label_names") if layout == "cifar10" else ("meta", b"fine_label_names")
    with open(src / meta_name, "wb") as f:
        pickle.dump({names_key: [f"c{i}".encode() for i in range(7)]}, f)
    if layout == "cifar10":  # the other training batches of a real archive
        for i in range(3, 6):
            (src / f"data_batch_{i}").write_bytes((src / "data_batch_2").read_bytes())
    assert write_ffcv_main(["cifar", str(src), str(tmp_path / "out")]) == 0
    meta = read_sidecar(tmp_path / "out" / "val.beton")
    assert meta["num_samples"] == 5 and meta["shape"] == [32, 32, 3] and meta["num_classes"] == 7
    x, _, _ = next(iter(val_loader(tmp_path / "out" / "val.beton", 8, 1, 0, 1)))
    want = planes["test_batch" if layout == "cifar10" else "test"].reshape(-1, 3, 32, 32)
    assert np.array_equal(x.numpy(), want)  # channel planes -> [B, C, H, W] unchanged
    assert write_ffcv_main(["cifar", str(tmp_path / "nothing"), str(tmp_path / "o2")]) == 2
