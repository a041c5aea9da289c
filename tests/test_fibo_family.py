"""The FIBO family feeds the transformer exactly what BriaFiboPipeline feeds it.

The reference is the pipeline itself: its transformer is swapped for a recorder, the pipeline runs
one step, and the recorded inputs are compared with what the family's training step passes.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from diffusers import BriaFiboPipeline
from torch import nn

from tailoredgen_train.families.fibo import FiboFamily, fit_text_layers, logit_normal_mu, sample_sigmas

CAPTION = '{"short_description":"a red circle on a blue background","style_medium":"digital illustration"}'
SHORT_CAPTION = '{"short_description":"a dot"}'


@contextmanager
def recording(transformer: nn.Module, prediction: float = 0.0):
    """Swap the transformer's forward for one that remembers its inputs and predicts a constant."""
    calls: list[dict] = []

    def forward(**kwargs):
        calls.append(kwargs)
        return (torch.full_like(kwargs["hidden_states"], prediction),)

    transformer.forward = forward
    try:
        yield calls
    finally:
        del transformer.forward  # back to the class's forward


@pytest.fixture(scope="module")
def family() -> FiboFamily:
    return FiboFamily()


@pytest.fixture(scope="module")
def loaded(family, tiny_fibo_base):
    return family.load(str(tiny_fibo_base), device=torch.device("cpu"), weight_dtype=torch.float32)


@pytest.fixture(scope="module")
def pipe(tiny_fibo_base):
    return BriaFiboPipeline.from_pretrained(tiny_fibo_base)


def pixels(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def pipeline_transformer_inputs(pipe, prompt: str, height: int, width: int) -> dict:
    with recording(pipe.transformer) as calls:
        pipe(prompt, height=height, width=width, num_inference_steps=1, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    return calls[0]


def family_transformer_inputs(family, loaded, batch, seed: int = 0) -> tuple[dict, torch.Tensor]:
    with recording(loaded.denoiser) as calls:
        loss = family.compute_loss(loaded.denoiser, batch, torch.Generator().manual_seed(seed))
    return calls[0], loss


def test_text_conditioning_matches_the_pipeline_exactly(family, loaded, pipe):
    entry = family.encode_sample(loaded, pixels(64, 96), CAPTION)
    ours, _ = family_transformer_inputs(family, loaded, family.collate([entry]))
    theirs = pipeline_transformer_inputs(pipe, CAPTION, 64, 96)

    assert torch.equal(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])
    assert len(ours["text_encoder_layers"]) == len(theirs["text_encoder_layers"]) == 4  # 1 dual + 3 single blocks
    for mine, reference in zip(ours["text_encoder_layers"], theirs["text_encoder_layers"]):
        assert torch.equal(mine, reference)
    assert torch.equal(ours["txt_ids"], theirs["txt_ids"])
    assert torch.equal(ours["img_ids"], theirs["img_ids"])
    assert ours["hidden_states"].shape == theirs["hidden_states"].shape == (1, 4 * 6, 48)
    # nothing padded: neither passes a mask
    assert ours["joint_attention_kwargs"] is None
    assert "attention_mask" not in (theirs["joint_attention_kwargs"] or {})


def test_a_different_caption_changes_the_conditioning(family, loaded, pipe):
    """Negative control for the test above: the comparison can fail."""
    entry = family.encode_sample(loaded, pixels(64, 96), CAPTION)
    ours, _ = family_transformer_inputs(family, loaded, family.collate([entry]))
    theirs = pipeline_transformer_inputs(pipe, CAPTION.replace("red", "teal"), 64, 96)
    assert not torch.equal(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])


def test_empty_caption_is_encoded_as_the_bos_token(family, loaded):
    entry = family.encode_sample(loaded, pixels(32, 32), "")
    text_encoder = loaded.encoders["text"].text_encoder
    hidden = text_encoder(torch.tensor([[128000]]), attention_mask=torch.ones(1, 1, dtype=torch.long),
                          output_hidden_states=True).hidden_states
    assert entry["prompt_embeds"].shape == (1, 64)
    assert torch.equal(entry["prompt_embeds"], torch.cat([hidden[-1], hidden[-2]], dim=-1)[0])


