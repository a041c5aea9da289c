"""The learning rate of every optimizer step, for each of the contract's six schedulers."""

from __future__ import annotations

import math

import pytest

from tailoredgen_train.contract import resolve_training_parameters
from tailoredgen_train.engine.schedule import learning_rates

LR = 1e-4


def rates(scheduler: str, steps: int = 200, **extra) -> list[float]:
    request = {"lr_scheduler": scheduler, "total_training_steps": steps, "learning_rate": LR, **extra}
    return learning_rates(resolve_training_parameters("fibo", "expert", request))


def test_constant_never_changes():
    assert rates("constant") == [LR] * 200


def test_constant_with_warmup_ramps_linearly_then_holds():
    lrs = rates("constant_with_warmup", lr_warmup_steps=100)
    assert lrs[0] == 0.0  # diffusers' warmup starts at zero
    assert math.isclose(lrs[50], LR / 2) and math.isclose(lrs[99], LR * 0.99)
    assert lrs[100:] == [LR] * 100


def test_constant_with_warmup_uses_the_default_warmup_of_100():
    lrs = rates("constant_with_warmup")
    assert lrs[99] < LR and lrs[100] == LR


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant"])
def test_warmup_is_not_applied_where_the_contract_reports_it_as_null(scheduler):
    # the client's lr_warmup_steps is accepted but reported null, and the schedule starts at full lr
    lrs = rates(scheduler, lr_warmup_steps=100)
    assert lrs[0] == LR


def test_linear_decays_to_zero_at_the_end():
    lrs = rates("linear")
    assert lrs[0] == LR and math.isclose(lrs[100], LR / 2) and math.isclose(lrs[-1], LR / 200)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cosine_is_half_way_at_the_middle():
    lrs = rates("cosine")
    assert lrs[0] == LR and math.isclose(lrs[100], LR / 2, rel_tol=1e-9)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_polynomial_power_one_decays_linearly_to_its_floor():
    lrs = rates("polynomial")
    assert lrs[0] == LR and lrs[-1] < lrs[100] < lrs[0]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cosine_with_restarts_with_one_cycle_is_cosine():
    assert rates("cosine_with_restarts") == pytest.approx(rates("cosine"))


def test_the_schedule_is_a_pure_function_of_the_step():
    assert rates("cosine") == rates("cosine")
    assert rates("cosine") != rates("linear")  # negative control
