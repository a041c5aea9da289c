"""Cached VAE latents and text-encoder outputs, one safetensors file per sample.

A cache entry is keyed by the sample id AND a digest of everything that determines its content
(base model, family options, bucket, image bytes, caption), never by a step or batch index:
shuffled loaders over step-indexed caches silently pair one image with another's caption
(a bug found in other trainers). Entries are written atomically, so a crash never leaves a torn file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..data import CropGeometry, Sample, crop_geometry, load_rgb, resize_and_center_crop, to_tensor
from ..errors import OutOfMemoryError

log = logging.getLogger(__name__)
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

    def load(self, item: CacheItem, keys: Iterable[str] | None = None,
             skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """The entry's tensors (only `keys`, none of `skip`): the file is memory-mapped and only
        what is asked for is read."""
        skip = set(skip)
        with safe_open(self.path(item), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in (handle.keys() if keys is None else keys) if key not in skip}

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


def choose_text_features(mode: str, *, has_text_features: bool, cache_bytes: Callable[[], int],
                         budget_gib: float) -> str:
    """data.text_features -> "cache" or "online". auto caches while the whole dataset's text features
    (`cache_bytes()`, computed only when needed) fit the budget. A family whose features do not split
    into image and text parts always caches."""
    if not has_text_features or mode == "cache":
        return "cache"
    if mode == "online":
        return "online"
    size = cache_bytes()
    choice = "cache" if size <= budget_gib * 2**30 else "online"
    log.info("data.text_features=auto: the text features would take %.2f GiB in the cache (budget "
             "data.text_cache_budget_gib=%g): %s", size / 2**30, budget_gib,
             "caching them" if choice == "cache" else "encoding them online, on the device, every micro-batch")
    return choice


class CachedFeatures(torch.utils.data.Dataset):
    """Index -> (index, the entry's image features): what DataLoader workers may pass through shared
    memory. Text features (FIBO: hundreds of MB per long caption) are left to `TextFeatures`, in the
    training process."""

    def __init__(self, cache: FeatureCache, items: list[CacheItem], text_keys: Iterable[str] = ()):
        self.cache = cache
        self.items = items
        self.text_keys = frozenset(text_keys)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, dict[str, torch.Tensor]]:
        return index, self.cache.load(self.items[index], skip=self.text_keys)


def entries_of(entries: list[tuple[int, dict[str, torch.Tensor]]]) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """The DataLoader's collate: the entries as they are (a picklable top-level function for workers)."""
    return entries


class TextFeatures:
    """Completes the loader's (index, image features) entries with their text features, in the training
    process, then batches them with the family's collate: (indices, batch). The text features are
    read from the cache (`encode` None) or encoded on the device by `encode(caption)` (online)."""

    def __init__(self, cache: FeatureCache, items: list[CacheItem], text_keys: Iterable[str],
                 collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]],
                 encode: Callable[[str], dict[str, torch.Tensor]] | None = None, device: torch.device | None = None):
        self.cache = cache
        self.items = items
        self.text_keys = tuple(text_keys)
        self.collate = collate
        self.encode = encode
        self.device = device

    def __call__(self, entries: list[tuple[int, dict[str, torch.Tensor]]]) -> tuple[list[int], dict[str, torch.Tensor]]:
        full = []
        for index, image in entries:
            item = self.items[index]
            if self.encode is None:
                full.append({**image, **(self.cache.load(item, self.text_keys) if self.text_keys else {})})
            else:  # the text features are born on the device: the image features join them there
                image = {key: value.to(self.device, non_blocking=True) for key, value in image.items()}
                full.append({**image, **self.encode(item.sample.caption)})
        return [index for index, _ in entries], self.collate(full)
