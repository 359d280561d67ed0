"""Real photos that install with the Python packages (no download), and small ImageFolder
trees cut from them: for the tests and benchmarks of the ImageNet pipeline (bench/loader.py).

Photos: scikit-learn's china.jpg and flower.jpg (always), scikit-image's astronaut, chelsea,
coffee and rocket when scikit-image is installed. A tree's classes are the photos; its images
are random crops of the photo (random size and position), optionally resized, saved as JPEG.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def bundled_photos() -> dict[str, np.ndarray]:
    """name -> RGB uint8 [H, W, 3], in a fixed order."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photos = {n: np.asarray(load_sample_image(f"{n}.jpg")) for n in ("china", "flower")}
    try:
        import skimage.data
    except ImportError:
        return photos
    for n in SKIMAGE_PHOTOS:
        img = np.asarray(getattr(skimage.data, n)())
        photos[n] = np.asarray(Image.fromarray(img).convert("RGB"))
    return photos


def write_photo_tree(root: str | os.PathLike, counts: dict[str, int], *, min_side: int = 32,
                     max_side: int = 256, resize_to: tuple[int, int] | None = None,
                     quality: int = 90, seed: int = 0) -> dict:
    """Write root/<split>/<photo>/<k>.jpg for split, n in counts (n crops per photo).

    Crops have sides uniform in [min_side, max_side] (clipped to the photo); resize_to=(w, h)
    resizes every crop (cv2 INTER_AREA shrinking, INTER_LINEAR enlarging).
    Returns {"root": Path, "classes": [photo names], "counts": {split: total}}."""
    import cv2
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    photos = bundled_photos()
    total = {}
    for split, n in counts.items():
        for name, img in photos.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                h = int(min(rng.integers(min_side, max_side + 1), img.shape[0]))
                w = int(min(rng.integers(min_side, max_side + 1), img.shape[1]))
                top = int(rng.integers(0, img.shape[0] - h + 1))
                left = int(rng.integers(0, img.shape[1] - w + 1))
                crop = img[top:top + h, left:left + w]
                if resize_to is not None:
                    shrink = resize_to[0] * resize_to[1] < w * h
                    crop = cv2.resize(crop, tuple(resize_to),
                                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
                Image.fromarray(np.ascontiguousarray(crop)).save(d / f"{k:04d}.jpg",
                                                                 quality=quality)
        total[split] = n * len(photos)
    return {"root": root, "classes": sorted(photos), "counts": total}
