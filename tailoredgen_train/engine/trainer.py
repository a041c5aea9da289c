"""The training loop. `train()` only sequences steps; `train_step()` owns accumulation, clipping and
the non-finite guard; the family's `compute_loss` is the only model-specific piece.

Counters are state: (step, cursor) plus the optimizer and LR-scheduler states are everything a
resumed run needs, because all randomness is a pure function of (seed, step, micro-batch, rank)
and the batch order is a pure function of (seed, cursor).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..errors import NonFiniteLossError, ResumeError
from ..families import ModelFamily
from .checkpoint import LORA_FILE, Checkpointer
from .lora import adapter_metadata, load_lora_state, lora_state_dict, trainable_parameters

log = logging.getLogger(__name__)
Batch = tuple[list[int], dict[str, torch.Tensor]]


def step_seed(seed: int, step: int, micro_batch: int, rank: int) -> int:
    """A distinct, reproducible seed per (step, micro-batch, process): resuming needs no RNG state."""
    return ((((seed * 1_000_003) + step) * 1_009 + micro_batch) * 8_191 + rank) % (2**63 - 1)


@dataclass
class Progress:
    step: int = 0
    """Optimizer steps completed."""
    cursor: int = 0
    """Micro-batches this process has consumed (the same on every process)."""


@dataclass
class TrainerSettings:
    total_steps: int
    checkpoint_steps: list[int]
    gradient_accumulation_steps: int
    max_grad_norm: float
    seed: int
    log_every: int
    log_samples: bool = False


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float
    seconds: float = 0.0
    """Wall time of the optimizer step, data loading included (the step ends in a host sync)."""


@dataclass
class Trainer:
    family: ModelFamily
    denoiser: torch.nn.Module  # as prepared by accelerate (maybe DDP-wrapped)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    accelerator: Accelerator
    batches_from: Callable[[int], Iterator[Batch]]
    """cursor -> this process's batches from that position on."""
    checkpointer: Checkpointer
    settings: TrainerSettings
    identity: dict[str, Any]
    """What a checkpoint must match to be resumed here (base fingerprint, LoRA shape, ...)."""
    sample_ids: list[str] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)
    history: list[StepRecord] = field(default_factory=list)

    # ---- the loop -----------------------------------------------------------------------------

    def train(self) -> list[StepRecord]:
        settings = self.settings
        batches = self.batches_from(self.progress.cursor)
        bar = tqdm(total=settings.total_steps, initial=self.progress.step, desc="train",
                   disable=not self.accelerator.is_main_process, dynamic_ncols=True)
        while self.progress.step < settings.total_steps:
            started = time.perf_counter()
            micro_batches = [next(batches) for _ in range(settings.gradient_accumulation_steps)]
            record = self.train_step(micro_batches)
            record.seconds = time.perf_counter() - started
            self.progress.step += 1
            self.progress.cursor += len(micro_batches)
            self.history.append(record)
            bar.set_postfix(loss=f"{record.loss:.4f}", lr=f"{record.lr:.2e}")
            bar.update(1)
            if self.progress.step % settings.log_every == 0 or self.progress.step == settings.total_steps:
                self.accelerator.log({"train/loss": record.loss, "train/lr": record.lr,
                                      "train/grad_norm": record.grad_norm,
                                      "train/step_s": record.seconds}, step=self.progress.step)
            if self.progress.step in settings.checkpoint_steps:
                self.save_checkpoint()
        bar.close()
        return self.history

    def train_step(self, micro_batches: list[Batch]) -> StepRecord:
        """One optimizer step over `gradient_accumulation_steps` micro-batches."""
        accelerator, step = self.accelerator, self.progress.step
        self.denoiser.train()
        lr = self.lr_scheduler.get_last_lr()[0]
        total_loss = torch.zeros((), device=accelerator.device)
        for index, (sample_indices, batch) in enumerate(micro_batches):
            if self.settings.log_samples:
                ids = ",".join(self.sample_ids[i] for i in sample_indices)
                print(f"[rank {accelerator.process_index}] step {step + 1} samples {ids}", flush=True)
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            generator = torch.Generator(device=accelerator.device)
            generator.manual_seed(step_seed(self.settings.seed, step, index, accelerator.process_index))
            last = index == len(micro_batches) - 1
            # gradients are all-reduced once, on the last micro-batch
            with nullcontext() if last else accelerator.no_sync(self.denoiser), accelerator.autocast():
                loss = self.family.compute_loss(self.denoiser, batch, generator)
            accelerator.backward(loss / len(micro_batches))
            total_loss += loss.detach()

        params = trainable_parameters(self.denoiser)
        max_norm = self.settings.max_grad_norm if self.settings.max_grad_norm > 0 else math.inf
        grad_norm = accelerator.clip_grad_norm_(params, max_norm)
        loss_value = float(total_loss) / len(micro_batches)  # the one host sync of the step
        grad_value = float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"step {step + 1}: loss={loss_value} grad_norm={grad_value}; the update was skipped, so the LoRA "
                f"is as it was after step {step}. Lower the learning rate or check the dataset; the newest "
                f"valid checkpoint in {self.checkpointer.output_dir} can be resumed."
            )
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepRecord(step=step + 1, loss=loss_value, lr=lr, grad_norm=grad_value)

    # ---- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.progress.step, "cursor": self.progress.cursor,
                "lr_scheduler": self.lr_scheduler.state_dict(), "identity": self.identity}

    def save_checkpoint(self) -> Path:
        unwrapped = self.accelerator.unwrap_model(self.denoiser)

        def write(directory: Path) -> None:
            self.family.save_lora(directory, lora_state_dict(unwrapped), adapter_metadata(unwrapped))
            (directory / "resume").mkdir()
            torch.save(self.optimizer.state_dict(), directory / "resume" / "optimizer.pt")
            (directory / "resume" / "state.json").write_text(json.dumps(self.state_dict(), indent=1))

        path = self.checkpointer.save(self.progress.step, write)
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore LoRA, optimizer, LR schedule and counters; refuse a checkpoint made for another setup."""
        state = json.loads((path / "resume" / "state.json").read_text())
        saved = state["identity"]
        for key in ("base_fingerprint", "family", "lora"):
            if saved.get(key) != self.identity.get(key):
                raise ResumeError(
                    f"cannot resume from {path}: its {key} is {saved.get(key)!r} but this run has "
                    f"{self.identity.get(key)!r}. Resume with the same base model and LoRA settings, or start "
                    "a new run in a fresh output directory."
                )
        for key in ("training_parameters", "engine_config"):
            if saved.get(key) != self.identity.get(key):
                log.warning("resuming %s with a different %s than it was saved with", path, key)
        unwrapped = self.accelerator.unwrap_model(self.denoiser)
        load_lora_state(unwrapped, load_file(path / LORA_FILE), self.family.lora_key_prefix)
        self.optimizer.load_state_dict(torch.load(path / "resume" / "optimizer.pt", weights_only=True))
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.progress = Progress(step=state["step"], cursor=state["cursor"])