def test_latents_are_the_normalised_vae_mean(family, loaded):
    image = pixels(64, 96, seed=3)
    entry = family.encode_sample(loaded, image, CAPTION)
    vae = loaded.encoders["vae"]
    dist = vae.encode(image.unsqueeze(2)).latent_dist
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    expected = ((dist.mean[:, :, 0] - mean) / std)[0]
    assert entry["latents"].shape == (48, 4, 6)  # 16x spatial downsampling, 48 channels
    assert torch.equal(entry["latents"], expected)
    # a sampled latent or the raw mean would differ: the tiny VAE has non-trivial statistics
    assert not torch.equal(entry["latents"], dist.mean[0, :, 0])
    assert not torch.equal(entry["latents"], ((dist.sample()[:, :, 0] - mean) / std)[0])


def test_noisy_latents_target_and_timestep_follow_rectified_flow(family, loaded):
    entry = family.encode_sample(loaded, pixels(64, 96), CAPTION)
    batch = family.collate([entry])
    inputs, loss = family_transformer_inputs(family, loaded, batch)  # the recorder predicts 0

    sigma = inputs["timestep"] / 1000  # the transformer gets sigma*1000
    assert inputs["timestep"].shape == (1,) and 0 < float(sigma) < 1
    x0 = BriaFiboPipeline._pack_latents_no_patch(batch["latents"], 1, 48, 4, 6)
    x_t = inputs["hidden_states"]
    noise = (x_t - (1 - sigma) * x0) / sigma  # x_t = sigma*noise + (1-sigma)*x0
    assert abs(float(noise.std()) - 1) < 0.3  # really gaussian noise
    # a zero prediction costs exactly |noise - x0|^2: the target is the velocity noise - x0
    torch.testing.assert_close(loss, ((noise - x0) ** 2).mean(), rtol=1e-4, atol=1e-5)


def test_randomness_comes_only_from_the_generator(family, loaded):
    batch = family.collate([family.encode_sample(loaded, pixels(64, 96), CAPTION)])
    first, loss_a = family_transformer_inputs(family, loaded, batch, seed=7)
    second, loss_b = family_transformer_inputs(family, loaded, batch, seed=7)
    third, _ = family_transformer_inputs(family, loaded, batch, seed=8)
    assert torch.equal(first["hidden_states"], second["hidden_states"]) and torch.equal(loss_a, loss_b)
    assert not torch.equal(first["hidden_states"], third["hidden_states"])


