"""Shared fixtures: a tiny FIBO base built with the real diffusers/transformers classes. Nothing
here touches a model hub."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tailoredgen_train.families.fibo import FiboFamily


@pytest.fixture(scope="session")
def tiny_fibo_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-fibo-base")
    FiboFamily().make_tiny_base(out, seed=0)
    return out


@pytest.fixture(autouse=True)
def _seed_everything():
    # model construction in tests must not depend on test order
    torch.manual_seed(0)
