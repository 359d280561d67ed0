"""Data: bundled datasets, FFCV writers (arrays, ImageFolder trees), loaders, replayable
augmentation (pad-crop-flip for small raw images, random resized crop + flip for photos), the
view spec, device transfer and batch preparation."""
from .augment import AUGMENT_VERSION, pad_crop_flip, view_epoch, view_params
from .batches import BatchPreparer
from .bundled import load_bundled, read_idx
from .imagefolder import write_imagefolder
from .loaders import (BetonLoader, check_beton, image_format, normalize, shard_indices, train_decoder,
                      train_loader, val_loader, view_loader)
from .spec import ViewSpec
from .transfer import Batch, device_batches
from .views import RRC_VERSION, center_view_params, rrc_view_params
from .writer import prepare_bundled, read_sidecar, sidecar_path, write_beton

__all__ = ["AUGMENT_VERSION", "pad_crop_flip", "view_epoch", "view_params", "BatchPreparer", "load_bundled",
           "read_idx", "write_imagefolder", "BetonLoader", "check_beton", "image_format", "normalize",
           "shard_indices", "train_decoder", "train_loader", "val_loader", "view_loader", "ViewSpec", "Batch",
           "device_batches", "RRC_VERSION", "center_view_params", "rrc_view_params", "prepare_bundled",
           "read_sidecar", "sidecar_path", "write_beton"]
