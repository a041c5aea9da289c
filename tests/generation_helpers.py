"""What the generation tests share: a prompt per family, fast settings, and a LoRA that is not the
identity (gaussian init starts lora_B at zero), saved with the family's own saver."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tailoredgen_train.engine.checkpoint import LORA_FILE
from tailoredgen_train.engine.lora import adapter_metadata, add_lora, lora_state_dict
from tailoredgen_train.families import ModelFamily
from tailoredgen_train.inference import GeneratedImage, GenerationSettings

FAMILY_NAMES = ("fibo", "bria-3.2", "bria-2.3")
PROMPTS = {
    "fibo": '{"short_description": "a red fox in fresh snow", "background_setting": "a pine forest"}',
    "bria-3.2": "a red fox in fresh snow",
    "bria-2.3": "a red fox in fresh snow",
}
FAST = dict(steps=2, resolution=64)  # seconds on a CPU; 64 is a multiple of every family's size step


def fast_settings(**overrides) -> GenerationSettings:
    return GenerationSettings(**{**FAST, **overrides})


def base_paths(tiny_fibo_base: Path, legacy_bases: dict[str, Path]) -> dict[str, str]:
    return {"fibo": str(tiny_fibo_base), **{name: str(path) for name, path in legacy_bases.items()}}


def denoiser_with_lora(family: ModelFamily, base: str, seed: int = 1) -> nn.Module:
    """The base's denoiser with the training adapter ("default") injected by the engine's add_lora,
    lora_B drawn at random so that the LoRA changes the output."""
    denoiser = getattr(family.load_pipeline(base, device="cpu", dtype=torch.float32), family.denoiser_component)
    add_lora(denoiser, rank=4, targets=family.default_lora_targets, init="gaussian")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return denoiser


def save_lora(family: ModelFamily, denoiser: nn.Module, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    family.save_lora(directory, lora_state_dict(denoiser), adapter_metadata(denoiser))
    return directory / LORA_FILE


def pixels(images: list[GeneratedImage]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(item.image)) for item in images])


