"""Losses of full-range distillation and the baselines, as pure functions on tensors.

Shapes: student logits ``z`` are ``[T, B, C]`` (time-major), labels ``y`` are ``[B]`` int64,
teacher logits ``z_a`` are ``[B, C]`` (detached). KL terms are summed over classes and
averaged over the batch, scaled by ``tau**2`` (PAPER.md, "Losses").

Every loss returns ``(loss, parts)`` where ``parts`` maps a term's name to a detached scalar
for logging.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SD_TARGETS = ("ensemble", "correct_only")
LOSS_KINDS = ("full_range", "skd", "tet", "ce")
NEEDS_TEACHER = {"full_range": True, "skd": True, "tet": False, "ce": False}


def _check_logits(z: torch.Tensor, y: torch.Tensor) -> None:
    if z.dim() != 3:
        raise ValueError(f"student logits must be [T, B, C], got shape {tuple(z.shape)}")
    if y.shape != (z.shape[1],):
        raise ValueError(f"labels must be [B]={z.shape[1]}, got shape {tuple(y.shape)}")


def kl_to_target(target_logits: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(S(target/tau) || S(logits/tau)), summed over classes, mean over batch.

    ``target_logits`` and ``logits`` broadcast to ``[..., B, C]``; the result averages every
    leading dimension too (so a ``[T, B, C]`` input gives the time-mean of per-step KLs).
    """
    log_p_target = F.log_softmax(target_logits.float() / tau, dim=-1)
    log_p = F.log_softmax(logits.float() / tau, dim=-1)
    kl = (log_p_target.exp() * (log_p_target - log_p)).sum(-1)
    return kl.mean() * tau * tau


def twce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Time-wise CE: (1/T) sum_t CE(z_t, y).  z [T,B,C], y [B] -> scalar."""
    T = z.shape[0]
    return F.cross_entropy(z.float().flatten(0, 1), y.repeat(T))


def twkl(z: torch.Tensor, z_a: torch.Tensor, tau: float) -> torch.Tensor:
    """Time-wise KD: (1/T) sum_t tau^2 KL(S(z_a/tau) || S(z_t/tau)).  z [T,B,C], z_a [B,C]."""
    return kl_to_target(z_a.detach().unsqueeze(0), z, tau)


def self_distillation_target(z: torch.Tensor, y: torch.Tensor, sd_target: str) -> torch.Tensor:
    """Detached target for TWSD, [B, C].

    ``ensemble``: the mean logit over all T (the paper).
    ``correct_only``: the mean over the timesteps whose argmax equals the label, or a zero
    vector when none is correct (the official code).
    """
    z = z.detach().float()
    if sd_target == "ensemble":
        return z.mean(0)
    if sd_target == "correct_only":
        correct = (z.argmax(-1) == y.unsqueeze(0)).float()  # [T, B]
        n = correct.sum(0)  # [B]
        summed = (z * correct.unsqueeze(-1)).sum(0)  # [B, C]
        return summed / n.clamp_min(1).unsqueeze(-1)
    raise ValueError(f"sd_target must be one of {SD_TARGETS}, got {sd_target!r}")


def twsd(z: torch.Tensor, y: torch.Tensor, tau: float, sd_target: str = "ensemble") -> torch.Tensor:
    """Time-wise self-distillation: (1/T) sum_t tau^2 KL(S(target/tau) || S(z_t/tau))."""
    target = self_distillation_target(z, y, sd_target)
    return kl_to_target(target.unsqueeze(0), z, tau)


def full_range_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                    alpha: float = 0.2, beta: float = 0.5, tau: float = 1.0,
                    sd_target: str = "ensemble") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = TWCE + alpha * TWKL + beta * TWSD.  student [T,B,C], labels [B], teacher [B,C]."""
    _check_logits(student_logits, labels)
    ce = twce(student_logits, labels)
    kd = twkl(student_logits, teacher_logits, tau)
    sd = twsd(student_logits, labels, tau, sd_target)
    loss = ce + alpha * kd + beta * sd
    return loss, {"twce": ce.detach(), "twkl": kd.detach(), "twsd": sd.detach()}


def skd_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
             alpha: float = 0.2, tau: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Standard logit KD on the time-mean: CE(z_ens, y) + alpha * tau^2 KL(S(z_a/tau) || S(z_ens/tau))."""
    _check_logits(student_logits, labels)
    z_ens = student_logits.float().mean(0)
    ce = F.cross_entropy(z_ens, labels)
    kd = kl_to_target(teacher_logits.detach(), z_ens, tau)
    return ce + alpha * kd, {"ce": ce.detach(), "kd": kd.detach()}


def tet_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TET-style: TWCE alone."""
    _check_logits(student_logits, labels)
    ce = twce(student_logits, labels)
    return ce, {"twce": ce.detach()}


def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain CE on the time-mean logit."""
    _check_logits(student_logits, labels)
    ce = F.cross_entropy(student_logits.float().mean(0), labels)
    return ce, {"ce": ce.detach()}


def student_loss(kind: str, student_logits: torch.Tensor, labels: torch.Tensor,
                 teacher_logits: torch.Tensor | None, alpha: float, beta: float, tau: float,
                 sd_target: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dispatch on the configured loss kind (one of LOSS_KINDS)."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")
    if NEEDS_TEACHER[kind] and teacher_logits is None:
        raise ValueError(f"loss {kind!r} needs teacher logits")
    if kind == "full_range":
        return full_range_loss(student_logits, labels, teacher_logits, alpha, beta, tau, sd_target)
    if kind == "skd":
        return skd_loss(student_logits, labels, teacher_logits, alpha, tau)
    if kind == "tet":
        return tet_loss(student_logits, labels)
    return ce_loss(student_logits, labels)
