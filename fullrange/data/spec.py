"""ViewSpec: everything besides the stored pixels that decides what a model sees, built once
per run from the config and passed to the loaders, the batch preparer and the teacher cache.

Raw small images (image_format "raw") get pad_crop_flip on the device (pad, flip); JPEG/RGB
files (ImageNet) get the replayable random resized crop in the decoder (image_size, scale,
ratio, flip) and a centre crop for validation (val_image_size, val_crop_ratio). Then, for
either, optionally AutoAugment and Cutout on the device (the official CIFAR recipe). Every
random draw is a function of (seed, augmentation epoch, sample index).
"""
from __future__ import annotations

from dataclasses import dataclass

from .views import DEFAULT_RATIO, DEFAULT_SCALE


@dataclass(frozen=True)
class ViewSpec:
    seed: int = 0
    pad: int = 4                                    # raw: zero-pad, then crop back (pixels)
    flip: bool = True                               # random horizontal flip
    image_size: int = 224                           # rgb_jpeg: random-resized-crop output
    scale: tuple[float, float] = DEFAULT_SCALE      # rgb_jpeg: crop area range
    ratio: tuple[float, float] = DEFAULT_RATIO      # rgb_jpeg: crop aspect range
    val_image_size: int = 224                       # rgb_jpeg: centre-crop output
    val_crop_ratio: float = 0.875                   # rgb_jpeg: centre crop / shorter side
    autoaugment: bool = False                       # AutoAugment (CIFAR10Policy) after the crop and flip
    cutout: int = 0                                 # Cutout hole side after AutoAugment (pixels); 0: none

    @classmethod
    def from_config(cls, cfg) -> "ViewSpec":
        """The spec of a RunConfig (its seed and data section)."""
        d = cfg.data
        return cls(seed=cfg.seed, pad=d.pad, flip=d.flip, image_size=d.image_size,
                   scale=(d.rrc_scale_min, DEFAULT_SCALE[1]), ratio=DEFAULT_RATIO,
                   val_image_size=d.val_image_size or d.image_size, val_crop_ratio=d.val_crop_ratio,
                   autoaugment=d.autoaugment, cutout=d.cutout)

    def recipe(self, meta: dict) -> dict:
        """What decides a training view of the .beton whose sidecar is `meta` (teacher-cache
        manifests compare it): raw files -> pad_crop_flip's hash version, seed, pad and flip;
        rgb_jpeg files -> the training decoder's recipe."""
        from .loaders import train_decoder

        decoder = train_decoder(meta, self)
        if decoder is not None:
            recipe = decoder.recipe()
        else:
            from .augment import AUGMENT_VERSION

            recipe = {"view": f"pad-crop-flip {AUGMENT_VERSION}", "seed": int(self.seed), "pad": int(self.pad),
                      "flip": bool(self.flip)}
        from .autoaugment import AUTOAUGMENT_VERSION, CUTOUT_VERSION

        if self.autoaugment:
            recipe["autoaugment"] = AUTOAUGMENT_VERSION
        if self.cutout:
            recipe["cutout"] = f"{CUTOUT_VERSION} {self.cutout}px"
        return recipe
