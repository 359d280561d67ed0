"""The training loop on accelerate: an ANN teacher (CE) or a spiking student with a teacher that
is live (runs in every step) or cached (its logits read from fullrange.teacher_cache).

One function, :func:`train`, reads top to bottom: check inputs, build data/model/optimiser,
resume if asked, then epochs of (train steps, validation over every T' <= T, checkpoint).
Outputs in ``RUN = out_dir/name``: config.yaml (resolved), metrics.jsonl, checkpoints/ (the
last accelerator state: an epoch's end, or a step inside an epoch with checkpoint_every_steps),
model.pt (the last epoch's weights as a plain state_dict).

Resume is exact: a step checkpoint records (epoch, batches done); the resumed run replays that
epoch's order (set_epoch) from the first batch not yet trained, without reading the others.
After every step (every stop_check_every) the ranks agree on a stop: a preemption signal -> checkpoint + Preempted, a
non-finite loss -> NonFiniteLoss with nothing saved (fullrange.preemption). The same loop runs
DDP and DeepSpeed ZeRO (accelerate's DeepSpeed plugin): DeepSpeed steps and clips inside
``acc.backward``, the run config fills its batch and clipping (_fit_deepspeed_config).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from fullrange.atomic import torch_save_atomic
from fullrange.batches import BatchPreparer
from fullrange.checkpoint import Checkpointer
from fullrange.config import ConfigError, RunConfig, save_config
from fullrange.data import read_sidecar, train_loader, val_loader, view_epoch, view_options
from fullrange.losses import student_loss
from fullrange.metrics import MetricsLog
from fullrange.models import build_model, is_spiking
from fullrange.optim import build_optimizer, build_scheduler
from fullrange.preemption import (EXIT_REQUEUE, Fault, NonFiniteLoss, Preempted, StopCheck, StopSignals,
                                  write_requeue_file)
from fullrange.runtime import make_accelerator, seed_everything
from fullrange.sweep import accuracies, all_reduce_counts, iterate_prepared, logits_over_time, prefix_counts
from fullrange.teacher_cache import TeacherCache
from fullrange.teachers import load_teacher


def check_inputs(cfg: RunConfig, world_size: int) -> tuple[dict, TeacherCache | None]:
    """Every check that needs no training: data files and their metadata against the config,
    the teacher weights or cache, the batch split and the run directory. Returns the train
    sidecar and the checked teacher cache (None unless teacher.source is cache)."""
    metas = {}
    for key in ("data.train_path", "data.val_path"):
        path = Path(getattr(cfg.data, key.split(".")[1]))
        if not path.is_file():
            raise ConfigError(f"config key {key}: data file {path} not found (expected an FFCV .beton; "
                              "write the bundled data with `python launcher/write_ffcv.py bundled fmnist data/fmnist`)")
        try:
            metas[key] = read_sidecar(path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"config key {key}: {e}") from None
    meta = metas["data.train_path"]
    h, w, c = meta["shape"]
    if c != cfg.model.in_channels:
        raise ConfigError(f"config key model.in_channels: {cfg.data.train_path} has {c} channels, "
                          f"config says {cfg.model.in_channels}")
    if meta["num_classes"] != cfg.model.num_classes:
        raise ConfigError(f"config key model.num_classes: {cfg.data.train_path} has {meta['num_classes']} "
                          f"classes, config says {cfg.model.num_classes}")
    if cfg.data.batch_size % world_size:
        raise ConfigError(f"config key data.batch_size: {cfg.data.batch_size} does not split evenly "
                          f"over {world_size} processes")
    cache = None
    if cfg.loss.kind in ("full_range", "skd"):
        if cfg.teacher.source == "cache":
            cache = TeacherCache(cfg.teacher.cache_dir)
            cache.check(cfg, meta)
        else:
            load_teacher(cfg)
    run_dir = cfg.run_dir
    if not cfg.resume and ((run_dir / "checkpoints").exists() or (run_dir / "model.pt").exists()):
        raise ConfigError(f"config key resume: run directory {run_dir} already holds a run; pass resume=true "
                          "to continue it or choose another name=... (nothing was overwritten)")
    return meta, cache


def average_buffers(model: nn.Module, accelerator: Accelerator) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks.

    DDP keeps parameters equal, but each rank's last forward updates its own running
    statistics; averaging them makes evaluation and the saved weights rank-independent."""
    if accelerator.num_processes == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            buf.copy_(accelerator.reduce(buf.detach().clone(), "mean"))


def live_teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The live teacher on the student's images x [B,C,H,W] -> logits [B,C], no gradient."""
    with torch.no_grad():  # the teacher stays fp32 when DeepSpeed feeds the student bf16 inputs
        return teacher(x.to(next(teacher.parameters()).dtype))


