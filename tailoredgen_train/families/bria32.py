"""Bria 3.2 (and BRIA-4B-Adapt, the `max` alias by default): BriaTransformer2DModel + T5-XXL +
a 4-channel AutoencoderKL, flow matching on 2x2-packed latents.

Facts this module relies on (docs/MODELS.md, Bria 3.2):
- prompts go through `BriaPipeline.encode_prompt`: each prompt is encoded alone, without padding,
  then zero-padded to max_sequence_length (128); no attention mask, txt_ids are zeros;
- latents: (z - shift_factor) * scaling_factor with shift_factor None -> 0, scaling 0.13025; the
  VAE stays fp32 as BriaPipeline keeps it; z is sampled from the cached latent distribution each step;
- 2x2 packing (`BriaPipeline._pack_latents`) and img_ids on the packed grid;
- sigma from a static shift-4 flow schedule (Bria's LoRA recipe): a uniform index into the
  1000 shifted training sigmas; the transformer gets sigma*1000; the target is noise - x0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, BriaPipeline, BriaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.loaders import FluxLoraLoaderMixin
from torch import nn
from transformers import AutoTokenizer, T5EncoderModel

from ..data.buckets import CropGeometry
from ..errors import ConfigError
from .base import FamilyOptions, LoadedModel, ModelFamily, base_fingerprint, diffusers_dtype
from .fibo import FIBO_LORA_TARGETS, latent_image_ids

# Bria's 3.x LoRA recipe (Efrat-Taig/training-lora-advanced): the attention and feed-forward
# suffixes of FIBO's list, without the AdaLN and output layers.
BRIA32_LORA_TARGETS = FIBO_LORA_TARGETS[:12]
# BRIA-3.2's README resolutions (W, H) and their transposes, ~1 MP.
_README_BUCKETS = ((1024, 1024), (1280, 768), (1344, 768), (832, 1216), (1152, 832), (1216, 832), (960, 1088))
BRIA32_BUCKETS_1024 = tuple(dict.fromkeys(_README_BUCKETS + tuple((h, w) for w, h in _README_BUCKETS)))


def keep_t5_projections_fp32(text_encoder: T5EncoderModel) -> None:
    """T5 overflows in half precision unless each block's last projection stays fp32 (BriaPipeline's
    docstring); T5's feed-forward casts its input to wo's dtype, so the mix just works. The modules
    are transformers' own `_keep_in_fp32_modules` ("wo"), which from_pretrained honours for fp16 only."""
    keep = set(text_encoder._keep_in_fp32_modules or ())
    for name, module in text_encoder.named_modules():
        if name.rsplit(".", 1)[-1] in keep:
            module.to(torch.float32)


