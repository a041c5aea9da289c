"""Learning-rate schedules: diffusers' six, as pure functions of the optimizer step."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LambdaLR

from ..config import OptimConfig
from ..contract import TrainingParameters


def build_lr_scheduler(optimizer: torch.optim.Optimizer, params: TrainingParameters, optim: OptimConfig) -> LambdaLR:
    """Warmup applies only where the contract reports it (constant_with_warmup): what is reported
    is what runs. The schedule is stepped once per optimizer step, on every process alike."""
    return get_scheduler(
        params.lr_scheduler, optimizer, num_warmup_steps=params.effective_warmup_steps,
        num_training_steps=params.total_training_steps, num_cycles=optim.lr_num_cycles, power=optim.lr_power,
    )


def learning_rates(params: TrainingParameters, optim: OptimConfig | None = None) -> list[float]:
    """The learning rate each optimizer step 1..total uses (for reports and tests)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=params.learning_rate)
    scheduler = build_lr_scheduler(optimizer, params, optim or OptimConfig())
    rates = []
    for _ in range(params.total_training_steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates
