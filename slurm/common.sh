#!/usr/bin/env bash
# Shared by slurm/*.sbatch (sourced, not run). Every parameter is an environment variable with a
# default; export it or pass `sbatch --export=ALL,NAME=value ...`.
#
#   FULLRANGE_ROOT     repository root (default: $SLURM_SUBMIT_DIR, i.e. submit from the repo root)
#   ACCELERATE         the accelerate executable (default: $FULLRANGE_ROOT/.venv/bin/accelerate)
#   ACCELERATE_CONFIG  accelerate YAML (default configs/accelerate/multi_node.yaml; DeepSpeed:
#                      configs/accelerate/deepspeed_zero2.yaml). Its distributed_type decides DDP or
#                      DeepSpeed; the per-node values below override the file.
#   GPUS_PER_NODE      processes per node (default: SLURM_GPUS_ON_NODE, else the count in
#                      SLURM_GPUS_PER_NODE, e.g. "a100:8" -> 8; no default beyond those)
#   MAIN_PORT          rendezvous port on the first node (default 20000 + SLURM_JOB_ID % 10000, so
#                      jobs sharing a node, e.g. two array tasks, do not collide)
#   REQUEUE_DIR        where a preempted run's main process leaves its requeue file (default
#                      runs/.requeue; on the shared filesystem)
#   DRY_RUN=1          print the exact command every node would run, run nothing
#
# Preemption: SLURM signals the job steps (SIGUSR1 from `--signal=USR1@N` before the time limit,
# SIGTERM on preemption); every rank checkpoints at the next step boundary and exits
# with 75 (fullrange.preemption). accelerate launch reports any failing rank as 1, so the main
# process also writes $FULLRANGE_REQUEUE_FILE, and slurm/launch_node.sh turns "accelerate failed
# and that file exists" back into exit 75: the step ends with 75. fr_launch then requeues the job
# (`#SBATCH --requeue`; scontrol requeue), which continues with resume=true. The batch shell and
# the launchers survive the signal so that the ranks can finish their checkpoint.
set -euo pipefail

EXIT_REQUEUE=75
FULLRANGE_ROOT="${FULLRANGE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$FULLRANGE_ROOT"
ACCELERATE="${ACCELERATE:-$FULLRANGE_ROOT/.venv/bin/accelerate}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-configs/accelerate/multi_node.yaml}"
MAIN_PORT="${MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-9500} % 10000))}"
REQUEUE_DIR="${REQUEUE_DIR:-runs/.requeue}"
[[ "$REQUEUE_DIR" == /* ]] || REQUEUE_DIR="$FULLRANGE_ROOT/$REQUEUE_DIR"
DRY_RUN="${DRY_RUN:-0}"
export ACCELERATE ACCELERATE_CONFIG MAIN_PORT DRY_RUN

fr_die() {
    echo "slurm/$(basename "${0}"): $*" >&2
    exit 2
}

# Processes per node: GPUS_PER_NODE, else what SLURM says about this allocation.
fr_gpus_per_node() {
    local n="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}"
    n="${n##*:}"  # SLURM_GPUS_PER_NODE may be "a100:8"
    [[ "$n" =~ ^[1-9][0-9]*$ ]] \
        || fr_die "GPUS_PER_NODE is not set and SLURM gives no GPU count (got '${n}'; use --gpus-per-node or export GPUS_PER_NODE)"
    echo "$n"
}

# fr_launch SCRIPT [ARG...]: run `accelerate launch SCRIPT ARG...` on every node of the job
# (one srun task per node), then requeue the job if the run was preempted.
fr_launch() {
    [ -n "${SLURM_JOB_NODELIST:-}" ] || fr_die "SLURM_JOB_NODELIST is not set: submit with sbatch (or fake it for DRY_RUN)"
    NNODES="${SLURM_NNODES:-1}"
    GPUS_PER_NODE="$(fr_gpus_per_node)"
    MAIN_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"  # sed: no SIGPIPE
    [ -n "$MAIN_ADDR" ] || fr_die "scontrol found no host in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    local job="${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-0}}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}"
    FULLRANGE_REQUEUE_FILE="$REQUEUE_DIR/$job.json"
    export NNODES GPUS_PER_NODE MAIN_ADDR FULLRANGE_REQUEUE_FILE
    if [ "$DRY_RUN" = 1 ]; then
        local node
        for ((node = 0; node < NNODES; node++)); do
            SLURM_NODEID=$node bash slurm/launch_node.sh "$@"
        done
        return 0
    fi
    mkdir -p "$(dirname "$FULLRANGE_REQUEUE_FILE")"
    rm -f "$FULLRANGE_REQUEUE_FILE"
    # A signal may reach this shell too (scancel --full, --signal=B:...): outlive it, so that the
    # ranks can finish their checkpoint and this shell requeue the job (the trap runs after srun).
    trap 'echo "$job: got SIGTERM; waiting for the ranks to checkpoint"' TERM
    trap 'echo "$job: got SIGUSR1; waiting for the ranks to checkpoint"' USR1
    local rc=0
    srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash slurm/launch_node.sh "$@" || rc=$?
    trap - TERM USR1
    # rc 75: a node's ranks were preempted. The file too: with several nodes, --kill-on-bad-exit
    # may end node 0 by a signal after its main process wrote the file.
    if [ "$rc" -eq "$EXIT_REQUEUE" ] || { [ "$rc" -ne 0 ] && [ -f "$FULLRANGE_REQUEUE_FILE" ]; }; then
        echo "preempted: $(cat "$FULLRANGE_REQUEUE_FILE" 2>/dev/null || echo "exit $rc"); requeueing $job"
        rm -f "$FULLRANGE_REQUEUE_FILE"
        scontrol requeue "$job" || fr_die "scontrol requeue $job failed (cancelled, or not --requeue?); resubmit to continue"
        return 0
    fi
    return "$rc"
}
