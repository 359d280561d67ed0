"""Peak memory of a piece of work, above the memory before it: CUDA's allocator statistics, or on
the CPU the process's resident set (Linux: VmHWM reset through /proc/self/clear_refs, after
handing freed heap memory back with malloc_trim so that earlier work does not hide this one's
growth). Also the bytes autograd saves for the backward (unique storages, saved_tensors_hooks)."""
from __future__ import annotations

import ctypes
import gc
from pathlib import Path

import torch


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_above(work, device: torch.device) -> tuple[float, object]:
    """(MiB the work's peak memory rose above the memory before it, work's result)."""
    before, peak, out = memory_around(work, device)
    return (peak - before) / 2**20, out


def memory_around(work, device: torch.device) -> tuple[int, int, object]:
    """(bytes in use before the work, the peak bytes in use during it, work's result): CUDA's
    allocated bytes, or the CPU process's resident set."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = work()
        torch.cuda.synchronize(device)
        return before, torch.cuda.max_memory_allocated(device), out
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    out = work()
    return before * 1024, _status_kib("VmHWM") * 1024, out


def saved_bytes(forward) -> int:
    """Bytes of the unique storages autograd keeps from one call of forward() for its backward."""
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())
