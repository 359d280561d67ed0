"""EXPERIMENTS.md and its plot from the study's results (scripts/study.sh); the demo's plot beside it.

    python scripts/study_report.py study/results EXPERIMENTS.md study/study.png
    python scripts/study_report.py --demo runs/demo/sweep.json study/results runs/demo/demo_vs_study.png

Each results file is one run's sweep (study/results/<method>_e<E>_s<seed>.json). Per method and
budget: mean +- std over seeds of top-1 at every T' = 1..T_max, and of the early-exit curve
(accuracy against mean timesteps at each confidence threshold); pairwise differences to SKD
with their seed spread, and a verdict per T' (win / tie / loss: the mean difference against
twice its standard error over seeds).
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

NAME = re.compile(r"^(?P<method>.+)_e(?P<epochs>\d+)_s(?P<seed>\d+)$")
LABELS = {"full_range_ensemble": "full-range (sd_target ensemble: the paper)",
          "full_range_correct_only": "full-range (sd_target correct_only: the official code)",
          "skd": "SKD (standard logit KD)", "tet": "TET (TWCE alone)", "ce": "plain CE on the time mean",
          "full_range_no_sd": "full-range without TWSD (beta 0: ablation)",
          "full_range_sd_warmup": "full-range, beta warmed up over half the budget (measured, then removed)",
          "full_range_ensemble_rerun": "full-range (ensemble) again, beside the options"}
OPTIONS = ("full_range_no_sd", "full_range_sd_warmup")  # compared with the paper's full-range run beside them
RERUN = "full_range_ensemble_rerun"  # the baseline retrained in the options' session (scripts/study.sh)


def load(results: Path) -> dict:
    """{(method, epochs): {seed: report}} of every results file."""
    runs: dict = defaultdict(dict)
    for path in sorted(results.glob("*.json")):
        m = NAME.match(path.stem)
        if m and not path.stem.startswith("budget"):
            runs[(m["method"], int(m["epochs"]))][int(m["seed"])] = json.loads(path.read_text())
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(diffs: list[float]) -> str:
    """win / tie / loss of a per-seed difference: its mean against 2 standard errors."""
    m, s = mean_std(diffs)
    se = s / len(diffs) ** 0.5 if len(diffs) > 1 else float("inf")
    return "win" if m > 2 * se else "loss" if m < -2 * se else "tie"


def accuracy_table(runs: dict, epochs: int) -> list[str]:
    T_max = max(len(r["top1"]) for seeds in runs.values() for r in seeds.values())
    lines = ["| method | seeds | " + " | ".join(f"T'={t}" for t in range(1, T_max + 1)) + " |",
             "|---|---|" + "---|" * T_max]
    for (method, e), seeds in sorted(runs.items()):
        if e != epochs:
            continue
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in (mean_std([r["top1"][t] for r in seeds.values()])
                                                    for t in range(T_max))]
        lines.append(f"| {LABELS.get(method, method)} | {len(seeds)} | " + " | ".join(cells) + " |")
    return lines


def versus(runs: dict, epochs: int, base: str, methods=None) -> list[str]:
    """Per-seed-pair differences to the method `base` at every T' (of the given methods, or all)."""
    ref = runs.get((base, epochs), {})
    T_max = max((len(r["top1"]) for r in ref.values()), default=0)
    lines = [f"| method - {LABELS.get(base, base).split(' (')[0]} | " + " | ".join(f"T'={t}" for t in range(1, T_max + 1))
             + " |", "|---|" + "---|" * T_max]
    for (method, e), seeds in sorted(runs.items()):
        common = sorted(set(seeds) & set(ref))
        if e != epochs or method == base or len(common) < 2 or (methods is not None and method not in methods):
            continue
        cells = []
        for t in range(T_max):
            d = [seeds[s]["top1"][t] - ref[s]["top1"][t] for s in common]
            m, sd = mean_std(d)
            cells.append(f"{m:+.2f} ± {sd:.2f} ({verdict(d)})")
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return lines


