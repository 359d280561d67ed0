#!/usr/bin/env bash
# README command 1: set up (idempotent), then the whole user workflow on the bundled Fashion-MNIST:
# write .beton files, train the ANN teacher, cache its logits, train the full-range student and the
# SKD baseline on the same budget from that cache, and sweep both over T' = 1..2T (table +
# runs/demo/sweep.png; runs/demo/demo_vs_study.png puts it beside the seed study's spread).
# Re-running resumes finished runs instead of retraining them. Extra arguments go to every
# training run as overrides (e.g. optim.epochs=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
PY=.venv/bin/python
# Two gloo processes with one thread each: about 2x the throughput of one process with two
# threads for these small layers (measured on 2 cores).
export OMP_NUM_THREADS=1
LAUNCH=(.venv/bin/accelerate launch --config_file configs/accelerate/cpu_2proc.yaml)
OUT=runs/demo
start=$(date +%s)

$PY launcher/write_ffcv.py bundled fmnist data/fmnist
"${LAUNCH[@]}" launcher/train.py configs/fmnist_teacher.yaml out_dir=$OUT resume=true "$@"
# The teacher's logits on every training view, once; both students read them (no teacher in their steps).
TEACHER=(teacher.checkpoint=$OUT/fmnist_teacher/model.pt teacher.cache_dir=$OUT/teacher_cache)
"${LAUNCH[@]}" launcher/cache_teacher.py configs/fmnist.yaml "${TEACHER[@]}" "$@"
for cfg in fmnist fmnist_skd; do
    "${LAUNCH[@]}" launcher/train.py configs/$cfg.yaml out_dir=$OUT resume=true "${TEACHER[@]}" "$@"
done
"${LAUNCH[@]}" launcher/sweep.py $OUT/fmnist_fullrange $OUT/fmnist_skd --out $OUT/sweep
# This single-seed, short-budget sweep beside the seed study's spread for the same two methods.
$PY scripts/study_report.py --demo $OUT/sweep.json study/results $OUT/demo_vs_study.png >/dev/null
echo "demo finished in $(( $(date +%s) - start )) s; report: $OUT/sweep.json, plots: $OUT/sweep.png," \
    "$OUT/demo_vs_study.png (beside the seed study, EXPERIMENTS.md)"
