"""Top-k teacher logits: what one cached (view, sample) holds and how the KD target is rebuilt.

A record is k fp16 values and k uint16 class indices (4k bytes: 64 B at k = 16, against 2000 B
for the full fp16 logits of 1000 classes):

    classes = the teacher's k largest logits' classes (largest first)
    m       = log-mean-exp of the logits of the other C - k classes
              (of all C classes when k = C)
    values  = fp16(logit[classes] - m)

Rebuilding (``rebuild_logits``) puts ``values`` at ``classes`` and 0 everywhere else. Softmax
ignores a shift of all logits, so:
- k = C: softmax(rebuilt / tau) is the teacher's softmax(z / tau) at every tau, up to fp16
  rounding of the values (exact KD target);
- k < C: at tau = 1 the k cached classes get exactly the teacher's probabilities and the
  remaining mass (1 - their sum) is spread evenly over the other C - k classes (the rule of
  FKD); at tau != 1 the ratios among the cached classes are exact, and the other classes are
  treated as if all their logits equalled m (their spread among themselves is lost).
Every value is >= 0 (m is at most the largest logit outside the top k), so fp16 holds them with
a relative error of at most 2**-11.
"""
from __future__ import annotations

import math

import numpy as np
import torch

MAX_CLASSES = 1 << 16  # class indices are stored as uint16


def record_dtype(k: int) -> np.dtype:
    """numpy structured dtype of one record: logits fp16 [k], classes uint16 [k]."""
    return np.dtype([("logits", "<f2", (k,)), ("classes", "<u2", (k,))])


def effective_k(topk: int, num_classes: int) -> int:
    """The k a cache stores: min(topk, num_classes)."""
    if topk < 1 or not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"topk {topk} must be >= 1 and num_classes {num_classes} in [1, {MAX_CLASSES}]")
    return min(topk, num_classes)


def compress_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits [B, C] (any float dtype) -> (values fp16 [B, k], classes int64 [B, k])."""
    if logits.dim() != 2 or not 1 <= k <= logits.shape[1]:
        raise ValueError(f"logits must be [B, C] with C >= k={k}, got shape {tuple(logits.shape)}")
    z = logits.float()
    num_classes = z.shape[1]
    top, classes = z.topk(k, dim=1)
    if k == num_classes:
        m = z.logsumexp(dim=1) - math.log(num_classes)
    else:
        rest = z.scatter(1, classes, float("-inf"))
        m = rest.logsumexp(dim=1) - math.log(num_classes - k)
    return (top - m[:, None]).half(), classes


def rebuild_logits(values: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """values [B, k] (fp16), classes [B, k] (int) -> float32 logits [B, num_classes] whose
    softmax is the KD target described in the module docstring."""
    out = torch.zeros(values.shape[0], num_classes, dtype=torch.float32, device=values.device)
    return out.scatter_(1, classes.long(), values.float())


def to_records(values: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """(values fp16 [B, k], classes [B, k]) -> numpy records [B] of record_dtype(k)."""
    k = values.shape[1]
    rec = np.empty(values.shape[0], record_dtype(k))
    rec["logits"] = values.detach().cpu().numpy().astype("<f2", copy=False)
    rec["classes"] = classes.detach().cpu().numpy().astype("<u2")
    return rec


def from_records(rec: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """numpy records [B] -> (values fp16 [B, k], classes int64 [B, k]) CPU tensors."""
    values = torch.from_numpy(np.ascontiguousarray(rec["logits"]))
    classes = torch.from_numpy(rec["classes"].astype(np.int64))
    return values, classes
