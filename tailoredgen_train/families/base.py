"""The one seam between the engine and a model family.

A family (FIBO, Bria 3.2, Bria 2.3, ...) knows how to load its diffusers components, turn an image
and a caption into cached features, batch them, compute the training loss, which modules LoRA
adapts, and how a LoRA file is written so that the family's diffusers pipeline loads it. The
trainer, the cache and `start_training` only talk to this interface.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Mapping

import torch
from torch import nn

from ..config import type_problem
from ..data import CropGeometry
from ..errors import BaseModelError, ConfigError, IncompatibleDatasetError, did_you_mean


@dataclass
class LoadedModel:
    """A family's components. `denoiser` gets the LoRA; everything in `encoders` is frozen and only
    used to fill the feature cache."""

    denoiser: nn.Module
    encoders: dict[str, Any]
    scheduler: Any
    fingerprint: str
    """Identifies the base weights: part of every cache key and checked when resuming."""
    extras: dict[str, Any] = field(default_factory=dict)


def base_fingerprint(base: str, *configs: Mapping[str, Any]) -> str:
    """Identifies base weights by where they came from and their components' configs: part of every
    cache key and checked when resuming."""
    text = json.dumps([base, *[dict(c) for c in configs]], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FamilyOptions:
    """Base for a family's typed options (the `model:` section of the engine config)."""

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], family: str) -> FamilyOptions:
        known = sorted(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - set(known))
        if unknown:
            keys = [f"model.{k}" for k in known]
            raise ConfigError(
                f"unknown key(s) {', '.join(f'model.{k}' + did_you_mean(f'model.{k}', keys) for k in unknown)} "
                f"for family {family}; accepted: {', '.join(known) or 'none'}"
            )
        for key, value in raw.items():
            problem = type_problem(cls, key, value)
            if problem:
                raise ConfigError(f"model.{key}={value!r} {problem} (family {family})")
        return cls(**raw)


class ModelFamily(ABC):
    """Everything model-specific. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    caption_format: ClassVar[Literal["json", "text"]]
    bucket_base: ClassVar[tuple[tuple[int, int], ...]]
    """Aspect-ratio buckets (W, H) at resolution 1024."""
    bucket_multiple: ClassVar[int]
    """Image sides must be multiples of this (VAE downsampling x patching)."""
    default_lora_targets: ClassVar[tuple[str, ...]]
    lora_key_prefix: ClassVar[str]
    """Component prefix of the LoRA keys the family's pipeline loader expects."""
    options_cls: ClassVar[type[FamilyOptions]] = FamilyOptions
    pipeline_class_name: ClassVar[str]
    """The diffusers pipeline a base of this family is saved with (model_index.json `_class_name`)."""
    base_components: ClassVar[tuple[str, ...]]
    """Subfolders a diffusers-format base of this family has."""
    hub_id: ClassVar[str]

    def __init__(self, options: Mapping[str, Any] | None = None):
        self.options = self.options_cls.from_mapping(dict(options or {}), self.name)

    def check_caption_prefix(self, caption_prefix: str | None) -> None:
        """A caption prefix is for text captions; a family with structured captions has none."""
        if caption_prefix and self.caption_format == "json":
            raise IncompatibleDatasetError(
                f"a caption_prefix ({caption_prefix!r}) is for legacy text captions; {self.name} captions are "
                "structured JSON and take no prefix. Drop the prefix or train a legacy version."
            )

    def check_base(self, base: str) -> None:
        """Fail early, with the fix, when `base` is meant as a local folder but is not this family's.
        Anything that looks like a path (absolute, ./, ~, or existing) is a folder; else a hub id."""
        path = Path(base).expanduser()
        if not (path.is_absolute() or base.startswith((".", "~")) or path.exists()):
            return
        fix = (f"Pass a directory saved by {self.pipeline_class_name}.save_pretrained, the hub id {self.hub_id}, "
               f"or build a tiny one with: tailoredgen-train make-tiny-base --family {self.name} DIR")
        if not path.is_dir():
            raise BaseModelError(f"base model directory {base} does not exist. {fix}")
        try:
            found = json.loads((path / "model_index.json").read_text()).get("_class_name")
        except (OSError, ValueError):
            found = None
        if found != self.pipeline_class_name:
            raise BaseModelError(
                f"base model {base} is {'a ' + found if found else 'not a diffusers pipeline'} directory, but "
                f"family {self.name} trains {self.pipeline_class_name} models; check --base and --training-version. "
                f"{fix}"
            )
        missing = [c for c in self.base_components if not (path / c).is_dir()]
        if missing:
            raise BaseModelError(f"base model {base} is missing {', '.join(m + '/' for m in missing)}. {fix}")

    @contextmanager
    def loading_errors(self, base: str) -> Iterator[None]:
        """Turn the loaders' errors into one that says what to pass instead."""
        try:
            yield
        except (OSError, ValueError) as exc:
            raise BaseModelError(
                f"could not load the {self.name} base model from {base!r}: {exc}. Pass a local diffusers-format "
                f"directory ({', '.join(c + '/' for c in self.base_components)}) or a hub id this machine can reach."
            ) from None

    @abstractmethod
    def load(self, base: str, *, device: torch.device, weight_dtype: torch.dtype) -> LoadedModel:
        """Load the diffusers-format directory (or hub id) `base`."""

    @abstractmethod
    def encode_sample(
        self, model: LoadedModel, pixels: torch.Tensor, caption: str, geometry: CropGeometry
    ) -> dict[str, torch.Tensor]:
        """One sample's cached features, on CPU. `pixels` is (1, 3, H, W) in [-1, 1]; `geometry` says
        how the original image was resized and cropped into it (SDXL conditions on it)."""

    @abstractmethod
    def collate(self, entries: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack cached features of one bucket into a batch (padding text where lengths differ)."""

    @abstractmethod
    def compute_loss(
        self, denoiser: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """The training objective for one micro-batch already on the device; all randomness from `generator`."""

    @abstractmethod
    def save_lora(self, directory: Path, lora_state: dict[str, torch.Tensor], adapter_metadata: dict) -> None:
        """Write `pytorch_lora_weights.safetensors` in the key format of the family's pipeline."""

    @abstractmethod
    def make_tiny_base(self, out_dir: Path, seed: int = 0) -> None:
        """Build every component with the real classes at tiny sizes and save a diffusers-format directory."""

    def denoiser_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        """The repeated transformer blocks, in call order: the unit of selective gradient
        checkpointing and regional compilation. Empty: the family supports neither."""
        return []

    def block_activation_bytes(self, denoiser: nn.Module, feature_shapes: dict[str, tuple[int, ...]],
                               batch_size: int) -> int | None:
        """Estimated activation memory one block keeps for backward, for a batch of cached features
        of these shapes (gradient_checkpointing=auto); None: no estimate."""
        return None

    def release_encoders(self, model: LoadedModel) -> None:
        """Free the frozen encoders once every feature is cached."""
        model.encoders.clear()
