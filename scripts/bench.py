"""Time the engine's FIBO training step against Bria's published recipe, through the code path `train` uses.

    python scripts/bench.py --size tiny --recipe both             # CPU-sized: tiny FIBO base
    python scripts/bench.py --size full --recipe both             # one GPU: random full-size FIBO, 1024^2, 1536 tokens
    python scripts/bench.py --size full --recipe engine --low-memory
    python scripts/bench.py --size full --recipe engine --sync-debug --render-prompts 0  # CUDA: no hidden host sync
    python scripts/bench.py --size full --layers 1 --text-layers 1 --resolution 64 --text-tokens 48 --rank 8  # CPU smoke

Prints one JSON line per recipe (s_per_step = median of the timed steps after warm-up; each step
ends in its loss read-back because log_every is 1; for the engine, render_s and render_peak_gib of
one validation render as training does it, beside the step's peak_gib; save_s_* and save_host_gib_*
of one checkpoint as the main process writes it and as every other process waits for it) and, for `both`, a last
line with ratio_reference_over_engine. Speed targets live in docs/PERFORMANCE.md, never in tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from tailoredgen_train.benchmark import BenchOptions, run_recipe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--recipe", choices=("engine", "reference", "both"), default="both")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 tiny, 5 full)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 tiny, 2 full)")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--low-memory", action="store_true",
                        help="engine: checkpoint every block, 8-bit AdamW (bitsandbytes) or CPU-offloaded states")
    parser.add_argument("--compile", action="store_true", help="engine: regional torch.compile of the blocks (CUDA)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default 1024 full, 128 tiny)")
    parser.add_argument("--text-tokens", type=int, default=None, help="caption tokens (default 1536 full, 256 tiny)")
    parser.add_argument("--layers", type=int, default=None, help="full: N dual + N single blocks (smoke tests)")
    parser.add_argument("--text-layers", type=int, default=None, help="full: text-encoder depth (smoke tests)")
    parser.add_argument("--images", type=int, default=2, help="synthetic images in the dataset")
    parser.add_argument("--log-every", type=int, default=1,
                        help="steps between loss read-backs; above 1 the per-step times are host times")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="engine config override for the engine recipe, e.g. run.gradient_checkpointing=8")
    parser.add_argument("--workdir", default=None, help="keep the synthetic data and caches here")
    parser.add_argument("--render-prompts", type=int, default=1,
                        help="engine: time a validation render of this many prompts after the steps (0: none)")
    parser.add_argument("--render-steps", type=int, default=None,
                        help="inference steps of that render (default: the config's validation.num_inference_steps)")
    parser.add_argument("--sync-debug", action="store_true",
                        help="engine on CUDA: one more step under torch.cuda.set_sync_debug_mode('error') with no "
                             "loss read-back; a hidden host sync fails the run")
    args = parser.parse_args(argv)
    full = args.size == "full"
    steps = args.steps if args.steps is not None else (5 if full else 10)
    warmup = args.warmup if args.warmup is not None else (2 if full else 3)
    if steps < 1 or warmup < 0:
        parser.error("--steps must be 1 or more and --warmup 0 or more")
    if not full and (args.layers or args.text_layers):
        parser.error("--layers/--text-layers shrink the full-size model; the tiny base has its own sizes")
    if args.sync_debug and args.recipe != "engine":
        parser.error("--sync-debug checks the engine's step: use it with --recipe engine")
    if args.sync_debug and not torch.cuda.is_available():
        parser.error("--sync-debug needs CUDA (torch.cuda.set_sync_debug_mode); this machine has no GPU")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if torch.cuda.is_available():
        # cuDNN SDPA's backward crashes at FIBO shapes (docs/PERFORMANCE.md); make_accelerator does the same
        torch.backends.cuda.enable_cudnn_sdp(False)

    options = BenchOptions(size=args.size, steps=steps, warmup=warmup, rank=args.rank, low_memory=args.low_memory,
                           compile_blocks=args.compile, resolution=args.resolution, text_tokens=args.text_tokens,
                           layers=args.layers, text_layers=args.text_layers, images=args.images,
                           log_every=args.log_every, overrides=tuple(args.overrides),
                           render_prompts=args.render_prompts, render_steps=args.render_steps,
                           sync_debug=args.sync_debug)
    recipes = ["engine", "reference"] if args.recipe == "both" else [args.recipe]
    with tempfile.TemporaryDirectory(prefix="tg-bench-") as scratch:
        work = Path(args.workdir or scratch)
        reports = {}
        for recipe in recipes:
            reports[recipe] = run_recipe(recipe, options, work)
            print(json.dumps(reports[recipe]), flush=True)
    if len(reports) == 2:
        engine, reference = reports["engine"], reports["reference"]
        print(json.dumps({
            "ratio_reference_over_engine": round(reference["s_per_step"] / engine["s_per_step"], 3),
            "size": args.size, "device": engine["device"], "engine_profile": engine["profile"],
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
