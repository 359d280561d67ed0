"""Atomic file writes: write under a temporary name in the same folder, fsync, then rename.

A crash mid-write leaves the previous file (checkpoint, config, cache shard, .beton, report)
intact, and a reader never sees half a file. Every file fullrange publishes goes through
:func:`atomic_path`.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to. On success the file is fsynced and
    renamed onto `path` (atomic on POSIX); on an exception it is removed and `path` is left as
    it was. suffix: the temporary name's ending (e.g. ".tmp.png" for writers that read it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
