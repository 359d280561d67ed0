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


def train_main(argv: list[str] | None = None, hooks=None) -> int:
    """hooks: None, or hooks(accelerator) -> step hooks for fullrange.engine.train (tests)."""
    parser = argparse.ArgumentParser(prog="launcher/train.py", description="Train an ANN teacher or a full-range spiking student.")
    parser.add_argument("config", help="experiment YAML, e.g. configs/fmnist.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 name=try2 resume=true")
    args = parser.parse_args(argv)

    def work(cfg, acc):
        from fullrange.engine import train

        train(cfg, acc, hooks(acc) if hooks else ())

    return _run_on_every_rank(args.config, args.overrides, work, trackers=True)


def _run_on_every_rank(config: str, overrides: list[str], work, trackers: bool = False) -> int:
    """Load the config (bad input: one line, exit 2, before the process group starts), then
    work(cfg, accelerator) on every rank, with the exit codes of fullrange.preemption: 2 for bad
    input (ConfigError), 75 when preempted, 3 for a non-finite loss. Every rank raises these at
    the same point, so the closing barrier is safe after them; any other error skips it."""
    from fullrange.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        return _fail(str(e))
    from fullrange.preemption import EXIT_NONFINITE, EXIT_REQUEUE, NonFiniteLoss, Preempted
    from fullrange.runtime import make_accelerator, shutdown

    try:
        acc = (make_accelerator(cfg.dist_timeout_s, cfg.log_with, cfg.run_dir) if trackers
               else make_accelerator(cfg.dist_timeout_s))
    except ConfigError as e:  # a tracker that is not installed, a precision the device cannot run
        return _fail(str(e))
    clean = False
    try:
        work(cfg, acc)
        clean = True
    except ConfigError as e:
        clean = True
        return _fail(str(e))
    except Preempted as e:
        clean = True
        _fail(str(e))
        return EXIT_REQUEUE
    except NonFiniteLoss as e:
        clean = True
        _fail(str(e))
        return EXIT_NONFINITE
    finally:
        shutdown(acc, barrier=clean)
    return 0


def cache_teacher_main(argv: list[str] | None = None, hooks=None) -> int:
    """hooks: None, or hooks(accelerator) -> round hooks for build_teacher_cache (tests)."""
    parser = argparse.ArgumentParser(
        prog="launcher/cache_teacher.py",
        description="Compute the teacher's top-k logits once for every training view a student config reads "
                    "(teacher.*, data.*, seed, data.views or optim.epochs), into teacher.cache_dir. "
                    "Resumes a partial build; a finished cache is left as it is.")
    parser.add_argument("config", help="a student config, e.g. configs/fmnist.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.cache_dir=caches/t1 teacher.topk=16")
    parser.add_argument("--chunk", type=int, default=None, help="samples per shard (default 65536)")
    parser.add_argument("--batch-size", type=int, default=None, help="teacher batch per process "
                        "(default data.val_batch_size)")
    args = parser.parse_args(argv)

    def work(cfg, acc):
        from fullrange.teacher_cache import DEFAULT_CHUNK, build_teacher_cache

        build_teacher_cache(cfg, acc, chunk=args.chunk or DEFAULT_CHUNK, batch_size=args.batch_size,
                            hooks=hooks(acc) if hooks else ())

    return _run_on_every_rank(args.config, args.overrides, work)


def _sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launcher/sweep.py",
        description="Deployment report from one forward pass per run: top-1/top-5, firing rates, synaptic "
                    "operations and energy at every T' = 1..T_max, and confidence-based early exit. "
                    "With --export T', write a student checkpoint for T' instead.")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with config.yaml and model.pt)")
    parser.add_argument("--t-max", type=int, default=None, help="largest T' (default: 2 x each run's training T)")
    parser.add_argument("--out", type=Path, default=None, help="prefix of the combined report for several runs "
                        "(default: <parent of the first run>/sweep -> sweep.json, sweep.png, sweep.txt)")
    parser.add_argument("--batch-size", type=int, default=None, help="validation batch per process")
    parser.add_argument("--workers", type=int, default=None, help="loader workers per process")
    parser.add_argument("--exit-thresholds", default=None, metavar="P,P,...",
                        help="early-exit confidence thresholds (default 0,0.5,0.6,0.7,0.8,0.9,0.95,0.99,1.01)")
    parser.add_argument("--no-layers", action="store_true", help="leave the per-layer tables out of the printout")
    parser.add_argument("--export", type=int, default=None, metavar="T'",
                        help="write RUN/export_T{T'}/ (model.pt + config.yaml with model.T = T') for each run "
                             "and exit; no evaluation")
    return parser


