"""The one seam between the engine and a model family.

A family (FIBO, Bria 3.2, Bria 2.3, ...) knows how to load its diffusers components, turn an image
and a caption into cached features, batch them, compute the training loss, which modules LoRA
adapts, and how a LoRA file is written so that the family's diffusers pipeline loads it. For
generation it knows its pipeline, how to load a LoRA file into it, its sampling defaults and what a
prompt must look like. The trainer, the cache, `start_training` and `inference/` only talk to this
interface.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Mapping

import safetensors
import torch
from torch import nn

from ..config import type_problem
from ..data import CropGeometry, apply_caption_prefix, normalize_text_caption
from ..errors import BaseModelError, ConfigError, IncompatibleDatasetError, InvalidGenerationParameterError, \
    LoraFileError, did_you_mean


def diffusers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`from_pretrained`'s dtype argument: `dtype` where diffusers has it (it deprecates
    `torch_dtype` with a warning on every load), `torch_dtype` on the older releases we support."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


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


def is_local_path(base: str) -> bool:
    """Whether `base` is meant as a folder (absolute, ./, ~, or existing) rather than a hub id."""
    path = Path(base).expanduser()
    return path.is_absolute() or base.startswith((".", "~")) or path.exists()


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
    denoiser_component: ClassVar[str] = "transformer"
    """The pipeline component that carries the LoRA (`unet` for SDXL)."""
    generation_steps: ClassVar[int]
    generation_guidance: ClassVar[float]
    generation_resolution: ClassVar[int] = 1024
    text_feature_keys: ClassVar[tuple[str, ...]] = ()
    """The features `encode_text` makes from a caption alone (data.text_features=online encodes them
    every step instead of caching them); empty: the family caches everything, always."""
    text_encoder_keys: ClassVar[tuple[str, ...]] = ()
    """The `LoadedModel.encoders` entries `encode_text` needs (kept on the device when online)."""

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
        if not is_local_path(base):
            return
        path = Path(base).expanduser()
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

    def encode_sample(
        self, model: LoadedModel, pixels: torch.Tensor, caption: str, geometry: CropGeometry | None = None
    ) -> dict[str, torch.Tensor]:
        """One sample's cached features, on CPU. `pixels` is (1, 3, H, W) in [-1, 1]; `geometry` says
        how the original image was resized and cropped into it (SDXL conditions on it; the others
        need none)."""
        features = {**self.encode_image(model, pixels, geometry), **self.encode_text(model, caption)}
        return {key: value.cpu() for key, value in features.items()}

    def encode_image(self, model: LoadedModel, pixels: torch.Tensor, geometry: CropGeometry) -> dict[str, torch.Tensor]:
        """The features of the image (and its crop), on the encoders' device."""
        raise NotImplementedError(f"{self.name} overrides encode_sample")

    def encode_text(self, model: LoadedModel, caption: str) -> dict[str, torch.Tensor]:
        """The features of one caption (`text_feature_keys`), on the text encoder's device, shaped as
        the cache stores them: `collate` batches them."""
        raise NotImplementedError(f"{self.name} overrides encode_sample")

    def text_feature_specs(self, model: LoadedModel, caption: str) -> dict[str, torch.Tensor]:
        """`encode_text`'s output for `caption` as meta tensors (shape and dtype, no data): what caching
        it would cost. Families whose sizes follow from the token count override it without encoding."""
        return {key: torch.empty_like(value, device="meta") for key, value in self.encode_text(model, caption).items()}

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

    def denoiser_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        """The repeated transformer blocks, in call order: the unit of selective gradient
        checkpointing and regional compilation. Empty: the family supports neither."""
        return []

    def block_activation_bytes(self, denoiser: nn.Module, feature_shapes: dict[str, tuple[int, ...]],
                               batch_size: int) -> int | None:
        """Estimated activation memory one block keeps for backward, for a batch of cached features
        of these shapes (gradient_checkpointing=auto); None: no estimate."""
        return None

    def release_encoders(self, model: LoadedModel, keep_text: bool = False) -> None:
        """Free the frozen encoders once every feature is cached; `keep_text`: all but the text
        encoder (data.text_features=online encodes each micro-batch's captions)."""
        for key in list(model.encoders):
            if not (keep_text and key in self.text_encoder_keys):
                del model.encoders[key]

    # ---- generation ---------------------------------------------------------------------------

    @property
    def pipeline_class(self) -> type:
        return getattr(import_module("diffusers"), self.pipeline_class_name)

    @property
    def generation_multiple(self) -> int:
        """Generated image sides are multiples of this."""
        return self.bucket_multiple

    def load_pipeline(self, base: str, *, device: torch.device | str, dtype: torch.dtype):
        """The family's full diffusers pipeline from a diffusers-format base, on `device`."""
        return self._load_pipeline(base, dtype=dtype).to(device)

    def load_pipeline_parts(self, base: str, *, dtype: torch.dtype):
        """The pipeline without its denoiser, on the host: text encoder(s), tokenizer(s), VAE and
        scheduler from `base`; `attach_denoiser` completes it."""
        return self._load_pipeline(base, dtype=dtype, **{self.denoiser_component: None})

    def _load_pipeline(self, base: str, *, dtype: torch.dtype, **components):
        self.check_base(base)
        with self.loading_errors(base):
            pipeline = self.pipeline_class.from_pretrained(base, **diffusers_dtype(dtype), **components)
        self.fix_pipeline_precision(pipeline)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def fix_pipeline_precision(self, pipeline) -> None:
        """Keep in fp32 what the family's pipeline documents must stay fp32."""

    def attach_denoiser(self, pipeline, denoiser: nn.Module | None):
        """Put `denoiser` (e.g. the one being trained, LoRA inside) into `pipeline` with a fresh
        scheduler (a render must not inherit another's timesteps); None empties the slot."""
        setattr(pipeline, self.denoiser_component, denoiser)
        pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
        return pipeline

    def lora_owner(self, pipeline):
        """What holds the pipeline's LoRA API (load, enable/disable, set_adapters, delete): the
        pipeline where it has a LoRA loader mixin (FIBO's Flux mixin, SDXL's), else its denoiser."""
        return pipeline

    def load_lora(self, pipeline, lora_file: Path, adapter_name: str) -> None:
        """Load a LoRA file (as `save_lora` writes it) into `pipeline` as adapter `adapter_name`,
        with the pipeline's own loader; a file that does not fit the denoiser is refused."""
        lora_file = Path(lora_file)
        keys = lora_file_keys(lora_file)
        try:
            self._load_lora_weights(pipeline, lora_file, adapter_name)
        except torch.OutOfMemoryError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError, safetensors.SafetensorError) as exc:
            self.unload_lora(pipeline, adapter_name)
            raise LoraFileError(f"LoRA file {lora_file} cannot be loaded into this {self.name} base: "
                                f"{str(exc).splitlines()[0]}") from None
        loaded = _adapter_keys(getattr(pipeline, self.denoiser_component), adapter_name)
        ours = {k[len(self.lora_key_prefix) + 1:] for k in keys if k.startswith(self.lora_key_prefix + ".")}
        # our files name every adapted module; a converted third-party format is judged by what loaded
        if not loaded or (ours and ours != loaded):
            self.unload_lora(pipeline, adapter_name)
            raise LoraFileError(
                f"LoRA file {lora_file} does not fit this {self.name} base: {len(ours)} of its tensors are for "
                f"its {self.denoiser_component}, and the {self.denoiser_component} has {len(loaded)} LoRA tensors "
                f"after loading it. Use a LoRA trained on this base.")

    def _load_lora_weights(self, pipeline, lora_file: Path, adapter_name: str) -> None:
        pipeline.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name=adapter_name)

    def activate_lora(self, pipeline, adapter_name: str | None, scale: float = 1.0) -> None:
        """Make `adapter_name` the only active adapter, at `scale` (the LoRA's influence: PEFT sets
        each layer's scaling to scale * alpha / r); None runs the base alone."""
        owner = self.lora_owner(pipeline)
        if adapter_name is None:
            if getattr(getattr(pipeline, self.denoiser_component), "peft_config", None):
                owner.disable_lora()
            return
        owner.enable_lora()
        owner.set_adapters([adapter_name], [scale])

    def unload_lora(self, pipeline, adapter_name: str) -> None:
        if adapter_name in (getattr(getattr(pipeline, self.denoiser_component), "peft_config", None) or {}):
            self.lora_owner(pipeline).delete_adapters([adapter_name])

    def prepare_prompt(self, text: str, prefix: str | None = None) -> str:
        """A prompt as training saw its captions: normalised, then the generation prefix (a legacy
        dataset's caption_prefix) prepended by the same rule."""
        try:
            caption = normalize_text_caption(text)
        except ValueError as exc:
            raise InvalidGenerationParameterError.single("prompt", text, str(exc).replace("caption", "prompt", 1)) \
                from None
        return apply_caption_prefix(caption, prefix)


def lora_file_keys(lora_file: Path) -> list[str]:
    """The tensor names of a LoRA file, read from its header alone (cheap: check before loading a base)."""
    try:
        with safetensors.safe_open(str(lora_file), framework="pt") as handle:
            keys = list(handle.keys())
    except (OSError, safetensors.SafetensorError) as exc:
        raise LoraFileError(f"LoRA file {lora_file} is not a readable safetensors file: {exc}") from None
    if not any("lora" in key for key in keys):
        raise LoraFileError(f"{lora_file} holds no LoRA tensors (no tensor name contains 'lora'); pass the "
                            "pytorch_lora_weights.safetensors of a checkpoint")
    return keys


def _adapter_keys(denoiser: nn.Module, adapter_name: str) -> set[str]:
    """PEFT names (no component prefix, no adapter name) of the tensors `adapter_name` holds."""
    if adapter_name not in (getattr(denoiser, "peft_config", None) or {}):
        return set()
    from peft.utils import get_peft_model_state_dict

    return set(get_peft_model_state_dict(denoiser, adapter_name=adapter_name))
