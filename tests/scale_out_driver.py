"""Runs one job (a job.json) in each process of an `accelerate launch`, stopped after step 1 and
resumed to the end in the same processes, for tests/test_scale_out.py.

    accelerate launch --multi_gpu --num_processes 2 tests/scale_out_driver.py JOB_JSON

Each process prints what its resume loaded and onto which device: "[rank R] loaded FILE
map_location=... devices=..." lines.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from accelerate.state import PartialState

import tailoredgen_train.engine.checkpoint_manager as checkpoint_manager
from tailoredgen_train.recipe import JobSpec, run_training


def tensor_devices(value) -> set[str]:
    if isinstance(value, torch.Tensor):
        return {str(value.device)}
    if isinstance(value, dict):
        return set().union(*map(tensor_devices, value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*map(tensor_devices, value)) if value else set()
    return set()


def say(line: str) -> None:
    # one write per line: the processes share the pipe, and print() may write the newline separately
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def record_loads() -> None:
    """Report every resume-state load of this process: the device it asked for, where tensors landed."""
    rank, device = PartialState().process_index, PartialState().device
    say(f"[rank {rank}] device {device}")
    torch_load, load_file = torch.load, checkpoint_manager.load_safetensors_file

    def report(path, location, loaded):
        say(f"[rank {rank}] loaded {Path(path).name} map_location={location} "
            f"devices={','.join(sorted(tensor_devices(loaded)))}")

    def recording_torch_load(path, *args, **kwargs):
        loaded = torch_load(path, *args, **kwargs)
        report(path, kwargs.get("map_location"), loaded)
        return loaded

    def recording_load_file(path, device="cpu"):
        loaded = load_file(path, device=device)
        report(path, device, loaded)
        return loaded

    torch.load = recording_torch_load
    checkpoint_manager.load_safetensors_file = recording_load_file


def main(job_file: str) -> int:
    job = JobSpec.from_dict(json.loads(Path(job_file).read_text()))
    # the first run ends its process group at the end; keep it for the resumed run in these processes
    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    stopped = dataclasses.replace(job, engine=dataclasses.replace(
        job.engine, run=dataclasses.replace(job.engine.run, stop_after_steps=1)))
    run_training(stopped)
    record_loads()
    run_training(dataclasses.replace(job, resume=True))
    destroy(PartialState())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