def compute_loss(cfg: RunConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor, T: int, spiking: bool,
                 teacher_logits: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """The configured loss of one batch: images x [B,C,H,W], labels y [B], teacher logits
    [B,C] (live or rebuilt from the cache; None without a teacher) -> (loss, parts)."""
    z = logits_over_time(model, x, T, spiking)
    return student_loss(cfg.loss.kind, z, y, teacher_logits, cfg.loss.alpha, cfg.loss.beta, cfg.loss.tau,
                        cfg.loss.sd_target)


def weights_checksum(model: nn.Module) -> float:
    """Sum of every floating-point parameter and buffer, in float64 (compares ranks)."""
    return float(sum(t.double().sum() for t in model.state_dict().values() if t.is_floating_point()))


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=not enabled, transient=False)


def _deepspeed_config(acc: Accelerator) -> dict | None:
    """The DeepSpeed config dict when launched with accelerate's DeepSpeed plugin, else None."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.DEEPSPEED:
        return None
    return acc.state.deepspeed_plugin.deepspeed_config


def _fit_deepspeed_config(ds: dict, cfg: RunConfig, per_process_batch: int) -> None:
    """The run config decides the batch and the clipping; the JSON's values are replaced.

    DeepSpeed needs a literal micro batch (FFCV loaders are not torch DataLoaders, so accelerate
    cannot infer it), and accelerate would fill an "auto" gradient_clipping with 1.0."""
    ds["train_micro_batch_size_per_gpu"] = per_process_batch
    ds["train_batch_size"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = float(cfg.optim.grad_clip)
    ds.setdefault("zero_allow_untested_optimizer", True)  # our SGD with two parameter groups


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines written after the checkpoint a run resumes from (step > step)."""
    if not path.is_file():
        return
    from fullrange.atomic import write_text_atomic
    from fullrange.metrics import read_metrics

    kept = [m for m in read_metrics(path) if m.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(m) + "\n" for m in kept))


def train(cfg: RunConfig, accelerator: Accelerator | None = None) -> Path:
    """Train the configured run; returns the run directory.

    Raises Preempted (SIGTERM / SIGUSR1: a step checkpoint was written) or NonFiniteLoss (the
    last good checkpoint is kept) on every rank; see fullrange.preemption for exit codes."""
    acc = accelerator or make_accelerator(cfg.dist_timeout_s)
    with StopSignals() as signals:
        return _train(cfg, acc, signals)


