"""The trainer: build_* steps, then epochs of train_step (batch -> targets -> loss -> backward ->
step), validation at every T' <= T and a checkpoint.

Trains an ANN teacher (CE) or a spiking student whose teacher is live (run in every step) or
cached (fullrange.teacher_cache), on DDP or DeepSpeed ZeRO (fullrange.deepspeed_support), in the
launch's precision (fullrange.runtime). Outputs in RUN = out_dir/name: config.yaml (resolved),
environment.json (precision, processes, device, versions), metrics.jsonl, checkpoints/ (the
last accelerator state: an epoch's end, or a step inside an epoch with checkpoint_every_steps)
and model.pt (the last epoch's weights as a plain fp32 state_dict).

A step syncs the host with the device only on log steps and on the ranks' stop agreement
(every stop_check_every steps, and before every save): a preemption signal -> checkpoint +
Preempted, a non-finite loss -> NonFiniteLoss with nothing saved after the last good
checkpoint (fullrange.preemption). A non-finite gradient never reaches the weights
(fullrange.optim.GuardedStep). Resume is exact: a step checkpoint records (epoch, batches
done), and the resumed run replays that epoch's order from the first batch not yet trained.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from rich.console import Console
from torch import nn

from fullrange import deepspeed_support
from fullrange.atomic import torch_save_atomic, write_text_atomic
from fullrange.checkpoint import Checkpointer
from fullrange.config import ConfigError, RunConfig, save_config
from fullrange.data import BatchPreparer, ViewSpec, device_batches, train_loader, val_loader, view_epoch
from fullrange.evaluate import accuracies, all_reduce_counts, logits_over_time, prefix_counts
from fullrange.inputs import check_inputs
from fullrange.losses import NEEDS_TEACHER, student_loss
from fullrange.metrics import MetricsLog, StepClock, trim_metrics
from fullrange.models import build_model, is_spiking
from fullrange.models.memory import set_fusion, set_memory
from fullrange.optim import GuardedStep, build_optimizer, build_scheduler
from fullrange.preemption import EXIT_REQUEUE, NonFiniteLoss, Preempted, StopCheck, StopSignals, write_requeue_file
from fullrange.progress import progress_bar
from fullrange.runtime import autocast, describe, input_dtype, make_accelerator, seed_everything
from fullrange.targets import LiveTeacher, TeacherTargets
from fullrange.teachers import load_teacher

StepHook = Callable[[int, nn.Module], None]  # called after every optimizer step with (step, model)


def build_model_for(cfg: RunConfig, acc: Accelerator, console: Console) -> nn.Module:
    """The student or teacher of cfg, in its memory mode (model.memory, students; and
    model.stem_once), with
    SyncBatchNorm (model.sync_bn, multi-process CUDA), channels_last weights (data.channels_last,
    not under DeepSpeed) and a compiled forward (model.compile)."""
    model = build_model(cfg.model.name, cfg.model.num_classes, cfg.model.in_channels, vars(cfg.neuron))
    if is_spiking(cfg.model.name):
        set_fusion(set_memory(model, cfg.model.memory, cfg.model.recompute_blocks), cfg.model.fuse_bn_lif)
        model.stem_once = cfg.model.stem_once
    if cfg.model.sync_bn and acc.num_processes > 1:
        if acc.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif acc.is_main_process:
            console.print("warning: model.sync_bn: torch has no SyncBatchNorm on the CPU; BatchNorm "
                          "statistics stay per process")
    if cfg.data.channels_last and deepspeed_support.deepspeed_config(acc) is None:
        model = model.to(memory_format=torch.channels_last)
    if cfg.model.compile:
        model.compile()
    return model


def build_targets(cfg: RunConfig, acc: Accelerator, cache) -> TeacherTargets | None:
    """The KD targets of the run: the checked cache, a live teacher, or None (no KD term)."""
    if not NEEDS_TEACHER[cfg.loss.kind]:
        return None
    if cache is not None:
        return cache
    teacher = load_teacher(cfg).to(acc.device)
    if cfg.data.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return LiveTeacher(teacher)


def build_loaders(cfg: RunConfig, acc: Accelerator, spec: ViewSpec):
    """(train loader of this process's share of the global batch, val loader of its shard)."""
    d = cfg.data
    train = train_loader(d.train_path, d.batch_size // acc.num_processes, d.num_workers, spec,
                         distributed=acc.num_processes > 1, os_cache=d.os_cache, batches_ahead=d.batches_ahead)
    val = val_loader(d.val_path, d.val_batch_size, d.num_workers, acc.process_index, acc.num_processes, spec,
                     os_cache=d.os_cache, batches_ahead=d.batches_ahead)
    return train, val


class Trainer:
    """The components of one run, built once; fit() trains it."""

    def __init__(self, cfg: RunConfig, acc: Accelerator, signals: StopSignals, hooks: Sequence[StepHook] = ()):
        self.cfg, self.acc, self.hooks = cfg, acc, tuple(hooks)
        self.console = Console(stderr=True)
        meta, cache = check_inputs(cfg, acc.num_processes)
        self.precision = acc.mixed_precision  # before prepare: DeepSpeed's is turned off there
        self.spiking = is_spiking(cfg.model.name)
        self.T = cfg.model.T if self.spiking else 1
        seed_everything(cfg.seed)
        ds = deepspeed_support.deepspeed_config(acc)
        model = build_model_for(cfg, acc, self.console)
        self.targets = build_targets(cfg, acc, cache)
        spec = ViewSpec.from_config(cfg)
        self.train_batches, self.val_batches = build_loaders(cfg, acc, spec)
        self.steps_per_epoch = self._steps_per_epoch(meta)
        self.prep = BatchPreparer(meta, spec, dtype=input_dtype(self.precision), channels_last=cfg.data.channels_last,
                                  augment=not self.train_batches.augmented)
        optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.steps_per_epoch)
        if ds is not None:
            deepspeed_support.fit_config(ds, cfg, cfg.data.batch_size // acc.num_processes)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)  # stepped by us once per optimizer step
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.guarded_step = GuardedStep(acc, self.optimizer, params, cfg.optim.grad_clip) if ds is None else None
        self.checkpointer = Checkpointer(cfg.run_dir, acc)
        self.stop = StopCheck(signals, acc.device, acc.process_index, acc.num_processes, cfg.stop_check_every)
        self.log = MetricsLog(cfg.run_dir / "metrics.jsonl", acc, trackers=bool(cfg.log_with))
        self.clock = StepClock(acc.device)
        self.deepspeed = ds is not None
        self.epoch = self.step = 0

    def _steps_per_epoch(self, meta: dict) -> int:
        steps = len(self.train_batches)
        if self.cfg.max_steps_per_epoch:
            steps = min(steps, self.cfg.max_steps_per_epoch)
        if steps == 0:
            raise ConfigError(f"config key data.batch_size: {self.cfg.data.batch_size} is larger than the training "
                              f"set ({meta['num_samples']} samples): no full batch per epoch")
        return steps

    def train_step(self, batch) -> tuple[torch.Tensor, dict]:
        """One optimizer step on a device Batch; returns (loss, its parts), detached, on the device."""
        cfg = self.cfg
        x, y = self.prep.train(batch)
        with autocast(self.acc.device, self.precision):
            z_a = self.targets.targets(x, batch.host_indices, batch.view) if self.targets else None
            z = logits_over_time(self.model, x, self.T, self.spiking)
            loss, parts = student_loss(cfg.loss.kind, z, y, z_a, cfg.loss.alpha, cfg.loss.beta, cfg.loss.tau,
                                       cfg.loss.sd_target)
        self.acc.backward(loss)  # DeepSpeed: also clips, checks for inf/NaN and steps
        if self.guarded_step is not None:
            self.guarded_step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), parts

    def resume(self) -> int:
        """Restore the last checkpoint when cfg.resume; returns the batches of self.epoch done."""
        last = self.checkpointer.latest() if self.cfg.resume else None
        if last is None:  # a fresh start: no lines of an earlier attempt that saved nothing
            if self.acc.is_main_process:
                trim_metrics(self.cfg.run_dir / "metrics.jsonl", 0)
            return 0
        state = self.checkpointer.load(last)
        self.epoch, self.step = state["epoch"], state["step"]
        if self.acc.is_main_process:
            trim_metrics(self.cfg.run_dir / "metrics.jsonl", self.step)
            self.console.print(f"resuming {self.cfg.run_dir} from {last.name} (epoch {self.epoch}, batch "
                               f"{state['batch']}, step {self.step})")
        return state["batch"]

    def agree_to_stop(self, batch: int, force: bool = False, saved: Path | None = None) -> None:
        """The ranks' stop agreement at a step boundary (every stop_check_every steps, or force)."""
        stop, bad_ranks = self.stop.check(self.step, force)
        if bad_ranks:
            last = self.checkpointer.latest()
            raise NonFiniteLoss(f"non-finite loss (NaN or inf) on rank(s) {bad_ranks} by step {self.step} (epoch "
                                f"{self.epoch}); stopped; nothing saved after the last good checkpoint "
                                f"{last if last else '(none: no checkpoint yet)'}")
        if stop:
            path = saved or self.checkpointer.save(self.epoch, self.step, batch)
            if self.acc.is_main_process:
                write_requeue_file({"reason": stop, "epoch": self.epoch, "batch": batch, "step": self.step,
                                    "checkpoint": str(path)})
            self.acc.wait_for_everyone()
            raise Preempted(f"preempted ({stop}) at epoch {self.epoch} batch {batch} (step {self.step}); checkpoint "
                            f"{path}; rerun with resume=true to continue (exit {EXIT_REQUEUE}: requeue)", path)

    def log_step(self, loss: torch.Tensor, parts: dict, progress, task) -> None:
        """The loss and its parts (mean over ranks), lr, throughput and memory (a host sync)."""
        values = self.acc.reduce(torch.stack([loss, *parts.values()]).float(), "mean").tolist()
        speed = self.clock.report(self.cfg.data.batch_size, self.T)
        self.log.write(self.step, epoch=self.epoch, lr=self.scheduler.get_last_lr()[0],
                       **dict(zip(["loss", *parts], values)), **speed)
        progress.update(task, info=f"loss {values[0]:.3f} {speed['img_per_s']:.0f} img/s")

    def train_epoch(self, done: int, progress, task) -> None:
        """The batches of self.epoch from batch `done` on (done > 0: resumed inside the epoch)."""
        cfg, loader = self.cfg, self.train_batches
        loader.set_epoch(self.epoch, view_epoch(self.epoch, cfg.data.views), start_batch=done)
        self.model.train()
        self.clock.reset()
        for i, batch in enumerate(device_batches(loader, self.acc.device, loader.epoch_view), start=done):
            if i >= self.steps_per_epoch:
                break
            self.clock.got_batch()
            loss, parts = self.train_step(batch)
            self.stop.note_loss(loss)
            self.step += 1
            for hook in self.hooks:
                hook(self.step, self.model)
            saving = bool(cfg.checkpoint_every_steps) and self.step % cfg.checkpoint_every_steps == 0 \
                and i + 1 < self.steps_per_epoch
            if cfg.log_every and self.step % cfg.log_every == 0:
                self.log_step(loss, parts, progress, task)  # before a stop: a preempted step keeps its line
            self.agree_to_stop(i + 1, force=saving)
            if saving:
                self.checkpointer.save(self.epoch, self.step, i + 1)
            progress.advance(task)
            self.clock.step_done()
        self.agree_to_stop(self.steps_per_epoch, force=True)

    def validate(self) -> dict:
        """Top-1/top-5 at every T' <= T over the whole validation set (exact over ranks), logged."""
        acc = self.acc
        average_buffers(self.model, acc)
        batches = (self.prep.eval(b) for b in device_batches(self.val_batches, acc.device))
        counts = prefix_counts(acc.unwrap_model(self.model), batches, self.T, self.spiking,
                               lambda: autocast(acc.device, self.precision))
        result = accuracies(all_reduce_counts(counts, acc.device))
        checksums = acc.gather(torch.tensor([weights_checksum(self.model)], dtype=torch.float64,
                                            device=acc.device)).tolist()
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in self.model.state_dict().values()})
        per_T = {f"val/top1_T{t + 1}": v for t, v in enumerate(result["top1"])}
        self.log.write(self.step, {"val/top1": result["top1"][-1], **per_T, "epoch": self.epoch + 1},
                       epoch=self.epoch + 1, val_total=result["total"], val_top1=result["top1"][-1],
                       val_top1_T1=result["top1"][0], val_top1_per_T=result["top1"], weights_checksums=checksums,
                       weights_dtypes=dtypes)
        return result

    def save_epoch(self) -> Path:
        """Checkpoint after epoch self.epoch, and model.pt (fp32 state_dict) on the main process."""
        saved = self.checkpointer.save(self.epoch + 1, self.step)
        weights = self.acc.get_state_dict(self.model)  # collective under ZeRO-3
        if self.acc.is_main_process:
            torch_save_atomic({k: v.float() if v.is_floating_point() else v for k, v in weights.items()},
                              self.cfg.run_dir / "model.pt")
        return saved

    def start(self) -> int:
        """Resume if asked, write config.yaml and environment.json; returns batches done."""
        done = self.resume()
        if self.acc.is_main_process:
            run_dir = self.cfg.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, run_dir / "config.yaml")
            write_text_atomic(run_dir / "environment.json", json.dumps(describe(self.acc, self.precision), indent=1))
            self.console.print(f"[bold]{self.cfg.name}[/]: {self.cfg.model.name} T={self.T} loss={self.cfg.loss.kind} "
                               f"on {self.acc.num_processes} process(es){' with DeepSpeed' if self.deepspeed else ''}, "
                               f"precision {self.precision}, {self.steps_per_epoch} steps/epoch x "
                               f"{self.cfg.optim.epochs} epochs")
        if self.cfg.log_with:
            self.acc.init_trackers("trackers", config=tracker_config(self.cfg))
        return done

    def fit(self) -> Path:
        cfg, main = self.cfg, self.acc.is_main_process
        done = self.start()
        with progress_bar(self.console, main, info=True) as progress:
            task = progress.add_task(cfg.name, total=cfg.optim.epochs * self.steps_per_epoch,
                                     completed=self.epoch * self.steps_per_epoch + done, info="")
            while self.epoch < cfg.optim.epochs:
                self.train_epoch(done, progress, task)
                result = self.validate()
                if main:
                    progress.console.print(f"epoch {self.epoch + 1}/{cfg.optim.epochs}: val top-1 "
                                           f"{result['top1'][-1]:.2f}% at T={self.T}"
                                           + (f", {result['top1'][0]:.2f}% at T'=1" if self.T > 1 else ""))
                saved = self.save_epoch()
                self.epoch, done = self.epoch + 1, 0
                if self.epoch < cfg.optim.epochs:
                    self.agree_to_stop(0, force=True, saved=saved)  # a signal during validation / saving
        for tracker in self.acc.trackers:
            tracker.finish()
        return cfg.run_dir


