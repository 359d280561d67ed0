"""fullrange.runtime.keep_freed_cpu_memory: after it, a loop that allocates and frees the same
large tensors every step (as training does) stops page-faulting once the heap has grown to its
peak; without it, every step faults every page of them again. Each case runs in a fresh process
(malloc settings are process-wide)."""
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys, torch
from fullrange.runtime import keep_freed_cpu_memory
if sys.argv[1] == "keep":
    assert keep_freed_cpu_memory()
def step():  # four large activations live at once (176 MiB), then freed
    xs = [torch.ones(n << 20) for n in (16, 8, 4, 16)]
    return sum(float(x[0]) for x in xs)
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_steady_steps_do_not_page_fault():
    faults = {}
    for mode in ("keep", "default"):
        done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        faults[mode] = int(done.stdout.split()[-1])
    pages = (44 << 22) // 4096  # 176 MiB per step
    assert faults["default"] > pages // 2, faults  # the control: every step faults its pages again
    assert faults["keep"] < pages // 10, faults
