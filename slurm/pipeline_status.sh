#!/usr/bin/env bash
# Where the jobs of slurm/pipeline.sh stand, one line per job (per array task), and which failed:
#   OUT_DIR=runs/pipeline slurm/pipeline.sh status
#     cache     101    COMPLETED  exit 0:0
#     students  102_0  COMPLETED  exit 0:0
#     students  102_1  FAILED     exit 1:0  log slurm-fullrange-students-102_1.out: fullrange: config key ...
#     sweep     103    CANCELLED  exit 0:0  DependencyNeverSatisfied
#     pipeline: FAILED: students 102_1
# Exit status: 0 every job COMPLETED, 1 a job failed, 3 still pending or running, 2 no
# OUT_DIR/pipeline.jobs. Reads `scontrol show job` (jobs slurmctld still remembers: MinJobAge,
# 300 s by default), else `sacct` (needs accounting).
set -euo pipefail
cd "${FULLRANGE_ROOT:-$(dirname "$0")/..}"
OUT_DIR="${OUT_DIR:-runs/pipeline}"
jobs_file="$OUT_DIR/pipeline.jobs"
[ -f "$jobs_file" ] || { echo "slurm/pipeline.sh status: $jobs_file: not found (run slurm/pipeline.sh with this OUT_DIR first)" >&2; exit 2; }

# field KEY LINE: the value of KEY=... in one line of `scontrol show job -o`
field() {
    sed -nE "s/(^|.* )$1=([^ ]*).*/\2/p" <<< "$2"
}

# report ROLE ID: print "ROLE ID STATE exit CODE [REASON] [log FILE: its last fullrange: line]"
# per job or array task of ID, one line each.
report() {
    local role="$1" id="$2" lines line task state extra log
    if lines="$(scontrol show job -o "$id" 2>/dev/null)" && [ -n "$lines" ]; then
        while IFS= read -r line; do
            task="$(field ArrayTaskId "$line")"
            state="$(field JobState "$line")"
            extra="$(field Reason "$line")"
            [ "$extra" = None ] && extra=""
            log="$(field StdOut "$line")"
            if [[ "$state" =~ ^(FAILED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE)$ ]] && [ -f "$log" ]; then
                extra="${extra:+$extra  }log $log: $(grep -o 'fullrange: .*' "$log" | tail -n 1 || true)"
            fi
            printf '%-9s %-7s %-10s exit %-5s %s\n' "$role" "$id${task:+_$task}" "$state" "$(field ExitCode "$line")" "$extra"
        done <<< "$lines"
    elif lines="$(sacct -n -P -X -j "$id" --format=JobID,State,ExitCode 2>/dev/null)" && [ -n "$lines" ]; then
        while IFS='|' read -r task state code; do
            printf '%-9s %-7s %-10s exit %s\n' "$role" "$task" "${state%% *}" "$code"
        done <<< "$lines"
    else
        printf '%-9s %-7s %-10s %s\n' "$role" "$id" UNKNOWN "(slurmctld forgot it and sacct has no record)"
    fi
}

table="$(while read -r role id; do report "$role" "$id" | sort -V -k2,2; done < "$jobs_file" | sed 's/ *$//')"
echo "$table"
# the root causes: failed jobs, not those cancelled because a dependency failed
failed="$(awk '$3 ~ /^(FAILED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE)$/ ||
               ($3 == "CANCELLED" && !/DependencyNeverSatisfied/) {printf " %s %s", $1, $2}' <<< "$table")"
if [ -n "$failed" ] || grep -q DependencyNeverSatisfied <<< "$table"; then
    echo "pipeline: FAILED:${failed:- a dependency was never satisfied}"
    exit 1
fi
if grep -q UNKNOWN <<< "$table"; then
    echo "pipeline: UNKNOWN: slurmctld no longer knows a job and there is no accounting (sacct)"
    exit 1
fi
if awk '$3 != "COMPLETED" {found = 1} END {exit !found}' <<< "$table"; then
    echo "pipeline: running"
    exit 3
fi
echo "pipeline: COMPLETED"
