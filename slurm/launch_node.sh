#!/usr/bin/env bash
# One node's part of a multi-node run (srun starts it once per node; see slurm/common.sh):
#   accelerate launch --config_file $ACCELERATE_CONFIG --num_machines $NNODES
#     --num_processes $((NNODES * GPUS_PER_NODE)) --machine_rank $SLURM_NODEID
#     --main_process_ip $MAIN_ADDR --main_process_port $MAIN_PORT SCRIPT ARG...
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
# The launcher itself ignores SIGUSR1 (its default action would kill it and orphan the ranks);
# the ranks install their own handler and checkpoint.
trap '' USR1
exec "${cmd[@]}"