def _sweep_input_error(args) -> str | None:
    """What is wrong with the sweep's arguments or run directories (one line), or None."""
    if args.t_max is not None and args.t_max < 1:
        return f"--t-max: expected an integer >= 1, got {args.t_max}"
    if args.export is not None and args.export < 1:
        return f"--export: expected an integer T' >= 1, got {args.export}"
    for run in args.runs:
        for name in ("config.yaml", "model.pt"):
            if not (run / name).is_file():
                return f"{run / name}: not found (expected a run directory written by launcher/train.py)"
    return None


def _thresholds(text: str | None) -> tuple[float, ...]:
    """--exit-thresholds -> the thresholds; ValueError when they are not numbers >= 0."""
    from fullrange.deploy_stats import EXIT_THRESHOLDS

    if text is None:
        return EXIT_THRESHOLDS
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(not (0.0 <= t < float("inf")) for t in values):
        raise ValueError(f"--exit-thresholds: expected comma-separated numbers >= 0, got {text!r}")
    return values


def _export(runs: list[Path], T: int) -> int:
    if os.environ.get("RANK", "0") != "0":
        return 0
    from fullrange.config import ConfigError
    from fullrange.sweep import export_run

    try:
        for run in runs:
            out = export_run(run, T)
            print(f"exported {run} for T'={T}: {out}/model.pt, {out}/config.yaml")
    except (FileNotFoundError, ValueError, ConfigError) as e:
        return _fail(str(e))
    return 0


def _report(args, thresholds) -> int:
    """The sweep of every run on every rank; the main process writes and prints the reports."""
    from fullrange.config import ConfigError
    from fullrange.report import log_sweep, plot_sweep, print_sweep, write_sweep_json, write_sweep_text
    from fullrange.runtime import make_accelerator, shutdown
    from fullrange.sweep import run_log_with, sweep_run

    out = args.out or (args.runs[0].parent / "sweep" if len(args.runs) > 1 else args.runs[0] / "sweep")
    trackers = run_log_with(args.runs)
    try:
        acc = make_accelerator(log_with=trackers, project_dir=out.parent)
    except ConfigError as e:
        return _fail(str(e))
    clean = False
    try:
        results = {}
        for run in args.runs:
            results[run.name] = sweep_run(run, args.t_max, acc, batch_size=args.batch_size, num_workers=args.workers,
                                          thresholds=thresholds)
            if acc.is_main_process:
                for write, suffix in ((write_sweep_json, ".json"), (plot_sweep, ".png"), (write_sweep_text, ".txt")):
                    write({run.name: results[run.name]}, run / f"sweep{suffix}")
        if acc.is_main_process:
            if len(results) > 1 or args.out is not None:
                for write, suffix in ((write_sweep_json, ".json"), (plot_sweep, ".png"), (write_sweep_text, ".txt")):
                    write(results, out.with_suffix(suffix))
            print_sweep(results, layers=not args.no_layers)
        if trackers and acc.is_main_process:  # the runs' log_with: the report goes there too, beside OUT
            acc.init_trackers("sweep_trackers")
            log_sweep(acc, results, out.with_suffix(".png"))
            for tracker in acc.trackers:
                tracker.finish()
        clean = True
    except (FileNotFoundError, ValueError, ConfigError) as e:
        return _fail(str(e))
    finally:
        shutdown(acc, barrier=clean)  # after an error a peer may never reach the barrier
    return 0


def sweep_main(argv: list[str] | None = None) -> int:
    args = _sweep_parser().parse_args(argv)
    problem = _sweep_input_error(args)
    if problem:
        return _fail(problem)
    try:
        thresholds = _thresholds(args.exit_thresholds)
    except ValueError as e:
        return _fail(str(e))
    if args.export is not None:
        return _export(args.runs, args.export)
    return _report(args, thresholds)


