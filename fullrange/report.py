"""Timestep-sweep report: rich tables, sweep.json and sweep.png, several runs side by side.

``results`` maps a run name to {"T_train": int, "total": N, "top1": [acc % at T'=1..], "top5": [...]}
and, when the sweep collected deployment statistics (``fullrange.deploy_stats.deploy_report``),
"firing_rate", "sops_per_image", "macs_per_image", "energy_uJ_per_image", "layers",
"energy_model" and "early_exit". Tables and the plot show whatever a result holds.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fullrange.atomic import atomic_path, write_text_atomic


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


def _si(value: float) -> str:
    """3.2e6 -> '3.20M': operations per image, compact."""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.1f}"


def deploy_table(name: str, r: dict) -> Table:
    """One run, one row per T': accuracy, firing rate, synaptic operations and energy per image."""
    table = Table(title=f"{name}: deployment at every T' (trained at T={r['T_train']}, {r['total']} images)")
    for col in ("T'", "top-1 %", "top-5 %", "rate %", "SOPs/img", "MACs/img", "uJ/img"):
        table.add_column(col, justify="right")
    for t in range(len(r["top1"])):
        mark = "*" if t + 1 == r["T_train"] else " "
        table.add_row(f"{t + 1}{mark}", f"{r['top1'][t]:.2f}", f"{r['top5'][t]:.2f}",
                      f"{100 * r['firing_rate']['overall'][t]:.2f}", _si(r["sops_per_image"][t]),
                      _si(r["macs_per_image"][t]), f"{r['energy_uJ_per_image'][t]:.3f}")
    return table


def layer_table(name: str, r: dict, T: int) -> Table:
    """One run at T': firing rate of every spiking layer, operations of every synaptic layer."""
    table = Table(title=f"{name}: per layer at T'={T}")
    for col, justify in (("layer", "left"), ("firing rate %", "right"), ("ops", "right"), ("ops/img", "right")):
        table.add_column(col, justify=justify)
    for layer, rates in r["firing_rate"]["layers"].items():
        table.add_row(layer, f"{100 * rates[T - 1]:.2f}", "", "")
    for layer, ops in r["layers"].items():
        table.add_row(layer, "", ops["kind"], _si(ops["ops_per_image"][T - 1]))
    return table


def early_exit_table(results: dict[str, dict]) -> Table:
    """Rows are confidence thresholds; per run one column: top-1 %, mean timesteps used, uJ per image."""
    runs = {n: r for n, r in results.items() if "early_exit" in r}
    table = Table(title="early exit: stop at the first t with max softmax(prefix mean) >= threshold")
    table.add_column("threshold", justify="right")
    for name in runs:
        table.add_column(f"{name}\ntop-1 %  mean T'  uJ/img", justify="right")
    thresholds = next(iter(runs.values()))["early_exit"]["thresholds"] if runs else []
    for i, th in enumerate(thresholds):
        cells = []
        for r in runs.values():
            e = r["early_exit"]
            ok = i < len(e["thresholds"]) and e["thresholds"][i] == th
            cells.append(f"{e['top1'][i]:6.2f}  {e['mean_steps'][i]:6.3f}  {e['energy_uJ_per_image'][i]:6.3f}"
                         if ok else "")
        table.add_row(f"{th:g}", *cells)
    return table


def energy_note(results: dict[str, dict]) -> str:
    model = next((r["energy_model"] for r in results.values() if "energy_model" in r), None)
    if model is None:
        return ""
    return (f"energy = {model['E_AC_pJ']} pJ x AC + {model['E_MAC_pJ']} pJ x MAC; {model['source']}.\n"
            f"counting rule: {model['rule']}.")


def print_sweep(results: dict[str, dict], console: Console | None = None, layers: bool = True) -> None:
    """The whole report: top-1 of all runs by T', then per run the deployment (and per-layer)
    tables, then the early-exit table and the energy constants with their source."""
    console = console or Console()
    console.print(sweep_table(results))
    for name, r in results.items():
        if "firing_rate" in r:
            console.print(deploy_table(name, r))
            if layers:
                console.print(layer_table(name, r, min(r["T_train"], len(r["top1"]))))
    if any("early_exit" in r for r in results.values()):
        console.print(early_exit_table(results))
    note = energy_note(results)
    if note:
        console.print(note, highlight=False)


def write_sweep_json(results: dict[str, dict], path: Path) -> None:
    write_text_atomic(path, json.dumps(results, indent=2))


def write_sweep_text(results: dict[str, dict], path: Path, layers: bool = True) -> None:
    """The printed report (all tables and the energy note) as plain text, atomically."""
    console = Console(file=io.StringIO(), record=True, width=160, color_system=None)
    print_sweep(results, console, layers=layers)
    write_text_atomic(path, console.export_text())


def plot_sweep(results: dict[str, dict], path: Path) -> None:
    """Two panels, one line per run: top-1 against T' (training T marked), and top-1 against
    the mean timesteps used by early exit over the confidence thresholds. PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_exit) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for name, r in results.items():
        ts = list(range(1, len(r["top1"]) + 1))
        (line,) = ax.plot(ts, r["top1"], marker="o", label=f"{name} (trained at T={r['T_train']})")
        if r["T_train"] <= len(ts):
            ax.axvline(r["T_train"], color=line.get_color(), linestyle=":", alpha=0.6)
        e = r.get("early_exit")
        if e:
            ax_exit.plot(e["mean_steps"], e["top1"], marker="s", color=line.get_color(), label=name)
            for th, x, y in zip(e["thresholds"], e["mean_steps"], e["top1"]):
                ax_exit.annotate(f"{th:g}", (x, y), textcoords="offset points", xytext=(3, -9), fontsize=6,
                                 color=line.get_color())
    ax.set_xlabel("deployment timesteps T'")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Full-range deployment: accuracy at every T'")
    ax_exit.set_xlabel("mean timesteps used (early exit)")
    ax_exit.set_ylabel("top-1 accuracy (%)")
    ax_exit.set_title("Early exit at confidence thresholds (annotated)")
    for a in (ax, ax_exit):
        a.grid(alpha=0.3)
        if a.lines:
            a.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def log_sweep(accelerator, results: dict[str, dict], figure: Path) -> None:
    """The sweep's report to the accelerator's trackers: top-1 per run at step T', the text
    report as a table, and the figure (the PNG at `figure`) as an image."""
    import numpy as np
    from PIL import Image

    for name, r in results.items():
        for t, acc in enumerate(r["top1"], start=1):
            accelerator.log({f"sweep/{name}/top1": acc, f"sweep/{name}/top5": r["top5"][t - 1]}, step=t)
    buf = io.StringIO()
    print_sweep(results, Console(file=buf, width=120, force_terminal=False), layers=False)
    accelerator.log({"sweep/report": "<pre>" + buf.getvalue() + "</pre>"}, step=0)
    image = np.asarray(Image.open(figure).convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"sweep/figure": image[None]}, step=0, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({"sweep/figure": [image]}, step=0)
