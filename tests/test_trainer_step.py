"""train_step in isolation (a bare Trainer with fake collaborators): the non-finite guard fires
before the optimizer touches the weights, and accumulation averages micro-batches."""

from __future__ import annotations

from unittest.mock import MagicMock

import pytest
import torch
from accelerate import Accelerator

from tailoredgen_train.engine.checkpoint_manager import CheckpointManager
from tailoredgen_train.engine.trainer import (Progress, Trainer, TrainerSettings, micro_batch_position,
                                              micro_batch_seed)
from tailoredgen_train.errors import NonFiniteLossError


class FakeFamily:
    """compute_loss = sum of weights times the batch's scale (nan/inf to poison a step)."""

    def __init__(self):
        self.seeds = []

    def compute_loss(self, denoiser, batch, generator):
        self.seeds.append(generator.initial_seed())
        return (denoiser.weight.sum() * batch["scale"]).squeeze()


def bare_trainer(accumulation: int = 1, max_grad_norm: float = 1.0, max_nonfinite: int = 0,
                 real_optimizer: bool = True) -> Trainer:
    denoiser = torch.nn.Linear(2, 1, bias=False)
    # a real optimizer behind a recording mock: calls are checked, zero_grad really clears
    optimizer = MagicMock(wraps=torch.optim.SGD(denoiser.parameters(), lr=0.1) if real_optimizer else None)
    scheduler = MagicMock()
    scheduler.get_last_lr.return_value = [1e-4]
    return Trainer(
        family=FakeFamily(), denoiser=denoiser, optimizer=optimizer, lr_scheduler=scheduler,
        accelerator=Accelerator(cpu=True), batches_from=lambda cursor: iter(()), checkpoints=MagicMock(),
        settings=TrainerSettings(total_steps=10, checkpoint_steps=[], gradient_accumulation_steps=accumulation,
                                 max_grad_norm=max_grad_norm, seed=3, log_every=1,
                                 max_consecutive_nonfinite=max_nonfinite),
        progress=Progress(step=4, cursor=8),
    )


def micro(scale: float) -> tuple[list[int], dict[str, torch.Tensor]]:
    return [0], {"scale": torch.tensor([scale])}


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_loss_fails_before_the_update_when_no_skips_are_allowed(poison):
    trainer = bare_trainer(max_nonfinite=0)
    before = trainer.denoiser.weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match="step 5") as info:
        trainer.train_step([micro(poison)])
    assert info.value.code == "non_finite_loss"
    trainer.optimizer.step.assert_not_called()
    assert torch.equal(trainer.denoiser.weight, before)
    # the poisoned gradients are dropped, not left to leak into a later step
    trainer.optimizer.zero_grad.assert_called_once_with(set_to_none=True)


def test_non_finite_steps_are_skipped_up_to_the_limit_then_fail():
    trainer = bare_trainer(max_nonfinite=2)
    records = [trainer.train_step([micro(float("nan"))]) for _ in range(2)]
    assert all(r.skipped for r in records) and trainer.progress.consecutive_nonfinite == 2
    trainer.optimizer.step.assert_not_called()
    assert trainer.lr_scheduler.step.call_count == 2  # skipped steps still advance the schedule
    with pytest.raises(NonFiniteLossError, match="3th non-finite step in a row"):
        trainer.train_step([micro(float("nan"))])
    trainer.optimizer.step.assert_not_called()


def test_a_finite_step_resets_the_streak():
    trainer = bare_trainer(max_nonfinite=1)
    trainer.train_step([micro(float("nan"))])
    trainer.train_step([micro(1.0)])
    assert trainer.progress.consecutive_nonfinite == 0
    trainer.train_step([micro(float("nan"))])  # allowed again: the streak restarted
    trainer.optimizer.step.assert_called_once()


def test_a_finite_step_updates_once():
    """Positive control for the guard."""
    trainer = bare_trainer()
    record = trainer.train_step([micro(2.0)])
    trainer.optimizer.step.assert_called_once()
    trainer.lr_scheduler.step.assert_called_once()
    assert record.step == 5 and record.lr == 1e-4


def test_accumulation_averages_micro_batches_and_seeds_each_one():
    # a pure mock optimizer keeps the accumulated gradient in place for inspection
    trainer = bare_trainer(accumulation=2, max_grad_norm=0.0, real_optimizer=False)  # 0: no clipping
    record = trainer.train_step([micro(1.0), micro(3.0)])
    weight_sum = float(trainer.denoiser.weight.detach().sum())
    assert record.loss == pytest.approx(weight_sum * 2.0)
    assert torch.allclose(trainer.denoiser.weight.grad, torch.full((1, 2), 2.0))  # (1 + 3) / 2
    # one process: its micro-batches are the global positions cursor, cursor + 1
    assert trainer.family.seeds == [micro_batch_seed(3, 8), micro_batch_seed(3, 9)]


def test_clipping_bounds_the_gradient_norm():
    trainer = bare_trainer(max_grad_norm=1.0, real_optimizer=False)
    record = trainer.train_step([micro(2.0)])
    assert record.grad_norm == pytest.approx(2 * 2**0.5)  # reported before clipping
    assert float(trainer.denoiser.weight.grad.norm()) == pytest.approx(1.0, rel=1e-5)


def test_micro_batch_seeds_differ_by_position():
    assert len({micro_batch_seed(0, position) for position in range(2000)}) == 2000
    assert micro_batch_seed(0, 5) != micro_batch_seed(1, 5)


@pytest.mark.parametrize("processes, accumulation", [(1, 4), (2, 2), (4, 1), (3, 2)])
def test_processes_share_each_global_batch_exactly_once(processes, accumulation):
    # a step at cursor c covers global micro-batches [c, c + global), whatever the process count
    cursor = 12
    positions = [micro_batch_position(cursor, index, rank, processes)
                 for rank in range(processes) for index in range(accumulation)]
    assert sorted(positions) == list(range(cursor, cursor + processes * accumulation))


def test_non_finite_weights_are_never_saved(monkeypatch):
    import tailoredgen_train.engine.checkpoint_manager as manager_module

    trainer = bare_trainer()
    checkpointer = MagicMock()
    trainer.checkpoints = CheckpointManager(checkpointer, family=FakeFamily(), accelerator=trainer.accelerator,
                                            optimizer=trainer.optimizer, lr_scheduler=trainer.lr_scheduler,
                                            identity={})
    monkeypatch.setattr(manager_module, "lora_state_dict", lambda model: {"a.lora_A.weight": torch.tensor([float("nan")])})
    with pytest.raises(NonFiniteLossError, match="refusing to save"):
        trainer.save_checkpoint()
    with pytest.raises(NonFiniteLossError, match="refusing to save"):
        trainer.save_resume_state()
    checkpointer.publish.assert_not_called()
    checkpointer.save_resume.assert_not_called()
