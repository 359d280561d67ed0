"""What a run reports and how it restarts: TensorBoard scalars (loss, throughput, val top-1 at every
T'), safe resume (a changed batch or seed is refused; resume=true without a checkpoint starts
clean), and one-line errors (exit 2) for a truncated .beton, a corrupt cache shard, a corrupt
checkpoint and a sweep of a missing run."""
import json
import shutil
import subprocess
import time

import pytest

from conftest import PYTHON, REPO, run_launcher, student_overrides
from fullrange.config import load_config
from fullrange.engine import train
from fullrange.metrics import read_metrics
from fullrange.runtime import make_accelerator

CONFIG = str(REPO / "configs" / "fmnist.yaml")


def one_line(done, *needles):
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("fullrange: ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def launch(*args):
    return subprocess.run([PYTHON, str(REPO / "launcher" / "train.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_data, teacher_file):
    """A finished 1-epoch run (8 steps) with log_with=[tensorboard], trained in this process."""
    out = tmp_path_factory.mktemp("obs")
    overrides = student_overrides(tiny_data, teacher_file, out, name="tb", log_with="[tensorboard]")
    cfg = load_config(CONFIG, overrides)
    train(cfg, make_accelerator(log_with=cfg.log_with, project_dir=cfg.run_dir))
    return out / "tb", overrides


def test_tensorboard_scalars(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = finished
    assert list((run / "trackers").glob("events.out.tfevents.*"))  # (the config goes to a subfolder as hparams)
    acc = EventAccumulator(str(run / "trackers"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "twce", "lr", "img_per_s", "img_timesteps_per_s", "step_time_s", "data_wait_frac",
            "peak_mem_mib", "val/top1", "val/top1_T1", "val/top1_T2"} <= tags, tags
    assert [e.step for e in acc.Scalars("loss")] == [2, 4, 6, 8]  # log_every=2
    img_s = [e.value for e in acc.Scalars("img_per_s")]
    assert all(v > 0 for v in img_s)
    (val,) = acc.Scalars("val/top1")
    line = [m for m in read_metrics(run / "metrics.jsonl") if "val_top1" in m][0]
    assert val.step == 8 and abs(val.value - line["val_top1"]) < 1e-4
    steps = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert all(0 <= m["data_wait_frac"] <= 1 and m["img_timesteps_per_s"] == pytest.approx(2 * m["img_per_s"], 1e-3)
               for m in steps)


def test_sweep_report_reaches_the_tracker(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = finished
    done = subprocess.run([PYTHON, str(REPO / "launcher" / "sweep.py"), str(run), "--no-layers"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    acc = EventAccumulator(str(run / "sweep_trackers"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    top1 = acc.Scalars("sweep/tb/top1")
    assert [e.step for e in top1] == [1, 2, 3, 4]  # T' = 1..2T
    report = json.loads((run / "sweep.json").read_text())["tb"]
    assert [round(e.value, 4) for e in top1] == [round(v, 4) for v in report["top1"]]
    assert "sweep/figure" in tags["images"] and any("sweep/report" in t for t in tags["tensors"]), tags


def test_resume_refuses_changed_batch_or_seed(finished):
    run, overrides = finished
    before = (run / "metrics.jsonl").read_text()
    one_line(launch(CONFIG, *overrides, "resume=true", "data.batch_size=16"), "config key resume",
             "data.batch_size: 32 -> 16")
    one_line(launch(CONFIG, *overrides, "resume=true", "seed=3", "optim.epochs=2"), "seed: 0 -> 3",
             "optim.epochs: 1 -> 2")
    assert (run / "metrics.jsonl").read_text() == before  # nothing written


def test_resume_without_checkpoint_starts_clean(tmp_path, tiny_data, teacher_file):
    overrides = student_overrides(tiny_data, teacher_file, tmp_path, name="fresh", resume="true",
                                  max_steps_per_epoch=2, log_every=1)
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')  # saved nothing
    done = launch(CONFIG, *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [m["step"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert steps == [1, 2] and all(m["loss"] != 9.0 for m in read_metrics(run / "metrics.jsonl") if "loss" in m)


def test_truncated_beton_corrupt_shard_and_checkpoint(tmp_path, tiny_data, teacher_file, finished):
    short = tmp_path / "short.beton"
    data = open(tiny_data["train"], "rb").read()
    short.write_bytes(data[: len(data) // 2])
    shutil.copy(tiny_data["train"] + ".json", str(short) + ".json")
    args = student_overrides(tiny_data, teacher_file, tmp_path, name="t1", **{"data.train_path": str(short)})
    one_line(launch(CONFIG, *args), "data.train_path", "truncated")

    cache = tmp_path / "cache"
    over = student_overrides(tiny_data, teacher_file, tmp_path, name="c1", **{
        "teacher.source": "cache", "teacher.cache_dir": str(cache)})
    built = subprocess.run([PYTHON, str(REPO / "launcher" / "cache_teacher.py"), CONFIG, *over], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    shard = sorted((cache / "shards").glob("*.npy"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x10
    shard.write_bytes(bytes(raw))
    one_line(launch(CONFIG, *over), "teacher.cache_dir", shard.name, "corrupt")
    assert not (tmp_path / "c1" / "checkpoints").exists()

    run, overrides = finished
    copy = tmp_path / "copy"
    shutil.copytree(run, copy / "tb")
    (ckpt,) = (copy / "tb" / "checkpoints").glob("epoch_*")
    for f in ckpt.glob("*.safetensors"):
        f.write_bytes(b"garbage")
    for f in ckpt.glob("*.bin"):
        f.write_bytes(b"garbage")
    moved = [o for o in overrides if not o.startswith("out_dir=")] + [f"out_dir={copy}"]
    one_line(launch(CONFIG, *moved, "resume=true", "optim.epochs=1"), "checkpoint", ckpt.name, "unreadable")
    assert ckpt.is_dir()  # nothing deleted


def test_two_process_sweep_of_missing_run_exits_promptly(tmp_path):
    start = time.time()
    done = run_launcher("sweep.py", [str(tmp_path / "no_such_run")], nproc=2, timeout=120)
    assert done.returncode != 0 and "no_such_run/config.yaml: not found" in done.stderr, done.stderr[-2000:]
    assert time.time() - start < 60
    assert json.dumps(done.returncode)
