"""What the fused BatchNorm + LIF kernels (bn_lif_cpu, bn_lif) share with nn.BatchNorm2d's training step."""
from __future__ import annotations

import torch


def running_stats_weight(bn: torch.nn.BatchNorm2d) -> float:
    """Advance bn.num_batches_tracked as bn(x) does in training, and return the weight of this
    batch's statistics in the running ones: bn.momentum, or 1 / batches when momentum is None
    (the cumulative average; reading the counter is a host sync on a GPU, as in nn.BatchNorm2d)."""
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else float(bn.momentum)
    return float(bn.momentum) if bn.momentum is not None else 0.0
