"""Aspect-ratio buckets: pick the closest training shape for an image and make it exactly that."""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

Bucket = tuple[int, int]  # (width, height)

# FIBO's training shapes at 1024 (about one megapixel), as (width, height).
FIBO_BUCKETS_1024: tuple[Bucket, ...] = (
    (832, 1248),
    (896, 1152),
    (960, 1088),
    (1024, 1024),
    (1088, 960),
    (1152, 896),
    (1216, 832),
    (1280, 800),
    (1344, 768),
)


def scale_buckets(base: Sequence[Bucket], resolution: int, multiple: int) -> tuple[Bucket, ...]:
    """Scale buckets defined at 1024 to `resolution`, each side rounded to a multiple of `multiple`.

    Sides never go below `multiple`; duplicates after rounding are dropped, first one kept.
    """
    if resolution <= 0 or multiple <= 0:
        raise ValueError(f"resolution and multiple must be positive, got {resolution} and {multiple}")
    factor = resolution / 1024
    out: list[Bucket] = []
    for w, h in base:
        scaled = (round_to_multiple(w * factor, multiple), round_to_multiple(h * factor, multiple))
        if scaled not in out:
            out.append(scaled)
    return tuple(out)


def round_to_multiple(value: float, multiple: int) -> int:
    """Nearest multiple (half-up, so results never hinge on banker's rounding), at least `multiple`."""
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest in log space to width/height; ties go to the first."""
    if not buckets:
        raise ValueError("buckets must not be empty")
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(target - math.log(b[0] / b[1])))


@dataclass(frozen=True)
class CropGeometry:
    """How an image of `original_size` becomes a bucket: resized to `resized_size`, then cropped at
    `crop_top_left`. Sizes are (height, width), coordinates (top, left), as SDXL's add_time_ids use them."""

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


def crop_geometry(width: int, height: int, size: Bucket) -> CropGeometry:
    """Scale so the image covers `size` (width, height), centred crop box of exactly that size."""
    target_w, target_h = size
    scale = max(target_w / width, target_h / height)
    new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    return CropGeometry((height, width), (new_h, new_w), ((new_h - target_h) // 2, (new_w - target_w) // 2),
                        (target_h, target_w))


def resize_and_center_crop(img: Image.Image, size: Bucket) -> Image.Image:
    """Resize so the image covers `size` (width, height), then centre-crop to exactly that size."""
    if img.size == tuple(size):
        return img
    geometry = crop_geometry(img.size[0], img.size[1], size)
    (new_h, new_w), (top, left), (target_h, target_w) = geometry.resized_size, geometry.crop_top_left, geometry.target_size
    # LANCZOS: training images are mostly downscaled, where it aliases least and keeps detail.
    resized = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    return resized.crop((left, top, left + target_w, top + target_h))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a float32 tensor of shape (3, H, W) with values in [-1, 1]."""
    if img.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image, got mode {img.mode}")
    arr = np.array(img, dtype=np.uint8)  # a writable copy, so torch.from_numpy does not warn
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float() / 127.5 - 1.0
