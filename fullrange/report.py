"""Timestep-sweep report: a rich table, sweep.json and sweep.png (accuracy against T', one line per run).

``results`` maps a run name to {"T_train": int, "total": N, "top1": [acc % at T'=1..], "top5": [...]}.
"""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fullrange.atomic import write_text_atomic


def sweep_table(results: dict[str, dict], title: str = "top-1 accuracy (%) by deployment timestep T'") -> Table:
    """Rows are T', columns are runs; the training T of each run is marked with *."""
    t_max = max(len(r["top1"]) for r in results.values())
    table = Table(title=title)
    table.add_column("T'", justify="right")
    for name, r in results.items():
        table.add_column(f"{name} (T={r['T_train']})", justify="right")
    for t in range(t_max):
        cells = []
        for r in results.values():
            acc = r["top1"][t] if t < len(r["top1"]) else None
            mark = "*" if t + 1 == r["T_train"] else " "
            cells.append("" if acc is None else f"{acc:6.2f}{mark}")
        table.add_row(str(t + 1), *cells)
    return table


def print_sweep(results: dict[str, dict], console: Console | None = None) -> None:
    (console or Console()).print(sweep_table(results))


def write_sweep_json(results: dict[str, dict], path: Path) -> None:
    write_text_atomic(path, json.dumps(results, indent=2))


def plot_sweep(results: dict[str, dict], path: Path) -> None:
    """Accuracy against T', one line per run, the training T of each run marked; PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, r in results.items():
        ts = list(range(1, len(r["top1"]) + 1))
        (line,) = ax.plot(ts, r["top1"], marker="o", label=f"{name} (trained at T={r['T_train']})")
        if r["T_train"] <= len(ts):
            ax.axvline(r["T_train"], color=line.get_color(), linestyle=":", alpha=0.6)
    ax.set_xlabel("deployment timesteps T'")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Full-range deployment: accuracy at every T'")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
