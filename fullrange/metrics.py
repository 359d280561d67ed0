"""metrics.jsonl: one JSON object per line, appended and flushed by the main process only."""
from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled
        self.start = time.time()

    def write(self, **values) -> None:
        if not self.enabled:
            return
        values = {"time": round(time.time() - self.start, 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(values) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def trim_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines written after the checkpoint a run resumes from (step > step)."""
    if not path.is_file():
        return
    from fullrange.atomic import write_text_atomic

    kept = [m for m in read_metrics(path) if m.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(m) + "\n" for m in kept))
