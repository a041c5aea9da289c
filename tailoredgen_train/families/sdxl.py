"""Bria 2.3 (and the `light` alias by default): an SDXL UNet2DConditionModel with two CLIP text
encoders, trained on DDPM noise like diffusers' SDXL LoRA recipe that Bria's own 2.3 recipe uses.

Facts this module relies on (docs/MODELS.md, Bria 2.3):
- prompts go through `StableDiffusionXLPipeline.encode_prompt` (penultimate hidden states of both
  encoders concatenated, pooled embedding of the second) and `_get_add_time_ids` (original size,
  crop top-left, target size: the micro-conditioning);
- the training noise schedule is `DDPMScheduler.from_pretrained(base, subfolder="scheduler")`, and
  its `prediction_type` (epsilon or v_prediction) decides the target;
- optional min-SNR-gamma loss weighting (Hang et al. 2023), as in diffusers' scripts;
- LoRA on the UNet attention projections, saved with the `unet.` prefix that
  `StableDiffusionXLPipeline.load_lora_weights` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import compute_snr
from torch import nn
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from ..data.buckets import CropGeometry
from ..errors import ConfigError
from .base import FamilyOptions, LoadedModel, ModelFamily, base_fingerprint, diffusers_dtype

SDXL_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# SDXL's ~1 MP training resolutions (W, H); sides are multiples of 64.
SDXL_BUCKETS_1024 = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                     (1536, 640), (640, 1536))


@dataclass(frozen=True)
class Sdxl23Options(FamilyOptions):
    snr_gamma: float | None = None
    """Min-SNR weighting: weigh each sample by min(SNR, gamma)/SNR (5.0 is the paper's value); null = plain MSE."""

    def __post_init__(self) -> None:
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ConfigError(f"model.snr_gamma={self.snr_gamma}: use a positive value such as 5.0, or null")


class Sdxl23Family(ModelFamily):
    name = "bria-2.3"
    caption_format = "text"
    bucket_base = SDXL_BUCKETS_1024
    bucket_multiple = 64  # 8x VAE x the UNet's downsampling
    default_lora_targets = SDXL_LORA_TARGETS
    lora_key_prefix = "unet"
    options_cls = Sdxl23Options
    pipeline_class_name = "StableDiffusionXLPipeline"
    base_components = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    hub_id = "briaai/BRIA-2.3"
    text_feature_keys = ("prompt_embeds", "pooled_prompt_embeds")
    text_encoder_keys = ("pipe",)
    denoiser_component = "unet"
    # StableDiffusionXLPipeline's defaults (50 steps, CFG 5.0): Bria publishes none of its own for 2.3
    generation_steps = 50
    generation_guidance = 5.0

    def load(self, base: str, *, device: torch.device, weight_dtype: torch.dtype) -> LoadedModel:
        self.check_base(base)
        with self.loading_errors(base):
            unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **diffusers_dtype(weight_dtype))
            vae = AutoencoderKL.from_pretrained(
                base, subfolder="vae", **diffusers_dtype(torch.float32))  # SDXL's VAE overflows in fp16
            text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=weight_dtype)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2",
                                                                         dtype=weight_dtype)
            tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer")
            tokenizer_2 = AutoTokenizer.from_pretrained(base, subfolder="tokenizer_2")
            # the diffusers SDXL recipe trains with a DDPM view of the base's own noise schedule
            self.noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        if self.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"{base}: scheduler prediction_type {self.noise_scheduler.config.prediction_type!r} "
                              "is not trainable here; expected epsilon or v_prediction")
        unet.to(device)
        vae.to(device).eval().requires_grad_(False)
        for encoder in (text_encoder, text_encoder_2):
            encoder.to(device).eval().requires_grad_(False)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                         scheduler=self.noise_scheduler)
        return LoadedModel(
            denoiser=unet,
            encoders={"pipe": pipe, "vae": vae},
            scheduler=self.noise_scheduler,
            fingerprint=base_fingerprint(base, unet.config, vae.config, text_encoder_2.config.to_dict()),
        )

    @torch.no_grad()
    def encode_image(self, model: LoadedModel, pixels: torch.Tensor, geometry: CropGeometry) -> dict[str, torch.Tensor]:
        vae, pipe = model.encoders["vae"], model.encoders["pipe"]
        dist = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist
        scale = vae.config.scaling_factor
        time_ids = pipe._get_add_time_ids(
            geometry.original_size, geometry.crop_top_left, geometry.target_size,
            dtype=pipe.text_encoder_2.dtype,  # encode_prompt's dtype
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )
        return {"latent_mean": dist.mean[0] * scale, "latent_std": dist.std[0] * scale, "time_ids": time_ids[0]}

    @torch.no_grad()
    def encode_text(self, model: LoadedModel, caption: str) -> dict[str, torch.Tensor]:
        pipe = model.encoders["pipe"]
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompt=caption, device=pipe.text_encoder_2.device,
                                                         num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"prompt_embeds": prompt_embeds[0], "pooled_prompt_embeds": pooled[0]}

    def collate(self, entries: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        # CLIP pads every caption to 77 tokens, so everything stacks as is
        return {key: torch.stack([e[key] for e in entries]) for key in entries[0]}

    def compute_loss(self, denoiser: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        mean, std = batch["latent_mean"], batch["latent_std"]
        device, dtype = mean.device, batch["prompt_embeds"].dtype
        schedule = self.noise_scheduler
        x0 = mean + std * torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        timesteps = torch.randint(0, schedule.config.num_train_timesteps, (x0.shape[0],), generator=generator,
                                  device=device)
        noisy = schedule.add_noise(x0, noise, timesteps)
        pred = denoiser(
            noisy.to(dtype), timesteps, encoder_hidden_states=batch["prompt_embeds"],
            added_cond_kwargs={"text_embeds": batch["pooled_prompt_embeds"], "time_ids": batch["time_ids"]},
            return_dict=False,
        )[0]
        epsilon = schedule.config.prediction_type == "epsilon"
        target = noise if epsilon else schedule.get_velocity(x0, noise, timesteps)
        if self.options.snr_gamma is None:
            return F.mse_loss(pred.float(), target.float())
        snr = compute_snr(schedule, timesteps)
        weights = torch.clamp(snr, max=self.options.snr_gamma) / (snr if epsilon else snr + 1)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * weights).mean()

    def save_lora(self, directory: Path, lora_state: dict[str, torch.Tensor], adapter_metadata: dict) -> None:
        StableDiffusionXLPipeline.save_lora_weights(
            directory, unet_lora_layers=lora_state, unet_lora_adapter_metadata=adapter_metadata,
            weight_name="pytorch_lora_weights.safetensors",
        )
