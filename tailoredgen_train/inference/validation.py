"""Validation samples during training: which prompts, at which steps, and where the images go.

    OUTPUT/samples/step-0/            the baseline, before step 1 (`validation.at_start`)
    OUTPUT/checkpoint-<step>/samples/ every checkpoint's samples, committed with its LoRA file
    OUTPUT/samples/step-<N>/          renders between checkpoints (`validation.every`)

Each folder holds 00.png, 01.png, ..., grid.png and prompts.json. Only the main process renders;
the others wait at the next collective. A render never changes training (see render.py), and a
render that fails costs its images, not the run.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import EngineConfig, ValidationConfig
from ..errors import ConfigError, TailoredGenError
from .generate import GeneratedImage, GenerationSettings
from .render import TrainingRenderer
from .samples import write_samples

log = logging.getLogger(__name__)
SAMPLES_DIR = "samples"


def sample_dir(output_dir: Path, step: int) -> Path:
    """Where an off-checkpoint render of `step` (0: the baseline) is written."""
    return Path(output_dir) / SAMPLES_DIR / f"step-{step}"


def pick_training_captions(captions: Sequence[tuple[str, str]], count: int) -> list[str]:
    """`count` captions spread evenly over the samples sorted by id: the same dataset always gives
    the same prompts, whatever order its metadata lists them in."""
    ordered = [caption for _, caption in sorted(captions)]
    count = min(count, len(ordered))
    return [ordered[i * len(ordered) // count] for i in range(count)] if count else []


def read_prompt_file(path: str) -> list[str]:
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"validation.prompts: prompt file {path} does not exist; give a list of prompts or a "
                          "file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"validation.prompts: prompt file {path} cannot be read as UTF-8 text: {exc}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"validation.prompts: prompt file {path} holds no prompt (one per line)")
    return prompts


def validation_prompts(config: ValidationConfig, family: Any, training_captions: Sequence[tuple[str, str]],
                       caption_prefix: str | None) -> list[str]:
    """The prompts every render uses, checked before training starts (a bad one fails the run now,
    not at the first checkpoint). Training captions are used as trained (already prefixed)."""
    if config.prompts is None:
        return pick_training_captions(training_captions, config.num_prompts)
    raw = read_prompt_file(config.prompts) if isinstance(config.prompts, str) else list(config.prompts)
    prompts = []
    for index, text in enumerate(raw):
        try:
            prompts.append(family.prepare_prompt(text, prefix=caption_prefix))
        except TailoredGenError as exc:
            raise ConfigError(f"validation.prompts[{index}]: {exc.message}") from None
    return prompts


@dataclass
class ValidationPlan:
    prompts: list[str]
    settings: GenerationSettings
    every: int | None
    at_start: bool

    def renders_between_checkpoints(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0


def plan_validation(config: EngineConfig, family: Any, training_captions: Sequence[tuple[str, str]],
                    caption_prefix: str | None) -> ValidationPlan | None:
    """None when validation is off or there is nothing to render."""
    validation = config.validation
    if not validation.enabled:
        return None
    prompts = validation_prompts(validation, family, training_captions, caption_prefix)
    if not prompts:
        return None
    settings = GenerationSettings(
        seed=validation.seed, num_images=1, steps=validation.num_inference_steps,
        guidance=validation.guidance_scale, aspect_ratio=validation.aspect_ratio,
        resolution=validation.resolution or config.data.resolution, influence=validation.lora_scale,
        negative_prompt=validation.negative_prompt,
    )
    return ValidationPlan(prompts=prompts, settings=settings, every=validation.every, at_start=validation.at_start)


@dataclass
class RenderStats:
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None


class Validator:
    """Renders the plan's prompts on the main process; the trainer decides where the images go."""

    def __init__(self, plan: ValidationPlan, renderer: TrainingRenderer, *, output_dir: Path, accelerator: Any):
        self.plan = plan
        self.renderer = renderer
        self.output_dir = Path(output_dir)
        self.accelerator = accelerator
        self.is_main_process = accelerator.is_main_process
        self.stats = RenderStats()

    def render(self, denoiser: Any, step: int) -> list[GeneratedImage] | None:
        """The step's images on the main process (None elsewhere, and when the render failed)."""
        if not self.is_main_process:
            return None
        started = time.perf_counter()
        try:
            images = self.renderer.render(denoiser, self.plan.prompts, self.plan.settings)
        except Exception as exc:  # an OOM or a pipeline error costs this step's samples, never the run
            log.warning("validation render at step %d failed, no samples for it: %s: %s", step, type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
            return None
        self.stats.seconds.append(time.perf_counter() - started)
        log.info("rendered %d validation sample(s) at step %d in %.1f s", len(images), step, self.stats.seconds[-1])
        self._log_images(images, step)
        return images

    def write_between_checkpoints(self, step: int, images: list[GeneratedImage] | None) -> Path | None:
        """Commit a render outside a checkpoint: staged, then renamed into samples/step-<N>/."""
        if not images:
            return None
        final = sample_dir(self.output_dir, step)
        staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write_samples(staging, images)
        if final.exists():  # a resumed run renders the same step again
            shutil.rmtree(final)
        os.replace(staging, final)
        return final

    @staticmethod
    def write_into_checkpoint(staging: Path, images: list[GeneratedImage]) -> None:
        """Into a checkpoint's staging folder: committed (manifest, rename) together with its LoRA."""
        write_samples(Path(staging) / SAMPLES_DIR, images)

    def baseline_exists(self) -> bool:
        return (sample_dir(self.output_dir, 0) / "grid.png").is_file()

    def release(self) -> None:
        self.renderer.release()

    def _log_images(self, images: list[GeneratedImage], step: int) -> None:
        for tracker in self.accelerator.trackers:
            writer = getattr(tracker, "writer", None)  # accelerate's TensorBoardTracker
            if writer is None:
                continue
            for index, generated in enumerate(images):
                writer.add_image(f"validation/{index:02d}", np.asarray(generated.image.convert("RGB")), step,
                                 dataformats="HWC")
            writer.flush()