def tracker_config(cfg: RunConfig) -> dict:
    """The run config as flat scalars (section.key -> value; lists as text), for trackers."""
    from fullrange.config import to_dict

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = ",".join(v) if isinstance(v, list) else v
        return out

    return flat(to_dict(cfg))


def average_buffers(model: nn.Module, accelerator: Accelerator) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks.

    DDP keeps parameters equal, but each rank's last forward updates its own running
    statistics; averaging them makes evaluation and the saved weights rank-independent."""
    if accelerator.num_processes == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            buf.copy_(accelerator.reduce(buf.detach().clone(), "mean"))


def weights_checksum(model: nn.Module) -> float:
    """Sum of every floating-point parameter and buffer, in float64 (compares ranks)."""
    return float(sum(t.double().sum() for t in model.state_dict().values() if t.is_floating_point()))


def train(cfg: RunConfig, accelerator: Accelerator | None = None, hooks: Sequence[StepHook] = ()) -> Path:
    """Train the configured run; returns the run directory. hooks: called after every
    optimizer step with (step, model) (tests inject faults this way).

    Raises Preempted (SIGTERM / SIGUSR1: a step checkpoint was written) or NonFiniteLoss (the
    last good checkpoint is kept) on every rank; see fullrange.preemption for exit codes."""
    acc = accelerator or make_accelerator(cfg.dist_timeout_s)
    with StopSignals() as signals:
        return Trainer(cfg, acc, signals, hooks).fit()
