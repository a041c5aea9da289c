"""The training loop. `train()` only sequences steps; `train_step()` owns accumulation, clipping and
the non-finite guard; the family's `compute_loss` is the only model-specific piece.

Counters are state: (step, cursor) plus the optimizer and LR-scheduler states are everything a
resumed run needs, because the batch order is a pure function of (seed, global micro-batch position)
and so is each micro-batch's randomness. Global micro-batch j goes to process j % P, so an optimizer
step trains on the same global batch, with the same noise, on 1 or P processes (P times faster).
"""

from __future__ import annotations

import gc
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..errors import NonFiniteLossError, OutOfMemoryError, Preempted
from ..families import ModelFamily
from .checkpoint_manager import CheckpointManager, any_process
from .lora import trainable_parameters
from .preemption import StopFlag
from .run_log import console_shows_bar, progress_log

if TYPE_CHECKING:
    from ..inference.validation import Validator

log = logging.getLogger(__name__)
Batch = tuple[list[int], dict[str, torch.Tensor]]


def micro_batch_seed(seed: int, position: int) -> int:
    """A distinct, reproducible seed per global micro-batch position: whichever process trains that
    micro-batch draws the same noise and timesteps, and resuming needs no RNG state."""
    return ((seed * 1_000_003) * 8_191 + position) % (2**63 - 1)


def micro_batch_position(cursor: int, index: int, rank: int, num_processes: int) -> int:
    """The global position of a process's `index`-th micro-batch of the step starting at `cursor`."""
    return cursor + index * num_processes + rank


@dataclass
class Progress:
    step: int = 0
    """Optimizer steps completed (skipped non-finite steps count: the schedule moves on)."""
    cursor: int = 0
    """Global micro-batches consumed by all processes together (the same number on every process)."""
    consecutive_nonfinite: int = 0


@dataclass
class TrainerSettings:
    total_steps: int
    checkpoint_steps: list[int]
    gradient_accumulation_steps: int
    """Micro-batches per process per optimizer step: optim.global_batch_size / (batch size x processes)."""
    max_grad_norm: float
    seed: int
    log_every: int
    max_consecutive_nonfinite: int = 3
    log_samples: bool = False
    stop_after_steps: int | None = None
    sync_every_step: bool = True
    """False: read the loss back only on logging/checkpoint steps; the optimizer then skips a
    non-finite step on the device (fused AdamW's found_inf), and the host learns of it later."""


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float
    skipped: bool = False
    """The loss or gradient was not finite, so the update was not applied."""
    seconds: float = 0.0
    """Host wall time of the optimizer step, data loading included, up to its loss read-back when it
    has one (every step unless sync_every_step is off): then it includes the step's device work."""


