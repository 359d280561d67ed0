#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests and development (Debian, as root):
#   scripts/slurm_local.sh start    install slurm-wlm + munge if missing, start munged, slurmctld
#                                   and slurmd, wait until the node is idle (a running cluster is
#                                   left as it is)
#   scripts/slurm_local.sh stop     cancel its jobs, stop the three daemons by their pid files
#   scripts/slurm_local.sh status   sinfo of the cluster; exit 1 when it is down
#   scripts/slurm_local.sh env      prints `export SLURM_CONF=...`: eval it to use the cluster
# Everything lives in FULLRANGE_SLURM_DIR (default /tmp/fullrange-slurm): slurm.conf, the munge
# key and socket, pid files, spool, state and logs; nothing is written to /etc. Clients (sbatch,
# srun, squeue, and the jobs, which inherit it) find the cluster through SLURM_CONF.
# The node is this host with the CPUs and memory `slurmd -C` finds, in partition "debug"; no
# accounting database (use scontrol show job, or sacct -c: job completions go to
# FULLRANGE_SLURM_DIR/jobcomp.txt). FULLRANGE_SLURM_PORT (default 6817): slurmctld's port, slurmd
# takes the next one.
set -euo pipefail

DIR="${FULLRANGE_SLURM_DIR:-/tmp/fullrange-slurm}"
PORT="${FULLRANGE_SLURM_PORT:-6817}"
CONF="$DIR/slurm.conf"
SOCKET="$DIR/munge/munge.socket"
export SLURM_CONF="$CONF"

die() {
    echo "scripts/slurm_local.sh: $*" >&2
    exit 1
}

# alive NAME: the pid in $DIR/NAME.pid runs a process called NAME
alive() {
    local pid
    pid="$(cat "$DIR/$1.pid" 2>/dev/null)" || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
    [ "$(id -u)" -eq 0 ] || die "slurm-wlm and munge are not installed and this is not root (apt-get install slurm-wlm munge)"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get"
    echo "slurm_local: apt-get install slurm-wlm munge"
    local log
    log="$(mktemp)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } >"$log" 2>&1; then
        tail -n 5 "$log" >&2
        die "apt-get install slurm-wlm munge failed (output above)"
    fi
    rm -f "$log"
}

write_config() {
    if ! mkdir -p "$DIR/munge" "$DIR/spool" "$DIR/state" 2>/dev/null; then
        die "FULLRANGE_SLURM_DIR=$DIR: cannot create the state directory"
    fi
    chmod 700 "$DIR" "$DIR/munge"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        head -c 1024 /dev/urandom > "$DIR/munge/munge.key"
        chmod 600 "$DIR/munge/munge.key"
    fi
    local node
    node="$(slurmd -C | sed -n 1p)"  # NodeName=<host> CPUs=... RealMemory=... (this hardware)
    [[ "$node" == NodeName=* ]] || die "slurmd -C printed no node line: $node"
    cat > "$CONF" <<EOF
# Written by scripts/slurm_local.sh: a one-node cluster on $(hostname) for tests.
ClusterName=fullrange-local
SlurmctldHost=$(hostname)
SlurmUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET,cred_expire=10  # a requeued job may start again after cred_expire s (default 120)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmdSpoolDir=$DIR/spool
StateSaveLocation=$DIR/state
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
SchedulerParameters=sched_interval=1,bf_interval=1  # a tiny cluster: schedule every second
MailProg=/bin/true
MinJobAge=600
KillWait=10
InactiveLimit=0
$node State=UNKNOWN
PartitionName=debug Nodes=$(hostname) Default=YES MaxTime=INFINITE State=UP
EOF
}

# wait_for SECONDS WHAT COMMAND...: retry COMMAND every 0.2 s
wait_for() {
    local seconds="$1" what="$2" i
    shift 2
    for ((i = 0; i < seconds * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    for log in munged slurmctld slurmd; do
        [ -f "$DIR/$log.log" ] && { echo "--- $DIR/$log.log"; tail -n 5 "$DIR/$log.log"; } >&2
    done
    die "$what did not come up within $seconds s (logs above, in $DIR)"
}

node_idle() {
    [ "$(sinfo -h -N -o %T)" = idle ]
}

start() {
    if alive munged && alive slurmctld && alive slurmd; then
        echo "slurm_local: already running ($CONF)"
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "the daemons need root (slurmd starts jobs as their users)"
    install_packages
    stop >/dev/null  # a half-started cluster from before
    write_config
    munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/munged.log" --seed-file="$DIR/munge/munged.seed" 2>>"$DIR/munged.log" \
        || die "munged did not start (see $DIR/munged.log)"
    wait_for 10 munged test -S "$SOCKET"
    slurmctld -c -f "$CONF" || die "slurmctld did not start (see $DIR/slurmctld.log)"
    wait_for 20 slurmctld scontrol ping
    slurmd -f "$CONF" || die "slurmd did not start (see $DIR/slurmd.log)"
    wait_for 30 "the node $(hostname)" node_idle
    echo "slurm_local: up, one node ($(sinfo -h -N -o '%N %c CPUs %m MB')); export SLURM_CONF=$CONF"
}

stop() {
    if alive slurmctld; then  # jobs first, so no step outlives the daemons
        scancel --quiet --user="$(id -un)" 2>/dev/null || true
        local i
        for ((i = 0; i < 75; i++)); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    local name pid i
    for name in slurmd slurmctld munged; do
        alive "$name" || { rm -f "$DIR/$name.pid"; continue; }
        pid="$(cat "$DIR/$name.pid")"
        kill "$pid"
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        rm -f "$DIR/$name.pid"
        echo "slurm_local: stopped $name ($pid)"
    done
}

status() {
    if ! { alive slurmctld && alive slurmd && alive munged; }; then
        echo "slurm_local: down ($DIR)"
        return 1
    fi
    sinfo
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) die "usage: scripts/slurm_local.sh start|stop|status|env" ;;
esac
