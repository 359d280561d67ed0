"""Fault injection for the scale-out tests, through the library's step hooks.

FULLRANGE_FAULT=KIND@STEP[@RANK], KIND one of:
    sigkill, sigterm, sigusr1   right after optimizer step STEP the process sends itself that signal
    nan                         right after step STEP - 1 the classifier bias of this rank becomes NaN, so the
                                loss of step STEP is NaN
    hang                        the process sleeps forever after step STEP
RANK limits it to one global rank (default: every rank). For the teacher cache a "step" is a
round of shards. tests/fault_launch.py runs the launchers with these hooks.
"""
from __future__ import annotations

import os
import signal
import time

import torch

KINDS = ("sigkill", "sigterm", "sigusr1", "nan", "hang")
SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1}


class Fault:
    def __init__(self, rank: int, spec: str | None = None):
        spec = os.environ.get("FULLRANGE_FAULT", "") if spec is None else spec
        self.kind, self.step = None, -1
        if not spec:
            return
        parts = spec.split("@")
        if len(parts) not in (2, 3) or parts[0] not in KINDS or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"FULLRANGE_FAULT={spec!r}: expected KIND@STEP[@RANK], KIND one of {KINDS}")
        if len(parts) == 3 and int(parts[2]) != rank:
            return
        self.kind, self.step = parts[0], int(parts[1])

    def __call__(self, step: int, model: torch.nn.Module | None = None) -> None:
        if self.kind == "nan":
            if step == self.step - 1 and model is not None:
                with torch.no_grad():
                    list(model.parameters())[-1].fill_(float("nan"))  # the classifier: a LIF would drop a NaN
        elif self.kind == "hang" and step == self.step:
            while True:
                time.sleep(3600)
        elif self.kind is not None and step == self.step:
            os.kill(os.getpid(), SIGNALS[self.kind])


def fault_hooks(accelerator) -> list[Fault]:
    """The hooks of this process (fullrange.cli's hooks argument)."""
    return [Fault(accelerator.process_index)]
