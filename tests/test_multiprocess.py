"""`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine: two gloo processes,
distinct data shards, one set of checkpoint files. (tests/test_scale_out.py compares the LoRA
with one process's.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tailoredgen_train.data import SAMPLE_DATASET_DIR

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_train_distinct_shards_and_write_one_checkpoint(tiny_fibo_base, tmp_path):
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "tailoredgen_train", "train",
        "--base", str(tiny_fibo_base), "--dataset", str(SAMPLE_DATASET_DIR), "--output", str(output),
        "--training-version", "fibo", "--training-mode", "expert", "--total-training-steps", "3",
        "--config", str(REPO / "configs" / "fibo-tiny.yaml"),
        "--set", "run.log_samples=true", "--set", "run.log_with=none",
        "--set", "optim.global_batch_size=2",  # fibo-tiny's 1 cannot be shared by 2 processes
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "processes: 2 on cpu" in log

    seen: dict[int, dict[int, str]] = {0: {}, 1: {}}
    for rank, step, samples in re.findall(r"\[rank (\d)\] step (\d+) samples (\S+)", log):
        seen[int(rank)][int(step)] = samples
    assert sorted(seen[0]) == sorted(seen[1]) == [1, 2, 3]
    # 6 images in 5 buckets at batch 1, a global batch of 2: the first epoch is 3 steps, in each of
    # which each process takes one micro-batch, and together they cover the whole dataset
    first_epoch = [set(seen[r][s].split(",")) for r in (0, 1) for s in (1, 2, 3)]
    assert set().union(*first_epoch) == {p.name for p in SAMPLE_DATASET_DIR.iterdir() if p.suffix in (".png", ".jpg")}
    assert sum(len(s) for s in first_epoch) == 6

    # checkpoint_interval omitted: capped to the 3 steps, so one checkpoint, written by one process
    assert sorted(p.name for p in output.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3"]
    assert sorted(p.name for p in (output / "checkpoint-3").iterdir()) == [
        "manifest.json", "pytorch_lora_weights.safetensors", "samples"]
    # validation renders ran on the main process only (one log line per render), the other waited
    assert log.count("rendered 4 validation sample(s) at step 3") == 1
    assert log.count("rendered 4 validation sample(s) at step 0") == 1
    assert sorted(p.name for p in (output / "samples").iterdir()) == ["step-0"]
    assert sorted(p.name for p in (output / "resume").iterdir()) == ["step-3"]
    assert not list(output.glob(".checkpoint-*"))
    # the feature cache holds each sample once; the main process encoded only its half of them
    assert len(list((output / "cache").glob("*.safetensors"))) == 6
    assert "(6 images; 3 encoded by this process" in log
