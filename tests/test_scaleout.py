"""Scale-out on the CPU with 2 gloo processes: exact mid-epoch resume after SIGKILL, preemption
(SIGTERM -> checkpoint + requeue), non-finite loss, two "nodes" on loopback, a dead rank,
DeepSpeed ZeRO-1/2 against DDP.

Faults are injected with FULLRANGE_FAULT=KIND@STEP@RANK (tests/faults.py). Every run
trains 2 epochs of 8 steps (256 samples, global batch 32) with a step checkpoint every 3 steps."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import FAULT_LAUNCH, REPO, free_port, launch_command, launcher_env, run_launcher, student_overrides
from fullrange.metrics import read_metrics
from fullrange.preemption import EXIT_NONFINITE, EXIT_REQUEUE

CONFIG = str(REPO / "configs" / "fmnist.yaml")


def run_args(tiny_data, teacher_file, out_dir, name, **extra):
    # channels_last off: DeepSpeed keeps contiguous weights, and the comparisons are bit-exact then
    extra = {"name": name, "optim.epochs": 2, "checkpoint_every_steps": 3, "log_every": 1, "stop_check_every": 1,
             "data.channels_last": "false", **extra}
    return [CONFIG, *student_overrides(tiny_data, teacher_file, out_dir, **extra)]


def load_weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)


def trainer_state(run_dir):
    (last,) = sorted((run_dir / "checkpoints").glob("epoch_*"))
    return last.name, json.loads((last / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data, teacher_file):
    """The uninterrupted 2-process DDP run (2 epochs, 16 steps), launched with the CPU config file."""
    out = tmp_path_factory.mktemp("ref")
    done = run_launcher("train.py", run_args(tiny_data, teacher_file, out, "ref"), nproc=2,
                        config_file=str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "ref"


def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, tiny_data, teacher_file, reference):
    args = run_args(tiny_data, teacher_file, tmp_path, "killed")
    # rank 1 is SIGKILLed right after step 11 (epoch 1, batch 3); accelerate then ends rank 0
    killed = run_launcher(FAULT_LAUNCH, args, nproc=2, env={"FULLRANGE_FAULT": "sigkill@11@1"})
    assert killed.returncode != 0
    run = tmp_path / "killed"
    assert trainer_state(run) == ("epoch_0001_batch_0000001", {"epoch": 1, "step": 9, "batch": 1})
    assert not (run / "checkpoints" / "epoch_0001").exists()  # only the last is kept
    resumed = run_launcher("train.py", args + ["resume=true"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 1, batch 1, step 9" in resumed.stderr
    ref, got = load_weights(reference), load_weights(run)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k  # bit-exact, buffers included
    # metrics.jsonl: the lines of steps 10-11 written before the kill were replaced on resume
    steps = [m["step"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert steps == list(range(1, 17))
    assert trainer_state(run) == ("epoch_0002", {"epoch": 2, "step": 16})


def test_sigterm_one_rank_checkpoints_and_requeues(tmp_path, tiny_data, teacher_file):
    requeue = tmp_path / "requeue.json"
    args = run_args(tiny_data, teacher_file, tmp_path, "term")
    # only rank 1 receives SIGTERM (after step 5): both ranks agree to stop after step 5
    done = run_launcher(FAULT_LAUNCH, args, nproc=2,
                        env={"FULLRANGE_FAULT": "sigterm@5@1", "FULLRANGE_REQUEUE_FILE": str(requeue)})
    assert done.returncode != 0  # accelerate reports any failing child as 1; the children exit 75
    assert f"exitcode  : {EXIT_REQUEUE}" in done.stderr or f"exitcode: {EXIT_REQUEUE}" in done.stderr, done.stderr[-3000:]
    assert "preempted (SIGTERM" in done.stderr
    info = json.loads(requeue.read_text())
    assert (info["epoch"], info["batch"], info["step"], info["exit_code"]) == (0, 5, 5, EXIT_REQUEUE)
    assert trainer_state(tmp_path / "term") == ("epoch_0000_batch_0000005", {"epoch": 0, "step": 5, "batch": 5})
    assert not (tmp_path / "term" / "model.pt").exists()


def test_nonfinite_loss_stops_every_rank_and_keeps_last_checkpoint(tmp_path, tiny_data, teacher_file):
    args = run_args(tiny_data, teacher_file, tmp_path, "nan", **{"optim.epochs": 1})
    done = run_launcher(FAULT_LAUNCH, args, nproc=2, env={"FULLRANGE_FAULT": "nan@5@1"})
    assert f"exitcode  : {EXIT_NONFINITE}" in done.stderr or f"exitcode: {EXIT_NONFINITE}" in done.stderr, \
        done.stderr[-3000:]
    assert "non-finite loss (NaN or inf) on rank(s) [1] by step 5" in done.stderr
    assert "epoch_0000_batch_0000003" in done.stderr  # the message names the kept checkpoint
    assert trainer_state(tmp_path / "nan") == ("epoch_0000_batch_0000003", {"epoch": 0, "step": 3, "batch": 3})
    assert not (tmp_path / "nan" / "model.pt").exists()


def start_node(args, rank, port, env=None):
    cmd = launch_command(FAULT_LAUNCH, args, nproc=2, num_machines=2, machine_rank=rank, port=port)
    return subprocess.Popen(cmd, cwd=REPO, env=launcher_env(**(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_two_nodes_on_loopback_train_together(tmp_path, tiny_data, teacher_file, reference):
    args = run_args(tiny_data, teacher_file, tmp_path, "nodes")
    port = free_port()
    nodes = [start_node(args, rank, port) for rank in (0, 1)]
    outs = [n.communicate(timeout=300) for n in nodes]
    for n, (_, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]
    epochs = [m for m in read_metrics(tmp_path / "nodes" / "metrics.jsonl") if "val_top1" in m]
    assert [len(m["weights_checksums"]) for m in epochs] == [2, 2]
    ref, got = load_weights(reference), load_weights(tmp_path / "nodes")
    for k in ref:  # the same 2-rank DDP run, only launched as two machines
        assert torch.equal(ref[k], got[k]), k


def test_dead_rank_ends_the_other_within_the_timeout(tmp_path, tiny_data, teacher_file):
    timeout_s = 20
    args = run_args(tiny_data, teacher_file, tmp_path, "dead", dist_timeout_s=timeout_s)
    port = free_port()
    # node 1's only rank hangs after step 2; then we SIGKILL node 1 (its launcher and rank)
    nodes = [start_node(args, 0, port), start_node(args, 1, port, {"FULLRANGE_FAULT": "hang@2@1"})]
    try:
        deadline = time.time() + 240
        while not any("step" in line for line in _lines(tmp_path / "dead" / "metrics.jsonl")):
            assert time.time() < deadline and nodes[0].poll() is None, "the nodes never trained"
            time.sleep(0.5)
        os.killpg(nodes[1].pid, signal.SIGKILL)
        killed_at = time.time()
        nodes[0].communicate(timeout=timeout_s + 60)
        waited = time.time() - killed_at
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
                n.communicate()
        # torch's launcher starts ranks in sessions of their own: the hung rank of node 1 outlives
        # the SIGKILL of its launcher's group (on a cluster the job's cgroup takes it down)
        subprocess.run(["pkill", "-KILL", "-f", f"out_dir={tmp_path}"], check=False)
    assert nodes[0].returncode != 0
    print(f"node 0 exited {waited:.1f} s after node 1 was killed")
    assert waited < timeout_s + 30, waited


def _lines(path):
    return path.read_text().splitlines() if path.is_file() else []


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_matches_ddp(tmp_path, tiny_data, teacher_file, reference, stage):
    """ZeRO-1 runs through; ZeRO-2 is preempted after step 5 (each rank saves its partition) and
    resumed. Both end with the DDP run's parameters."""
    args = run_args(tiny_data, teacher_file, tmp_path, f"zero{stage}")
    config = str(REPO / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml")
    # ACCELERATE_USE_CPU=true would turn the DeepSpeed launch into plain MULTI_CPU
    env = {"ACCELERATE_USE_CPU": "false"}
    if stage == 2:
        stopped = run_launcher(FAULT_LAUNCH, args, nproc=2, env={**env, "FULLRANGE_FAULT": "sigterm@5@0"},
                               config_file=config)
        assert "preempted (SIGTERM" in stopped.stderr, stopped.stderr[-3000:]
        assert trainer_state(tmp_path / "zero2")[0] == "epoch_0000_batch_0000005"
        args = args + ["resume=true"]
    done = run_launcher("train.py", args, nproc=2, env=env, config_file=config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "with DeepSpeed" in done.stderr
    ref, got = load_weights(reference), load_weights(tmp_path / f"zero{stage}")
    assert ref.keys() == got.keys()
    for k, v in ref.items():
        if k.endswith("running_mean") or k.endswith("running_var") or not v.is_floating_point():
            continue  # DDP broadcasts rank 0's BatchNorm statistics every step, DeepSpeed does not
        assert torch.allclose(v, got[k], rtol=0, atol=1e-5), (k, (v - got[k]).abs().max())
    assert (tmp_path / f"zero{stage}" / "checkpoints" / "epoch_0002").is_dir()


def test_stop_signals_fault_spec_and_checkpoint_order():
    """In-process pieces: SIGUSR1/SIGTERM are caught (and restored), a 1-process StopCheck,
    FULLRANGE_FAULT parsing, and checkpoint names that sort in training order."""
    from faults import Fault
    from fullrange.checkpoint import checkpoint_name
    from fullrange.preemption import StopCheck, StopSignals

    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as signals:
        check = StopCheck(signals, torch.device("cpu"), rank=0, world_size=1)
        assert check.check(1) == (None, [])
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == "SIGUSR1" and check.check(2) == ("SIGUSR1", [])
        check.note_loss(torch.tensor(float("inf")))
        assert check.check(3)[1] == [0]
    assert signal.getsignal(signal.SIGUSR1) == before
    assert (Fault(1, "sigterm@5@1").kind, Fault(0, "sigterm@5@1").kind, Fault(0, "nan@3").step) == ("sigterm", None, 3)
    model = torch.nn.Linear(2, 2)
    Fault(0, "nan@3")(1, model)
    assert not torch.isnan(model.bias).any()
    Fault(0, "nan@3")(2, model)  # after step 2: the loss of step 3 is NaN
    assert torch.isnan(model.bias).all()
    with pytest.raises(ValueError, match="KIND@STEP"):
        Fault(0, "boom@1")
    names = [checkpoint_name(1), checkpoint_name(1, 3), checkpoint_name(1, 12), checkpoint_name(2), checkpoint_name(10)]
    assert sorted(names) == names
