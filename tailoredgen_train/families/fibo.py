"""Bria FIBO: BriaFiboTransformer2DModel + SmolLM3 text encoder + Wan 2.2 VAE, rectified flow.

Facts this module relies on (docs/MODELS.md, FIBO):
- prompts are encoded by `BriaFiboPipeline.get_prompt_embeds` itself: the last two hidden layers
  concatenated, all hidden layers fitted to the transformer's block count, "" -> BOS 128000;
- latents are the Wan VAE's `latent_dist.mean` of a one-frame video, normalised per channel,
  packed without 2x2 patching (one token per 16x16 pixels);
- x_t = sigma*noise + (1-sigma)*x0, target noise - x0, timestep sigma*1000 (no rescale inside);
- sigma ~ 10% uniform, else sigmoid(N(mu, 1)) with mu linear in image tokens (0.5@256 .. 1.15@4096).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, BriaFiboPipeline, BriaFiboTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..data.buckets import FIBO_BUCKETS_1024, CropGeometry
from ..data.captions import normalize_json_caption
from ..errors import ConfigError, InvalidGenerationParameterError, PromptError
from .base import FamilyOptions, LoadedModel, ModelFamily, base_fingerprint, diffusers_dtype

# Bria's FIBO LoRA targets (Bria-AI/FIBO src/fine_tuning/fine_tune_utils.py::add_lora); suffix
# matching also catches the top-level proj_out.
FIBO_LORA_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "norm1_context.linear", "norm1.linear", "norm.linear", "proj_out",
)
VAE_SCALE = 16  # Wan 2.2: 8x spatial x patch 2
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# Production FIBO (docs/MODELS.md): 8 dual + 38 single blocks, inner 3072; 8,285,836,848 parameters
FIBO_TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=48, num_layers=8, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, text_encoder_dim=2048, pooled_projection_dim=None, guidance_embeds=False,
    axes_dims_rope=[16, 56, 56], rope_theta=10000, time_theta=10000,
)
# Wan 2.2 VAE as FIBO ships it (Bria-AI/FIBO src/fine_tuning/vae_config.json), neutral statistics
FIBO_VAE_CONFIG = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, is_residual=True,
    in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
    temperal_downsample=[False, True, True], latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
)
# Activation bytes one block keeps for backward, per token and per unit of inner width, in bf16 at
# LoRA r=128: (65.3 - 24.7) GiB over 46 blocks x 5632 tokens x 3072 (docs/PERFORMANCE.md, Anchors)
ACTIVATION_BYTES_PER_TOKEN_WIDTH = 55


@dataclass(frozen=True)
class FiboOptions(FamilyOptions):
    max_sequence_length: int = 3000
    """Caption tokens kept (the pipeline's hard maximum is 3000)."""
    uniform_sigma_fraction: float = 0.1
    logit_normal_std: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_sequence_length <= 3000:
            raise ConfigError(f"model.max_sequence_length={self.max_sequence_length}: use 1..3000 (FIBO's limit)")
        if not 0 <= self.uniform_sigma_fraction <= 1:
            raise ConfigError(f"model.uniform_sigma_fraction={self.uniform_sigma_fraction}: use a value in [0, 1]")
        if self.logit_normal_std <= 0:
            raise ConfigError(f"model.logit_normal_std={self.logit_normal_std}: use a positive value")


def logit_normal_mu(image_tokens: int) -> float:
    """FIBO's shift: linear from 0.5 at 256 image tokens to 1.15 at 4096 (1024x1024): diffusers'
    `calculate_shift` (the Flux/FIBO pipelines' dynamic-shift formula) at Bria's training constants."""
    return calculate_shift(image_tokens, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)


def sample_sigmas(
    batch_size: int, image_tokens: int, generator: torch.Generator, *, uniform_fraction: float, std: float
) -> torch.Tensor:
    """Per-sample sigma in (0, 1): a uniform draw with probability `uniform_fraction`, else a
    shifted logit-normal draw. Branch-free, so it needs no host sync."""
    device = generator.device
    use_uniform = torch.rand(batch_size, generator=generator, device=device) < uniform_fraction
    uniform = torch.rand(batch_size, generator=generator, device=device)
    normal = torch.randn(batch_size, generator=generator, device=device) * std + logit_normal_mu(image_tokens)
    return torch.where(use_uniform, uniform, torch.sigmoid(normal))


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The pipelines' `_prepare_latent_image_ids` rows (0, row, column) of an h x w grid, built on
    the device: theirs are built on the host and copied with a blocking copy every call."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    columns = torch.arange(width, device=device).repeat(height)
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=1).to(dtype)


def fit_text_layers(layers: list[torch.Tensor], num_blocks: int) -> list[torch.Tensor]:
    """As BriaFiboPipeline: keep the last `num_blocks` hidden states, or repeat the last one."""
    if len(layers) >= num_blocks:
        return list(layers[len(layers) - num_blocks :])
    return list(layers) + [layers[-1]] * (num_blocks - len(layers))