def _train(cfg: RunConfig, acc: Accelerator, signals: StopSignals) -> Path:
    console = Console(stderr=True)
    main = acc.is_main_process
    meta, cache = check_inputs(cfg, acc.num_processes)
    run_dir = cfg.run_dir
    spiking = is_spiking(cfg.model.name)
    T = cfg.model.T if spiking else 1
    seed_everything(cfg.seed)
    fault = Fault(acc.process_index)
    ds_config = _deepspeed_config(acc)

    model = build_model(cfg.model.name, cfg.model.num_classes, cfg.model.in_channels, vars(cfg.neuron))
    live = cfg.loss.kind in ("full_range", "skd") and cache is None
    teacher = load_teacher(cfg).to(acc.device) if live else None
    if cfg.data.channels_last and ds_config is None:  # DeepSpeed broadcasts weights as flat bytes
        model = model.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last) if teacher is not None else None

    per_process_batch = cfg.data.batch_size // acc.num_processes
    views = view_options(cfg.data)  # image size, crop ranges, batches_ahead (rgb_jpeg files)
    train_batches = train_loader(cfg.data.train_path, per_process_batch, cfg.data.num_workers, cfg.seed,
                                 distributed=acc.num_processes > 1, os_cache=cfg.data.os_cache, **views["train"])
    val_batches = val_loader(cfg.data.val_path, cfg.data.val_batch_size, cfg.data.num_workers,
                             acc.process_index, acc.num_processes, os_cache=cfg.data.os_cache, **views["val"])
    steps_per_epoch = len(train_batches)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ConfigError(f"config key data.batch_size: {cfg.data.batch_size} is larger than the training set "
                          f"({meta['num_samples']} samples): no full batch per epoch")
    prep = BatchPreparer(acc.device, meta["mean"], meta["std"], cfg.seed, cfg.data.pad, cfg.data.flip,
                         cfg.data.channels_last, augment=not train_batches.augmented,
                         dtype=torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float32)

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch)
    input_dtype = None
    if ds_config is not None:
        _fit_deepspeed_config(ds_config, cfg, per_process_batch)
        if acc.mixed_precision == "bf16":  # DeepSpeed casts the weights, not the inputs
            input_dtype = torch.bfloat16
    model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(scheduler)  # stepped by us once per optimizer step
    checkpointer = Checkpointer(run_dir, acc)
    stop_check = StopCheck(signals, acc.device, acc.process_index, acc.num_processes, cfg.stop_check_every)

    start_epoch, skip, step = 0, 0, 0
    if cfg.resume and (last := checkpointer.latest()) is not None:
        state = checkpointer.load(last)
        start_epoch, skip, step = state["epoch"], state["batch"], state["step"]
        if main:
            _trim_metrics(run_dir / "metrics.jsonl", step)
            console.print(f"resuming {run_dir} from {last.name} (epoch {start_epoch}, batch {skip}, step {step})")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    log = MetricsLog(run_dir / "metrics.jsonl", main)
    if main:
        console.print(f"[bold]{cfg.name}[/]: {cfg.model.name} T={T} loss={cfg.loss.kind} on "
                      f"{acc.num_processes} process(es){' with DeepSpeed' if ds_config else ''}, "
                      f"{steps_per_epoch} steps/epoch x {cfg.optim.epochs} epochs")

    def prepare_eval(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = prep.eval(images, labels)
        return (x if input_dtype is None else x.to(input_dtype)), y

    def preempt(reason: str, epoch: int, batch: int, saved: Path | None) -> None:
        """Checkpoint at this step boundary (every rank), then raise Preempted everywhere."""
        path = saved or checkpointer.save(epoch, step, batch)
        if main:
            write_requeue_file({"reason": reason, "epoch": epoch, "batch": batch, "step": step,
                                "checkpoint": str(path)})
        acc.wait_for_everyone()
        raise Preempted(f"preempted ({reason}) at epoch {epoch} batch {batch} (step {step}); checkpoint {path}; "
                        f"rerun with resume=true to continue (exit {EXIT_REQUEUE}: requeue)", path)

    def check(epoch: int, batch: int, force: bool = False, saved: Path | None = None) -> None:
        stop, bad_ranks = stop_check.check(step, force)
        if bad_ranks:
            last_good = checkpointer.latest()
            raise NonFiniteLoss(f"non-finite loss (NaN or inf) on rank(s) {bad_ranks} by step {step} (epoch {epoch}); "
                                f"stopped; nothing saved after the last good checkpoint "
                                f"{last_good if last_good else '(none: no checkpoint yet)'}")
        if stop:
            preempt(stop, epoch, batch, saved)

    with _progress(console, main) as progress:
        task = progress.add_task(cfg.name, total=cfg.optim.epochs * steps_per_epoch,
                                 completed=start_epoch * steps_per_epoch + skip, info="")
        for epoch in range(start_epoch, cfg.optim.epochs):
            view = view_epoch(epoch, cfg.data.views)  # the random views: (seed, view, index)
            done = skip if epoch == start_epoch else 0  # batches of this epoch already trained
            # the shuffle order is a function of (seed, epoch); a resume starts at batch `done`
            train_batches.set_epoch(epoch, view, start_batch=done)
            model.train()
            for i, (images, labels, indices) in enumerate(train_batches, start=done):
                if i >= steps_per_epoch:
                    break
                x, y = prep.train(images, labels, indices, view)
                if input_dtype is not None:
                    x = x.to(input_dtype)
                z_a = cache.teacher_logits(view, indices, acc.device) if cache is not None else None
                with acc.autocast():
                    if teacher is not None:
                        z_a = live_teacher_logits(teacher, x)
                    loss, parts = compute_loss(cfg, model, x, y, T, spiking, z_a)
                loss = fault.loss(loss, step + 1)
                stop_check.note_loss(loss)
                acc.backward(loss)  # with DeepSpeed this also clips (its config) and steps
                if cfg.optim.grad_clip and ds_config is None:
                    acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                fault.after_step(step)
                saving = bool(cfg.checkpoint_every_steps) and step % cfg.checkpoint_every_steps == 0 \
                    and i + 1 < steps_per_epoch
                check(epoch, i + 1, force=saving)
                if cfg.log_every and step % cfg.log_every == 0:
                    values = acc.reduce(torch.stack([loss.detach(), *parts.values()]).float(), "mean").tolist()
                    names = ["loss", *parts]
                    log.write(step=step, epoch=epoch, lr=scheduler.get_last_lr()[0], **dict(zip(names, values)))
                    progress.update(task, info=f"loss {values[0]:.3f}")
                if saving:
                    checkpointer.save(epoch, step, i + 1)
                progress.advance(task)
            check(epoch, steps_per_epoch, force=True)

            average_buffers(model, acc)
            counts = all_reduce_counts(
                prefix_counts(acc.unwrap_model(model), iterate_prepared(val_batches, prepare_eval), T, spiking,
                              acc.autocast), acc.device)
            result = accuracies(counts)
            checksums = acc.gather(torch.tensor([weights_checksum(model)], dtype=torch.float64,
                                                device=acc.device)).tolist()
            log.write(step=step, epoch=epoch + 1, val_total=result["total"], val_top1=result["top1"][-1],
                      val_top1_T1=result["top1"][0], val_top1_per_T=result["top1"], weights_checksums=checksums)
            if main:
                progress.console.print(f"epoch {epoch + 1}/{cfg.optim.epochs}: val top-1 {result['top1'][-1]:.2f}% "
                                       f"at T={T}" + (f", {result['top1'][0]:.2f}% at T'=1" if T > 1 else ""))
            saved = checkpointer.save(epoch + 1, step)
            weights = acc.get_state_dict(model)  # collective under ZeRO-3
            if main:
                torch_save_atomic({k: v.float() if v.is_floating_point() else v for k, v in weights.items()},
                                  run_dir / "model.pt")
            if epoch + 1 < cfg.optim.epochs:
                check(epoch + 1, 0, force=True, saved=saved)  # a signal during validation / saving
    return run_dir
