"""Per-epoch accelerator checkpoints under RUN/checkpoints/, published atomically; the last is kept.

Layout: ``checkpoints/epoch_0003/`` holds accelerate's state (model, optimizer, scheduler, RNG of
every rank) and ``trainer_state.json`` ({"epoch": completed epochs, "step": optimizer steps}).
A checkpoint is written to ``.tmp_epoch_0003`` and renamed when every rank has finished, so an
interrupted save never replaces the previous good checkpoint. Checkpoints are never chosen by
validation accuracy: resume and export take the last one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import Accelerator

PREFIX = "epoch_"


class Checkpointer:
    def __init__(self, run_dir: Path, accelerator: Accelerator, keep: int = 1):
        self.dir = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep = keep

    def latest(self) -> Path | None:
        done = sorted(p for p in self.dir.glob(f"{PREFIX}*") if (p / "trainer_state.json").is_file())
        return done[-1] if done else None

    def save(self, epoch: int, step: int) -> Path:
        """Save after ``epoch`` completed epochs (collective: every rank calls it)."""
        acc = self.accelerator
        final = self.dir / f"{PREFIX}{epoch:04d}"
        tmp = self.dir / f".tmp_{PREFIX}{epoch:04d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({"epoch": epoch, "step": step}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(self.dir.glob(f"{PREFIX}*"))[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> dict:
        """Restore accelerator state from ``path``; returns its trainer_state."""
        self.accelerator.load_state(str(path))
        return json.loads((Path(path) / "trainer_state.json").read_text())
