"""Shared fixtures: a small real dataset as .beton files, a teacher weights file, a launcher helper."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Fashion-MNIST (or digits) subsets: 256 train and an ODD 101 val samples as .beton files."""
    from fullrange.data import load_bundled, write_beton
    from fullrange.data.writer import channel_stats

    out = tmp_path_factory.mktemp("data")
    x, y, info = load_bundled("fmnist", "train")
    xv, yv, _ = load_bundled("fmnist", "val")
    x, y, xv, yv = x[:256], y[:256], xv[:101], yv[:101]
    mean, std = channel_stats(x)
    paths = {}
    for split, (a, b) in {"train": (x, y), "val": (xv, yv)}.items():
        paths[split] = out / f"{split}.beton"
        write_beton(paths[split], a, b, name=info["name"], source="test subset", split=split,
                    num_classes=info["num_classes"], mean=mean, std=std)
    return {"train": str(paths["train"]), "val": str(paths["val"]), "shape": x.shape[1:],
            "num_classes": info["num_classes"]}


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory, tiny_data):
    """Random-init resnet_tiny weights (a stand-in teacher; the tests check plumbing, not accuracy)."""
    import torch

    from fullrange.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(build_model("resnet_tiny", tiny_data["num_classes"], tiny_data["shape"][-1]).state_dict(), path)
    return str(path)


def student_overrides(tiny_data, teacher_file, out_dir, **extra) -> list[str]:
    values = {"data.train_path": tiny_data["train"], "data.val_path": tiny_data["val"],
              "data.batch_size": 32, "data.val_batch_size": 40, "data.num_workers": 1,
              "model.T": 2, "optim.epochs": 1, "teacher.checkpoint": teacher_file, "teacher.source": "live",
              "out_dir": str(out_dir), "log_every": 2, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(**extra: str) -> dict:
    """The environment of a CPU `accelerate launch` in tests (one thread per process); an extra
    value of None removes that variable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1", **extra}
    return {k: v for k, v in env.items() if v is not None}


FAULT_LAUNCH = "tests/fault_launch.py"  # the launchers with FULLRANGE_FAULT's fault (tests/faults.py)


def launch_command(script: str, args: list[str], nproc: int = 1, *, config_file: str | None = None,
                   num_machines: int = 1, machine_rank: int = 0, port: int | None = None,
                   precision: str = "no") -> list[str]:
    """`accelerate launch` of launcher/SCRIPT (or of the repository path SCRIPT, e.g. FAULT_LAUNCH)
    on the CPU: nproc processes in all, over num_machines "nodes" that meet at 127.0.0.1:port
    (this process is machine_rank); config_file: an accelerate YAML (e.g.
    configs/accelerate/deepspeed_zero2.yaml) whose GPU settings the flags override; precision:
    --mixed_precision (no or bf16 on the CPU)."""
    launch = [ACCELERATE, "launch"]
    if config_file:
        launch += ["--config_file", config_file]
    if nproc > 1 or num_machines > 1:
        if not config_file:
            launch.append("--multi_gpu")
        launch += ["--num_processes", str(nproc), "--num_machines", str(num_machines),
                   "--main_process_port", str(port or free_port())]
        if num_machines > 1:
            launch += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    else:
        launch += ["--cpu", "--num_processes", "1", "--num_machines", "1"]
    launch += ["--mixed_precision", precision, "--dynamo_backend", "no"]
    path = REPO / script if "/" in script else REPO / "launcher" / script
    return launch + [str(path), *args]


def run_launcher(script: str, args: list[str], nproc: int = 1, timeout: int = 600, env: dict | None = None,
                 **launch) -> subprocess.CompletedProcess:
    """Run launcher/SCRIPT through `accelerate launch` on the CPU with nproc processes (gloo).
    env: extra environment variables; launch: keyword arguments of launch_command."""
    return subprocess.run(launch_command(script, args, nproc, **launch), cwd=REPO, env=launcher_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu skip without CUDA (scripts/gpu_check.sh runs them on a GPU machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs these)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
