"""Command-line entry points behind launcher/*.py: argument parsing and one-line errors.

Bad input (unknown key, wrong type, missing file) prints ``fullrange: <what and what was
expected>`` on the main process and exits with status 2 before any work starts.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _fail(message: str) -> int:
    if os.environ.get("RANK", "0") == "0":
        print(f"fullrange: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher/train.py", description="Train an ANN teacher or a full-range spiking student.")
    parser.add_argument("config", help="experiment YAML, e.g. configs/fmnist.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 name=try2 resume=true")
    args = parser.parse_args(argv)
    from fullrange.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _fail(str(e))
    from fullrange.engine import train
    from fullrange.runtime import make_accelerator, shutdown

    acc = make_accelerator()
    try:
        train(cfg, acc)
    except ConfigError as e:
        return _fail(str(e))
    finally:
        shutdown(acc)
    return 0


def sweep_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher/sweep.py", description="Accuracy at every T' = 1..T_max from one forward pass per run.")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with config.yaml and model.pt)")
    parser.add_argument("--t-max", type=int, default=None, help="largest T' (default: 2 x each run's training T)")
    parser.add_argument("--out", type=Path, default=None, help="prefix of the combined report for several runs "
                        "(default: <parent of the first run>/sweep -> sweep.json, sweep.png)")
    parser.add_argument("--batch-size", type=int, default=None, help="validation batch per process")
    parser.add_argument("--workers", type=int, default=None, help="loader workers per process")
    args = parser.parse_args(argv)
    if args.t_max is not None and args.t_max < 1:
        return _fail(f"--t-max: expected an integer >= 1, got {args.t_max}")
    for run in args.runs:
        for name in ("config.yaml", "model.pt"):
            if not (run / name).is_file():
                return _fail(f"{run / name}: not found (expected a run directory written by launcher/train.py)")
    from fullrange.report import plot_sweep, print_sweep, write_sweep_json
    from fullrange.runtime import make_accelerator, shutdown
    from fullrange.sweep import sweep_run

    acc = make_accelerator()
    try:
        results = {}
        for run in args.runs:
            results[run.name] = sweep_run(run, args.t_max, acc, batch_size=args.batch_size, num_workers=args.workers)
            if acc.is_main_process:
                write_sweep_json({run.name: results[run.name]}, run / "sweep.json")
                plot_sweep({run.name: results[run.name]}, run / "sweep.png")
        if acc.is_main_process:
            if len(results) > 1:
                out = args.out or args.runs[0].parent / "sweep"
                write_sweep_json(results, out.with_suffix(".json"))
                plot_sweep(results, out.with_suffix(".png"))
            print_sweep(results)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    finally:
        shutdown(acc)
    return 0


def write_ffcv_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher/write_ffcv.py", description="Write datasets to FFCV .beton files.")
    sub = parser.add_subparsers(dest="source", required=True)
    bundled = sub.add_parser("bundled", help="a dataset that installs with the system (train.beton + val.beton)")
    bundled.add_argument("name", choices=("fmnist", "digits"))
    bundled.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    from fullrange.data import prepare_bundled

    try:
        written = prepare_bundled(args.name, args.out_dir)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    for split in ("train", "val"):
        m = written["meta"][split]
        print(f"{written[split]}: {m['num_samples']} samples of {m['name']} {tuple(m['shape'])}, {m['num_classes']} classes")
    return 0
