"""Loader batches -> model inputs on the device.

FFCV yields uint8 images [B, C, H, W] on the CPU (reused buffers). They move to the device as
uint8 (4x fewer bytes than float), get the replayable pad-crop-flip there (training only, and
only when the loader's decoder has not already augmented: rgb_jpeg files are cropped and
flipped by the decoder, see fullrange.data.loaders), and are normalised there (mean/std in
pixel units from the .beton sidecar) into `dtype` (bf16 on GPU halves the bytes again),
optionally in channels_last memory.
"""
from __future__ import annotations

import torch

from fullrange.data import normalize, pad_crop_flip


class BatchPreparer:
    """augment=False: the loader's decoder already applied the random view (pad and flip are
    then ignored). dtype: of the normalised images (float32, or bfloat16 under bf16 autocast)."""

    def __init__(self, device: torch.device, mean: list[float], std: list[float], seed: int,
                 pad: int, flip: bool, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32, augment: bool = True):
        self.device = device
        self.mean, self.std = mean, std
        self.seed, self.pad, self.flip = seed, pad, flip
        self.channels_last = channels_last
        self.dtype, self.augment = dtype, augment

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std, dtype=self.dtype,
                         channels_last=self.channels_last)

    def train(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
              epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B,C,H,W], labels [B], sample indices [B] -> (dtype [B,C,H,W], int64 [B]) on device.

        The crop offsets and flip bit are a function of (seed, epoch, index) only."""
        images = images.to(self.device, non_blocking=True)
        if self.augment and (self.pad or self.flip):
            images = pad_crop_flip(images, indices.to(self.device), self.seed, epoch, self.pad, self.flip)
        return self._finish(images), labels.to(self.device, non_blocking=True).long()

    def eval(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B,C,H,W], labels [B] -> (dtype [B,C,H,W], int64 [B]) on device, no augmentation."""
        images = images.to(self.device, non_blocking=True)
        return self._finish(images), labels.to(self.device, non_blocking=True).long()