def exit_table(runs: dict, epochs: int) -> list[str]:
    lines = ["| method | threshold | top-1 % | mean T' |", "|---|---|---|---|"]
    for (method, e), seeds in sorted(runs.items()):
        if e != epochs:
            continue
        first = next(iter(seeds.values()))["early_exit"]
        for j, th in enumerate(first["thresholds"]):
            acc = mean_std([r["early_exit"]["top1"][j] for r in seeds.values()])
            steps = mean_std([r["early_exit"]["mean_steps"][j] for r in seeds.values()])
            lines.append(f"| {LABELS.get(method, method)} | {th:g} | {acc[0]:.2f} ± {acc[1]:.2f} | "
                         f"{steps[0]:.2f} ± {steps[1]:.2f} |")
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _seed_curves(ax, runs: dict, epochs: int, methods=None) -> None:
    """Mean +- std over seeds of top-1 against T' for each method (or the given ones)."""
    for (method, e), seeds in sorted(runs.items()):
        if e != epochs or (methods is not None and method not in methods):
            continue
        reports = list(seeds.values())
        T = range(1, len(reports[0]["top1"]) + 1)
        stats = [mean_std([r["top1"][t - 1] for r in reports]) for t in T]
        ax.errorbar(list(T), [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                    label=f"{LABELS.get(method, method)} (n={len(reports)})")


def plot(runs: dict, epochs: int, path: Path) -> None:
    plt = _pyplot()
    fig, (ax, ax_exit) = plt.subplots(1, 2, figsize=(12, 4.5))
    _seed_curves(ax, runs, epochs)
    for (method, e), seeds in sorted(runs.items()):
        if e != epochs:
            continue
        reports = list(seeds.values())
        ee = [r["early_exit"] for r in reports]
        xs = [statistics.fmean(x["mean_steps"][j] for x in ee) for j in range(len(ee[0]["thresholds"]))]
        ys = [statistics.fmean(x["top1"][j] for x in ee) for j in range(len(ee[0]["thresholds"]))]
        ax_exit.plot(xs, ys, marker=".", label=LABELS.get(method, method))
    T_train = next(iter(next(iter(runs.values())).values()))["T_train"]
    ax.axvline(T_train, color="grey", ls=":", label=f"trained at T={T_train}")
    ax.set(xlabel="deployment timesteps T'", ylabel="top-1 % (mean ± std over seeds)",
           title=f"Fashion-MNIST, spiking_resnet_tiny, {epochs} epochs")
    ax_exit.set(xlabel="mean timesteps used (early exit)", ylabel="top-1 %", title="Confidence-based early exit")
    for a in (ax, ax_exit):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


DEMO_RUNS = {"fmnist_fullrange": "full_range_ensemble", "fmnist_skd": "skd"}  # demo run -> its study method


def demo_plot(sweep_json: str, results: str, figure: str) -> None:
    """The demo's single-seed sweep (left) beside the study's seed spread for the same methods
    on the study's longer budget (right)."""
    demo = json.loads(Path(sweep_json).read_text())
    runs = load(Path(results))
    plt = _pyplot()
    fig, (ax, ax_study) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, report in demo.items():
        T = list(range(1, len(report["top1"]) + 1))
        ax.plot(T, report["top1"], marker="o", label=f"{LABELS.get(DEMO_RUNS.get(name, ''), name)} (1 seed)")
    ax.set(xlabel="deployment timesteps T'", ylabel="top-1 %", title="this demo (short budget, one seed)")
    if runs:
        epochs = max(e for _, e in runs)
        _seed_curves(ax_study, runs, epochs, set(DEMO_RUNS.values()))
        ax_study.set(title=f"the study: {epochs} epochs, mean ± std over seeds (EXPERIMENTS.md)")
    ax_study.set(xlabel="deployment timesteps T'", ylabel="top-1 %")
    for a in (ax, ax_study):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    Path(figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)
    plt.close(fig)
    print(f"wrote {figure}")


def budget_lines(results: Path) -> list[str]:
    probe = sorted((int(re.search(r"e(\d+)", p.stem)[1]), json.loads(p.read_text()))
                   for p in results.glob("budget_skd_e*.json"))
    if not probe:
        return []
    lines = ["| SKD, seed 0, epochs | " + " | ".join(f"T'={t}" for t in range(1, len(probe[0][1]["top1"]) + 1)) + " |",
             "|---|" + "---|" * len(probe[0][1]["top1"])]
    for e, r in probe:
        lines.append(f"| {e} | " + " | ".join(f"{v:.2f}" for v in r["top1"]) + " |")
    return lines


def main(results: str, out: str, figure: str) -> None:
    runs = load(Path(results))
    if not runs:
        sys.exit(f"study_report: no results in {results} (run scripts/study.sh first)")
    epochs = max(e for _, e in runs)
    plot(runs, epochs, Path(figure))
    text = Path(out).read_text() if Path(out).is_file() else ""
    if "<!-- tables -->" in text:  # the text above the marker is kept
        head = text.split("<!-- tables -->")[0]
    else:  # a file without one is kept whole, the tables follow it
        head = text.rstrip() + "\n\n" if text else "# Experiments\n\n"
    body = ["<!-- tables -->", "", f"## Top-1 (%) at every T', {epochs} epochs (mean ± std over seeds)", "",
            *accuracy_table(runs, epochs), "", "## Difference to SKD, per seed pair (mean ± std; verdict)", "",
            *versus(runs, epochs, "skd"), ""]
    if any((m, epochs) in runs for m in OPTIONS):
        base = RERUN if (RERUN, epochs) in runs else "full_range_ensemble"
        body += [f"## The options against the paper's full-range ({LABELS[base]}), per seed pair (mean ± std; "
                 "verdict)", "", *versus(runs, epochs, base, OPTIONS), ""]
    if (RERUN, epochs) in runs:
        body += ["## The same runs in two sessions: the rerun against the first runs (reproduction noise)", "",
                 *versus(runs, epochs, "full_range_ensemble", (RERUN,)), ""]
    body += [f"![study]({Path(figure).as_posix()})", "",
             "## Early exit (mean ± std over seeds)", "", *exit_table(runs, epochs), ""]
    probe = budget_lines(Path(results))
    if probe:
        body += ["## Budget probe", "", *probe, ""]
    Path(out).write_text(head + "\n".join(body))
    print(f"wrote {out} and {figure} from {sum(len(s) for s in runs.values())} runs")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--demo"]:
        demo_plot(*sys.argv[2:5])
    else:
        main(*sys.argv[1:4])
