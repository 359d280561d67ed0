"""What a run reports: metrics.jsonl (one JSON object per line, main process only), the
experiment trackers (accelerate's, config key log_with), and the step clock behind the
throughput and memory figures of every log step."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch


class MetricsLog:
    """Appends to metrics.jsonl and logs the numeric values to the accelerator's trackers."""

    def __init__(self, path: Path, accelerator, trackers: bool = False):
        self.path, self.acc = Path(path), accelerator
        self.enabled, self.trackers = accelerator.is_main_process, trackers
        self.start = time.time()

    def write(self, step: int, tracker_values: dict | None = None, **values) -> None:
        """One metrics.jsonl line (step plus values); tracker_values (default: the numeric
        values) go to the trackers at that step."""
        if self.trackers:  # every rank calls it; accelerate logs on the main process only
            scalars = tracker_values if tracker_values is not None else {
                k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.acc.log(scalars, step=step)
        if self.enabled:
            values = {"time": round(time.time() - self.start, 3), "step": step, **values}
            with self.path.open("a") as f:
                f.write(json.dumps(values) + "\n")


class StepClock:
    """Host time between log steps, the part of it spent waiting for batches, and peak memory.
    A log step syncs with the device (its values are read back), so the interval it closes is
    the real time of those steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.waiting, self.steps = 0.0, 0

    def got_batch(self) -> None:
        """A batch arrived: the time since the last step ended was data wait."""
        self.waiting += time.perf_counter() - self.mark

    def step_done(self) -> None:
        self.steps += 1
        self.mark = time.perf_counter()

    def report(self, global_batch: int, T: int) -> dict:
        """img/s and image-timesteps/s (global), step time, data-wait fraction and peak memory
        of the steps since the last report; then starts a new interval."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        img_s = self.steps * global_batch / elapsed
        out = {"img_per_s": round(img_s, 2), "img_timesteps_per_s": round(img_s * T, 2),
               "step_time_s": round(elapsed / max(self.steps, 1), 5),
               "data_wait_frac": round(self.waiting / elapsed, 4), "peak_mem_mib": round(peak_memory_mib(self.device), 1)}
        self.reset()
        return out


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: torch.cuda.max_memory_allocated on CUDA, peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def trim_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines written after the checkpoint a run resumes from (step > step);
    step 0 (a fresh start) empties it."""
    if not path.is_file():
        return
    from fullrange.atomic import write_text_atomic

    kept = [m for m in read_metrics(path) if step and m.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(m) + "\n" for m in kept))
