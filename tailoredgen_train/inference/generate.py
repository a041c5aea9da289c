"""The one generation function behind validation samples during training, the `generate` command
and the service: settings that validate themselves, a size per aspect ratio, one seeded pipeline
call per image."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..contract import ASPECT_RATIOS
from ..data import round_to_multiple
from ..errors import InvalidGenerationParameterError
from ..families import ModelFamily

MAX_INFLUENCE = 1.5  # Bria's tailored_model_influence range is 0..1.5
MAX_IMAGES = 16
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
RESOLUTION_RANGE = (64, 4096)
MAX_SEED = 2**63 - 1 - MAX_IMAGES  # seed + image index must still be a valid generator seed


def size_for(aspect_ratio: str, resolution: int, multiple: int) -> tuple[int, int]:
    """(W, H) of about resolution**2 pixels with the aspect ratio's proportions, each side a
    multiple of `multiple` (1:1 at 1024 is 1024x1024, 2:3 at 1024 is 832x1248 for FIBO)."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise InvalidGenerationParameterError.single("aspect_ratio", aspect_ratio,
                                                     f"use one of {', '.join(ASPECT_RATIOS)}")
    w, h = (int(part) for part in aspect_ratio.split(":"))
    ratio = math.sqrt(w / h)
    return round_to_multiple(resolution * ratio, multiple), round_to_multiple(resolution / ratio, multiple)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """How to sample; None takes the family's default. Errors name the field and the range."""

    seed: int = 0
    """Image i of a prompt is drawn with seed + i: image 0 is comparable across checkpoints."""
    num_images: int = 1
    """Images per prompt."""
    steps: int | None = None
    guidance: float | None = None
    aspect_ratio: str = "1:1"
    resolution: int | None = None
    """The side of a square of the same area; the family's default (1024) when None."""
    influence: float = 1.0
    """The LoRA's scale (Bria's tailored_model_influence): 0 is the base alone."""
    negative_prompt: str | None = None
    """Passed to the pipeline as given (a FIBO negative may be JSON or text, as the pipeline takes it)."""

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, fix: str) -> None:
            if not ok:
                raise InvalidGenerationParameterError.single(name, getattr(self, name), fix)

        check(_is_int(self.seed) and 0 <= self.seed <= MAX_SEED, "seed", f"use an integer in 0..{MAX_SEED}")
        check(_is_int(self.num_images) and 1 <= self.num_images <= MAX_IMAGES, "num_images",
              f"use an integer in 1..{MAX_IMAGES}")
        check(self.steps is None or (_is_int(self.steps) and 1 <= self.steps <= MAX_STEPS), "steps",
              f"use an integer in 1..{MAX_STEPS}")
        check(self.guidance is None or (_is_number(self.guidance) and 1 <= self.guidance <= MAX_GUIDANCE),
              "guidance", f"use a number in 1..{MAX_GUIDANCE:g} (1 turns classifier-free guidance off)")
        check(self.aspect_ratio in ASPECT_RATIOS, "aspect_ratio", f"use one of {', '.join(ASPECT_RATIOS)}")
        low, high = RESOLUTION_RANGE
        check(self.resolution is None or (_is_int(self.resolution) and low <= self.resolution <= high),
              "resolution", f"use an integer in {low}..{high} (1024 is the models' native size)")
        check(_is_number(self.influence) and 0 <= self.influence <= MAX_INFLUENCE, "influence",
              f"use a number in 0..{MAX_INFLUENCE} (0: the base alone, 1: the LoRA as trained)")
        check(self.negative_prompt is None or isinstance(self.negative_prompt, str), "negative_prompt",
              "use a string")


@dataclass
class GeneratedImage:
    image: Image.Image
    prompt: str
    seed: int


def generate(pipeline, family: ModelFamily, prompts: list[str], settings: GenerationSettings) -> list[GeneratedImage]:
    """Render `settings.num_images` images per prompt with `pipeline` (the family's diffusers
    pipeline, LoRA already active at its influence): one call per (prompt, image index), each with
    its own generator seeded `seed + index` on the pipeline's device.

    Prompts are used as given: prepare them first with `family.prepare_prompt` (FIBO's JSON check
    and compact form, a legacy generation prefix). Results are ordered prompt by prompt."""
    steps = settings.steps if settings.steps is not None else family.generation_steps
    guidance = settings.guidance if settings.guidance is not None else family.generation_guidance
    width, height = size_for(settings.aspect_ratio, settings.resolution or family.generation_resolution,
                             family.generation_multiple)
    device = pipeline._execution_device  # where the pipeline draws its latents (offload hooks included)
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for prompt in prompts:
        for index in range(settings.num_images):
            seed = settings.seed + index
            generator = torch.Generator(device=device).manual_seed(seed)
            result = pipeline(prompt=prompt, negative_prompt=settings.negative_prompt, width=width, height=height,
                              num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=1,
                              generator=generator, output_type="pil")
            images.append(GeneratedImage(image=result.images[0], prompt=prompt, seed=seed))
    return images
