"""Shared fixtures: a tiny FIBO base built with the real diffusers/transformers classes. Nothing
here touches a model hub."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tailoredgen_train.fixtures.tiny_bases import make_tiny_base


@pytest.fixture(scope="session")
def tiny_fibo_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-fibo-base")
    make_tiny_base("fibo", out, seed=0)
    return out


@pytest.fixture(scope="session")
def legacy_bases(tmp_path_factory) -> dict[str, Path]:
    """Tiny Bria 3.2 and Bria 2.3 (SDXL) bases, by family name."""
    bases = {}
    for name in ("bria-3.2", "bria-2.3"):
        bases[name] = tmp_path_factory.mktemp(f"tiny-{name}")
        make_tiny_base(name, bases[name], seed=0)
    return bases


@pytest.fixture(autouse=True)
def _seed_everything():
    # model construction in tests must not depend on test order
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """A tiny random Qwen3-VL captioner saved as a real one (make-tiny-base --family fibo-vlm)."""
    from tailoredgen_train.fixtures.tiny_vlm import make_tiny_vlm

    return make_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~20x faster than two
    contending ones (OpenMP barriers), and every comparison in a module runs under the same setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
