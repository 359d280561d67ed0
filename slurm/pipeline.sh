#!/usr/bin/env bash
# The whole cluster workflow, chained with --dependency=afterok:
#   1. slurm/cache_teacher.sbatch   teacher logits, once          (skip with CACHE=0)
#   2. slurm/students.sbatch        a job array: one student per line of OVERRIDES_FILE
#   3. slurm/sweep.sbatch           the timestep sweep over every student run
# Usage (from the repository root; every parameter is an environment variable):
#   CONFIG=configs/imagenet_r34.yaml OVERRIDES_FILE=grid.txt slurm/pipeline.sh
#   CONFIG        student config (required; its teacher and data are what step 1 caches)
#   OVERRIDES_FILE one line of key=value overrides per student (required; see students.sbatch)
#   OVERRIDES     overrides for every job (default none)
#   OUT_DIR       run directories go to OUT_DIR/<name> (default runs/pipeline)
#   NAME_PREFIX   name of students whose line has no name= (default student -> student_K)
#   CACHE         1: submit step 1 and make the students read it (teacher.source=cache; default);
#                 0: no cache job, students use their config's teacher.source (a cache built earlier)
#   NODES_CACHE, NODES_STUDENT, NODES_SWEEP   nodes per job (default 1, 1, 1)
#   MAX_PARALLEL  students running at once (default: all)
#   SBATCH        the sbatch executable (default sbatch); SBATCH_ARGS extra flags for every job
#                 (e.g. "--partition=gpu --account=me")
#   DRY_RUN=1     print the sbatch commands (with placeholder job ids) instead of submitting
# The job ids go to OUT_DIR/pipeline.jobs; a job that depends on a failed one is cancelled
# (--kill-on-invalid-dep=yes) instead of waiting forever. Progress and which job failed:
#   OUT_DIR=runs/pipeline slurm/pipeline.sh status      (see slurm/pipeline_status.sh)
set -euo pipefail
cd "${FULLRANGE_ROOT:-$(dirname "$0")/..}"
[ "${1:-}" = status ] && exec bash slurm/pipeline_status.sh
[ $# -eq 0 ] || { echo "slurm/pipeline.sh: unknown argument '$1' (usage: slurm/pipeline.sh [status])" >&2; exit 2; }
CONFIG="${CONFIG:-}"
OVERRIDES_FILE="${OVERRIDES_FILE:-}"
[ -n "$CONFIG" ] || { echo "slurm/pipeline.sh: CONFIG is not set" >&2; exit 2; }
[ -f "$OVERRIDES_FILE" ] || { echo "slurm/pipeline.sh: OVERRIDES_FILE=$OVERRIDES_FILE: not a file" >&2; exit 2; }
OVERRIDES="${OVERRIDES:-}"
OUT_DIR="${OUT_DIR:-runs/pipeline}"
NAME_PREFIX="${NAME_PREFIX:-student}"
CACHE="${CACHE:-1}"
NODES_CACHE="${NODES_CACHE:-1}"
NODES_STUDENT="${NODES_STUDENT:-1}"
NODES_SWEEP="${NODES_SWEEP:-1}"
MAX_PARALLEL="${MAX_PARALLEL:-}"
SBATCH="${SBATCH:-sbatch}"
DRY_RUN="${DRY_RUN:-0}"
read -r -a extra <<< "${SBATCH_ARGS:-}" || true
export FULLRANGE_ROOT="$PWD"

mapfile -t lines < <(grep -v -e '^[[:space:]]*$' -e '^[[:space:]]*#' "$OVERRIDES_FILE")
[ "${#lines[@]}" -gt 0 ] || { echo "slurm/pipeline.sh: $OVERRIDES_FILE has no override lines" >&2; exit 2; }
runs=()
for k in "${!lines[@]}"; do
    name="${NAME_PREFIX}_$k"
    for word in ${lines[$k]}; do
        [[ "$word" == name=* ]] && name="${word#name=}"
    done
    runs+=("$OUT_DIR/$name")
done

# submit ROLE ENV_ASSIGNMENT... -- SBATCH_FLAG...: submit (or print) one job; its id goes to JOB_ID
# and, with its role, to OUT_DIR/pipeline.jobs.
submitted=0
JOB_ID=""
jobs_file="$OUT_DIR/pipeline.jobs"
[ "$DRY_RUN" = 1 ] || { mkdir -p "$OUT_DIR" && : > "$jobs_file"; }
submit() {
    local role="$1" envs=() flags=()
    shift
    while [ "$1" != -- ]; do envs+=("$1"); shift; done
    shift
    flags=("$@")
    submitted=$((submitted + 1))
    if [ "$DRY_RUN" = 1 ]; then
        JOB_ID="JOB$submitted"
        echo "$JOB_ID: env$(printf ' %q' "${envs[@]}") $SBATCH --parsable$(printf ' %q' "${extra[@]}" "${flags[@]}")"
    else
        JOB_ID="$(env "${envs[@]}" "$SBATCH" --parsable "${extra[@]}" "${flags[@]}")"
        JOB_ID="${JOB_ID%%;*}"  # --parsable prints "id" or "id;cluster"
        echo "$role $JOB_ID" >> "$jobs_file"
        echo "submitted ${flags[-1]}: job $JOB_ID"
    fi
}

after=()
student_overrides="${OVERRIDES:+$OVERRIDES }out_dir=$OUT_DIR"
if [ "$CACHE" = 1 ]; then
    submit cache "CONFIG=$CONFIG" "OVERRIDES=$OVERRIDES" -- --nodes="$NODES_CACHE" slurm/cache_teacher.sbatch
    after=(--dependency="afterok:$JOB_ID" --kill-on-invalid-dep=yes)
    student_overrides+=" teacher.source=cache"
fi
array="0-$((${#lines[@]} - 1))${MAX_PARALLEL:+%$MAX_PARALLEL}"
submit students "CONFIG=$CONFIG" "OVERRIDES=$student_overrides" "OVERRIDES_FILE=$OVERRIDES_FILE" \
    "NAME_PREFIX=$NAME_PREFIX" -- "${after[@]}" --nodes="$NODES_STUDENT" --array="$array" slurm/students.sbatch
students_job="$JOB_ID"
submit sweep "SWEEP_RUNS=${runs[*]}" "SWEEP_ARGS=--out $OUT_DIR/sweep" -- \
    --dependency="afterok:$students_job" --kill-on-invalid-dep=yes --nodes="$NODES_SWEEP" slurm/sweep.sbatch
echo "pipeline: ${#runs[@]} student run(s) in $OUT_DIR; sweep report $OUT_DIR/sweep.json after job $JOB_ID;" \
     "progress: OUT_DIR=$OUT_DIR slurm/pipeline.sh status"
