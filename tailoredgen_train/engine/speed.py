"""Speed and memory levers of the training step: which blocks are checkpointed, regional
torch.compile, and the optimizer (fused AdamW, 8-bit states, or states offloaded to the CPU).

Measured anchors behind the defaults: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import EngineConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)
GIB = 2**30


def _checkpointed(forward, *args, **kwargs):
    # non-reentrant: works with keyword arguments, frozen inputs and compiled forwards
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpointed_blocks_for_memory(*, num_blocks: int, block_bytes: int, reserve_bytes: int, free_bytes: int) -> int:
    """How many blocks must recompute their activations so that the rest fit in `free_bytes`."""
    if block_bytes <= 0:
        return num_blocks
    keep = max(0, (free_bytes - reserve_bytes) // block_bytes)
    return max(0, num_blocks - int(keep))


def resolve_checkpointing(policy: bool | int | str, *, device: torch.device, num_blocks: int,
                          block_bytes: int | None, trainable_bytes: int, optimizer: str) -> int | bool:
    """run.gradient_checkpointing -> True (every block, the model's own switch), False, or a count
    of blocks. "auto" estimates the step's memory from free device memory (never on CPU)."""
    if isinstance(policy, bool):
        return policy
    if policy != "auto":
        return True if num_blocks and policy >= num_blocks else int(policy)
    if device.type != "cuda":
        return False  # host memory is not what limits a CPU run
    if block_bytes is None or not num_blocks:
        return True  # no estimate for this family: the safe choice
    free, total = torch.cuda.mem_get_info(device)
    states = {"adamw": 2.0, "adamw_8bit": 0.5, "adamw_cpu_offload": 0.0}[optimizer] * trainable_bytes
    # gradients + optimizer states + one block's recompute + 10% of the card for the allocator
    reserve = int(trainable_bytes + states + block_bytes + 0.1 * total)
    count = checkpointed_blocks_for_memory(num_blocks=num_blocks, block_bytes=block_bytes, reserve_bytes=reserve,
                                           free_bytes=free)
    log.info("gradient_checkpointing=auto: %.1f GiB free, ~%.2f GiB of activations per block -> %d of %d blocks "
             "checkpointed", free / GIB, block_bytes / GIB, count, num_blocks)
    return True if count >= num_blocks else count


def apply_block_policy(denoiser: nn.Module, blocks: list[nn.Module], *, checkpointing: int | bool,
                       compile_blocks: bool, device: torch.device) -> None:
    """Checkpoint all blocks (the model's switch), the last `checkpointing` blocks, or none; compile
    each block on its own (regional: one small graph per block class, compiled once, reused).
    A family without a block list (SDXL's UNet) gets the model's own switches: checkpointing all or
    nothing, and diffusers' `compile_repeated_blocks` (the classes the model names)."""
    if compile_blocks and device.type != "cuda":
        log.warning("run.compile_blocks is for CUDA; not compiling on %s", device.type)
        compile_blocks = False
    if not blocks:
        if checkpointing:  # True or a count: with no block list it is all or nothing
            denoiser.enable_gradient_checkpointing()
        if compile_blocks:
            if getattr(denoiser, "_repeated_blocks", None):
                denoiser.compile_repeated_blocks()
            else:
                log.warning("run.compile_blocks: %s names no repeated blocks; not compiling", type(denoiser).__name__)
        return
    if checkpointing is True and not compile_blocks:
        denoiser.enable_gradient_checkpointing()
        return
    count = len(blocks) if checkpointing is True else int(checkpointing)
    for index, block in enumerate(blocks):
        forward = block.forward
        if compile_blocks:
            forward = torch.compile(forward)
        if index >= len(blocks) - count:  # the last blocks: their inputs are the latest to be needed
            forward = functools.partial(_checkpointed, forward)
        if forward is not block.forward:
            block.forward = forward


class CpuOffloadAdamW(torch.optim.AdamW):
    """AdamW over fp32 master copies in pinned host memory, stepped on the CPU: the device holds
    only the LoRA weights and their gradients. Slow (host traffic + CPU math), small."""

    def __init__(self, params: Iterable[nn.Parameter], **kwargs):
        self.device_params = list(params)
        masters = [p.detach().to("cpu", torch.float32, copy=True) for p in self.device_params]
        if torch.cuda.is_available():
            masters = [m.pin_memory() for m in masters]
        # the CPU's fused AdamW: one pass over all tensors, much faster than the per-tensor loop
        super().__init__(masters, **{"fused": True, **kwargs})
        self.masters = masters

    @torch.no_grad()
    def step(self, closure=None):
        for master, param in zip(self.masters, self.device_params):
            if param.grad is None:
                master.grad = None
                continue
            if master.grad is None:
                master.grad = torch.empty_like(master, pin_memory=master.is_pinned())
            master.grad.copy_(param.grad, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the gradients must have landed before the CPU reads them
        loss = super().step(closure)
        for master, param in zip(self.masters, self.device_params):
            param.copy_(master, non_blocking=True)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.device_params:
            param.grad = None
        super().zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        with torch.no_grad():  # the weights were restored on the device: refresh the masters
            for master, param in zip(self.masters, self.device_params):
                master.copy_(param)


def build_optimizer(params: list[nn.Parameter], *, learning_rate: float, config: EngineConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    optim = config.optim
    kwargs = dict(lr=learning_rate, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_epsilon,
                  weight_decay=optim.weight_decay)
    if optim.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optim.optimizer=adamw_8bit needs bitsandbytes (pip install bitsandbytes); "
                              "without it use adamw_cpu_offload for a small footprint, or adamw") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    if optim.optimizer == "adamw_cpu_offload":
        return CpuOffloadAdamW(params, **kwargs)
    # fused: one kernel for all LoRA tensors, and it can skip a non-finite step on the device
    return torch.optim.AdamW(params, fused=device.type == "cuda", **kwargs)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Fused torch Adam/AdamW honour `found_inf` (as for GradScaler): a step can be skipped without
    the host knowing yet, so the loop need not wait for the loss."""
    return type(optimizer) in (torch.optim.AdamW, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))


def resolve_host_sync(mode: str, optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """run.host_sync -> True when every step reads its loss back."""
    possible = device.type == "cuda" and skips_on_device(optimizer)
    if mode == "log" and not possible:
        raise ConfigError("run.host_sync=log needs optim.optimizer=adamw on CUDA (fused AdamW skips a non-finite "
                          "step on the device); use auto or step")
    return mode == "step" or (mode == "auto" and not possible)


def bytes_of(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def gib(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value / GIB, 3)
