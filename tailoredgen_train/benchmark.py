"""The benchmark behind scripts/bench.py: the engine's training step and Bria's published recipe,
each timed through `prepare_training` -> `Trainer.train` -> the family's `compute_loss` (the path
`train` takes), on a synthetic dataset of fixed-size images and captions.

Nothing here asserts a speed: it measures and reports (docs/PERFORMANCE.md keeps the numbers).
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import json
import math
import re
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from accelerate.utils import set_seed
from PIL import Image

from .config import EngineConfig, load_engine_config
from .contract import TrainingParameters
from .data import validate_dataset
from .engine.checkpoint import Checkpointer
from .engine.preemption import StopFlag
from .engine.speed import GIB
from .families.base import LoadedModel
from .families.fibo import FiboFamily
from .fixtures.tiny_bases import build_random_fibo, make_tiny_fibo
from .inference.validation import plan_validation
from .recipe import JobSpec, make_accelerator, prepare_training, weight_dtype_for

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# bf16 dense tensor-core peaks (vendor datasheets, no sparsity), matched on the device name, most specific first
BF16_DENSE_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H100", 989.4), ("H200", 989.4),
    ("A100", 312.0), ("L40S", 362.05), ("B200", 2250.0),
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def bf16_peak_tflops(name: str) -> float | None:
    """The device's bf16 dense peak, or None (CPUs and unknown cards: no MFU is reported)."""
    for key, peak in BF16_DENSE_PEAK_TFLOPS:
        if key in name:
            return peak
    return None


