"""Cached VAE latents and text-encoder outputs, one safetensors file per sample.

A cache entry is keyed by the sample id AND a digest of everything that determines its content
(base model, family options, bucket, image bytes, caption), never by a step or batch index:
shuffled loaders over step-indexed caches silently pair one image with another's caption
(a bug found in other trainers). Entries are written atomically, so a crash never leaves a torn file.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..data import CropGeometry, Sample, crop_geometry, load_rgb, resize_and_center_crop, to_tensor
from ..errors import OutOfMemoryError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class CacheItem:
    sample: Sample
    bucket: tuple[int, int]
    key: str


class FeatureCache:
    def __init__(self, directory: Path, namespace: str):
        """`namespace` fingerprints the family, base weights and options that shape every entry."""
        self.directory = Path(directory)
        self.namespace = namespace

    def item(self, sample: Sample, bucket: tuple[int, int]) -> CacheItem:
        digest = hashlib.sha256(
            "\0".join([self.namespace, sample.content_hash, sample.caption, f"{bucket[0]}x{bucket[1]}"]).encode()
        ).hexdigest()[:24]
        return CacheItem(sample, bucket, f"{_UNSAFE.sub('_', sample.sample_id)}-{digest}")

    def path(self, item: CacheItem) -> Path:
        return self.directory / f"{item.key}.safetensors"

    def has(self, item: CacheItem) -> bool:
        return self.path(item).is_file()

    def load(self, item: CacheItem) -> dict[str, torch.Tensor]:
        return load_file(self.path(item))

    def shapes(self, item: CacheItem) -> dict[str, tuple[int, ...]]:
        """An entry's tensor shapes, from the file header alone."""
        with safe_open(self.path(item), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}

    def store(self, item: CacheItem, tensors: dict[str, torch.Tensor]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(item)
        staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, staging)
        os.replace(staging, final)


def fill_cache(
    cache: FeatureCache,
    items: list[CacheItem],
    encode: Callable[[torch.Tensor, str, CropGeometry], dict[str, torch.Tensor]],
    *,
    rank: int,
    world_size: int,
    max_pixels: int,
) -> int:
    """Encode this process's share (every world_size-th item) of what is missing; returns how many
    it encoded. Callers put a barrier after it so every process then finds every entry."""
    encoded = 0
    for index, item in enumerate(items):
        if index % world_size != rank or cache.has(item):
            continue
        original = load_rgb(item.sample.image_path, max_pixels=max_pixels)
        geometry = crop_geometry(original.size[0], original.size[1], item.bucket)
        image = resize_and_center_crop(original, item.bucket)
        try:
            features = encode(to_tensor(image).unsqueeze(0), item.sample.caption, geometry)
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not _out_of_memory(exc):
                raise
            raise OutOfMemoryError(
                f"out of memory while encoding {item.sample.sample_id} at {item.bucket[0]}x{item.bucket[1]} "
                f"({str(exc).splitlines()[0][:200]}). Lower data.resolution (the buckets scale with it) or, for "
                "long captions, model.max_sequence_length, or run fewer processes per GPU. Nothing was trained; "
                f"the features already cached in {cache.directory} are kept and reused."
            ) from None
        cache.store(item, features)
        encoded += 1
    return encoded


def _out_of_memory(exc: BaseException) -> bool:
    """An accelerator out of memory, or the CPU allocator failing (a plain RuntimeError in torch)."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


class CachedFeatures(torch.utils.data.Dataset):
    """Index -> (index, cached tensors); the loader's collate turns a bucket's entries into a batch."""

    def __init__(self, cache: FeatureCache, items: list[CacheItem]):
        self.cache = cache
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, dict[str, torch.Tensor]]:
        return index, self.cache.load(self.items[index])


class CollateWithIndices:
    """A picklable collate (DataLoader workers need one) that keeps the sample indices."""

    def __init__(self, collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]):
        self.collate = collate

    def __call__(self, entries: list[tuple[int, dict[str, torch.Tensor]]]) -> tuple[list[int], dict[str, torch.Tensor]]:
        return [i for i, _ in entries], self.collate([e for _, e in entries])
