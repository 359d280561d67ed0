"""launcher/train.py through accelerate: 2 CPU processes complete an epoch with identical weights, the
same weights in model.memory=checkpoint (blocks recomputed under DDP); resume of a finished run
(refused with another schedule, a no-op with the same config)."""
import json

import torch

from conftest import REPO, run_launcher, student_overrides
from fullrange.metrics import read_metrics


def test_two_process_epoch_weights_agree_and_resume(tmp_path, tiny_data, teacher_file):
    args = [str(REPO / "configs" / "fmnist.yaml"), *student_overrides(tiny_data, teacher_file, tmp_path, name="ddp")]
    done = run_launcher("train.py", args, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "ddp"
    metrics = read_metrics(run / "metrics.jsonl")
    epoch_lines = [m for m in metrics if "val_top1" in m]
    assert len(epoch_lines) == 1
    sums = epoch_lines[0]["weights_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert epoch_lines[0]["val_total"] == 101  # every validation sample counted once
    # 256 samples / global batch 32 = 8 steps; logged every 2 steps with the loss parts
    steps = [m for m in metrics if "twce" in m]
    assert [m["step"] for m in steps] == [2, 4, 6, 8]
    assert (run / "checkpoints" / "epoch_0001" / "trainer_state.json").is_file()
    state = torch.load(run / "model.pt", weights_only=True)
    assert float(sum(t.double().sum() for t in state.values() if t.is_floating_point())) == sums[0]

    # a resume of the finished run with more epochs is refused (the cosine schedule would change);
    # with the same config it finds nothing left to do and writes nothing
    refused = run_launcher("train.py", args + ["resume=true", "optim.epochs=2"], nproc=2)
    assert refused.returncode != 0 and "optim.epochs: 1 -> 2" in refused.stderr, refused.stderr[-3000:]
    before = (run / "metrics.jsonl").read_text()
    again = run_launcher("train.py", args + ["resume=true"], nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "epoch 1, batch 0, step 8" in again.stderr
    assert (run / "metrics.jsonl").read_text() == before
    assert json.loads((run / "checkpoints" / "epoch_0001" / "trainer_state.json").read_text()) == {"epoch": 1, "step": 8}

    args = [str(REPO / "configs" / "fmnist.yaml"), *student_overrides(tiny_data, teacher_file, tmp_path, name="ckpt")]
    done = run_launcher("train.py", args + ["model.memory=checkpoint"], nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    recomputed = [m for m in read_metrics(tmp_path / "ckpt" / "metrics.jsonl") if "val_top1" in m][0]
    assert recomputed["weights_checksums"] == sums


def test_demo_launch_config_trains_with_ddp(tmp_path, tiny_data, teacher_file):
    """configs/accelerate/cpu_2proc.yaml as scripts/demo.sh uses it (no ACCELERATE_USE_CPU in the
    environment): the two processes must really be data-parallel, not two independent runs."""
    args = [str(REPO / "configs" / "fmnist.yaml"), *student_overrides(tiny_data, teacher_file, tmp_path, name="cfg")]
    done = run_launcher("train.py", args, nproc=2, env={"ACCELERATE_USE_CPU": None},
                        config_file=str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    epoch = [m for m in read_metrics(tmp_path / "cfg" / "metrics.jsonl") if "val_top1" in m][0]
    sums = epoch["weights_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