class FiboFamily(ModelFamily):
    name = "fibo"
    caption_format = "json"
    bucket_base = FIBO_BUCKETS_1024
    bucket_multiple = VAE_SCALE
    default_lora_targets = FIBO_LORA_TARGETS
    lora_key_prefix = "transformer"
    options_cls = FiboOptions
    pipeline_class_name = "BriaFiboPipeline"
    base_components = COMPONENTS
    hub_id = "briaai/FIBO"
    text_feature_keys = ("prompt_embeds", "text_layers")
    text_encoder_keys = ("text",)
    # Bria's generate.py and the pipeline's docstring: 50 steps, CFG 5 (Bria's API allows 20-50 and 3-5)
    generation_steps = 50
    generation_guidance = 5.0

    # ---- loading ------------------------------------------------------------------------------

    def load(self, base: str, *, device: torch.device, weight_dtype: torch.dtype) -> LoadedModel:
        self.check_base(base)
        with self.loading_errors(base):
            transformer = BriaFiboTransformer2DModel.from_pretrained(
                base, subfolder="transformer", **diffusers_dtype(weight_dtype))
            # the VAE stays fp32 as in Bria's recipe: latents are cached once, so its cost is paid once
            vae = AutoencoderKLWan.from_pretrained(base, subfolder="vae", **diffusers_dtype(torch.float32))
            text_encoder = AutoModelForCausalLM.from_pretrained(base, subfolder="text_encoder", dtype=weight_dtype)
            tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer")
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
        transformer.to(device)
        return self._assemble(base, transformer, vae.to(device), text_encoder.to(device), tokenizer, scheduler)

    @staticmethod
    def _assemble(source: str, transformer, vae, text_encoder, tokenizer, scheduler) -> LoadedModel:
        vae.eval().requires_grad_(False)
        text_encoder.eval().requires_grad_(False)
        # the pipeline object is used only for its prompt encoder, so encoding is the pipeline's own
        text_pipe = BriaFiboPipeline(transformer=None, scheduler=None, vae=None, text_encoder=text_encoder,
                                     tokenizer=tokenizer)
        fingerprint = base_fingerprint(source, transformer.config, vae.config, text_encoder.config.to_dict())
        return LoadedModel(
            denoiser=transformer,
            encoders={"text": text_pipe, "vae": vae},
            scheduler=scheduler,
            fingerprint=fingerprint,
            extras={"num_blocks": len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)},
        )

    # ---- features -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_latents(self, model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
        """Wan VAE mean of a one-frame video, normalised per channel: (B, 48, H/16, W/16)."""
        vae = model.encoders["vae"]
        device = vae.device
        latents = vae.encode(pixels.to(device, vae.dtype).unsqueeze(2)).latent_dist.mean[:, :, 0]
        mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1)
        return (latents - mean) / std

    @torch.no_grad()
    def encode_text(self, model: LoadedModel, caption: str) -> dict[str, torch.Tensor]:
        text_pipe = model.encoders["text"]
        prompt_embeds, hidden_states, _ = text_pipe.get_prompt_embeds(
            prompt=[caption], max_sequence_length=self.options.max_sequence_length,
            device=text_pipe.text_encoder.device)
        # each distinct hidden state the transformer uses, once; fit_text_layers rebuilds the per-block list
        kept = hidden_states[-min(len(hidden_states), model.extras["num_blocks"]) :]
        return {"prompt_embeds": prompt_embeds[0], "text_layers": torch.stack(kept)[:, 0]}

    def text_feature_specs(self, model: LoadedModel, caption: str) -> dict[str, torch.Tensor]:
        # from the token count alone: encoding 200 long captions to learn their size would cost minutes
        text_pipe = model.encoders["text"]
        encoder = text_pipe.text_encoder
        tokens = len(text_pipe.tokenizer(caption, max_length=self.options.max_sequence_length, truncation=True,
                                         add_special_tokens=True).input_ids) if caption else 1
        hidden = encoder.config.hidden_size
        layers = min(encoder.config.num_hidden_layers + 1, model.extras["num_blocks"])
        return {"prompt_embeds": torch.empty(tokens, 2 * hidden, dtype=encoder.dtype, device="meta"),
                "text_layers": torch.empty(layers, tokens, hidden, dtype=encoder.dtype, device="meta")}

    def encode_image(self, model: LoadedModel, pixels: torch.Tensor,
                     geometry: CropGeometry | None = None) -> dict[str, torch.Tensor]:
        return {"latents": self.encode_latents(model, pixels)[0]}

    def collate(self, entries: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        lengths = [e["prompt_embeds"].shape[0] for e in entries]
        longest = max(lengths)

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            # zeros, as BriaFiboPipeline.pad_embedding; the mask hides them from every real token
            extra = longest - t.shape[dim]
            if extra == 0:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        batch = {
            "latents": torch.stack([e["latents"] for e in entries]),
            "prompt_embeds": torch.stack([pad(e["prompt_embeds"], 0) for e in entries]),
            "text_layers": torch.stack([pad(e["text_layers"], 1) for e in entries], dim=1),  # (K, B, S, D)
        }
        if min(lengths) < longest:  # decided here, on the host: the step then needs no device sync
            batch["text_mask"] = torch.stack([torch.arange(longest) < n for n in lengths])
        return batch

    # ---- objective ----------------------------------------------------------------------------

    def compute_loss(self, denoiser: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        x0 = batch["latents"]
        b, c, h, w = x0.shape
        dtype = batch["prompt_embeds"].dtype
        sigmas = sample_sigmas(b, h * w, generator, uniform_fraction=self.options.uniform_sigma_fraction,
                               std=self.options.logit_normal_std)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        s = sigmas.view(b, 1, 1, 1).to(x0.dtype)
        noisy = s * noise + (1 - s) * x0
        target = noise - x0

        packed = BriaFiboPipeline._pack_latents_no_patch(noisy, b, c, h, w)
        img_ids = latent_image_ids(h, w, x0.device, dtype)
        txt_ids = torch.zeros(batch["prompt_embeds"].shape[1], 3, device=x0.device, dtype=dtype)
        unwrapped = getattr(denoiser, "module", denoiser)  # DDP hides the block lists
        num_blocks = len(unwrapped.transformer_blocks) + len(unwrapped.single_transformer_blocks)
        layers = fit_text_layers(list(batch["text_layers"].unbind(0)), num_blocks)

        attention_kwargs = self.attention_kwargs(batch.get("text_mask"), h * w, dtype)

        pred = denoiser(
            hidden_states=packed.to(dtype),
            timestep=sigmas * 1000,  # FIBO's transformer takes sigma*1000 and does not rescale
            encoder_hidden_states=batch["prompt_embeds"],
            text_encoder_layers=layers,
            txt_ids=txt_ids,
            img_ids=img_ids,
            joint_attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]
        target_packed = BriaFiboPipeline._pack_latents_no_patch(target, b, c, h, w)
        return F.mse_loss(pred.float(), target_packed.float())

    def attention_kwargs(self, text_mask: torch.Tensor | None, image_tokens: int, dtype: torch.dtype) -> dict | None:
        """No mask when nothing is padded (a batch without `text_mask`); else the pipeline's (B,1,1,S)
        key-padding mask: a dense SxS matrix costs ~40% of a step (docs/PERFORMANCE.md)."""
        if text_mask is None:
            return None
        image_mask = torch.ones(text_mask.shape[0], image_tokens, dtype=torch.bool, device=text_mask.device)
        return {"attention_mask": torch.cat([text_mask, image_mask], dim=1)[:, None, None, :]}

    # ---- speed --------------------------------------------------------------------------------

    def denoiser_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        unwrapped = getattr(denoiser, "module", denoiser)
        return [*unwrapped.transformer_blocks, *unwrapped.single_transformer_blocks]

    def block_activation_bytes(self, denoiser: nn.Module, feature_shapes: dict[str, tuple[int, ...]],
                               batch_size: int) -> int | None:
        _, h, w = feature_shapes["latents"]
        tokens = h * w + feature_shapes["prompt_embeds"][0]
        inner = getattr(denoiser, "module", denoiser).inner_dim
        return ACTIVATION_BYTES_PER_TOKEN_WIDTH * tokens * batch_size * inner

    # ---- export -------------------------------------------------------------------------------

    def save_lora(self, directory: Path, lora_state: dict[str, torch.Tensor], adapter_metadata: dict) -> None:
        # FluxLoraLoaderMixin adds the transformer. prefix and stores the LoraConfig in the header
        BriaFiboPipeline.save_lora_weights(
            directory,
            transformer_lora_layers=lora_state,
            transformer_lora_adapter_metadata=adapter_metadata,
            weight_name="pytorch_lora_weights.safetensors",
        )

    # ---- generation ---------------------------------------------------------------------------

    def prepare_prompt(self, text: str, prefix: str | None = None) -> str:
        """A structured JSON prompt, compact as training stores captions; FIBO takes no prefix."""
        if prefix and prefix.strip():
            raise InvalidGenerationParameterError.single(
                "generation_prefix", prefix, "FIBO prompts are structured JSON and take no prefix; leave it out")
        if not text.strip():
            raise InvalidGenerationParameterError.single("prompt", text, "the prompt is empty")
        try:
            return normalize_json_caption(text)
        except ValueError as exc:
            excerpt = text if len(text) <= 60 else text[:57] + "..."
            reason = str(exc).replace("caption", "prompt", 1)
            raise PromptError(
                f"FIBO needs a structured JSON prompt, a JSON object such as "
                f'{{"short_description": "a red fox in fresh snow", "background_setting": "a pine forest"}}; '
                f"got {excerpt!r} ({reason}). A captioning model expands plain text into a structured prompt: "
                f"`generate --vlm briaai/FIBO-vlm` (or `expand-prompt`) on the command line, `serve --vlm` for the "
                f"API; the fields are in docs/CAPTIONS.md.") from None
