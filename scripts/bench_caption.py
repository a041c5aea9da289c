"""Time captioning through `Captioner.caption_images` (the code path `caption` uses), with and without
the caption grammar.

    python scripts/bench_caption.py --size tiny                    # CPU: the tiny random Qwen3-VL
    python scripts/bench_caption.py --size full                    # one GPU: random Qwen3-VL-4B shape, bf16, 1024^2
    python scripts/bench_caption.py --size full --layers 1 --vision-layers 1 --resolution 64 --images 2  # CPU smoke

Prints one JSON line per mode. "constrained" captions `--images` synthetic images in batches of
`--batch-size` (images/s, tokens/s, ms per decoding step, peak memory). "unconstrained" generates the
same number of tokens per image with the same inputs and sampling but without the grammar: the ratio
of the two ms/step is the grammar's overhead (last line). Each mode runs `--repeat` times and reports
its median run; "grammar_ms_per_step" is the time spent inside the constraint itself (mask, cursor,
masked_fill), which a busy machine disturbs less than the end-to-end ratio. Random weights write random strings, so a
caption's length is set by the string allowance (`--string-tokens`) and the tokenizer (byte-level:
one token a byte); `tokens_per_caption` says what was timed. Numbers go to docs/PERFORMANCE.md,
never into tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

from tailoredgen_train.benchmark import device_name, peak_memory, reset_peak  # noqa: E402
from tailoredgen_train.captioning.captioner import Captioner  # noqa: E402
from tailoredgen_train.captioning.constrained import CaptionConstraint  # noqa: E402
from tailoredgen_train.captioning.grammar import CaptionLimits  # noqa: E402
from tailoredgen_train.captioning.loading import (  # noqa: E402
    FIBO_MAX_PIXELS,
    FIBO_MIN_PIXELS,
    ImageOnlyQwen3VLProcessor,
    default_device,
    default_dtype,
)
from tailoredgen_train.captioning.prompts import inspire_messages  # noqa: E402
from tailoredgen_train.fixtures.tiny_vlm import (  # noqa: E402
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_tokenizer,
    make_tiny_vlm,
)


def qwen3_vl_4b_config(tokenizer, layers: int | None, vision_layers: int | None) -> Qwen3VLConfig:
    """Qwen3-VL-4B's published shape (FIBO-vlm's base is inferred to be it, not stated by Bria)."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=layers or 36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True},
            pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=vision_layers or 24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2560, num_position_embeddings=2304,
            deepstack_visual_indexes=[i for i in (5, 11, 17) if i < (vision_layers or 24)],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_captioner(args: argparse.Namespace, work: Path, device: torch.device, limits: CaptionLimits) -> Captioner:
    if args.size == "tiny":
        # saved and loaded as `--vlm DIR` is
        return Captioner.load(str(make_tiny_vlm(work / "tiny-vlm")), device=device, min_pixels=args.min_pixels,
                              max_pixels=args.max_pixels, limits=limits, batch_size=args.batch_size)
    tokenizer = build_tokenizer()
    dtype = default_dtype(device)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(
            qwen3_vl_4b_config(tokenizer, args.layers, args.vision_layers), dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "left"
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                               size={"shortest_edge": args.min_pixels, "longest_edge": args.max_pixels})
    processor = ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=CHAT_TEMPLATE)
    return Captioner(model, processor, limits=limits, batch_size=args.batch_size, source="random Qwen3-VL-4B shape")


