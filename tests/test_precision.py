"""Precision from the launch: two CPU processes with --mixed_precision bf16 (CPU autocast) train an
epoch under DDP and under DeepSpeed ZeRO-2; the run records bf16, the ranks agree, and the weights,
BatchNorm included, stay fp32 (DeepSpeed's own bf16 engine would cast the whole module)."""
import json

import pytest
import torch

from conftest import REPO, run_launcher, student_overrides
from fullrange.metrics import read_metrics

CONFIG = str(REPO / "configs" / "fmnist.yaml")


def launch(tmp_path, tiny_data, teacher_file, name, config_file=None, env=None, **extra):
    args = [CONFIG, *student_overrides(tiny_data, teacher_file, tmp_path, name=name, **extra)]
    return run_launcher("train.py", args, nproc=2, precision="bf16", env=env, config_file=config_file)


@pytest.mark.parametrize("mode", ["ddp", "zero2"])
def test_bf16_two_processes(tmp_path, tiny_data, teacher_file, mode):
    if mode == "ddp":
        done = launch(tmp_path, tiny_data, teacher_file, mode, **{"model.sync_bn": "true"})
    else:  # ACCELERATE_USE_CPU=true would turn the DeepSpeed launch into plain MULTI_CPU
        done = launch(tmp_path, tiny_data, teacher_file, mode, env={"ACCELERATE_USE_CPU": "false"},
                      config_file=str(REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"),
                      **{"data.channels_last": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / mode
    env = json.loads((run / "environment.json").read_text())
    assert (env["mixed_precision"], env["world_size"], env["device"].split(":")[0]) == ("bf16", 2, "cpu")
    assert env["torch"] == torch.__version__
    assert "precision bf16" in done.stderr
    if mode == "ddp":  # torch has no CPU SyncBatchNorm: one warning line, then plain BatchNorm
        assert done.stderr.count("model.sync_bn") == 1
    else:
        assert "with DeepSpeed" in done.stderr
    (epoch,) = [m for m in read_metrics(run / "metrics.jsonl") if "val_top1" in m]
    assert epoch["weights_checksums"][0] == epoch["weights_checksums"][1]
    assert epoch["weights_dtypes"] == ["float32", "int64"]  # in the run, BatchNorm included
    weights = torch.load(run / "model.pt", weights_only=True)
    mean, w = weights["layer1.0.bn1.running_mean"], weights["fc.weight"]
    for t in (mean, w):  # fp32 values, not bf16 ones stored as fp32
        assert t.dtype == torch.float32 and not torch.equal(t, t.bfloat16().float())
    losses = [m["loss"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 4 and all(0 < v < 10 for v in losses)


def test_fp16_on_cpu_is_refused(tmp_path, tiny_data, teacher_file):
    args = [CONFIG, *student_overrides(tiny_data, teacher_file, tmp_path, name="fp16")]
    done = run_launcher("train.py", args, nproc=1, precision="fp16")
    assert "fullrange: mixed precision fp16 needs a GPU" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "fp16").exists()
