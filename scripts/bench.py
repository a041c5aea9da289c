"""Time the engine's training step through the same code path `train` uses (run_training).

    python scripts/bench.py --base runs/tiny-fibo-base --steps 30 [--config configs/fibo-tiny.yaml]

Prints one JSON line: median seconds per optimizer step after warm-up, peak memory, device.
Speed and memory targets live here, never in the tests. (Full-size FIBO with random weights and
the reference recipe side by side are the GPU-speed issue's work.)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from tailoredgen_train.config import load_engine_config
from tailoredgen_train.contract import TrainingParameters
from tailoredgen_train.data import SAMPLE_DATASET_DIR
from tailoredgen_train.recipe import JobSpec, run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="diffusers-format FIBO directory (e.g. runs/tiny-fibo-base)")
    parser.add_argument("--dataset", default=str(SAMPLE_DATASET_DIR))
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "fibo-tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the median")
    parser.add_argument("--rank", type=int, default=128)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    engine = load_engine_config(args.config, ["run.log_with=none", *args.overrides])
    params = TrainingParameters(learning_rate=1e-4, lr_scheduler="constant", rank=args.rank,
                                total_training_steps=args.steps, checkpoint_interval=args.steps, lr_warmup_steps=None)
    with tempfile.TemporaryDirectory() as output:
        result = run_training(JobSpec(base=args.base, dataset_dir=args.dataset, output_dir=output,
                                      training_version="fibo", params=params, engine=engine))
    timed = [r.seconds for r in result.history[args.warmup:]]
    cuda = torch.cuda.is_available()
    report = {
        "recipe": "engine",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "base": args.base,
        "rank": args.rank,
        "resolution": engine.data.resolution,
        "batch_size": engine.data.batch_size,
        "gradient_checkpointing": engine.run.gradient_checkpointing,
        "steps_timed": len(timed),
        "s_per_step": round(statistics.median(timed), 5),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30 if cuda
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "peak_kind": "cuda_allocated" if cuda else "process_max_rss",
        "torch": torch.__version__,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
