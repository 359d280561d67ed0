"""slurm/ for real, on a one-node Slurm cluster on this machine (scripts/slurm_local.sh): the
pipeline (teacher cache -> 2-task student array -> sweep, chained by afterok), preemption by the
scheduler's signals (requeue, then a bit-exact resume) and a failing student.

Marked `slurm`. Where the cluster cannot start (not root, no apt-get, ...) the tests skip with the
reason, except in CI (CI=true), where that fails them. Every job is one CPU process (GPUS_PER_NODE=1
with the gloo config, --cpus-per-task=1), so two jobs run at once on two cores; the budget is the
tiny data of conftest: 8 steps of 32 samples, T=2."""
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import ACCELERATE, REPO

pytestmark = pytest.mark.slurm

LOCAL = REPO / "scripts" / "slurm_local.sh"
CONFIG = "configs/fmnist.yaml"


class Cluster:
    """The running cluster: `env` for Slurm clients and jobs, `sbatch` and `job` to use it."""

    def __init__(self, conf: str, logs: Path, requeue: Path):
        self.logs, self.submitted = logs, []
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not a job of another cluster
        self.env = {**env, "SLURM_CONF": conf, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "FULLRANGE_ROOT": str(REPO), "ACCELERATE": ACCELERATE, "GPUS_PER_NODE": "1",
                    "ACCELERATE_CONFIG": "configs/accelerate/cpu_2proc.yaml", "REQUEUE_DIR": str(requeue)}
        # the scripts' #SBATCH lines ask for 8 GPUs and 64 CPUs: one CPU and no GPU here; logs in tmp
        self.sbatch_args = [f"--chdir={logs}", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10"]

    def run(self, *cmd, check=True, timeout=120, **env) -> subprocess.CompletedProcess:
        done = subprocess.run([str(c) for c in cmd], cwd=REPO, env={**self.env, **env}, capture_output=True,
                              text=True, timeout=timeout)
        assert not check or done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"
        return done

    def sbatch(self, script: str, **env) -> str:
        job = self.run("sbatch", "--parsable", *self.sbatch_args, f"slurm/{script}", **env).stdout.strip()
        self.submitted.append(job)
        return job

    def pipeline(self, out_dir: Path, **env) -> subprocess.CompletedProcess:
        done = self.run("bash", "slurm/pipeline.sh", OUT_DIR=str(out_dir), SBATCH_ARGS=" ".join(self.sbatch_args), **env)
        self.submitted += re.findall(r"^submitted .*: job (\d+)$", done.stdout, re.M)
        return done

    def status(self, out_dir: Path) -> subprocess.CompletedProcess:
        return self.run("bash", "slurm/pipeline.sh", "status", check=False, OUT_DIR=str(out_dir))

    def job(self, job: str) -> list[dict]:
        """`scontrol show job` of a job (one dict per array task)."""
        out = self.run("scontrol", "show", "job", "-o", job).stdout
        return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines()]