def fibo_step_flop_parts(config, *, image_tokens: int, text_tokens: int, rank: int,
                         batch_size: int = 1) -> dict[str, float]:
    """Analytic model FLOPs of one LoRA training step (forward + backward) of a FIBO transformer with
    a frozen base and LoRA on Bria's 17 targets, by part. Recomputation by checkpointing is not counted.

    Per block, with inner width D and T = image + text tokens: base linears 12*D^2*T multiply-adds,
    run forward and backward to the input only (4 FLOPs per MAC: the base gets no weight gradient);
    attention 4*T^2*D forward, 8*T^2*D backward; LoRA r*(in+out) MACs per module and token, 6 FLOPs
    per MAC (forward, input and weight gradients): 18*r*D per token in a dual block, 17*r*D in a
    single one. Forward only: caption projections, context and x embedders. AdaLN linears (one token
    per sample) are left out.
    """
    d = config.num_attention_heads * config.attention_head_dim
    blocks = config.num_layers + config.num_single_layers
    t = image_tokens + text_tokens
    lora_macs = rank * d * t * (18 * config.num_layers + 17 * config.num_single_layers)
    lora_macs += rank * (d + config.in_channels) * image_tokens  # top-level proj_out
    parts = {
        "base_linear": 4 * 12 * d * d * t * blocks + 4 * image_tokens * d * config.in_channels,  # + proj_out
        "attention": 12 * t * t * d * blocks,
        "lora": 6 * lora_macs,
        "forward_only": 2 * (text_tokens * config.text_encoder_dim * (d // 2) * blocks  # caption projections
                             + text_tokens * config.joint_attention_dim * d + image_tokens * config.in_channels * d),
    }
    return {name: float(batch_size * value) for name, value in parts.items()}


def fibo_step_flops(config, *, image_tokens: int, text_tokens: int, rank: int, batch_size: int = 1) -> float:
    return sum(fibo_step_flop_parts(config, image_tokens=image_tokens, text_tokens=text_tokens, rank=rank,
                                    batch_size=batch_size).values())


class ReferenceFibo(FiboFamily):
    """Bria's published FIBO LoRA step (Bria-AI/FIBO src/fine_tuning/fine_tune_fibo.py) on the
    engine's loop: nothing cached (VAE and text encoder run every step: the VAE in fp32, as there),
    and a dense additive (B,1,S,S) attention mask. Gradient checkpointing comes from the config."""

    name = "fibo-reference"
    text_feature_keys = ()  # its entries are pixels and token ids: always "cached", encoded every step

    def __init__(self, model: LoadedModel, options=None):
        super().__init__(options)
        self.model = model

    def encode_sample(self, model, pixels, caption, geometry=None):
        # what Bria's dataset yields: the cropped image, and token ids of the caption
        tokenizer = model.encoders["text"].tokenizer
        ids = tokenizer(caption, truncation=True, max_length=self.options.max_sequence_length,
                        add_special_tokens=True, return_tensors="pt").input_ids[0]
        return {"pixels": pixels[0], "input_ids": ids}

    def collate(self, entries):
        longest = max(len(e["input_ids"]) for e in entries)
        pad_id = self.model.encoders["text"].tokenizer.pad_token_id
        ids = torch.full((len(entries), longest), pad_id, dtype=torch.long)
        for row, entry in enumerate(entries):
            ids[row, : len(entry["input_ids"])] = entry["input_ids"]
        mask = torch.stack([torch.arange(longest) < len(e["input_ids"]) for e in entries])
        return {"pixels": torch.stack([e["pixels"] for e in entries]), "input_ids": ids, "text_mask": mask}

    def release_encoders(self, model, keep_text: bool = False) -> None:
        pass  # they run every step

    def compute_loss(self, denoiser, batch, generator):
        with torch.no_grad(), torch.autocast(batch["pixels"].device.type, enabled=False):
            latents = self.encode_latents(self.model, batch["pixels"])
            text_encoder = self.model.encoders["text"].text_encoder
            # Bria's get_smollm_prompt_embeds: last two hidden states concatenated, every layer kept
            hidden = text_encoder(batch["input_ids"], attention_mask=batch["text_mask"].long(),
                                  output_hidden_states=True).hidden_states
            prompt_embeds = torch.cat([hidden[-1], hidden[-2]], dim=-1)
            kept = hidden[-min(len(hidden), self.model.extras["num_blocks"]):]
        features = {"latents": latents, "prompt_embeds": prompt_embeds, "text_layers": torch.stack(kept),
                    "text_mask": batch["text_mask"]}
        return super().compute_loss(denoiser, features, generator)

    def attention_kwargs(self, text_mask, image_tokens, dtype):
        # Bria: outer product of [text_mask, ones(image)] -> 0 keep / -inf drop, always passed
        keep = torch.cat([text_mask, torch.ones(text_mask.shape[0], image_tokens, dtype=torch.bool,
                                                device=text_mask.device)], dim=1)
        pairs = keep[:, :, None] & keep[:, None, :]
        additive = torch.zeros(pairs.shape, dtype=dtype, device=keep.device).masked_fill(~pairs, float("-inf"))
        return {"attention_mask": additive[:, None]}


@dataclass
class BenchOptions:
    size: str = "tiny"
    steps: int = 10
    warmup: int = 3
    rank: int = 128
    low_memory: bool = False
    compile_blocks: bool = False
    resolution: int | None = None
    text_tokens: int | None = None
    layers: int | None = None
    text_layers: int | None = None
    images: int = 2
    log_every: int = 1
    overrides: tuple[str, ...] = ()
    render_prompts: int = 1
    """Validation render timed after the steps (engine recipe): prompts per render, 0 for none."""
    render_steps: int | None = None
    """Inference steps of that render (default: the recipe config's validation.num_inference_steps)."""
    sync_debug: bool = False
    """Engine on CUDA: after the timed steps, one more step under torch.cuda.set_sync_debug_mode("error")
    with no loss read-back (run.host_sync=log, no logging step): any hidden host sync fails it."""

    @property
    def full(self) -> bool:
        return self.size == "full"


def low_memory_optimizer() -> str:
    """8-bit states when bitsandbytes is importable, else states offloaded to the CPU."""
    return "adamw_8bit" if importlib.util.find_spec("bitsandbytes") else "adamw_cpu_offload"


def recipe_config(recipe: str, options: BenchOptions, work: Path) -> EngineConfig:
    base = CONFIGS / ("fibo.yaml" if options.full else "fibo-tiny.yaml")
    resolution = options.resolution or (1024 if options.full else 128)
    settings = [
        f"data.resolution={resolution}", f"data.min_side={min(resolution, 256)}", "data.batch_size=1",
        "optim.global_batch_size=1", "run.log_with=none", f"run.log_every={options.log_every}",
        f"run.cache_dir={work / recipe / 'cache'}", f"validation.num_prompts={max(options.render_prompts, 1)}",
        "validation.at_start=false",
    ]
    if options.render_steps:
        settings.append(f"validation.num_inference_steps={options.render_steps}")
    if options.sync_debug and recipe == "engine":  # no read-back but the one after the last step
        settings += ["run.host_sync=log", f"run.log_every={options.warmup + options.steps}"]
    if recipe == "reference":  # Bria's recipe: checkpointing on, nothing compiled
        settings += ["run.gradient_checkpointing=true", "run.compile_blocks=false"]
    elif options.low_memory:
        settings += ["run.gradient_checkpointing=true", f"optim.optimizer={low_memory_optimizer()}",
                     f"run.compile_blocks={str(options.compile_blocks).lower()}"]
    else:  # the engine's levers: checkpoint only what free memory requires
        settings += ["run.gradient_checkpointing=auto", f"run.compile_blocks={str(options.compile_blocks).lower()}"]
        settings += list(options.overrides)
    return load_engine_config(base, settings)


def write_dataset(directory: Path, *, count: int, resolution: int, text_tokens: int) -> Path:
    """`count` square images of side `resolution` with JSON captions of exactly `text_tokens` bytes
    (one token per byte with FIBO's byte tokenizer here)."""
    directory.mkdir(parents=True, exist_ok=True)
    overhead = len(json.dumps({"short_description": ""}, separators=(",", ":")))
    if text_tokens <= overhead:
        raise ValueError(f"--text-tokens must exceed {overhead}")
    ramp = np.linspace(0, 255, resolution, dtype=np.float32)
    rows = []
    for index in range(count):
        pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (resolution, 1)),
                           np.full((resolution, resolution), 40.0 * index)], axis=-1)
        name = f"synthetic_{index}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(directory / name)
        words = f"image {index} " + "a long structured caption " * text_tokens
        caption = json.dumps({"short_description": words[: text_tokens - overhead]}, separators=(",", ":"))
        rows.append({"file_name": name, "caption": caption})
    (directory / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process_max_rss"


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _time_render(trainer, device: torch.device) -> dict:
    """One validation render as training does it (components moved in from the host, then out),
    timed twice (the first pays for loading), with its own peak memory beside the step's."""
    validator = trainer.validator
    validator.render(trainer.denoiser, 0)  # loads the renderer's components; not timed
    reset_peak(device)
    started = time.perf_counter()
    images = validator.render(trainer.denoiser, 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak, _ = peak_memory(device)
    validator.release()
    plan = validator.plan
    return {"render_s": round(seconds, 3), "render_prompts": len(plan.prompts),
            "render_steps": plan.settings.steps or trainer.family.generation_steps,
            "render_size": list(images[0].image.size) if images else None, "render_peak_gib": round(peak, 3),
            "render_ok": bool(images)}


def _host_memory_kib(field: str) -> int | None:
    try:
        return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))
    except (OSError, AttributeError):
        return None


