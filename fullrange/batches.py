"""Loader batches -> model inputs on the device.

FFCV yields uint8 images [B, C, H, W] on the CPU (reused buffers). They move to the device as
uint8 (4x fewer bytes than float), get the replayable pad-crop-flip there (training only), and
are normalised there (mean/std in pixel units from the .beton sidecar).
"""
from __future__ import annotations

import torch

from fullrange.data import normalize, pad_crop_flip


class BatchPreparer:
    def __init__(self, device: torch.device, mean: list[float], std: list[float], seed: int,
                 pad: int, flip: bool, channels_last: bool = False):
        self.device = device
        self.mean, self.std = mean, std
        self.seed, self.pad, self.flip = seed, pad, flip
        self.channels_last = channels_last

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
              epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B,C,H,W], labels [B], sample indices [B] -> (float [B,C,H,W], int64 [B]) on device.

        The crop offsets and flip bit are a function of (seed, epoch, index) only."""
        images = images.to(self.device, non_blocking=True)
        if self.pad or self.flip:
            images = pad_crop_flip(images, indices.to(self.device), self.seed, epoch, self.pad, self.flip)
        return self._finish(images), labels.to(self.device, non_blocking=True).long()

    def eval(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B,C,H,W], labels [B] -> (float [B,C,H,W], int64 [B]) on device, no augmentation."""
        images = images.to(self.device, non_blocking=True)
        return self._finish(images), labels.to(self.device, non_blocking=True).long()
