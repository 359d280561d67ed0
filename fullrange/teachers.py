"""The ANN teacher of a run: its frozen weights, and the hash that identifies them."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from fullrange.config import ConfigError, RunConfig
from fullrange.models import build_model


def load_teacher(cfg: RunConfig) -> nn.Module:
    """The ANN teacher of ``cfg.teacher`` in eval mode with frozen weights, on the CPU."""
    path = Path(cfg.teacher.checkpoint)
    if not path.is_file():
        raise ConfigError(f"config key teacher.checkpoint: teacher weights {path} not found "
                          f"(expected a state_dict file for {cfg.teacher.name}, e.g. runs/<teacher>/model.pt)")
    teacher = build_model(cfg.teacher.name, cfg.model.num_classes, cfg.model.in_channels)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        teacher.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any unreadable or mismatched file is the same user error
        first = str(e).strip().splitlines()[0][:300]
        raise ConfigError(f"config key teacher.checkpoint: {path} does not hold {cfg.teacher.name} weights "
                          f"for {cfg.model.num_classes} classes ({type(e).__name__}: {first})") from None
    teacher.eval().requires_grad_(False)
    return teacher


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    """sha256 hex digest of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
