"""Validation renders from the denoiser being trained: they agree with the served LoRA file, and they
leave training exactly as it was (LoRA scales, modes, requires_grad, gradients, weights, RNG)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers
from generation_helpers import (FAMILY_NAMES, PROMPTS, base_paths, denoiser_with_lora, fast_settings,
                                pixels, save_lora)
from peft.tuners.lora import LoraLayer

from tailoredgen_train.engine.speed import apply_block_policy
from tailoredgen_train.families import family_class
from tailoredgen_train.inference import LoraPipeline, TrainingRenderer
from tailoredgen_train.inference import render as render_module

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bases(tiny_fibo_base, legacy_bases):
    return base_paths(tiny_fibo_base, legacy_bases)


def training_state(denoiser: torch.nn.Module) -> dict:
    """Everything a render could disturb, copied."""
    return {
        "scaling": [dict(m.scaling) for m in denoiser.modules() if isinstance(m, LoraLayer)],
        "modes": [m.training for m in denoiser.modules()],
        "requires_grad": [p.requires_grad for p in denoiser.parameters()],
        "grads": [p.grad for p in denoiser.parameters()],
        "weights": [p.detach().clone() for p in denoiser.parameters()],
        "cpu_rng": torch.get_rng_state(),
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert after["scaling"] == before["scaling"]  # exact float equality, key by key
    assert after["modes"] == before["modes"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(g is None for g in after["grads"])
    assert all(torch.equal(a, b) for a, b in zip(before["weights"], after["weights"]))
    assert torch.equal(after["cpu_rng"], before["cpu_rng"])


def as_in_training(denoiser: torch.nn.Module) -> None:
    """Train mode with one frozen submodule left in eval (modes differ per module), LoRA trainable,
    and a LoRA scaling that scale-then-unscale by 0.7 does not restore (0.37 * 0.7 / 0.7 != 0.37)."""
    denoiser.train()
    next(m for m in denoiser.modules() if isinstance(m, torch.nn.LayerNorm | torch.nn.GroupNorm)).eval()
    for layer in (m for m in denoiser.modules() if isinstance(m, LoraLayer)):
        layer.scaling["default"] = 0.37
    assert 0.37 * 0.7 / 0.7 != 0.37


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_training_render_matches_the_served_lora_and_leaves_training_untouched(bases, name, tmp_path):
    family = family_class(name)()
    denoiser = denoiser_with_lora(family, bases[name])
    lora = save_lora(family, denoiser, tmp_path)
    prompt = [family.prepare_prompt(PROMPTS[name])]
    settings = fast_settings(influence=0.7)

    renderer = TrainingRenderer(family, bases[name], device="cpu", weight_dtype=torch.float32)
    as_in_training(denoiser)
    before = training_state(denoiser)
    rendered = pixels(renderer.render(denoiser, prompt, settings))
    assert_same_state(before, training_state(denoiser))
    assert getattr(renderer._pipeline, family.denoiser_component) is None  # no reference kept between renders

    served_pipeline = LoraPipeline(family, bases[name], device="cpu", dtype=torch.float32)
    served = pixels(served_pipeline.generate(lora, prompt, settings))
    # exact: the same modules, the same scale (0.7 * alpha / r) and the same seeded latents
    assert torch.equal(rendered, served)
    assert torch.equal(pixels(renderer.render(denoiser, prompt, settings)), rendered)  # a second render: the same

    # gradient checkpointing as the trainer applies it: the model's switch, and per-block wrappers
    apply_block_policy(denoiser, family.denoiser_blocks(denoiser), checkpointing=True, compile_blocks=False,
                       device=torch.device("cpu"))
    if family.denoiser_blocks(denoiser):
        apply_block_policy(denoiser, family.denoiser_blocks(denoiser), checkpointing=1, compile_blocks=False,
                           device=torch.device("cpu"))
    before = training_state(denoiser)
    assert torch.equal(pixels(renderer.render(denoiser, prompt, settings)), rendered)
    assert_same_state(before, training_state(denoiser))
    renderer.release()


def test_a_render_drawing_from_the_global_rng_does_not_move_it(bases, monkeypatch):
    """fork_rng is what keeps training's RNG: a pipeline that draws from the global generator."""
    family = family_class("bria-3.2")()
    denoiser = denoiser_with_lora(family, bases["bria-3.2"])
    renderer = TrainingRenderer(family, bases["bria-3.2"], device="cpu", weight_dtype=torch.float32)
    real_generate = render_module.generate

    def greedy_generate(*args, **kwargs):
        torch.rand(3)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(render_module, "generate", greedy_generate)
    state = torch.get_rng_state()
    renderer.render(denoiser, ["a fox"], fast_settings())
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(3)  # the negative control: the same draw outside a render does move it
    assert not torch.equal(torch.get_rng_state(), state)


def test_negative_control_scale_then_unscale_is_caught(bases, monkeypatch):
    """A renderer that scales the LoRA and divides the scale back out (diffusers' scale/unscale
    helpers) leaves a scaling that is off in the last bit: the state check sees it."""
    family = family_class("bria-3.2")()
    denoiser = denoiser_with_lora(family, bases["bria-3.2"])

    @contextmanager
    def scale_then_unscale(model, scale, adapter_name="default"):
        scale_lora_layers(model, scale)
        try:
            yield
        finally:
            unscale_lora_layers(model, scale)

    monkeypatch.setattr(render_module, "lora_scale", scale_then_unscale)
    renderer = TrainingRenderer(family, bases["bria-3.2"], device="cpu", weight_dtype=torch.float32)
    as_in_training(denoiser)
    before = training_state(denoiser)
    renderer.render(denoiser, ["a fox"], fast_settings(influence=0.7))
    after = training_state(denoiser)
    with pytest.raises(AssertionError):
        assert_same_state(before, after)
    assert after["scaling"][0]["default"] != 0.37 and abs(after["scaling"][0]["default"] - 0.37) < 1e-15
