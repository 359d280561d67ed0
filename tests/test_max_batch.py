"""bench/max_batch.py: the search for the largest batch that fits, and one run on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


@pytest.mark.parametrize("limit", [1, 7, 100, 1234, 50_000])
@pytest.mark.parametrize("guess_of", [lambda n: 1, lambda n: n // 3 + 1, lambda n: n, lambda n: n + 1, lambda n: 5 * n])
def test_largest_fitting_finds_the_limit_to_tolerance(limit, guess_of):
    from max_batch import largest_fitting

    probed = []

    def fits(batch):
        probed.append(batch)
        return batch <= limit

    best = largest_fitting(fits, guess_of(limit), tolerance=0.03, max_probes=40)
    assert best <= limit and best >= limit / 1.03 - 1, (best, probed)
    assert fits(best)
    assert len(probed) - 1 <= 40
    assert all(b >= 1 for b in probed)


def test_largest_fitting_probes_only_between_known_bounds():
    from max_batch import largest_fitting

    probed = []
    best = largest_fitting(lambda b: probed.append(b) or b <= 90, 500, lo=64, hi=128, tolerance=0.01)
    assert 64 < min(probed) and max(probed) < 128
    assert best == 90


def test_largest_fitting_stops_after_max_probes():
    from max_batch import largest_fitting

    probed = []
    best = largest_fitting(lambda b: probed.append(b) or True, 2, max_probes=5)
    assert len(probed) == 5 and best == max(probed)


def test_cpu_run_on_the_demo_student_finds_a_batch_within_the_budget():
    """The demo student in fullrange's default mode under a 1 GiB resident-set budget: the
    largest batch fitted, a larger one within the tolerance did not, and the line fitted at 32
    and 64 images predicted it (activation memory grows linearly in the batch)."""
    budget_gib, tolerance = 1.0, 0.05
    done = subprocess.run([sys.executable, str(BENCH / "max_batch.py"), "--one", "fullrange", "--case", "demo",
                           "--budget-gib", str(budget_gib), "--probe-batch", "32", f"--tolerance={tolerance}",
                           "--threads", "1"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads([x for x in done.stdout.splitlines() if x.startswith("MAXB ")][-1][5:])
    best, probes = r["max_batch"], r["probes"]
    assert best > 64, r
    assert [best, True] in [p[:2] for p in probes]
    assert all(peak <= budget_gib * 1024 for b, ok, peak in probes if ok)
    assert all(not ok for b, ok, _ in probes if b > best)
    assert any(not ok and b <= best * (1 + tolerance) + 1 for b, ok, _ in probes), probes
    assert abs(r["predicted"] - best) <= 0.15 * best, r
    assert 0.2 < r["per_image_MiB"] < 5, r  # bench/memory.py measures ~0.9 MiB/img at batch 128


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the budget defaults to the card")
def test_cli_rejects_a_cpu_run_without_a_budget():
    done = subprocess.run([sys.executable, str(BENCH / "max_batch.py"), "--case", "demo"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "--budget-gib is required" in done.stderr
