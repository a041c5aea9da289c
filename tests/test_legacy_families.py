"""The legacy families (Bria 3.2 and Bria 2.3) on their tiny bases: conditioning exactly as their
pipelines build it, the objectives, LoRA files their pipelines load, learning, and refusals."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from diffusers import BriaPipeline, DDPMScheduler, StableDiffusionXLPipeline
from torch import nn

from helpers import params, tiny_engine
from tailoredgen_train.data import SAMPLE_TEXT_CAPTION_PREFIX, SAMPLE_TEXT_DATASET_DIR, crop_geometry
from tailoredgen_train.errors import BaseModelError
from tailoredgen_train.families import family_class
from tailoredgen_train.recipe import JobSpec, run_training

CAPTION = "a red circle at the center of a smooth pale blue background"
PIPELINES = {"bria-3.2": BriaPipeline, "bria-2.3": StableDiffusionXLPipeline}
VERSIONS = {"bria-3.2": "3.2", "bria-2.3": "2.3"}


@contextmanager
def recording(module: nn.Module, output_key: str):
    """Swap the denoiser's forward for one that remembers its inputs and predicts zeros."""
    calls: list[tuple[tuple, dict]] = []

    def forward(*args, **kwargs):
        calls.append((args, kwargs))
        sample = args[0] if args else kwargs[output_key]
        return (torch.zeros_like(sample),)

    module.forward = forward
    try:
        yield calls
    finally:
        del module.forward


def loaded(name: str, base: Path):
    family = family_class(name)()
    return family, family.load(str(base), device=torch.device("cpu"), weight_dtype=torch.float32)


def pixels(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(seed)) * 2 - 1


SQUARE = crop_geometry(128, 128, (128, 128))


@pytest.mark.parametrize("name", list(PIPELINES))
def test_tiny_base_is_a_pipeline_directory(name, legacy_bases):
    pipe = PIPELINES[name].from_pretrained(legacy_bases[name])
    out = pipe(CAPTION, height=128, width=128, num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 128, 128) and torch.isfinite(out).all()


def denoiser_inputs(name: str, base: Path, sample_key: str):
    """The denoiser inputs of the family's training step and of its pipeline (one step, no CFG),
    plus the pipeline and the family."""
    family, model = loaded(name, base)
    entry = family.encode_sample(model, pixels(), CAPTION, SQUARE)
    with recording(model.denoiser, sample_key) as ours:
        family.compute_loss(model.denoiser, family.collate([entry]), torch.Generator().manual_seed(0))
    pipe = PIPELINES[name].from_pretrained(base)
    with recording(pipe.transformer if name == "bria-3.2" else pipe.unet, sample_key) as theirs:
        pipe(CAPTION, height=128, width=128, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    return ours[0][1], theirs[0][1], pipe, family


def test_bria32_conditioning_matches_bria_pipeline(legacy_bases):
    mine, reference, pipe, family = denoiser_inputs("bria-3.2", legacy_bases["bria-3.2"], "hidden_states")
    # each caption alone through T5, zero-padded to 128, no mask
    assert mine["encoder_hidden_states"].shape == (1, 128, 32)
    assert torch.equal(mine["encoder_hidden_states"], reference["encoder_hidden_states"])
    tokens = len(pipe.tokenizer(CAPTION).input_ids)
    assert mine["encoder_hidden_states"][0, tokens - 1].any() and not mine["encoder_hidden_states"][0, tokens:].any()
    assert torch.equal(mine["txt_ids"], reference["txt_ids"]) and torch.equal(mine["img_ids"], reference["img_ids"])
    assert mine["hidden_states"].shape == reference["hidden_states"].shape == (1, 64, 16)  # 2x2-packed 16x16x4
    # the timestep is one of the shift-4 training sigmas, times 1000
    sigma = float(mine["timestep"][0]) / 1000
    assert torch.isclose(family.sigmas, torch.tensor(sigma), atol=1e-6).any()


def test_bria32_sigmas_follow_the_static_shift(legacy_bases):
    family, _ = loaded("bria-3.2", legacy_bases["bria-3.2"])
    plain = torch.linspace(1, 1000, 1000).flip(0) / 1000
    expected = 4 * plain / (1 + 3 * plain)  # shift * s / (1 + (shift - 1) * s)
    torch.testing.assert_close(family.sigmas, expected)
    first_mid_last = [round(float(family.sigmas[i]) * 1000, 2) for i in (0, 500, 999)]
    assert first_mid_last == [1000.0, 800.0, 3.99]  # models.md: 1000, 800, 3.99


def test_bria32_objective_is_the_velocity(legacy_bases):
    family, model = loaded("bria-3.2", legacy_bases["bria-3.2"])
    batch = family.collate([family.encode_sample(model, pixels(1), CAPTION, SQUARE)])
    batch["latent_std"] = torch.zeros_like(batch["latent_std"])  # x0 = the mean: recoverable below
    with recording(model.denoiser, "hidden_states") as calls:
        loss = family.compute_loss(model.denoiser, batch, torch.Generator().manual_seed(3))
    inputs = calls[0][1]
    sigma = inputs["timestep"] / 1000
    x0 = BriaPipeline._pack_latents(batch["latent_mean"], 1, 4, 16, 16)
    noise = (inputs["hidden_states"] - (1 - sigma) * x0) / sigma
    torch.testing.assert_close(loss, ((noise - x0) ** 2).mean(), rtol=1e-4, atol=1e-5)


def test_sdxl_conditioning_matches_the_sdxl_pipeline(legacy_bases):
    mine, reference, _, _ = denoiser_inputs("bria-2.3", legacy_bases["bria-2.3"], "sample")
    assert torch.equal(mine["encoder_hidden_states"], reference["encoder_hidden_states"])
    for key in ("text_embeds", "time_ids"):
        assert torch.equal(mine["added_cond_kwargs"][key], reference["added_cond_kwargs"][key]), key
    assert mine["added_cond_kwargs"]["time_ids"].tolist() == [[128, 128, 0, 0, 128, 128]]


def test_sdxl_time_ids_carry_the_crop(legacy_bases):
    family, model = loaded("bria-2.3", legacy_bases["bria-2.3"])
    geometry = crop_geometry(300, 200, (128, 128))  # wide image: scaled to 192x128, cropped at left 32
    entry = family.encode_sample(model, pixels(), CAPTION, geometry)
    assert entry["time_ids"].tolist() == [200, 300, 0, 32, 128, 128]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 1.0])
