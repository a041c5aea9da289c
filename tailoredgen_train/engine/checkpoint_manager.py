"""What a checkpoint holds, and how every process agrees on writing it.

The trainer calls `save` (a published LoRA, then the resume state), `save_resume` (resume state
only: a stop) and `restore`; it knows nothing of files. The folders themselves are committed by
`Checkpointer` (checkpoint.py): complete or absent, never half-written.

A resume state is the LoRA, the optimizer state, the LR-schedule state and the counters (step,
cursor): all randomness is a pure function of (seed, step, micro-batch, rank) and the batch
order of (seed, cursor), so nothing else is needed to continue bit-identically.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..errors import CheckpointWriteError, NonFiniteLossError, ResumeError
from .checkpoint import Checkpointer
from .lora import adapter_metadata, load_lora_state, lora_state_dict

log = logging.getLogger(__name__)


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process if it is true on any: processes must take the same branch."""
    if accelerator.num_processes == 1:
        return flag
    votes = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum")
    return bool(votes.item() > 0)


class CheckpointManager:
    """save(denoiser, progress, extra) / save_resume(denoiser, progress) / restore(denoiser, path)."""

    def __init__(self, checkpointer: Checkpointer, *, family: Any, accelerator: Accelerator,
                 optimizer: torch.optim.Optimizer, lr_scheduler: Any, identity: dict[str, Any]):
        self.checkpointer = checkpointer
        self.family = family
        self.accelerator = accelerator
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.identity = identity
        """What a resume state must match to be resumed here (base fingerprint, LoRA shape, ...)."""

    @property
    def output_dir(self) -> Path:
        return self.checkpointer.output_dir

    def resume_path_for(self, step: int) -> Path:
        return self.checkpointer.resume_path_for(step)

    # ---- saving -------------------------------------------------------------------------------

    def save(self, denoiser: torch.nn.Module, progress: Any,
             extra: Callable[[Path], None] | None = None) -> Path:
        """Publish the LoRA of `progress.step` (plus whatever `extra(staging_dir)` writes beside it,
        committed together), then the resume state: a crash in between redoes the step."""
        unwrapped = self.accelerator.unwrap_model(denoiser)
        state = self.lora_state(unwrapped, progress.step)

        def write(directory: Path) -> None:
            self.family.save_lora(directory, state, adapter_metadata(unwrapped))
            if extra is not None:
                extra(directory)

        path = self._on_every_process(lambda: self.checkpointer.publish(progress.step, write))
        self.save_resume(denoiser, progress, state)
        return path

    def save_resume(self, denoiser: torch.nn.Module, progress: Any,
                    lora_state: dict[str, torch.Tensor] | None = None) -> Path:
        if lora_state is None:
            lora_state = self.lora_state(self.accelerator.unwrap_model(denoiser), progress.step)
        optimizer_bytes = io.BytesIO()
        torch.save(self.optimizer.state_dict(), optimizer_bytes)
        state = {"step": progress.step, "cursor": progress.cursor,
                 "consecutive_nonfinite": progress.consecutive_nonfinite,
                 "lr_scheduler": self.lr_scheduler.state_dict(), "identity": self.identity}
        files = {
            "adapter.safetensors": save_safetensors(lora_state),
            "optimizer.pt": optimizer_bytes.getvalue(),
            "state.json": json.dumps(state, indent=1).encode(),
        }
        return self._on_every_process(lambda: self.checkpointer.save_resume(progress.step, files))

    @staticmethod
    def lora_state(unwrapped: torch.nn.Module, step: int) -> dict[str, torch.Tensor]:
        state = lora_state_dict(unwrapped)
        bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
        if bad:
            raise NonFiniteLossError(f"LoRA weights are not finite after step {step} ({bad[:3]}); refusing to save them")
        return state

    def _on_every_process(self, write: Callable[[], Path]) -> Path:
        """Run a checkpoint write (only the main process really writes) and make its failure every
        process's failure, so that none is left waiting at the next collective."""
        error: CheckpointWriteError | None = None
        try:
            path = write()
        except CheckpointWriteError as exc:
            error = exc
        if any_process(self.accelerator, error is not None):
            raise error or CheckpointWriteError("the main process could not write a checkpoint; see its error")
        return path

    # ---- restoring ----------------------------------------------------------------------------

    def restore(self, denoiser: torch.nn.Module, path: Path) -> dict[str, int]:
        """Load LoRA, optimizer and LR schedule from `path`; return its counters (step, cursor,
        consecutive_nonfinite). A state made for another setup is refused."""
        state = json.loads((path / "state.json").read_text())
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
        load_lora_state(self.accelerator.unwrap_model(denoiser),
                        load_safetensors((path / "adapter.safetensors").read_bytes()))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        return {"step": state["step"], "cursor": state["cursor"],
                "consecutive_nonfinite": state.get("consecutive_nonfinite", 0)}
