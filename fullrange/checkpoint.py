"""Accelerator checkpoints under RUN/checkpoints/, published atomically; the last is kept.

Layout: ``checkpoints/epoch_0003/`` holds accelerate's state after 3 completed epochs (model,
optimizer, scheduler, RNG of every rank; with DeepSpeed each rank writes its own optimizer
partition) and ``trainer_state.json`` ({"epoch": completed epochs, "step": optimizer steps}).
A step checkpoint inside an epoch is ``epoch_0003_batch_0000040/`` with
{"epoch": 3, "batch": 40, "step": ...}: 40 batches of epoch index 3 are done, so a resumed run
calls ``set_epoch(3)`` and skips those 40 batches (the same order: it is a function of seed and
epoch). The names sort in training order.

A checkpoint is written to ``.tmp_<name>`` and renamed when every rank has finished, so an
interrupted save (SIGKILL, a dead rank) never replaces the previous good checkpoint.
Checkpoints are never chosen by validation accuracy: resume and export take the last one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import Accelerator

from fullrange.atomic import write_text_atomic
from fullrange.config import ConfigError

PREFIX = "epoch_"


def checkpoint_name(epoch: int, batch: int = 0) -> str:
    """``epoch`` completed epochs plus ``batch`` batches of the next one."""
    return f"{PREFIX}{epoch:04d}" + (f"_batch_{batch:07d}" if batch else "")


def _published(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob(f"{PREFIX}*") if (p / "trainer_state.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's last published checkpoint, or None."""
    done = _published(Path(run_dir) / "checkpoints")
    return done[-1] if done else None


class Checkpointer:
    def __init__(self, run_dir: Path, accelerator: Accelerator, keep: int = 1):
        self.dir = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep = keep

    def latest(self) -> Path | None:
        return latest_checkpoint(self.dir.parent)

    def save(self, epoch: int, step: int, batch: int = 0) -> Path:
        """Save after ``epoch`` completed epochs and ``batch`` batches of the next (collective:
        every rank calls it)."""
        acc = self.accelerator
        name = checkpoint_name(epoch, batch)
        final = self.dir / name
        tmp = self.dir / f".tmp_{name}"
        if acc.is_main_process:  # leftovers of saves that were interrupted
            for stale in self.dir.glob(f".tmp_{PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"epoch": epoch, "step": step, **({"batch": batch} if batch else {})}
            write_text_atomic(tmp / "trainer_state.json", json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in _published(self.dir)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> dict:
        """Restore accelerator state from ``path``; returns its trainer_state (with "batch", 0
        for an epoch boundary)."""
        try:
            self.accelerator.load_state(str(path))
            state = json.loads((Path(path) / "trainer_state.json").read_text())
        except Exception as e:  # noqa: BLE001 - torch, safetensors, pickle and json each raise their own
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"config key resume: checkpoint {path} is unreadable ({type(e).__name__}: {first}); "
                              "delete that folder to restart the run from scratch, or resume=false with another "
                              "name=...") from None
        state.setdefault("batch", 0)
        return state
