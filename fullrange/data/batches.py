"""Device batches -> model inputs: the replayable pad-crop-flip (raw files, training only; the
decoder of rgb_jpeg files has already cropped and flipped), AutoAugment and Cutout when the
ViewSpec asks for them (training only), then normalisation with the
sidecar's mean/std (pixel units) into `dtype` (the autocast dtype under mixed precision),
optionally channels_last."""
from __future__ import annotations

import torch

from .augment import pad_crop_flip
from .autoaugment import autoaugment, cutout
from .loaders import normalize
from .spec import ViewSpec
from .transfer import Batch


class BatchPreparer:
    """augment=False: the loader's decoder already applied the random view."""

    def __init__(self, meta: dict, spec: ViewSpec, *, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, augment: bool = True):
        self.mean, self.std = meta["mean"], meta["std"]
        self.spec, self.dtype, self.channels_last, self.augment = spec, dtype, channels_last, augment

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std, dtype=self.dtype, channels_last=self.channels_last)

    def train(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """A device Batch -> (inputs dtype [B, C, H, W], labels int64 [B]); the random view of
        each sample is a function of (seed, batch.view, index) only."""
        images, spec, idx = batch.images, self.spec, batch.host_indices
        if self.augment and (spec.pad or spec.flip):
            images = pad_crop_flip(images, idx, spec.seed, batch.view, spec.pad, spec.flip)
        if spec.autoaugment:  # the official order: crop, flip, CIFAR10Policy, Cutout, normalise
            images = autoaugment(images, idx, spec.seed, batch.view)
        if spec.cutout:
            images = cutout(images, idx, spec.seed, batch.view, spec.cutout)
        return self._finish(images), batch.labels

    def eval(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """A device Batch -> (inputs dtype [B, C, H, W], labels int64 [B]), no augmentation."""
        return self._finish(batch.images), batch.labels