def synthetic_images(count: int, side: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    images = []
    for _ in range(count):
        base = (ramp[None, :, None] * rng.random(3) + ramp[:, None, None] * rng.random(3)) / 2
        noise = rng.normal(0, 12, (side, side, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return images


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--images", type=int, default=None, help="images captioned (default 20 full, 6 tiny)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default 1024 full, 256 tiny)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per generate call (default 8 full, 6 tiny)")
    parser.add_argument("--string-tokens", type=int, default=None,
                        help="token allowance of every string (default 16 full, 4 tiny); 0: the per-field defaults")
    parser.add_argument("--max-pixels", type=int, default=None, help="VLM image area (default FIBO's 1024*28*28)")
    parser.add_argument("--min-pixels", type=int, default=None, help="(default FIBO's 256*28*28, capped at max)")
    parser.add_argument("--layers", type=int, default=None, help="full: text layers (smoke runs)")
    parser.add_argument("--vision-layers", type=int, default=None, help="full: vision blocks (smoke runs)")
    parser.add_argument("--mode", choices=("constrained", "unconstrained", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=None, help="runs per mode, the median is reported "
                        "(default 3 tiny, 1 full)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.size == "full" else 3)
    full = args.size == "full"
    args.images = args.images or (20 if full else 6)
    args.resolution = args.resolution or (1024 if full else 256)
    args.batch_size = args.batch_size or (8 if full else 6)
    args.max_pixels = args.max_pixels or (FIBO_MAX_PIXELS if full else 16 * 32 * 32)
    args.min_pixels = min(args.min_pixels or FIBO_MIN_PIXELS, args.max_pixels)
    string_tokens = args.string_tokens if args.string_tokens is not None else (16 if full else 4)
    limits = CaptionLimits().with_string_tokens(string_tokens) if string_tokens else CaptionLimits()
    device = torch.device(args.device) if args.device else default_device()

    with tempfile.TemporaryDirectory(prefix="tg-bench-caption-") as scratch:
        captioner = build_captioner(args, Path(scratch), device, limits)
        images = synthetic_images(args.images, args.resolution)
        captioner.caption_images(images[:1], seed=99)  # warm-up: kernels, allocator, llguidance tables
        common = {"size": args.size, "device": device_name(device), "images": args.images,
                  "batch_size": args.batch_size, "resolution": args.resolution,
                  "image_tokens": int(captioner.model_inputs([inspire_messages(images[0])])["image_grid_thw"][0]
                                      .prod()) // 4, "string_tokens": string_tokens or "per-field"}
        reports = {}
        tokens_per_caption = None
        if args.mode in ("constrained", "both"):
            runs = [constrained_run(captioner, images, args.batch_size, device) for _ in range(args.repeat)]
            seconds, tokens, steps, failed, grammar_seconds = sorted(runs)[len(runs) // 2]
            tokens_per_caption = round(tokens / len(images))
            reports["constrained"] = report(common, "constrained", seconds, tokens, steps, failed, device)
            reports["constrained"]["grammar_ms_per_step"] = round(1000 * grammar_seconds / steps, 3)
            print(json.dumps(reports["constrained"]), flush=True)
        if args.mode in ("unconstrained", "both"):
            length = tokens_per_caption or 256
            runs = [unconstrained_run(captioner, images, args.batch_size, length, device) for _ in range(args.repeat)]
            seconds = statistics.median(runs)
            steps = length * -(-len(images) // args.batch_size)
            reports["unconstrained"] = report(common, "unconstrained", seconds, length * len(images), steps, 0, device)
            print(json.dumps(reports["unconstrained"]), flush=True)
        if len(reports) == 2:
            ratio = reports["constrained"]["ms_per_step"] / reports["unconstrained"]["ms_per_step"]
            print(json.dumps({"grammar_overhead": round(ratio, 3), "size": args.size, "device": common["device"]}))
    return 0


def constrained_run(captioner: Captioner, images: list[Image.Image], batch_size: int,
                    device: torch.device) -> tuple[float, int, int, int, float]:
    """(seconds, tokens, decoding steps, failed captions, seconds inside the constraint)."""
    spent = [0.0]
    original = CaptionConstraint.__call__

    def timed(self, input_ids, scores):
        start = time.perf_counter()
        out = original(self, input_ids, scores)
        sync(device)
        spent[0] += time.perf_counter() - start
        return out

    CaptionConstraint.__call__ = timed
    try:
        reset_peak(device)
        steps, failed, tokens = 0, 0, 0
        start = time.perf_counter()
        for first in range(0, len(images), batch_size):
            results = captioner.caption_images(images[first:first + batch_size], seed=first)
            steps += max(r.tokens for r in results) + 1  # the rows' longest, and its end-of-sequence step
            failed += sum(not r.ok for r in results)
            tokens += sum(r.tokens for r in results)
        sync(device)
        return time.perf_counter() - start, tokens, steps, failed, spent[0]
    finally:
        CaptionConstraint.__call__ = original


def unconstrained_run(captioner: Captioner, images: list[Image.Image], batch_size: int, length: int,
                      device: torch.device) -> float:
    reset_peak(device)
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        inputs = captioner.model_inputs([inspire_messages(image) for image in images[first:first + batch_size]])
        with torch.inference_mode():
            torch.manual_seed(first)
            captioner.model.generate(**inputs, do_sample=True, temperature=captioner.sampling.temperature,
                                     top_p=captioner.sampling.top_p, max_new_tokens=length, min_new_tokens=length,
                                     pad_token_id=captioner.pad_token_id)
    sync(device)
    return time.perf_counter() - start


def report(common: dict, mode: str, seconds: float, tokens: int, steps: int, failed: int,
           device: torch.device) -> dict:
    peak_gib, peak_kind = peak_memory(device)
    return {**common, "mode": mode, "seconds": round(seconds, 3), "images_per_s": round(common["images"] / seconds, 4),
            "tokens_per_caption": round(tokens / common["images"]), "tokens_per_s": round(tokens / seconds, 1),
            "ms_per_step": round(1000 * seconds / max(steps, 1), 3), "peak_gib": round(peak_gib, 3),
            "peak_kind": peak_kind, "failed": failed}


if __name__ == "__main__":
    sys.exit(main())
