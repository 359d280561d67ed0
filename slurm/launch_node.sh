#!/usr/bin/env bash
# One node's part of a multi-node run (srun starts it once per node; see slurm/common.sh):
#   accelerate launch --config_file $ACCELERATE_CONFIG --num_machines $NNODES
#     --num_processes $((NNODES * GPUS_PER_NODE)) --machine_rank $SLURM_NODEID
#     --main_process_ip $MAIN_ADDR --main_process_port $MAIN_PORT SCRIPT ARG...
# and exits with its status, or 75 when the run was preempted (see below).
# DRY_RUN=1 prints that command ("node N: ...") instead of running it.
set -euo pipefail
: "${NNODES:?}" "${GPUS_PER_NODE:?}" "${MAIN_ADDR:?}" "${MAIN_PORT:?}" "${ACCELERATE:?}" "${ACCELERATE_CONFIG:?}"
NODE_RANK="${SLURM_NODEID:?SLURM_NODEID is not set (run under srun)}"
cmd=("$ACCELERATE" launch --config_file "$ACCELERATE_CONFIG"
     --num_machines "$NNODES" --num_processes "$((NNODES * GPUS_PER_NODE))"
     --machine_rank "$NODE_RANK" --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT"
     --rdzv_backend static --same_network "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "node $NODE_RANK:$(printf ' %q' "${cmd[@]}")"
    exit 0
fi
# Preemption: the scheduler signals every process of the step. The launcher must outlive the
# signal while the ranks checkpoint: it ignores SIGUSR1 and SIGTERM (the ranks inherit that, and
# install their own handlers when training starts), and torch's elastic agent is told (torchrun's
# --signals-to-handle, read from PET_SIGNALS_TO_HANDLE) not to turn SIGTERM into SIGTERM + SIGKILL
# of the ranks 30 s later.
trap '' USR1 TERM
export PET_SIGNALS_TO_HANDLE="SIGINT,SIGHUP,SIGQUIT"
rc=0
"${cmd[@]}" || rc=$?
# accelerate reports a failing rank as 1; a preempted main process wrote FULLRANGE_REQUEUE_FILE
# first (fullrange.preemption): then this node's step exits 75 (EX_TEMPFAIL, "requeue me").
if [ "$rc" -ne 0 ] && [ -n "${FULLRANGE_REQUEUE_FILE:-}" ] && [ -f "$FULLRANGE_REQUEUE_FILE" ]; then
    echo "node $NODE_RANK: preempted, exit 75 (accelerate exited $rc)" >&2
    exit 75
fi
exit "$rc"
