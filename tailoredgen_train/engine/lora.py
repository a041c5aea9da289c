"""PEFT LoRA on a diffusers denoiser: inject, keep trainable weights in fp32, export, restore."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from ..errors import ConfigError, ResumeError

ADAPTER_NAME = "default"


def add_lora(denoiser: nn.Module, *, rank: int, targets: Iterable[str], init: str) -> int:
    """Add one adapter with lora_alpha == rank (the contract's rank is the only knob) and return
    the number of trainable parameters. Only LoRA weights require grad afterwards."""
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        init_lora_weights="gaussian" if init == "gaussian" else True,
        target_modules=sorted(set(targets)),
    )
    denoiser.requires_grad_(False)
    try:
        denoiser.add_adapter(config, adapter_name=ADAPTER_NAME)
    except ValueError as exc:  # PEFT: "Target modules {...} not found in the base model"
        raise ConfigError(f"lora.target_modules matches nothing usable in {type(denoiser).__name__}: {exc}") from None
    # the base may be bf16; optimizer state and updates stay exact in fp32
    cast_training_params(denoiser, dtype=torch.float32)
    return sum(p.numel() for p in denoiser.parameters() if p.requires_grad)


def set_lora_input_casting(denoiser: nn.Module, enabled: bool) -> None:
    """PEFT casts every LoRA layer's input to the adapter's dtype (fp32 here); under autocast the
    matmul casts it straight back to bf16, so a bf16 step turns the cast off (same values, two
    copies fewer per layer). Code that runs the denoiser outside autocast needs it on."""
    for module in denoiser.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


@contextmanager
def lora_input_casting(denoiser: nn.Module) -> Iterator[None]:
    """PEFT's input cast on for the duration (a render without autocast), then as it was."""
    layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
    before = [m.cast_input_dtype_enabled for m in layers]
    set_lora_input_casting(denoiser, True)
    try:
        yield
    finally:
        for module, enabled in zip(layers, before):
            module.cast_input_dtype_enabled = enabled


def trainable_parameters(denoiser: nn.Module) -> list[nn.Parameter]:
    return [p for p in denoiser.parameters() if p.requires_grad]


def lora_state_dict(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA tensors (no component prefix), detached copies on CPU."""
    state = get_peft_model_state_dict(denoiser, adapter_name=ADAPTER_NAME)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def adapter_metadata(denoiser: nn.Module) -> dict:
    """The LoraConfig as a dict; stored in the safetensors header so alpha travels with the file."""
    return denoiser.peft_config[ADAPTER_NAME].to_dict()


def lora_signature(denoiser: nn.Module) -> dict:
    """What a checkpoint must match to be resumed into this adapter."""
    config = denoiser.peft_config[ADAPTER_NAME]
    return {"rank": int(config.r), "lora_alpha": float(config.lora_alpha), "target_modules": sorted(config.target_modules)}


def load_lora_state(denoiser: nn.Module, state: dict[str, torch.Tensor], prefix: str | None = None) -> None:
    """Load PEFT-named tensors into the adapter; with `prefix`, keys must start with `prefix.`
    (the component prefix a family's `save_lora` adds)."""
    if prefix is None:
        stripped = dict(state)
    else:
        stripped = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if len(stripped) != len(state):
            raise ResumeError(f"LoRA file has keys without the '{prefix}.' prefix; it was not written by this engine")
    expected = set(get_peft_model_state_dict(denoiser, adapter_name=ADAPTER_NAME))
    if set(stripped) != expected:
        missing, extra = sorted(expected - set(stripped))[:3], sorted(set(stripped) - expected)[:3]
        raise ResumeError(f"checkpoint LoRA keys do not match this adapter (missing {missing}, unexpected {extra})")
    set_peft_model_state_dict(denoiser, stripped, adapter_name=ADAPTER_NAME)