@dataclass
class Trainer:
    family: ModelFamily
    denoiser: torch.nn.Module  # as prepared by accelerate (maybe DDP-wrapped)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    accelerator: Accelerator
    batches_from: Callable[[int], Iterator[Batch]]
    """cursor -> this process's batches from that position on."""
    checkpoints: CheckpointManager
    settings: TrainerSettings
    sample_ids: list[str] = field(default_factory=list)
    stop_flag: StopFlag = field(default_factory=StopFlag)
    progress: Progress = field(default_factory=Progress)
    history: list[StepRecord] = field(default_factory=list)
    validator: Validator | None = None
    """Renders sample images at checkpoints (and every `validation.every` steps) on the main process."""
    record_steps: Callable[[list[StepRecord]], None] | None = None
    """Receives each step's record once its values are on the host (metrics.jsonl), main process only."""
    after_checkpoint: Callable[[int], None] | None = None
    """Called on the main process once a checkpoint is committed (the run report is rebuilt)."""
    _recorded: int = field(default=0, repr=False)
    _pending: list[tuple[StepRecord, torch.Tensor]] = field(default_factory=list, repr=False)
    """Steps whose loss/grad norm/skip flag are still on the device (sync_every_step=False)."""

    # ---- the loop -----------------------------------------------------------------------------

    def train(self) -> list[StepRecord]:
        settings = self.settings
        main = self.accelerator.is_main_process
        self._render_baseline()
        batches = self.batches_from(self.progress.cursor)
        # a terminal gets the bar, a pipe or file the step lines (run_log.py): never both
        bar = tqdm(total=settings.total_steps, initial=self.progress.step, desc="train",
                   disable=not (main and console_shows_bar()), dynamic_ncols=True)
        while self.progress.step < settings.total_steps:
            started = time.perf_counter()
            micro_batches = [next(batches) for _ in range(settings.gradient_accumulation_steps)]
            record = self._guarded_step(micro_batches)
            self.progress.step += 1
            self.progress.cursor += len(micro_batches) * self.accelerator.num_processes
            self.history.append(record)
            step = self.progress.step
            logging_step = step % settings.log_every == 0 or step == settings.total_steps
            stopping = bool(settings.stop_after_steps and step >= settings.stop_after_steps)
            synced = settings.sync_every_step or logging_step or stopping or step in settings.checkpoint_steps
            if synced:
                self._resolve_pending()  # the only host sync when sync_every_step is off
                bar.set_postfix(loss=f"{record.loss:.4f}", lr=f"{record.lr:.2e}", refresh=False)
            record.seconds = time.perf_counter() - started  # after the sync, when the step has one
            if synced:
                self._record_resolved_steps()
            bar.update(1)
            if logging_step:
                self.accelerator.log({"train/loss": record.loss, "train/lr": record.lr,
                                      "train/grad_norm": record.grad_norm, "train/step_s": record.seconds,
                                      "train/skipped": float(record.skipped)}, step=self.progress.step)
                if main:  # what the progress bar shows a terminal, as a line a log file keeps
                    progress_log.info("step %d/%d: loss %.4f, lr %.2e, grad_norm %.3f, %.3f s/step%s", step,
                                      settings.total_steps, record.loss, record.lr, record.grad_norm, record.seconds,
                                      " (skipped: not finite)" if record.skipped else "")
            if self.progress.step in settings.checkpoint_steps:
                self.save_checkpoint()
            elif self.validator is not None and self.validator.plan.renders_between_checkpoints(step):
                self._render_between_checkpoints(step)
            # with several processes the vote is a collective: taken at sync points unless every step syncs
            if (synced or self.accelerator.num_processes == 1) and self._any_process(
                    self.stop_flag.requested is not None):
                self._resolve_pending()
                self._stop_for_signal()
            if settings.stop_after_steps and self.progress.step >= settings.stop_after_steps:
                if self.progress.step not in settings.checkpoint_steps:
                    self.save_resume_state()
                bar.close()  # the message gets a line of its own, after the bar's last state
                if self.accelerator.is_main_process:
                    log.warning(self._stopped_early_message())
                break
        self._resolve_pending()
        self._record_resolved_steps()
        bar.close()
        return self.history

    def _record_resolved_steps(self) -> None:
        """Hand the steps whose values are now on the host to `record_steps`, each once."""
        if self.record_steps is not None and self.accelerator.is_main_process and self._recorded < len(self.history):
            self.record_steps(self.history[self._recorded:])
        self._recorded = len(self.history)

    # ---- validation renders -------------------------------------------------------------------

    def _render_baseline(self) -> None:
        """Samples of the base model before step 1, once per run (a resume past step 0 has none to make)."""
        validator = self.validator
        if validator is None or not validator.plan.at_start or self.progress.step != 0:
            return
        if self.accelerator.is_main_process and not validator.baseline_exists():
            self._write_samples_safely(0, validator.render(self.denoiser, 0))
        self.accelerator.wait_for_everyone()  # the other processes wait for the main one's render

    def _render_between_checkpoints(self, step: int) -> None:
        if self.accelerator.is_main_process:
            self._write_samples_safely(step, self.validator.render(self.denoiser, step))
        self.accelerator.wait_for_everyone()

    def _write_samples_safely(self, step: int, images) -> None:
        try:
            self.validator.write_between_checkpoints(step, images)
        except OSError as exc:  # samples are a view of training, not a reason to stop it
            log.warning("could not write the validation samples of step %d: %s", step, exc)

    def _guarded_step(self, micro_batches: list[Batch]) -> StepRecord:
        try:
            return self.train_step(micro_batches)
        except torch.OutOfMemoryError as exc:
            self.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise OutOfMemoryError(
                f"out of memory in step {self.progress.step + 1} ({str(exc).splitlines()[0]}). Lower the memory "
                "a step needs: set run.gradient_checkpointing=true, a lower data.resolution, a smaller "
                "data.batch_size (accumulation grows to keep optim.global_batch_size), "
                f"or fewer processes per GPU. The checkpoints in {self.checkpoints.output_dir} are intact; "
                "--resume continues from the newest."
            ) from None

    def train_step(self, micro_batches: list[Batch]) -> StepRecord:
        """One optimizer step over this process's `gradient_accumulation_steps` micro-batches of the
        global batch. A non-finite loss or gradient skips the update; too many in a row fail the run."""
        accelerator, step = self.accelerator, self.progress.step
        self.denoiser.train()
        lr = self.lr_scheduler.get_last_lr()[0]
        total_loss = torch.zeros((), device=accelerator.device)
        for index, (sample_indices, batch) in enumerate(micro_batches):
            if self.settings.log_samples:
                ids = ",".join(self.sample_ids[i] for i in sample_indices)
                # one write per line: processes share the pipe, and `python -u` would split a print
                sys.stdout.write(f"[rank {accelerator.process_index}] step {step + 1} samples {ids}\n")
                sys.stdout.flush()
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            generator = torch.Generator(device=accelerator.device)
            position = micro_batch_position(self.progress.cursor, index, accelerator.process_index,
                                            accelerator.num_processes)
            generator.manual_seed(micro_batch_seed(self.settings.seed, position))
            last = index == len(micro_batches) - 1
            # gradients are all-reduced (averaged over processes) once, on the last micro-batch: with the
            # 1/accumulation scale below, the gradient is the mean over the global batch on any P
            with nullcontext() if last else accelerator.no_sync(self.denoiser), accelerator.autocast():
                loss = self.family.compute_loss(self.denoiser, batch, generator)
            accelerator.backward(loss / len(micro_batches))
            total_loss += loss.detach()

        params = trainable_parameters(self.denoiser)
        max_norm = self.settings.max_grad_norm if self.settings.max_grad_norm > 0 else math.inf
        grad_norm = accelerator.clip_grad_norm_(params, max_norm)
        loss = total_loss / len(micro_batches)
        if accelerator.num_processes > 1:
            # the global batch's mean loss, the same on every process: a non-finite loss on any of them
            # makes it non-finite everywhere, so every process skips together (the gradient norm is global)
            loss = accelerator.reduce(loss.reshape(1), "mean")[0]
        if not self.settings.sync_every_step:
            return self._update_on_device(step, loss, grad_norm, lr)
        loss_value = float(loss)  # the one host sync of the step
        grad_value = float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
            return self._skip_update(step, loss_value, grad_value, lr)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.consecutive_nonfinite = 0
        return StepRecord(step=step + 1, loss=loss_value, lr=lr, grad_norm=grad_value)

    def _update_on_device(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> StepRecord:
        """The update without waiting for the loss: fused AdamW skips it on the device when the loss
        or gradient is not finite (found_inf, as under GradScaler); the host counts it when it syncs."""
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))  # the same on every process (both are global)
        self.optimizer.grad_scale, self.optimizer.found_inf = None, bad.float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale, self.optimizer.found_inf
        self.lr_scheduler.step()  # a skipped step still counts, as on the host path
        self.optimizer.zero_grad(set_to_none=True)
        record = StepRecord(step=step + 1, loss=math.nan, lr=lr, grad_norm=math.nan)
        self._pending.append((record, torch.stack([loss.float(), grad_norm.float(), bad.float()]).detach()))
        return record

    def _resolve_pending(self) -> None:
        """Read the pending steps' values back in one transfer and count their non-finite steps."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        values = torch.stack([v for _, v in pending]).tolist()
        for (record, _), (loss_value, grad_value, bad) in zip(pending, values):
            record.loss, record.grad_norm, record.skipped = loss_value, grad_value, bad > 0
            if record.skipped:
                self._count_nonfinite(record.step - 1, loss_value, grad_value)
            else:
                self.progress.consecutive_nonfinite = 0

    def _skip_update(self, step: int, loss_value: float, grad_value: float, lr: float) -> StepRecord:
        self.optimizer.zero_grad(set_to_none=True)
        self._count_nonfinite(step, loss_value, grad_value)
        self.lr_scheduler.step()  # a skipped step still counts, so checkpoints stay on schedule
        return StepRecord(step=step + 1, loss=loss_value, lr=lr, grad_norm=grad_value, skipped=True)

    def _count_nonfinite(self, step: int, loss_value: float, grad_value: float) -> None:
        self.progress.consecutive_nonfinite += 1
        limit = self.settings.max_consecutive_nonfinite
        if self.progress.consecutive_nonfinite > limit:
            raise NonFiniteLossError(
                f"step {step + 1}: loss={loss_value} grad_norm={grad_value}, the "
                f"{self.progress.consecutive_nonfinite}th non-finite step in a row (optim.max_consecutive_nonfinite="
                f"{limit}). Lower the learning rate or check the dataset; no update was applied, and the newest "
                f"valid resume state in {self.checkpoints.output_dir} can be resumed."
            )
        log.warning("step %d: loss=%s grad_norm=%s is not finite; update skipped (%d in a row, limit %d)",
                    step + 1, loss_value, grad_value, self.progress.consecutive_nonfinite, limit)

    def _any_process(self, flag: bool) -> bool:
        return any_process(self.accelerator, flag)

    def _stop_for_signal(self) -> None:
        signum = self.stop_flag.requested or 15
        if self.progress.step not in self.settings.checkpoint_steps:  # else it was saved a moment ago
            self.save_resume_state()
        raise Preempted(
            f"stopped by signal {signum} after step {self.progress.step}; resume state saved in "
            f"{self.checkpoints.resume_path_for(self.progress.step)}. Run again with --resume to continue.",
            signum,
        )

    def _stopped_early_message(self) -> str:
        """Where a run cut short by run.stop_after_steps left its state, what it published, how to go on."""
        step = self.progress.step
        published = [s for s in self.checkpoints.checkpointer.published_steps() if s <= step]
        if not published:
            upcoming = [s for s in self.settings.checkpoint_steps if s > step]
            lora = "no LoRA published" + (f" (the next checkpoint is step {upcoming[0]})" if upcoming else "")
        else:
            lora = (f"LoRA published for step(s) {', '.join(map(str, published))}, newest in "
                    f"{self.checkpoints.checkpointer.path_for(published[-1])}")
            if published[-1] < step:
                since = published[-1] + 1
                lora += f"; none for step {step}" if since == step else f"; none for steps {since}-{step}"
        return (f"stopped after step {step} of {self.settings.total_steps} (run.stop_after_steps="
                f"{self.settings.stop_after_steps}): resume state in {self.checkpoints.resume_path_for(step)}; "
                f"{lora}. To continue, run the same command with --resume and without --set run.stop_after_steps "
                "(or with a larger value).")

    # ---- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Publish this step's LoRA with its validation samples (one commit: the samples exist
        exactly when their checkpoint does), then its resume state."""
        step = self.progress.step
        images = self.validator.render(self.denoiser, step) if self.validator is not None else None
        path = self.checkpoints.save(self.denoiser, self.progress, extra=(
            (lambda staging: self.validator.write_into_checkpoint(staging, images)) if images else None))
        if self.after_checkpoint is not None and self.accelerator.is_main_process:
            self.after_checkpoint(step)
        return path

    def save_resume_state(self) -> Path:
        return self.checkpoints.save_resume(self.denoiser, self.progress)

    def load_resume_state(self, path: Path) -> None:
        """Continue from a resume state (refused when it was made for another setup)."""
        self.progress = Progress(**self.checkpoints.restore(self.denoiser, path))