def test_padded_batches_use_a_key_padding_mask_that_changes_nothing(family, loaded):
    lora_free = loaded.denoiser
    long_entry = family.encode_sample(loaded, pixels(64, 96, seed=1), CAPTION)
    short_entry = family.encode_sample(loaded, pixels(64, 96, seed=2), SHORT_CAPTION)
    batch = family.collate([long_entry, short_entry])
    inputs, _ = family_transformer_inputs(family, loaded, batch)

    mask = inputs["joint_attention_kwargs"]["attention_mask"]
    text_len, image_len = batch["prompt_embeds"].shape[1], 4 * 6
    short_len = short_entry["prompt_embeds"].shape[0]
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 1, text_len + image_len)  # not a dense SxS matrix
    assert mask[0].all()
    assert mask[1, 0, 0, :short_len].all() and not mask[1, 0, 0, short_len:text_len].any()
    assert mask[1, 0, 0, text_len:].all()  # text first, then image, as the pipeline orders them

    def run(kwargs, rows):
        picked = {k: (v[rows] if k in ("hidden_states", "encoder_hidden_states", "timestep") else v)
                  for k, v in kwargs.items() if k != "text_encoder_layers"}
        picked["text_encoder_layers"] = [layer[rows] for layer in kwargs["text_encoder_layers"]]
        if kwargs["joint_attention_kwargs"] is not None:
            picked["joint_attention_kwargs"] = {"attention_mask": kwargs["joint_attention_kwargs"]["attention_mask"][rows]}
        with torch.no_grad():
            return lora_free(**picked)[0]

    # the short caption's prediction inside the padded batch equals its prediction alone
    padded = run(inputs, slice(1, 2))
    alone = dict(inputs)
    alone["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :short_len]
    alone["text_encoder_layers"] = [layer[:, :short_len] for layer in inputs["text_encoder_layers"]]
    alone["txt_ids"] = inputs["txt_ids"][:short_len]
    alone["joint_attention_kwargs"] = None
    torch.testing.assert_close(padded, run(alone, slice(1, 2)), rtol=1e-5, atol=1e-5)
    # negative control: without the mask the padding leaks into the prediction
    unmasked = dict(inputs, joint_attention_kwargs=None)
    assert not torch.allclose(run(unmasked, slice(1, 2)), run(alone, slice(1, 2)), atol=1e-4)


@pytest.mark.parametrize(("available", "blocks", "expected"), [
    (37, 46, list(range(37)) + [36] * 9),  # full FIBO: SmolLM3-3B has 37 hidden states, 46 blocks
    (5, 3, [2, 3, 4]),                     # more states than blocks: keep the last ones
    (4, 4, [0, 1, 2, 3]),
])
def test_text_layers_are_fitted_to_the_block_count(available, blocks, expected):
    layers = [torch.full((1,), float(i)) for i in range(available)]
    assert [int(t) for t in fit_text_layers(layers, blocks)] == expected


def test_logit_normal_shift_is_linear_in_image_tokens():
    assert math.isclose(logit_normal_mu(256), 0.5)
    assert math.isclose(logit_normal_mu(4096), 1.15)  # 1024x1024
    assert math.isclose(logit_normal_mu(2176), 0.825)


def test_sigma_sampler_distribution():
    generator = torch.Generator().manual_seed(0)
    shifted = sample_sigmas(50_000, 4096, generator, uniform_fraction=0.0, std=1.0)
    logits = torch.logit(shifted.double())
    assert abs(float(logits.mean()) - 1.15) < 0.02 and abs(float(logits.std()) - 1.0) < 0.02
    uniform = sample_sigmas(50_000, 4096, generator, uniform_fraction=1.0, std=1.0)
    assert abs(float(uniform.mean()) - 0.5) < 0.01 and abs(float((uniform < 0.1).float().mean()) - 0.1) < 0.01
    mixed = sample_sigmas(50_000, 4096, generator, uniform_fraction=0.1, std=1.0)
    # the logit-normal part at mu=1.15 puts Phi(logit(0.1) - 1.15) = 0.04% below 0.1; the uniform 10% adds 1%
    below = float((mixed < 0.1).float().mean())
    assert 0.9 * 0.0004 + 0.01 - 0.004 < below < 0.9 * 0.0004 + 0.01 + 0.004


def test_lora_targets_are_brias_list(family, tiny_fibo_base):
    from tailoredgen_train.engine.lora import add_lora

    transformer = family.load(str(tiny_fibo_base), device=torch.device("cpu"), weight_dtype=torch.float32).denoiser
    add_lora(transformer, rank=4, targets=family.default_lora_targets, init="gaussian")
    wrapped = sorted(name.rsplit(".lora_A", 1)[0] for name, _ in transformer.named_parameters() if ".lora_A." in name)
    # 14 per dual block, 6 per single block, plus the top-level proj_out (models.md 3.2)
    assert len(wrapped) == 14 * 1 + 6 * 3 + 1
    assert "proj_out" in wrapped and "norm_out.linear" not in wrapped
    assert "transformer_blocks.0.norm1_context.linear" in wrapped
    assert not any(name.startswith("caption_projection") or name.startswith("context_embedder") for name in wrapped)