@dataclass(frozen=True)
class Bria32Options(FamilyOptions):
    max_sequence_length: int = 128
    """T5 tokens per caption; shorter embeddings are zero-padded to this length (BriaPipeline's max is 512)."""
    shift: float = 4.0
    """Static shift of the training sigma schedule (Bria's recipes use 4)."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_sequence_length <= 512:
            raise ConfigError(f"model.max_sequence_length={self.max_sequence_length}: use 1..512 (BriaPipeline's limit)")
        if not self.shift > 0:
            raise ConfigError(f"model.shift={self.shift}: use a positive shift (4 in Bria's recipes)")


class Bria32Family(ModelFamily):
    name = "bria-3.2"
    caption_format = "text"
    bucket_base = BRIA32_BUCKETS_1024
    bucket_multiple = 16  # 8x VAE x 2x2 packing
    default_lora_targets = BRIA32_LORA_TARGETS
    lora_key_prefix = "transformer"
    options_cls = Bria32Options
    pipeline_class_name = "BriaPipeline"
    base_components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    hub_id = "briaai/BRIA-3.2"
    text_feature_keys = ("prompt_embeds",)
    text_encoder_keys = ("pipe",)
    # BriaPipeline's defaults; BRIA-3.2's card advises 30-50 steps and CFG 5 (Bria's ComfyUI node sends 30)
    generation_steps = 30
    generation_guidance = 5.0
    generation_multiple = 32  # BriaPipeline warns below this (its vae_scale_factor 16 x 2x2 packing)

    def load(self, base: str, *, device: torch.device, weight_dtype: torch.dtype) -> LoadedModel:
        self.check_base(base)
        with self.loading_errors(base):
            transformer = BriaTransformer2DModel.from_pretrained(
                base, subfolder="transformer", **diffusers_dtype(weight_dtype))
            vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **diffusers_dtype(torch.float32))
            text_encoder = T5EncoderModel.from_pretrained(base, subfolder="text_encoder", dtype=weight_dtype)
            tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer")
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
        keep_t5_projections_fp32(text_encoder)
        transformer.to(device)
        vae.to(device).eval().requires_grad_(False)
        text_encoder.to(device).eval().requires_grad_(False)
        # the pipeline's own prompt encoder; its __init__ also treats a None shift_factor as 0
        pipe = BriaPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                            tokenizer=tokenizer)
        training_schedule = FlowMatchEulerDiscreteScheduler.from_config(
            scheduler.config, shift=self.options.shift, use_dynamic_shifting=False)
        # on the device once: the step indexes it there without a copy
        self.sigmas = training_schedule.sigmas.to(device, torch.float32)
        return LoadedModel(
            denoiser=transformer,
            encoders={"pipe": pipe, "vae": vae},
            scheduler=scheduler,
            fingerprint=base_fingerprint(base, transformer.config, vae.config, text_encoder.config.to_dict()),
        )

    @torch.no_grad()
    def encode_image(self, model: LoadedModel, pixels: torch.Tensor,
                     geometry: CropGeometry | None = None) -> dict[str, torch.Tensor]:
        vae = model.encoders["vae"]
        dist = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist
        shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
        # the distribution, normalised: a fresh latent is drawn from it every step
        return {"latent_mean": (dist.mean[0] - shift) * scale, "latent_std": dist.std[0] * scale}

    @torch.no_grad()
    def encode_text(self, model: LoadedModel, caption: str) -> dict[str, torch.Tensor]:
        pipe = model.encoders["pipe"]
        prompt_embeds, _, _ = pipe.encode_prompt(prompt=[caption], device=pipe.text_encoder.device,
                                                 do_classifier_free_guidance=False,
                                                 max_sequence_length=self.options.max_sequence_length)
        return {"prompt_embeds": prompt_embeds[0]}

    def collate(self, entries: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        # every caption is already zero-padded to max_sequence_length
        return {key: torch.stack([e[key] for e in entries]) for key in ("latent_mean", "latent_std", "prompt_embeds")}

    def compute_loss(self, denoiser: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        mean, std = batch["latent_mean"], batch["latent_std"]
        b, c, h, w = mean.shape
        device, dtype = mean.device, batch["prompt_embeds"].dtype
        x0 = mean + std * torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        index = torch.randint(0, len(self.sigmas), (b,), generator=generator, device=device)
        sigmas = self.sigmas[index] if self.sigmas.device == device else self.sigmas.to(device)[index]
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        s = sigmas.view(b, 1, 1, 1)
        noisy = s * noise + (1 - s) * x0

        packed = BriaPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = latent_image_ids(h // 2, w // 2, device, dtype)
        txt_ids = torch.zeros(batch["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)
        pred = denoiser(
            hidden_states=packed.to(dtype),
            timestep=sigmas * 1000,  # the scheduler's timestep for that sigma
            encoder_hidden_states=batch["prompt_embeds"],
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        target = BriaPipeline._pack_latents(noise - x0, b, c, h, w)
        return F.mse_loss(pred.float(), target.float())

    def denoiser_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        unwrapped = getattr(denoiser, "module", denoiser)
        return [*unwrapped.transformer_blocks, *unwrapped.single_transformer_blocks]

    def save_lora(self, directory: Path, lora_state: dict[str, torch.Tensor], adapter_metadata: dict) -> None:
        # BriaPipeline has no LoRA mixin; Flux's saver writes the `transformer.` keys that
        # pipe.transformer.load_lora_adapter(dir, prefix="transformer") reads
        FluxLoraLoaderMixin.save_lora_weights(
            directory, transformer_lora_layers=lora_state, transformer_lora_adapter_metadata=adapter_metadata,
            weight_name="pytorch_lora_weights.safetensors",
        )

    def fix_pipeline_precision(self, pipeline) -> None:
        if pipeline.text_encoder is not None:
            keep_t5_projections_fp32(pipeline.text_encoder)
        if pipeline.vae is not None:
            pipeline.vae.to(torch.float32)  # "BRIA's VAE is not supported in mixed precision" (BriaPipeline)

    def lora_owner(self, pipeline):
        return pipeline.transformer  # BriaPipeline has no LoRA loader mixin

    def _load_lora_weights(self, pipeline, lora_file: Path, adapter_name: str) -> None:
        pipeline.transformer.load_lora_adapter(str(lora_file.parent), prefix=self.lora_key_prefix,
                                               weight_name=lora_file.name, adapter_name=adapter_name)
