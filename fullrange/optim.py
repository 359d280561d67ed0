"""SGD with weight decay only on weights of rank >= 2, a warmup + cosine schedule per step, and an
optimizer step that skips itself on the device when a gradient is not finite.

The step (GuardedStep) computes the global gradient norm on the device (after DDP's all-reduce
it is the same on every rank), clips to it when asked, and hands `found_inf = norm is not
finite` to torch's fused SGD, which then leaves weights and momentum untouched: a NaN/inf loss
never reaches the weights, and no step waits for the host. Under fp16, accelerate's GradScaler
sets the same flag itself. (torch's fused SGD creates a momentum buffer with empty_like on its
first step and skips writing it when that step is skipped, so the buffers start as zeros here:
the first real step then computes 0.9 * 0 + g = g, exactly what torch's first step stores.)
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.sgd import sgd

from fullrange.models.memory import is_nhwc

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # fullrange.config imports SCHEDULES from here
    from fullrange.config import OptimConfig

SCHEDULES = ("step", "epoch")  # optim.schedule: where the cosine is evaluated


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: conv/linear weights decay; BatchNorm parameters and all biases (ndim <= 1) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: "OptimConfig", fused: bool = True) -> torch.optim.SGD:
    """SGD over the model's parameters (MemoryOrderSGD); fused=True (one kernel per step, and it
    can skip a step on a device flag) needs them on the CPU or a GPU."""
    return MemoryOrderSGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov, fused=fused)


class MemoryOrderSGD(torch.optim.SGD):
    """torch.optim.SGD whose step hands the update each channels_last weight, its gradient and its
    momentum buffer as contiguous views in memory order (permute(0, 2, 3, 1): the same storage,
    and the update is elementwise). torch's fused CPU kernel otherwise copies every such tensor
    to contiguous and back: 19 ms of preact-34's 480 ms CPU step (BENCHMARKS.md). A weight whose
    gradient or buffer is laid out otherwise is passed as it is. The state keeps the buffers in
    the weights' own shape, so checkpoints are torch.optim.SGD's."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list = []
            sparse = self._init_group(group, params, grads, buffers)
            momentum = group["momentum"] != 0  # else buffers stays empty
            viewed = [is_nhwc(p) and is_nhwc(g) and (not momentum or (buffers[i] is not None and is_nhwc(buffers[i])))
                      for i, (p, g) in enumerate(zip(params, grads))]
            in_order = [[t.permute(0, 2, 3, 1) if v else t for t, v in zip(ts, viewed)]
                        for ts in (params, grads, buffers)]
            sgd(*in_order,
                weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
                has_sparse_grad=sparse, foreach=group["foreach"], fused=group["fused"],
                grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None))
            if momentum:  # sgd may have created buffers (the first step) in place of None
                for p, old, new, v in zip(params, buffers, in_order[2], viewed):
                    self.state[p]["momentum_buffer"] = old if v else new
        return loss


def warmup_cosine(total_steps: int, warmup_steps: int, steps_per_epoch: int = 1):
    """Multiplier on the base lr at optimizer step s: linear warmup, then cosine decay to 0.
    steps_per_epoch > 1: the cosine moves once per epoch (constant within one), as
    CosineAnnealingLR(T_max=epochs) stepped after every epoch: 0.5 (1 + cos(pi e / E))."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) // steps_per_epoch * steps_per_epoch
        progress = done / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: "OptimConfig",
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    per = steps_per_epoch if cfg.schedule == "epoch" else 1
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup, per))


class GuardedStep:
    """Clip (grad_clip > 0), then optimizer.step() unless a gradient is inf/NaN, decided on the
    device. optimizer: the (accelerate-wrapped) fused SGD; acc: the Accelerator (unscales fp16
    gradients first)."""

    def __init__(self, acc, optimizer, params: list[torch.Tensor], grad_clip: float):
        self.acc, self.optimizer, self.params, self.grad_clip = acc, optimizer, params, grad_clip
        self.sgd = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside accelerate's
        self._zero_momentum()

    def _zero_momentum(self) -> None:
        for group in self.sgd.param_groups:
            if group["momentum"]:
                for p in group["params"]:
                    self.sgd.state[p].setdefault("momentum_buffer", torch.zeros_like(p))

    def __call__(self) -> torch.Tensor:
        """One step; returns the global gradient norm (device scalar, before clipping)."""
        scaled = self.acc.scaler is not None
        if scaled:
            self.acc.unscale_gradients()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if self.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, norm)
        if not scaled:  # the GradScaler passes its own found_inf to the fused step
            self.sgd.grad_scale, self.sgd.found_inf = None, (~torch.isfinite(norm)).float()
        try:
            self.optimizer.step()
        finally:
            self.sgd.__dict__.pop("grad_scale", None)
            self.sgd.__dict__.pop("found_inf", None)
        return norm
