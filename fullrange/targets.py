"""Teacher targets: the KD logits of a batch, from a live teacher or from the teacher cache.

Both implement ``targets(x, indices, view) -> float logits [B, C]`` on x's device, for student
inputs x [B, C, H, W], the batch's sample indices (int64 [B], CPU) and its augmentation epoch
`view` (fullrange.data.Batch carries both).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

SOURCES = ("live", "cache")  # teacher.source: a live teacher in every step, or the teacher cache


class TeacherTargets(Protocol):
    def targets(self, x: torch.Tensor, indices: torch.Tensor, view: int) -> torch.Tensor: ...


class LiveTeacher:
    """The ANN teacher (eval mode, frozen) run on the student's own inputs in every step."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher

    def targets(self, x: torch.Tensor, indices: torch.Tensor, view: int) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(x)
