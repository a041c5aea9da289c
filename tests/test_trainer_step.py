"""train_step in isolation (a bare Trainer with fake collaborators): the non-finite guard fires
before the optimizer touches the weights, and accumulation averages micro-batches."""

from __future__ import annotations

from unittest.mock import MagicMock

import pytest
import torch
from accelerate import Accelerator

from tailoredgen_train.engine.trainer import Progress, Trainer, TrainerSettings, step_seed
from tailoredgen_train.errors import NonFiniteLossError


class FakeFamily:
    """compute_loss = sum of weights times the batch's scale (nan/inf to poison a step)."""

    def __init__(self):
        self.seeds = []

    def compute_loss(self, denoiser, batch, generator):
        self.seeds.append(generator.initial_seed())
        return (denoiser.weight.sum() * batch["scale"]).squeeze()


def bare_trainer(accumulation: int = 1, max_grad_norm: float = 1.0) -> Trainer:
    denoiser = torch.nn.Linear(2, 1, bias=False)
    optimizer = MagicMock()
    scheduler = MagicMock()
    scheduler.get_last_lr.return_value = [1e-4]
    return Trainer(
        family=FakeFamily(), denoiser=denoiser, optimizer=optimizer, lr_scheduler=scheduler,
        accelerator=Accelerator(cpu=True), batches_from=lambda cursor: iter(()), checkpointer=MagicMock(),
        settings=TrainerSettings(total_steps=10, checkpoint_steps=[], gradient_accumulation_steps=accumulation,
                                 max_grad_norm=max_grad_norm, seed=3, log_every=1),
        identity={}, progress=Progress(step=4, cursor=8),
    )


def micro(scale: float) -> tuple[list[int], dict[str, torch.Tensor]]:
    return [0], {"scale": torch.tensor([scale])}


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_loss_raises_before_the_update(poison):
    trainer = bare_trainer()
    before = trainer.denoiser.weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match="step 5"):
        trainer.train_step([micro(poison)])
    trainer.optimizer.step.assert_not_called()
    trainer.lr_scheduler.step.assert_not_called()
    assert torch.equal(trainer.denoiser.weight, before)
    # the poisoned gradients are dropped, not left to leak into a later step
    trainer.optimizer.zero_grad.assert_called_once_with(set_to_none=True)


def test_a_finite_step_updates_once():
    """Positive control for the guard."""
    trainer = bare_trainer()
    record = trainer.train_step([micro(2.0)])
    trainer.optimizer.step.assert_called_once()
    trainer.lr_scheduler.step.assert_called_once()
    assert record.step == 5 and record.lr == 1e-4


def test_accumulation_averages_micro_batches_and_seeds_each_one():
    trainer = bare_trainer(accumulation=2, max_grad_norm=0.0)  # 0: no clipping
    record = trainer.train_step([micro(1.0), micro(3.0)])
    weight_sum = float(trainer.denoiser.weight.detach().sum())
    assert record.loss == pytest.approx(weight_sum * 2.0)
    assert torch.allclose(trainer.denoiser.weight.grad, torch.full((1, 2), 2.0))  # (1 + 3) / 2
    assert trainer.family.seeds == [step_seed(3, 4, 0, 0), step_seed(3, 4, 1, 0)]


def test_clipping_bounds_the_gradient_norm():
    trainer = bare_trainer(max_grad_norm=1.0)
    record = trainer.train_step([micro(2.0)])
    assert record.grad_norm == pytest.approx(2 * 2**0.5)  # reported before clipping
    assert float(trainer.denoiser.weight.grad.norm()) == pytest.approx(1.0, rel=1e-5)


def test_step_seeds_differ_by_step_micro_batch_and_process():
    seeds = {step_seed(0, s, m, r) for s in range(50) for m in range(4) for r in range(8)}
    assert len(seeds) == 50 * 4 * 8
