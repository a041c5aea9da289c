"""Validation samples from the denoiser being trained, through the family's own pipeline.

A render must not change training: it runs under no_grad with the global RNG states forked, puts
every module in eval mode and restores each module's own mode, sets the LoRA scale for the render
and restores every LoRA layer's `scaling` dict from a snapshot (scale-then-unscale is not bit-exact
in floating point), and leaves requires_grad flags and gradients alone. The text encoder(s) and the
VAE live on the host between renders and visit the training device only for a render.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..engine.lora import ADAPTER_NAME, lora_input_casting
from ..families import ModelFamily
from .generate import GeneratedImage, GenerationSettings, generate


@contextmanager
def lora_scale(denoiser: nn.Module, scale: float, adapter_name: str = ADAPTER_NAME) -> Iterator[None]:
    """Every LoRA layer of `adapter_name` at `scale` (PEFT: scale * alpha / r) inside the block;
    afterwards each layer's `scaling` dict holds exactly the values it held before."""
    layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer)]
    saved = [dict(layer.scaling) for layer in layers]
    try:
        for layer in layers:
            layer.set_scale(adapter_name, scale)
        yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.clear()
            layer.scaling.update(scaling)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block; each gets its own previous mode back."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


class TrainingRenderer:
    """`render(denoiser, prompts, settings)`: images from the denoiser being trained (its PEFT
    adapter "default" inside), with the other components loaded from `base` on first use.
    `release()` frees them. `components`: the pipeline's other components already in memory (the
    benchmark's random full-size model has no folder to load them from); moved to the host now."""

    def __init__(self, family: ModelFamily, base: str, *, device: torch.device | str, weight_dtype: torch.dtype,
                 components: dict | None = None):
        self.family = family
        self.base = base
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self._pipeline = None  # every component but the denoiser, on the host
        if components is not None:
            self._pipeline = family.pipeline_class(**components, **{family.denoiser_component: None})
            family.fix_pipeline_precision(self._pipeline)
            self._pipeline.set_progress_bar_config(disable=True)
            for part in self._host_parts():
                part.to("cpu")

    def _host_parts(self) -> list[nn.Module]:
        return [module for name, module in self._pipeline.components.items()
                if isinstance(module, nn.Module) and name != self.family.denoiser_component]

    def render(self, denoiser: nn.Module, prompts: list[str], settings: GenerationSettings) -> list[GeneratedImage]:
        """Prompts already prepared (`family.prepare_prompt`); the LoRA at `settings.influence`."""
        model = getattr(denoiser, "module", denoiser)  # DDP keeps the real model in .module
        if self._pipeline is None:
            self._pipeline = self.family.load_pipeline_parts(self.base, dtype=self.weight_dtype)
        pipeline = self.family.attach_denoiser(self._pipeline, model)
        try:
            with torch.random.fork_rng(devices=_rng_devices(self.device)), torch.no_grad(), \
                    eval_mode(model), lora_scale(model, settings.influence), \
                    lora_input_casting(model):
                for part in self._host_parts():
                    part.to(self.device)
                return generate(pipeline, self.family, prompts, settings)
        finally:
            self.family.attach_denoiser(self._pipeline, None)  # no reference to the training model kept
            for part in self._host_parts():
                part.to("cpu")
            self._free_device_cache()

    def release(self) -> None:
        """Drop the text encoder(s) and VAE (after the last render)."""
        self._pipeline = None
        gc.collect()
        self._free_device_cache()

    def _free_device_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
