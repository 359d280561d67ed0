"""Data: bundled datasets, FFCV writer, loaders, replayable augmentation."""
from .augment import AUGMENT_VERSION, pad_crop_flip, view_params
from .bundled import load_bundled, read_idx
from .loaders import (BetonLoader, check_beton, normalize, shard_indices, train_loader,
                      val_loader)
from .writer import prepare_bundled, read_sidecar, sidecar_path, write_beton

__all__ = ["AUGMENT_VERSION", "pad_crop_flip", "view_params", "load_bundled", "read_idx",
           "BetonLoader", "check_beton", "normalize", "shard_indices", "train_loader",
           "val_loader", "prepare_bundled", "read_sidecar", "sidecar_path", "write_beton"]
