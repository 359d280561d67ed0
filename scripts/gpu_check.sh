#!/usr/bin/env bash
# Every GPU test and benchmark in one command, for a lent GPU machine (device tool) or any CUDA box:
#   bash scripts/gpu_check.sh            # writes gpu_check.json (and logs) to $OUT, else ./gpu_check/
# Setup: a venv over the machine's own CUDA torch (--system-site-packages), fullrange installed
# editable without dependencies, and the wheels in .whl/ (scripts/gpu_wheels.sh fetches them on a
# machine with PyPI: spikingjelly, loguru, and an ffcv wheel with its libraries) when present.
# Then: pytest -m gpu, bench/step.py (every case against SpikingJelly, plain and compiled, every
# memory mode, the fused Triton BN + LIF against the modules), bench/memory.py (activation peak of
# every memory mode against SpikingJelly and its memopt at levels 1 and 4), bench/lif.py (T=4,
# N=2^24, bf16, against SpikingJelly's Triton and CuPy backends), bench/train_step.py (preact
# ResNet-34, T=4, bf16, batch 64, 224 px) and bench/max_batch.py (the largest preact ResNet-34
# batch at T=4 that fits in 20 GiB of the card: fullrange default and spikes_1bit+2 against
# SpikingJelly's default). Budget: at most 9.7 minutes after setup (never measured on a GPU yet).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT_DIR="${OUT:-$PWD/gpu_check}"
mkdir -p "$OUT_DIR"
PY="${GPU_PYTHON:-python3}"
VENV=/tmp/fullrange-gpu-venv
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV" || exit 1
fi
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT_DIR/setup.log" 2>&1 \
    || { echo "gpu_check: pip install -e . failed (see $OUT_DIR/setup.log)"; exit 1; }
if compgen -G ".whl/*.whl" >/dev/null; then
    "$VENV/bin/python" -m pip install -q --no-deps --no-index .whl/*.whl >>"$OUT_DIR/setup.log" 2>&1 \
        || echo "gpu_check: some wheels in .whl/ did not install (see setup.log)"
fi
export PATH="$VENV/bin:$PATH" PYTHONUNBUFFERED=1 SETUPTOOLS_USE_DISTUTILS=local  # ffcv imports distutils (gone in 3.12)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT_DIR/gpu.txt" 2>&1

status=0
# Most important first; the timeouts add up to 580 s, so the whole check fits one 10-minute call.
timeout 140 python -m pytest -m gpu tests -q -rs --junitxml="$OUT_DIR/gpu_tests.xml" 2>&1 \
    | tee "$OUT_DIR/gpu_tests.log" | tail -n 25 || status=1
# the ImageNet case first: each case compiles two students with inductor, and a case that finished
# is in the log even if the timeout stops a later one
timeout 150 python bench/step.py --cases preact34,resnet19,demo --repeats 5 2>&1 \
    | tee "$OUT_DIR/bench_step_vs_sj.log" | tail -n 12
# memory: one fresh process per (case, variant), 12 here; the demo is too small to say much on a GPU
timeout 90 python bench/memory.py --cases resnet19,preact34 2>&1 | tee "$OUT_DIR/bench_memory.log" | tail -n 20
timeout 60 python bench/lif.py --n 16777216 --t 4 --dtype bfloat16 2>&1 | tee "$OUT_DIR/bench_lif.log" | tail -n 30
timeout 40 python bench/train_step.py --model spiking_preact_resnet34 --T 4 --batch 64 --size 224 2>&1 \
    | tee "$OUT_DIR/bench_step.log" | tail -n 3
# within 20 GiB (a 24 GB card's share; the whole card's batches take minutes of steps to search)
timeout 100 python bench/max_batch.py --case preact34 --impls "fullrange,fullrange spikes_1bit+2,spikingjelly" \
    --budget-gib 20 --probe-batch 8 --tolerance 0.05 2>&1 | tee "$OUT_DIR/bench_max_batch.log" | tail -n 5

python - "$OUT_DIR" <<'PY'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
def read(name):
    p = out / name
    return p.read_text(errors="replace") if p.is_file() else ""
tests = read("gpu_tests.log")
summary = re.findall(r"(\d+) (passed|failed|skipped|error)", tests)
step = [json.loads(l) for l in read("bench_step.log").splitlines() if l.startswith("{")]
lif = [l for l in read("bench_lif.log").splitlines() if "/ ours" in l or "x " in l][-12:]
ratios = {m[0]: float(m[1]) for name in ("bench_step_vs_sj.log", "bench_memory.log", "bench_max_batch.log")
          for m in re.findall(r"^(\w+)=([0-9.]+)$", read(name), re.M)}
report = {"gpu": read("gpu.txt").strip(), "tests": {k: int(v) for v, k in summary},
          "train_step": step[-1] if step else None, "lif_bench_tail": lif, "ratios": ratios}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))
print(json.dumps(report, indent=1))
PY
exit $status