def wait_until(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.time() + timeout
    while not (value := predicate()):
        if time.time() > deadline:
            tail = log.read_text()[-3000:] if log and log.is_file() else ""
            raise AssertionError(f"{what}: not within {timeout} s\n{tail}")
        time.sleep(0.3)
    return value


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """The local cluster (started here unless it already runs; then it is left running)."""
    state = os.environ.get("FULLRANGE_SLURM_DIR", "/tmp/fullrange-slurm")
    env = {**os.environ, "FULLRANGE_SLURM_DIR": state}
    was_up = subprocess.run(["bash", LOCAL, "status"], env=env, capture_output=True).returncode == 0
    if not was_up:
        start = subprocess.run(["bash", LOCAL, "start"], env=env, capture_output=True, text=True, timeout=900)
        if start.returncode != 0:
            reason = f"no local Slurm cluster: {(start.stderr.strip().splitlines() or ['?'])[-1]}"
            if os.environ.get("CI") == "true":
                pytest.fail(f"{reason} (CI must run the slurm tests)\n{start.stdout}{start.stderr}")
            pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("slurm")
    (tmp / "logs").mkdir()
    c = Cluster(f"{state}/slurm.conf", tmp / "logs", tmp / "requeue")
    yield c
    if was_up:
        subprocess.run(["scancel", *c.submitted], env=c.env, capture_output=True)
    else:
        subprocess.run(["bash", LOCAL, "stop"], env=env, capture_output=True, timeout=120)


def common_overrides(tiny_data, teacher_file, cache_dir: Path) -> str:
    return " ".join(f"{k}={v}" for k, v in {
        "data.train_path": tiny_data["train"], "data.val_path": tiny_data["val"], "data.batch_size": 32,
        "data.val_batch_size": 40, "data.num_workers": 1, "model.T": 2, "optim.epochs": 1, "log_every": 1,
        "teacher.checkpoint": teacher_file, "teacher.cache_dir": cache_dir}.items())


@pytest.fixture(scope="module")
def pipeline(cluster, tiny_data, teacher_file, tmp_path_factory):
    """slurm/pipeline.sh, run to the end: the cache, students student_0 (lr 0.1) and slow (lr 0.02), the sweep."""
    tmp = tmp_path_factory.mktemp("pipeline")
    grid = tmp / "grid.txt"
    grid.write_text("# two students\noptim.lr=0.1\noptim.lr=0.02 name=slow\n")
    overrides = common_overrides(tiny_data, teacher_file, tmp / "cache")
    out = tmp / "runs"
    started = time.time()
    cluster.pipeline(out, CONFIG=CONFIG, OVERRIDES_FILE=str(grid), OVERRIDES=overrides)
    jobs = dict(line.split() for line in (out / "pipeline.jobs").read_text().splitlines())
    # while the cache job runs (its first seconds are imports), the others wait on their dependency
    waiting = {role: cluster.job(jobs[role])[0]["Dependency"] for role in ("students", "sweep")}
    status = wait_until(lambda: (s := cluster.status(out)).returncode != 3 and s, 300, "the pipeline finished")
    print(f"pipeline: {time.time() - started:.0f} s")
    return {"out": out, "cache": tmp / "cache", "overrides": overrides, "status": status, "jobs": jobs,
            "waiting": waiting}


def test_pipeline_runs_cache_students_sweep_in_order(cluster, pipeline):
    status, jobs, out = pipeline["status"], pipeline["jobs"], pipeline["out"]
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.splitlines()[-1] == "pipeline: COMPLETED"
    assert list(jobs) == ["cache", "students", "sweep"]
    cache, = cluster.job(jobs["cache"])
    students = sorted(cluster.job(jobs["students"]), key=lambda j: j["ArrayTaskId"])
    sweep, = cluster.job(jobs["sweep"])
    assert [j["JobState"] for j in [cache, *students, sweep]] == ["COMPLETED"] * 4
    assert [j["ArrayTaskId"] for j in students] == ["0", "1"]
    # afterok: each stage waited for the one before it, and started after it ended (whole seconds)
    assert pipeline["waiting"]["students"].startswith(f"afterok:{jobs['cache']}(")
    assert pipeline["waiting"]["sweep"].startswith(f"afterok:{jobs['students']}_*(")
    for s in students:
        assert cache["EndTime"] <= s["StartTime"] and s["EndTime"] <= sweep["StartTime"]
    # each student read the cache the first job built
    manifest = pipeline["cache"] / "manifest.json"
    assert manifest.is_file(), sorted(p.name for p in pipeline["cache"].iterdir())
    for name, lr in (("student_0", "0.1"), ("slow", "0.02")):
        config = (out / name / "config.yaml").read_text()
        assert re.search(r"^\s+source: cache$", config, re.M) and f"cache_dir: {pipeline['cache']}" in config
        assert re.search(rf"^\s+lr: {lr}$", config, re.M)
        assert (out / name / "model.pt").is_file()
        assert manifest.stat().st_mtime <= (out / name / "config.yaml").stat().st_mtime
    # the sweep report compares both students at every T' = 1..2T
    report = json.loads((out / "sweep.json").read_text())
    assert sorted(report) == ["slow", "student_0"]
    assert all(len(r["top1"]) == 4 for r in report.values())
    assert "student_0 (T=2)" in (out / "sweep.txt").read_text() and "slow (T=2)" in (out / "sweep.txt").read_text()


def test_preempted_jobs_checkpoint_requeue_and_resume_exactly(cluster, pipeline, tmp_path):
    """Two training runs of the same config as student_0, signalled like the scheduler does: job A
    with SIGUSR1 (what `#SBATCH --signal=USR1@300` sends to the job steps before the time limit),
    job B with SIGTERM (preemption). Each checkpoints, its step exits 75 and the job requeues; A
    resumes and ends with student_0's weights, bit for bit; B is cancelled once requeued."""
    # stop_check_every=1: the ranks may stop after any step (the default, 10, is more than this
    # epoch's 8 steps); it changes when they look, not what they compute
    base = f"{pipeline['overrides']} teacher.source=cache optim.lr=0.1 stop_check_every=1 out_dir={tmp_path}"
    jobs = {name: cluster.sbatch("train.sbatch", CONFIG=CONFIG, OVERRIDES=f"{base} name={name}") for name in "AB"}
    logs = {name: cluster.logs / f"slurm-fullrange-train-{job}.out" for name, job in jobs.items()}
    # A rank ignores these signals until training has installed its handlers (the launchers ignore
    # them throughout); config.yaml is written just after that, before the first step. So: signal
    # once it exists, again every 0.2 s until the job is requeued (on this warm tiny run, under a
    # second of training follows config.yaml). scancel retries a job in transition (being
    # requeued) for many seconds, and would then signal the restarted run: cut it short.
    # While the requeue is under way the job is COMPLETING (or REQUEUED) before its restart count
    # goes up; only a state the job ends in fails the wait.
    signals, deadline = {"A": "USR1", "B": "TERM"}, time.time() + 180
    while waiting := [n for n in "AB" if cluster.job(jobs[n])[0]["Restarts"] == "0"]:
        for name in waiting:
            state = cluster.job(jobs[name])[0]["JobState"]
            assert time.time() < deadline and state in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"), \
                f"job {name} ({state}) was not requeued\n{logs[name].read_text()[-3000:]}"
            if state == "RUNNING" and (tmp_path / name / "config.yaml").is_file():
                try:
                    cluster.run("scancel", f"--signal={signals[name]}", jobs[name], check=False, timeout=2)
                except subprocess.TimeoutExpired:
                    pass
        time.sleep(0.2)
    cluster.run("scancel", jobs["B"])
    for name, signal in (("A", "SIGUSR1"), ("B", "SIGTERM")):
        log = logs[name].read_text()
        assert f"fullrange: preempted ({signal})" in log, log[-3000:]
        assert "task 0: Exited with exit code 75" in log, log[-3000:]  # the srun step's status
        assert "death signal" not in log  # torch's launcher did not shut the rank down
        # the step checkpoint of the requeue file, mid-epoch (8 steps)
        stop = re.search(rf'preempted: {{"reason": "{signal}", "epoch": 0, "batch": (\d), .*; requeueing {jobs[name]}$',
                         log, re.M)
        assert stop and 1 <= int(stop[1]) < 8, log[-3000:]
    assert not list(Path(cluster.env["REQUEUE_DIR"]).glob("*.json"))  # consumed
    a, = wait_until(lambda: (j := cluster.job(jobs["A"]))[0]["JobState"] in ("COMPLETED", "FAILED", "CANCELLED") and j,
                    180, "job A finished", logs["A"])
    assert (a["JobState"], a["Restarts"]) == ("COMPLETED", "1"), logs["A"].read_text()[-3000:]
    assert "resuming " in logs["A"].read_text()
    # one line per logged step, none twice (the engine checks for a stop before it logs a step, so
    # the line of the step a preemption ends on is not written)
    steps = [json.loads(line)["step"] for line in (tmp_path / "A" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == sorted(set(steps)) and steps[-1] == 8, steps
    ref = torch.load(pipeline["out"] / "student_0" / "model.pt", weights_only=True)
    got = torch.load(tmp_path / "A" / "model.pt", weights_only=True)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k  # bit-exact, buffers included


def test_failing_student_fails_fast_and_the_sweep_never_runs(cluster, tiny_data, teacher_file, tmp_path):
    grid = tmp_path / "grid.txt"
    grid.write_text("max_steps_per_epoch=1\noptim.lr=abc name=bad\n")
    overrides = common_overrides(tiny_data, teacher_file, tmp_path / "no_cache") + " teacher.source=live"
    out = tmp_path / "runs"
    cluster.pipeline(out, CONFIG=CONFIG, OVERRIDES_FILE=str(grid), OVERRIDES=overrides, CACHE="0")
    jobs = dict(line.split() for line in (out / "pipeline.jobs").read_text().splitlines())
    assert list(jobs) == ["students", "sweep"]
    sweep = wait_until(lambda: (j := cluster.job(jobs["sweep"])[0])["JobState"] != "PENDING" and j, 120,
                       "the sweep left the queue")
    assert (sweep["JobState"], sweep["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied")
    good, bad = sorted(cluster.job(jobs["students"]), key=lambda j: j["ArrayTaskId"])
    assert (good["JobState"], bad["JobState"], bad["ExitCode"]) == ("COMPLETED", "FAILED", "1:0")
    h, m, s = map(int, bad["RunTime"].split(":"))
    assert h * 3600 + m * 60 + s < 60, bad["RunTime"]  # fails fast: before any training
    log = Path(bad["StdOut"]).read_text()
    error = "fullrange: config key optim.lr: expected float, got 'abc'"
    assert [line for line in log.splitlines() if line.startswith("fullrange: ")] == [f"{error} (str)"], log[-3000:]
    status = cluster.status(out)
    assert status.returncode == 1
    lines = status.stdout.splitlines()
    assert lines[-1] == f"pipeline: FAILED: students {jobs['students']}_1"
    assert any(line.startswith(f"students  {jobs['students']}_1 ") and error in line for line in lines), status.stdout
    assert any(line.startswith("sweep ") and "DependencyNeverSatisfied" in line for line in lines), status.stdout
