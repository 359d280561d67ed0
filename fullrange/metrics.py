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
