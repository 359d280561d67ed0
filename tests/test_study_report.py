"""scripts/study_report.py: mean +- std over seeds, the verdict against SKD, the plots; and
scripts/study.sh --dry-run lists every run of the study."""
import importlib.util
import json
import subprocess

from conftest import REPO

spec = importlib.util.spec_from_file_location("study_report", REPO / "scripts" / "study_report.py")
study_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study_report)


def _report(top1):
    return {"T_train": 2, "T_max": 3, "total": 100, "top1": top1,
            "early_exit": {"thresholds": [0.9], "top1": [top1[0]], "mean_steps": [1.5]}}


def test_tables_give_mean_std_and_verdicts(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    skd = {0: [80.0, 82.0, 83.0], 1: [81.0, 83.0, 84.0], 2: [82.0, 84.0, 85.0]}
    for seed, top1 in skd.items():
        (results / f"skd_e5_s{seed}.json").write_text(json.dumps(_report(top1)))
        # full-range: +1.0, +1.1, +0.9 at T'=1 (a win), -0.5, +0.5, 0 at T'=2 (a tie), -1 at T'=3
        fr = [top1[0] + 1.0 + 0.1 * (seed == 1) - 0.1 * (seed == 2), top1[1] + [-0.5, 0.5, 0.0][seed], top1[2] - 1]
        (results / f"full_range_ensemble_e5_s{seed}.json").write_text(json.dumps(_report(fr)))
        # an option: +0.3 over full-range at every T' on every seed; the baseline rerun beside it: +0.1
        (results / f"full_range_sd_warmup_e5_s{seed}.json").write_text(json.dumps(_report([v + 0.3 for v in fr])))
        (results / f"full_range_ensemble_rerun_e5_s{seed}.json").write_text(json.dumps(_report([v + 0.1 for v in fr])))
    out = tmp_path / "EXPERIMENTS.md"
    out.write_text("# Experiments\n\nintro kept\n\n<!-- tables -->\nold tables\n")
    study_report.main(str(results), str(out), str(tmp_path / "study.png"))
    text = out.read_text()
    assert text.startswith("# Experiments\n\nintro kept\n") and "old tables" not in text
    assert "| SKD (standard logit KD) | 3 | 81.00 ± 1.00 | 83.00 ± 1.00 | 84.00 ± 1.00 |" in text
    row = [line for line in text.splitlines() if line.startswith("| full-range") and "(win)" in line]
    assert row and "+1.00 ± 0.10 (win)" in row[0] and "+0.00 ± 0.50 (tie)" in row[0]
    assert "-1.00 ± 0.00 (loss)" in row[0]
    options = text.split("## The options against the paper's full-range")[1].split("##")[0]
    assert "| method - full-range | T'=1 | T'=2 | T'=3 |" in options
    assert "| full-range, beta warmed up over half the budget (measured, then removed) | +0.20 ± 0.00 (win) |" in options
    reproduction = text.split("## The same runs in two sessions")[1].split("##")[0]
    assert "| full-range (ensemble) again, beside the options | +0.10 ± 0.00 (win) |" in reproduction
    assert "full-range (sd_target ensemble" not in options.split("|---|")[1]  # the base is not its own row
    assert (tmp_path / "study.png").stat().st_size > 10_000

    demo = tmp_path / "sweep.json"
    demo.write_text(json.dumps({"fmnist_fullrange": _report([70.0, 71.0, 72.0]),
                                "fmnist_skd": _report([69.0, 72.0, 73.0])}))
    study_report.demo_plot(str(demo), str(results), str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_study_dry_run_lists_every_run():
    done = subprocess.run(["bash", str(REPO / "scripts" / "study.sh"), "--dry-run"], capture_output=True,
                          text=True, check=True)
    lines = done.stdout.splitlines()
    assert len(lines) == 21
    for method in ("full_range_ensemble", "full_range_correct_only", "skd", "tet", "ce", "full_range_no_sd",
                   "full_range_ensemble_rerun"):
        assert sum(line.startswith(f"{method}_e12_s") for line in lines) == 3
    assert all("loss.beta=0" in line for line in lines if line.startswith("full_range_no_sd"))
