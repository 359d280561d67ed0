#!/usr/bin/env bash
# The seed study behind EXPERIMENTS.md: on the bundled Fashion-MNIST, the spiking_resnet_tiny
# student at T=4 trained by each method over several seeds on one budget, every run swept over
# T' = 1..8 with the deployment report (accuracy, early exit).
#   bash scripts/study.sh              # run (or continue) every run, then write EXPERIMENTS.md
#   bash scripts/study.sh --dry-run    # list every run it would make, run nothing
#   bash scripts/study.sh --budget     # the budget probe: SKD, seed 0, at 4, 8 and 16 epochs
# Resumable: a run whose results file exists is skipped, an interrupted one continues from its
# checkpoint (resume=true); run it in parts. Results (the sweep of each run) are files in the
# repository: study/results/<run>.json; the run directories (weights, checkpoints) stay in
# runs/study/. Environment: SEEDS (default "0 1 2"), EPOCHS (default 12), METHODS (default all seven;
# study/results also holds full_range_sd_warmup, an option measured and removed: EXPERIMENTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-run}"
SEEDS="${SEEDS:-0 1 2}"
EPOCHS="${EPOCHS:-12}"
METHODS="${METHODS:-full_range_ensemble full_range_correct_only skd tet ce full_range_no_sd full_range_ensemble_rerun}"
OUT=runs/study
RESULTS=study/results
TEACHER_EPOCHS=10
PY=.venv/bin/python
LAUNCH=(.venv/bin/accelerate launch --config_file configs/accelerate/cpu_2proc.yaml)
export OMP_NUM_THREADS=1

method_overrides() {  # method -> its loss overrides
    case "$1" in
        full_range_ensemble) echo "loss.kind=full_range loss.sd_target=ensemble" ;;
        # the same runs again, trained in the session (teacher build, machine) of the ablation
        # below, which is compared with it: the study's results came from several sessions
        full_range_ensemble_rerun) echo "loss.kind=full_range loss.sd_target=ensemble" ;;
        full_range_correct_only) echo "loss.kind=full_range loss.sd_target=correct_only" ;;
        skd) echo "loss.kind=skd" ;;
        tet) echo "loss.kind=tet" ;;
        ce) echo "loss.kind=ce" ;;
        # ablation: full-range without its self-distillation term (TWCE + alpha TWKL)
        full_range_no_sd) echo "loss.kind=full_range loss.beta=0" ;;
        *) echo "scripts/study.sh: unknown method $1" >&2; exit 2 ;;
    esac
}

# run NAME SEED EPOCHS OVERRIDES...: train (or continue) one student, sweep it, keep its results
run() {
    local name="$1" seed="$2" epochs="$3"
    shift 3
    local result="$RESULTS/$name.json" views="$epochs"
    local teacher=(teacher.checkpoint="$OUT/teacher/model.pt" teacher.cache_dir="$OUT/cache_seed${seed}_v$views")
    local common=(out_dir="$OUT" name="$name" seed="$seed" optim.epochs="$epochs" data.views="$views" resume=true)
    if [ "$MODE" = --dry-run ]; then
        echo "$name: train configs/fmnist.yaml ${common[*]} $* ${teacher[*]}; sweep --t-max 8"
        return
    fi
    [ -f "$result" ] && { echo "study: $name done ($result)"; return; }
    if [[ " $* " == *" loss.kind=full_range "* || " $* " == *" loss.kind=skd "* ]]; then
        "${LAUNCH[@]}" launcher/cache_teacher.py configs/fmnist.yaml seed="$seed" optim.epochs="$epochs" \
            data.views="$views" "${teacher[@]}"
    fi
    "${LAUNCH[@]}" launcher/train.py configs/fmnist.yaml "${common[@]}" "$@" "${teacher[@]}"
    "${LAUNCH[@]}" launcher/sweep.py "$OUT/$name" --t-max 8 --no-layers >/dev/null
    mkdir -p "$RESULTS"
    $PY - "$OUT/$name/sweep.json" "$name" "$result" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))[sys.argv[2]]
keep = {k: report[k] for k in ("T_train", "T_max", "total", "top1", "top1_correct", "top5", "early_exit",
                                "firing_rate", "sops_per_image", "energy_uJ_per_image") if k in report}
json.dump(keep, open(sys.argv[3] + ".tmp", "w"), indent=1)
PY
    mv "$result.tmp" "$result"
}

if [ "$MODE" != --dry-run ]; then
    bash scripts/setup.sh dev
    $PY launcher/write_ffcv.py bundled fmnist data/fmnist
    "${LAUNCH[@]}" launcher/train.py configs/fmnist_teacher.yaml out_dir="$OUT" name=teacher \
        optim.epochs="$TEACHER_EPOCHS" resume=true
fi
if [ "$MODE" = --budget ]; then
    for e in 4 8 16; do run "budget_skd_e${e}" 0 "$e" loss.kind=skd; done
    exit 0
fi
for seed in $SEEDS; do
    for method in $METHODS; do
        read -r -a over <<< "$(method_overrides "$method")"
        run "${method}_e${EPOCHS}_s${seed}" "$seed" "$EPOCHS" "${over[@]}"
    done
done
if [ "$MODE" != --dry-run ]; then
    $PY scripts/study_report.py "$RESULTS" EXPERIMENTS.md study/study.png
fi
