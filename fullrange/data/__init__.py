"""Data: bundled datasets, FFCV writers (arrays, ImageFolder trees), loaders, replayable
augmentation (pad-crop-flip for small raw images, random resized crop + flip for photos)."""
from .augment import AUGMENT_VERSION, pad_crop_flip, view_epoch, view_params
from .bundled import load_bundled, read_idx
from .imagefolder import write_imagefolder
from .loaders import (BetonLoader, check_beton, image_format, normalize, shard_indices,
                      train_loader, train_view_recipe, val_loader, view_loader, view_options)
from .views import RRC_VERSION, center_view_params, rrc_view_params
from .writer import prepare_bundled, read_sidecar, sidecar_path, write_beton

__all__ = ["AUGMENT_VERSION", "pad_crop_flip", "view_epoch", "view_params", "load_bundled", "read_idx",
           "write_imagefolder", "BetonLoader", "check_beton", "image_format", "normalize",
           "shard_indices", "train_loader", "train_view_recipe", "val_loader", "view_loader",
           "view_options", "RRC_VERSION",
           "center_view_params", "rrc_view_params", "prepare_bundled", "read_sidecar",
           "sidecar_path", "write_beton"]