def test_sdxl_targets_and_min_snr_weighting(legacy_bases, prediction_type, snr_gamma):
    family = family_class("bria-2.3")({"snr_gamma": snr_gamma})
    model = family.load(str(legacy_bases["bria-2.3"]), device=torch.device("cpu"), weight_dtype=torch.float32)
    family.noise_scheduler = DDPMScheduler.from_config(family.noise_scheduler.config, prediction_type=prediction_type)
    entries = [family.encode_sample(model, pixels(i), CAPTION, SQUARE) for i in range(2)]
    batch = family.collate(entries)
    batch["latent_std"] = torch.zeros_like(batch["latent_std"])
    with recording(model.denoiser, "sample") as calls:
        loss = family.compute_loss(model.denoiser, batch, torch.Generator().manual_seed(5))
    args, _ = calls[0]
    noisy, timesteps = args[0], args[1]
    abar = family.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    x0 = batch["latent_mean"]
    noise = (noisy - abar.sqrt() * x0) / (1 - abar).sqrt()
    target = noise if prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
    per_sample = (target**2).mean(dim=(1, 2, 3))  # the prediction is zero
    if snr_gamma is None:
        expected = per_sample.mean()
    else:
        snr = abar.flatten() / (1 - abar.flatten())
        weight = torch.clamp(snr, max=snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
        expected = (per_sample * weight).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


# ---- training: LoRA files that the pipelines load ------------------------------------------------


def legacy_job(name: str, base: Path, output: Path, training_params, dataset: Path = SAMPLE_TEXT_DATASET_DIR,
               **kwargs) -> JobSpec:
    return JobSpec(base=str(base), dataset_dir=str(dataset), output_dir=str(output), training_version=VERSIONS[name],
                   params=training_params, engine=tiny_engine(), caption_prefix=SAMPLE_TEXT_CAPTION_PREFIX, **kwargs)


@pytest.fixture(scope="module")
def trained_legacy(legacy_bases, tmp_path_factory):
    return {name: run_training(legacy_job(name, legacy_bases[name], tmp_path_factory.mktemp(name) / "out",
                                          params(10, lr=1e-3, rank=8, interval=5)))
            for name in PIPELINES}


def _generate(pipe) -> torch.Tensor:
    return pipe(CAPTION, height=128, width=128, num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_bria32_checkpoint_loads_with_load_lora_adapter(trained_legacy, legacy_bases):
    result, base = trained_legacy["bria-3.2"], legacy_bases["bria-3.2"]
    assert [p.name for p in result.checkpoints] == ["checkpoint-5", "checkpoint-10"]
    base_output = _generate(BriaPipeline.from_pretrained(base))
    pipe = BriaPipeline.from_pretrained(base)
    pipe.transformer.load_lora_adapter(str(result.checkpoints[-1]), prefix="transformer",
                                       weight_name="pytorch_lora_weights.safetensors")
    lora_output = _generate(pipe)
    trained_output = _generate(BriaPipeline.from_pretrained(base, transformer=result.denoiser.eval()))
    assert not torch.allclose(lora_output, base_output, atol=1e-3)
    torch.testing.assert_close(lora_output, trained_output, rtol=0, atol=1e-6)


def test_sdxl_checkpoint_loads_with_load_lora_weights(trained_legacy, legacy_bases):
    result, base = trained_legacy["bria-2.3"], legacy_bases["bria-2.3"]
    from safetensors.torch import load_file

    keys = load_file(result.checkpoints[-1] / "pytorch_lora_weights.safetensors")
    assert keys and all(k.startswith("unet.") and ".attn" in k for k in keys)
    base_output = _generate(StableDiffusionXLPipeline.from_pretrained(base))
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    pipe.load_lora_weights(result.checkpoints[-1])
    lora_output = _generate(pipe)
    trained_output = _generate(StableDiffusionXLPipeline.from_pretrained(base, unet=result.denoiser.eval()))
    assert not torch.allclose(lora_output, base_output, atol=1e-3)
    torch.testing.assert_close(lora_output, trained_output, rtol=0, atol=1e-6)


def test_caption_prefix_is_prepended_to_every_training_caption(legacy_bases, tmp_path, monkeypatch):
    family_cls = family_class("bria-3.2")
    captions: list[str] = []
    original = family_cls.encode_sample

    def spy(self, model, pixels_, caption, geometry):
        captions.append(caption)
        return original(self, model, pixels_, caption, geometry)

    monkeypatch.setattr(family_cls, "encode_sample", spy)
    run_training(legacy_job("bria-3.2", legacy_bases["bria-3.2"], tmp_path / "out", params(1, rank=4)))
    assert len(captions) == 6
    assert all(c.startswith(SAMPLE_TEXT_CAPTION_PREFIX + " a ") for c in captions)


def _eval_loss(family, denoiser, entries, draws: int = 16) -> float:
    with torch.no_grad():
        losses = [family.compute_loss(denoiser, family.collate([entry]), torch.Generator().manual_seed(10_000 + k))
                  for entry in entries for k in range(draws)]
    return float(torch.stack(losses).mean())


@pytest.mark.slow
@pytest.mark.parametrize(("name", "steps", "lr", "bound"), [
    ("bria-3.2", 200, 1e-3, 0.45),  # measured 0.29 (torch 2.13 CPU)
    # epsilon prediction has a high floor at low noise levels (the noise is nearly unidentifiable
    # there), so the tiny UNet's attention LoRA halves the loss: measured 0.52 at 300 steps
    ("bria-2.3", 300, 1e-3, 0.65),
])
def test_each_legacy_family_learns_one_image(name, steps, lr, bound, legacy_bases, tmp_path):
    from helpers import subset_dataset
    from safetensors.torch import load_file

    dataset = subset_dataset(tmp_path / "one", 1, source=SAMPLE_TEXT_DATASET_DIR)
    result = run_training(legacy_job(name, legacy_bases[name], tmp_path / "out", params(steps, lr=lr, rank=32),
                                     dataset=dataset))
    family, _ = loaded(name, legacy_bases[name])
    entries = [load_file(f) for f in sorted((tmp_path / "out" / "cache").glob("*.safetensors"))]
    after = _eval_loss(family, result.denoiser, entries)
    result.denoiser.disable_adapters()
    before = _eval_loss(family, result.denoiser, entries)
    print(f"{name}: eval loss {before:.4f} -> {after:.4f} after {steps} steps (ratio {after / before:.3f})")
    assert after / before < bound


@pytest.mark.parametrize("name", list(PIPELINES))
def test_learning_rate_zero_leaves_the_lora_at_its_init(name, legacy_bases, tmp_path):
    """Negative control for the learning tests."""
    result = run_training(legacy_job(name, legacy_bases[name], tmp_path / "out", params(5, lr=0.0, rank=4)))
    from tailoredgen_train.engine.lora import lora_state_dict

    state = lora_state_dict(result.denoiser)
    assert all(not v.any() for k, v in state.items() if "lora_B" in k)


# ---- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "base_family"), [
    ("3.2", "fibo"), ("bria-3.2", "bria-2.3"), ("max", "fibo"),
    ("2.3", "bria-3.2"), ("light", "fibo"), ("fibo", "bria-3.2"), ("fibo", "bria-2.3"),
])
def test_a_base_of_the_wrong_family_is_refused_before_any_work(version, base_family, legacy_bases, tiny_fibo_base,
                                                               tmp_path):
    base = tiny_fibo_base if base_family == "fibo" else legacy_bases[base_family]
    job = JobSpec(base=str(base), dataset_dir=str(tmp_path / "no-dataset-needed"), output_dir=str(tmp_path / "out"),
                  training_version=version, params=params(1, rank=4), engine=tiny_engine())
    with pytest.raises(BaseModelError, match="check --base and --training-version"):
        run_training(job)
    assert not (tmp_path / "out").exists()


def test_t5_keeps_its_last_projections_in_fp32_under_bf16(legacy_bases):
    family = family_class("bria-3.2")()
    model = family.load(str(legacy_bases["bria-3.2"]), device=torch.device("cpu"), weight_dtype=torch.bfloat16)
    encoder = model.encoders["pipe"].text_encoder
    for block in encoder.encoder.block:
        assert block.layer[-1].DenseReluDense.wo.weight.dtype == torch.float32
        assert block.layer[-1].DenseReluDense.wi_0.weight.dtype == torch.bfloat16
    assert model.denoiser.dtype == torch.bfloat16
    entry = family.encode_sample(model, pixels(), CAPTION, SQUARE)
    assert torch.isfinite(entry["prompt_embeds"].float()).all()