def _timed_save(save) -> tuple[float, float | None]:
    """Wall time of `save()` and the host memory it needed above the resident memory before it
    (Linux: the peak is reset through /proc/self/clear_refs; None elsewhere)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resident high-water mark := current
        before = _host_memory_kib("VmRSS")
    except OSError:
        before = None
    started = time.perf_counter()
    save()
    seconds = time.perf_counter() - started
    peak = _host_memory_kib("VmHWM")
    return seconds, None if before is None or peak is None else (peak - before) / 2**20


def _time_checkpoint_saves(trainer) -> dict:
    """One checkpoint (published LoRA + resume state) as the main process saves it, and as every
    other process of a multi-process run does (only waits for the main one's verdict): per-rank
    save time and extra host memory."""
    checkpoints = trainer.checkpoints
    main_s, main_gib = _timed_save(lambda: checkpoints.save(trainer.denoiser, trainer.progress))
    # the same manager on a process that is not the main one (one process here: no collective to wait on)
    other = copy.copy(checkpoints)
    other.accelerator = SimpleNamespace(is_main_process=False, num_processes=1, device=checkpoints.accelerator.device,
                                        unwrap_model=checkpoints.accelerator.unwrap_model)
    other.checkpointer = copy.copy(checkpoints.checkpointer)
    other.checkpointer.is_main_process = False
    other_s, other_gib = _timed_save(lambda: other.save(trainer.denoiser, trainer.progress))
    resume = checkpoints.resume_path_for(trainer.progress.step)
    return {"save_s_rank0": round(main_s, 3), "save_host_gib_rank0": _round(main_gib),
            "save_s_other_rank": round(other_s, 4), "save_host_gib_other_rank": _round(other_gib),
            "resume_state_gib": round(sum(p.stat().st_size for p in resume.iterdir()) / GIB, 4)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def step_under_sync_debug(trainer) -> str:
    """One more optimizer step (its micro-batches loaded first: loading is the host's part) under
    torch.cuda.set_sync_debug_mode("error"): a blocking copy, .item() or a data-dependent shape in
    the step raises. "ok" when none did."""
    if trainer.settings.sync_every_step:
        raise RuntimeError("the sync check needs run.host_sync=log (fused AdamW on CUDA): every step reads its loss")
    batches = trainer.batches_from(trainer.progress.cursor)
    micro_batches = [next(batches) for _ in range(trainer.settings.gradient_accumulation_steps)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(micro_batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer._resolve_pending()  # the step's own read-back, after the check
    return "ok"


def run_recipe(recipe: str, options: BenchOptions, work: Path) -> dict:
    """Build the model, cache (engine) or not (reference), train warmup + steps, report one line."""
    config = recipe_config(recipe, options, work)
    out = work / recipe
    accelerator = make_accelerator(config, out)
    device = accelerator.device
    reset_peak(device)
    started = time.perf_counter()
    family = FiboFamily(config.model)
    set_seed(config.run.seed)
    render_components = None
    if options.full:
        model = build_random_fibo(device=device, weight_dtype=weight_dtype_for(accelerator),
                                  num_layers=options.layers, text_layers=options.text_layers)
        base = "random full-size FIBO"
        # no folder to load the renderer's text encoder and VAE from: it keeps these on the host
        render_components = {"text_encoder": model.encoders["text"].text_encoder,
                             "tokenizer": model.encoders["text"].tokenizer, "vae": model.encoders["vae"],
                             "scheduler": model.scheduler}
    else:
        base_dir = work / "tiny-base"
        if not base_dir.exists():
            make_tiny_fibo(base_dir, seed=0)
        model = family.load(str(base_dir), device=device, weight_dtype=weight_dtype_for(accelerator))
        base = str(base_dir)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - started
    if recipe == "reference":
        family = ReferenceFibo(model, config.model)

    text_tokens = options.text_tokens or (1536 if options.full else 256)
    dataset = write_dataset(work / "dataset", count=options.images, resolution=config.data.resolution,
                            text_tokens=text_tokens)
    measured_tokens = len(model.encoders["text"].tokenizer(json.loads(
        (dataset / "metadata.jsonl").read_text().splitlines()[0])["caption"]).input_ids)
    total = options.warmup + options.steps
    params = TrainingParameters(learning_rate=1e-4, lr_scheduler="constant", rank=options.rank,
                                total_training_steps=total, checkpoint_interval=total, lr_warmup_steps=None)
    job = JobSpec(base=base, dataset_dir=str(dataset), output_dir=str(out), training_version="fibo", params=params,
                  engine=config)
    samples = validate_dataset(dataset, caption_format="json", min_side=config.data.min_side).samples
    checkpointer = Checkpointer(out, is_main_process=True, config_hash=job.fingerprint())
    transformer_config = model.denoiser.config
    plan = None
    if recipe == "engine" and options.render_prompts:
        plan = plan_validation(config, family, [(s.sample_id, s.caption) for s in samples], None)
    setup = prepare_training(job, family, model, samples, accelerator, checkpointer, StopFlag(), plan,
                             render_components=render_components)
    render_components = None  # the renderer holds them now, on the host
    trainer = setup.trainer
    trainer.settings.checkpoint_steps = []  # the benchmark writes no checkpoints
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    setup_s = time.perf_counter() - started
    peak_setup, _ = peak_memory(device)
    reset_peak(device)

    history = trainer.train()
    peak, peak_kind = peak_memory(device)
    render = _time_render(trainer, device) if trainer.validator is not None else {}
    if options.sync_debug and recipe == "engine":
        render["sync_debug"] = step_under_sync_debug(trainer)
    saves = _time_checkpoint_saves(trainer) if recipe == "engine" else {}
    timed = [r.seconds for r in history[options.warmup:]]
    s_per_step = statistics.median(timed)
    bucket = setup.items[0].bucket
    image_tokens = (bucket[0] // 16) * (bucket[1] // 16)
    flops = fibo_step_flops(transformer_config, image_tokens=image_tokens, text_tokens=measured_tokens,
                            rank=options.rank, batch_size=config.data.batch_size)
    name = device_name(device)
    peak_tflops = bf16_peak_tflops(name) if device.type == "cuda" else None
    tflops = flops / s_per_step / 1e12
    report = {
        "recipe": recipe,
        "profile": "low_memory" if options.low_memory and recipe == "engine" else "default",
        "size": options.size,
        "device": name,
        "torch": torch.__version__,
        "s_per_step": round(s_per_step, 5),
        "steps_timed": len(timed),
        "warmup": options.warmup,
        "peak_gib": round(peak, 3),
        "peak_kind": peak_kind,
        "peak_gib_setup": round(peak_setup, 3),
        "tflops": round(tflops, 4),
        "mfu": round(tflops / peak_tflops, 4) if peak_tflops else None,
        "mfu_peak_tflops": peak_tflops,
        "flop_per_step": flops,
        "build_s": round(build_s, 2),
        "setup_s": round(setup_s, 2),
        "base": base,
        "blocks": transformer_config.num_layers + transformer_config.num_single_layers,
        "resolution": list(bucket),
        "image_tokens": image_tokens,
        "text_tokens": measured_tokens,
        "rank": options.rank,
        "lora_params": setup.num_trainable,
        "batch_size": config.data.batch_size,
        "precision": accelerator.mixed_precision,
        "gradient_checkpointing": setup.checkpointing,
        "compile_blocks": config.run.compile_blocks and device.type == "cuda",
        "attention_mask": "dense_additive" if recipe == "reference" else "none_unless_padded",
        "encoders_every_step": recipe == "reference",
        "optimizer": config.optim.optimizer + (" (fused)" if trainer.optimizer.defaults.get("fused") else ""),
        "sync_every_step": trainer.settings.sync_every_step,
        "skipped_steps": sum(r.skipped for r in history),
        "loss_finite": all(math.isfinite(r.loss) for r in history),
        "loss_mean": round(statistics.fmean(r.loss for r in history), 6),
        **render,
        **saves,
    }
    accelerator.free_memory()  # drops accelerate's references, so the next recipe starts from an empty device
    del trainer, setup, model, family
    reset_peak(device)
    return report
