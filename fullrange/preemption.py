"""Stopping a distributed run cleanly: preemption signals and non-finite losses.

Exit codes of ``launcher/train.py`` (each rank's process):
    0   finished                     2   bad input (see fullrange.cli)
    3   non-finite loss: stopped, the last good checkpoint is kept (nothing was saved after it)
    75  EXIT_REQUEUE (sysexits EX_TEMPFAIL): preempted (SIGTERM or SIGUSR1); a step checkpoint
        was written, rerun the same command with resume=true to continue exactly.
``accelerate launch`` turns any non-zero child status into its own status 1, so a scheduler
cannot read 75 through it: when ``FULLRANGE_REQUEUE_FILE`` is set, the main process also writes
that file (JSON: reason, epoch, batch, step, checkpoint) before exiting; slurm/*.sbatch set it
and requeue the job when it exists.

Agreement: every rank installs the handlers, but the signal may reach only some of them. Every
``stop_check_every`` steps the ranks all-reduce one small vector (the signal flag and a
non-finite-loss flag per rank), so all ranks stop after the same optimizer step.

Tests inject faults (signals, NaN, hangs) through the trainer's step hooks (tests/faults.py).
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_NONFINITE = 3
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REQUEUE_FILE_ENV = "FULLRANGE_REQUEUE_FILE"


class Preempted(Exception):
    """Raised on every rank after the preemption checkpoint is written."""

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


class NonFiniteLoss(Exception):
    """Raised on every rank when any rank's loss is NaN or inf; nothing is saved after it."""


class StopSignals:
    """Context manager: SIGTERM / SIGUSR1 set ``self.received`` instead of killing the process."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class StopCheck:
    """The per-step agreement: ``check(loss, step)`` -> (stop signal name or None, bad ranks).

    Non-finite losses are accumulated on the device between checks (no host sync); the
    all-reduce runs every ``every`` steps, and always when ``force`` (before any save)."""

    def __init__(self, signals: StopSignals, device: torch.device, rank: int, world_size: int, every: int = 1):
        self.signals, self.device = signals, device
        self.rank, self.world_size, self.every = rank, world_size, max(1, every)
        self.bad = torch.zeros((), dtype=torch.bool, device=device)

    def note_loss(self, loss: torch.Tensor) -> None:
        self.bad |= ~torch.isfinite(loss.detach()).all()

    def check(self, step: int, force: bool = False) -> tuple[str | None, list[int]]:
        if not force and step % self.every:
            return None, []
        flags = torch.zeros(self.world_size + 1, dtype=torch.float32, device=self.device)
        flags[0] = 1.0 if self.signals.received else 0.0
        flags[1 + self.rank] = self.bad.float()
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        flags = flags.tolist()
        bad_ranks = [r for r in range(self.world_size) if flags[1 + r] > 0]
        stop = (self.signals.received or "SIGTERM/SIGUSR1 on another rank") if flags[0] > 0 else None
        return stop, bad_ranks


def write_requeue_file(info: dict) -> Path | None:
    """Write $FULLRANGE_REQUEUE_FILE (atomically) when set; returns its path."""
    target = os.environ.get(REQUEUE_FILE_ENV)
    if not target:
        return None
    from fullrange.atomic import write_text_atomic

    path = Path(target)
    write_text_atomic(path, json.dumps({**info, "exit_code": EXIT_REQUEUE}) + "\n")
    return path