def convert_official_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launcher/convert_official.py",
        description="Turn a checkpoint of the official code (its best_net entry) into a fullrange run directory "
                    "OUT_DIR/NAME with config.yaml and model.pt, ready for launcher/sweep.py; see "
                    "fullrange.models.official for the key layouts.")
    parser.add_argument("checkpoint", type=Path, help="the official checkpoint, e.g. log/model_weights.pth")
    parser.add_argument("config", help="the matching fullrange config, e.g. configs/imagenet_r34.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. name=official_r34 out_dir=runs")
    args = parser.parse_args(argv)
    from fullrange.config import ConfigError, load_config, save_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _fail(str(e))
    if not args.checkpoint.is_file():
        return _fail(f"{args.checkpoint}: not found (expected an official checkpoint file)")
    import pickle

    from fullrange.atomic import torch_save_atomic
    from fullrange.models import build_model
    from fullrange.models.official import load_official

    model = build_model(cfg.model.name, cfg.model.num_classes, cfg.model.in_channels, vars(cfg.neuron))
    try:
        load_official(args.checkpoint, cfg.model.name, model)
    except (ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        return _fail(f"{args.checkpoint}: {str(e).splitlines()[0]}")
    run = cfg.run_dir
    if (run / "model.pt").exists():
        return _fail(f"{run / 'model.pt'} already exists (nothing was overwritten); choose another name=...")
    torch_save_atomic(model.state_dict(), run / "model.pt")
    save_config(cfg, run / "config.yaml")
    print(f"{args.checkpoint} -> {run}/model.pt, {run}/config.yaml")
    return 0


def write_ffcv_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launcher/write_ffcv.py", description="Write datasets to FFCV .beton files.")
    sub = parser.add_subparsers(dest="source", required=True)
    bundled = sub.add_parser("bundled", help="a dataset that installs with the system (train.beton + val.beton)")
    bundled.add_argument("name", choices=("fmnist", "digits"))
    bundled.add_argument("out_dir", type=Path)
    cifar = sub.add_parser("cifar", help="an unpacked CIFAR-10/100 python-version archive "
                           "(cifar-10-batches-py or cifar-100-python) -> train.beton + val.beton (32x32 raw)")
    cifar.add_argument("src", type=Path, help="the unpacked folder")
    cifar.add_argument("out_dir", type=Path)
    folder = sub.add_parser("imagefolder", help="an ImageFolder tree SRC/{train,val}/<class>/*.jpg (ImageNet layout): "
                            "RGB images as JPEG and/or raw pixels (train.beton + val.beton)")
    folder.add_argument("src", type=Path, help="directory holding train/ and val/")
    folder.add_argument("out_dir", type=Path)
    folder.add_argument("--max-resolution", type=int, default=500, help="longer side in pixels (default 500)")
    folder.add_argument("--jpeg-quality", type=int, default=90)
    folder.add_argument("--compress-probability", type=float, default=0.5,
                        help="fraction stored as JPEG with --write-mode proportion (default 0.5)")
    folder.add_argument("--write-mode", choices=("proportion", "jpg", "raw"), default="proportion")
    folder.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes (default: all CPUs)")
    folder.add_argument("--stats", choices=("imagenet", "computed"), default="imagenet",
                        help="normalisation mean/std: ImageNet's standard constants (default) or computed from train")
    folder.add_argument("--overwrite", action="store_true", help="replace existing .beton files written differently")
    args = parser.parse_args(argv)
    from fullrange.data import prepare_bundled, write_imagefolder

    try:
        if args.source == "bundled":
            written = prepare_bundled(args.name, args.out_dir)
        elif args.source == "cifar":
            from fullrange.data.cifar import write_cifar

            written = write_cifar(args.src, args.out_dir)
        else:
            if args.workers < 1:
                return _fail(f"--workers: expected an integer >= 1, got {args.workers}")
            written = write_imagefolder(args.src, args.out_dir, max_resolution=args.max_resolution,
                                        jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
                                        write_mode=args.write_mode, num_workers=args.workers, stats=args.stats,
                                        overwrite=args.overwrite)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        return _fail(str(e))
    for split in ("train", "val"):
        m = written["meta"][split]
        kept = " (up to date, kept)" if split not in written.get("written", [split]) else ""
        shape = tuple(m.get("max_shape", m["shape"]))
        print(f"{written[split]}: {m['num_samples']} samples of {m['name']} {'up to ' * ('max_shape' in m)}{shape}, "
              f"{m['num_classes']} classes{kept}")
    return 0
