"""What a checkpoint holds, and how every process agrees on writing it.

The trainer calls `save` (a published LoRA, then the resume state), `save_resume` (resume state
only: a stop) and `restore`; it knows nothing of files. The folders themselves are committed by
`Checkpointer` (checkpoint.py): complete or absent, never half-written. Only the main process
copies the state to the host and serialises it, streaming each file to disk; the other processes
only wait for its verdict. A restore maps every tensor straight onto the restoring process's device.

A resume state is the LoRA, the optimizer state, the LR-schedule state and the counters (step,
cursor): the batch order and all randomness are pure functions of (seed, global micro-batch
position), so nothing else is needed to continue bit-identically, on any number of processes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors

from ..errors import CheckpointWriteError, NonFiniteLossError, ResumeError
from .checkpoint import Checkpointer
from .lora import adapter_metadata, load_lora_state, lora_state_dict

log = logging.getLogger(__name__)


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process if it is true on any: processes must take the same branch."""
    if accelerator.num_processes == 1:
        return flag  # no collective, no host sync
    if flag:
        accelerator.set_trigger()
    return accelerator.check_trigger()  # one all-reduce; it resets the trigger when it fired


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
        host_copy: dict[str, torch.Tensor] = {}  # the LoRA on the host, main process only, reused below

        def publish() -> None:
            host_copy.update(self.lora_state(unwrapped, progress.step))

            def write(directory: Path) -> None:
                self.family.save_lora(directory, host_copy, adapter_metadata(unwrapped))
                if extra is not None:
                    extra(directory)

            self.checkpointer.publish(progress.step, write)

        path = self._on_main_process(self.checkpointer.path_for(progress.step), publish)
        self.save_resume(denoiser, progress, host_copy or None)
        return path

    def save_resume(self, denoiser: torch.nn.Module, progress: Any,
                    lora_state: dict[str, torch.Tensor] | None = None) -> Path:
        def write() -> None:
            lora = lora_state if lora_state is not None else self.lora_state(
                self.accelerator.unwrap_model(denoiser), progress.step)
            state = {"step": progress.step, "cursor": progress.cursor,
                     "consecutive_nonfinite": progress.consecutive_nonfinite,
                     "lr_scheduler": self.lr_scheduler.state_dict(), "identity": self.identity}
            # each file streams into the staging folder, hashed on the way: no in-memory copy of the
            # optimizer state (torch.save moves one tensor at a time to the host)
            self.checkpointer.save_resume(progress.step, {
                "adapter.safetensors": lambda handle: handle.write(save_safetensors(lora)),
                "optimizer.pt": lambda handle: torch.save(self.optimizer.state_dict(), handle),
                "state.json": lambda handle: handle.write(json.dumps(state, indent=1).encode()),
            })

        return self._on_main_process(self.checkpointer.resume_path_for(progress.step), write)

    @staticmethod
    def lora_state(unwrapped: torch.nn.Module, step: int) -> dict[str, torch.Tensor]:
        state = lora_state_dict(unwrapped)
        bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
        if bad:
            raise NonFiniteLossError(f"LoRA weights are not finite after step {step} ({bad[:3]}); refusing to save them")
        return state

    def _on_main_process(self, path: Path, write: Callable[[], None]) -> Path:
        """Run a checkpoint write of `path` on the main process only (the others hold no copy of the
        state) and make its failure every process's failure, so that none is left waiting at the
        next collective."""
        error: CheckpointWriteError | NonFiniteLossError | None = None
        if self.accelerator.is_main_process:
            try:
                write()
            except (CheckpointWriteError, NonFiniteLossError) as exc:
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
        # each process loads straight onto its own device (without map_location every process's
        # optimizer state would land on the device it was saved from: cuda:0)
        device = self.accelerator.device
        device = torch.device("cpu") if device.type == "cpu" else device  # gloo ranks have cpu:0, which loaders refuse
        load_lora_state(self.accelerator.unwrap_model(denoiser),
                        load_safetensors_file(path / "adapter.safetensors", device=str(device)))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        return {"step": state["step"], "cursor": state["cursor"],
                "consecutive_nonfinite": state.get("consecutive_nonfinite", 0)}
