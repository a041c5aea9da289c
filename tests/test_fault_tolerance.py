"""Whatever happens to a run, it continues to exactly the result it would have reached, and no
checkpoint is ever half-written or silently corrupt (style-and-reliability.md B.4)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import params, subset_dataset, tiny_engine, train
from tailoredgen_train.engine.checkpoint import Checkpointer, Storage
from tailoredgen_train.engine.preemption import StopFlag
from tailoredgen_train.engine.trainer import Trainer
from tailoredgen_train.errors import (
    CheckpointWriteError,
    NonFiniteLossError,
    OutOfMemoryError,
    Preempted,
    ResumeError,
)
from tailoredgen_train.families.fibo import FiboFamily
from tailoredgen_train.fixtures.tiny_bases import make_tiny_base
from tailoredgen_train.recipe import JobSpec, run_training

DRIVER = Path(__file__).with_name("fault_driver.py")
# cosine: a resume that lost the scheduler state would train with other learning rates
JOB_PARAMS = params(6, lr=1e-3, rank=4, interval=2, scheduler="cosine")


def write_job(path: Path, base: Path, dataset: Path, output: Path, *, resume: bool) -> Path:
    job = JobSpec(base=str(base), dataset_dir=str(dataset), output_dir=str(output), training_version="fibo",
                  params=JOB_PARAMS, engine=tiny_engine(), resume=resume)
    path.write_text(json.dumps(job.to_dict()))
    return path


def run_driver(job: Path | list[str], *flags: str) -> subprocess.CompletedProcess:
    """`job`: a job.json (run-job), or a CLI command such as bare_resume(output)."""
    arguments = [str(job), *flags] if isinstance(job, Path) else [*flags, "--", *job]
    return subprocess.run([sys.executable, str(DRIVER), *arguments], capture_output=True, text=True, timeout=600)


def bare_resume(output: Path) -> list[str]:
    """`train --output DIR --resume` and no other flag: everything else comes from DIR/job.json."""
    return ["train", "--output", str(output), "--resume"]


def final_lora(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "checkpoint-6" / "pytorch_lora_weights.safetensors")


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return subset_dataset(tmp_path_factory.mktemp("data") / "two-images", 2)


@pytest.fixture(scope="module")
def reference(tiny_fibo_base, dataset, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The uninterrupted run, in a subprocess like the interrupted ones."""
    root = tmp_path_factory.mktemp("reference")
    result = run_driver(write_job(root / "job.json", tiny_fibo_base, dataset, root / "out", resume=False))
    assert result.returncode == 0, result.stderr[-3000:]
    return final_lora(root / "out")


@pytest.mark.slow
def test_killed_again_and_again_the_run_ends_bit_identical(tiny_fibo_base, dataset, reference, tmp_path):
    output = tmp_path / "out"
    fresh = write_job(tmp_path / "fresh.json", tiny_fibo_base, dataset, output, resume=False)
    resume = bare_resume(output)
    interruptions = [
        (fresh, ["--kill-after-step", "1"]),                 # nothing saved yet
        (resume, ["--kill-at", "lora.files_written:2"]),     # LoRA written, not committed
        (resume, ["--kill-at", "resume.manifest_written:2"]),  # published 2, its resume state not committed
        (resume, ["--kill-at", "lora.renamed:4"]),           # published 4, resume state 4 never started
        (resume, ["--kill-after-step", "5"]),                # between steps, after resuming from step 2
    ]
    for job_file, flags in interruptions:
        result = run_driver(job_file, *flags)
        assert result.returncode == -signal.SIGKILL, (flags, result.stderr[-3000:])
    result = run_driver(resume)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "step-4" in result.stderr  # the engine's log lines

    assert identical(final_lora(output), reference)
    checkpointer = Checkpointer(output)
    assert checkpointer.published_steps() == [6, 4, 2]
    assert all(Checkpointer.verify(checkpointer.path_for(s)) for s in (2, 4, 6))
    assert checkpointer.resume_steps() == [6, 4]  # the larger state is kept for the two newest steps only
    leftovers = [p for p in [*output.iterdir(), *(output / "resume").iterdir()] if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.slow
def test_negative_control_resume_without_the_scheduler_state_differs(tiny_fibo_base, dataset, reference, tmp_path):
    output = tmp_path / "out"
    killed = run_driver(write_job(tmp_path / "fresh.json", tiny_fibo_base, dataset, output, resume=False),
                        "--kill-after-step", "3")
    assert killed.returncode == -signal.SIGKILL
    resumed = run_driver(write_job(tmp_path / "resume.json", tiny_fibo_base, dataset, output, resume=True),
                         "--drop-scheduler-state")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not identical(final_lora(output), reference)


@pytest.mark.slow
def test_sigterm_stops_within_a_step_and_resume_finishes_identically(tiny_fibo_base, dataset, reference, tmp_path):
    output = tmp_path / "out"
    job = write_job(tmp_path / "fresh.json", tiny_fibo_base, dataset, output, resume=False)
    # the driver holds the boundary after step 3 until the signal arrives: the signal lands mid-run
    process = subprocess.Popen([sys.executable, str(DRIVER), str(job), "--pause-after-step", "3"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("step 3 done"):
            break
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    rest, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert time.monotonic() - signalled < 30  # the rest of step 3 plus one save, with CI slack
    assert "[preempted]" in stderr and "--resume" in stderr
    assert "step 4" not in rest  # no new step started after the signal

    checkpointer = Checkpointer(output)
    assert checkpointer.latest_resume() == checkpointer.resume_path_for(3)
    assert checkpointer.published_steps() == [2]  # step 3 gets resume state, not a published checkpoint

    resumed = run_driver(bare_resume(output))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert identical(final_lora(output), reference)


def test_sigint_saves_resume_state_and_exits_130(tiny_fibo_base, dataset, tmp_path, monkeypatch):
    original = Trainer.train_step

    def interrupted(self, micro_batches):
        record = original(self, micro_batches)
        if record.step == 3:
            self.stop_flag.handle(signal.SIGINT)  # what the handler does when Ctrl-C arrives mid-step
        return record

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(Preempted) as info:
        train(tiny_fibo_base, tmp_path / "out", params(8, rank=4, interval=4), dataset=dataset)
    assert info.value.exit_code == 130 and info.value.code == "preempted"
    checkpointer = Checkpointer(tmp_path / "out")
    assert checkpointer.resume_steps() == [3] and checkpointer.published_steps() == []
    assert json.loads((checkpointer.resume_path_for(3) / "state.json").read_text())["step"] == 3


def test_the_signal_handler_only_sets_a_flag(tmp_path):
    before = sorted(os.listdir(tmp_path))
    flag = StopFlag()
    flag.handle(signal.SIGTERM)
    assert flag.requested == signal.SIGTERM
    assert sorted(os.listdir(tmp_path)) == before


def test_signal_handlers_are_installed_for_the_run_and_restored(monkeypatch):
    previous = signal.getsignal(signal.SIGTERM)
    flag = StopFlag().install()
    assert signal.getsignal(signal.SIGTERM) == flag.handle and signal.getsignal(signal.SIGINT) == flag.handle
    flag.restore()
    assert signal.getsignal(signal.SIGTERM) == previous


# ---- injected faults (in process) ------------------------------------------------------------


def poison_from(monkeypatch, first_bad_call: int, make_error=None):
    """Make FiboFamily.compute_loss misbehave from its n-th call (one call per step here)."""
    original = FiboFamily.compute_loss
    calls = {"n": 0}

    def compute_loss(self, denoiser, batch, generator):
        calls["n"] += 1
        loss = original(self, denoiser, batch, generator)
        if calls["n"] >= first_bad_call:
            if make_error:
                raise make_error()
            return loss * float("nan")
        return loss

    monkeypatch.setattr(FiboFamily, "compute_loss", compute_loss)


def assert_step_two_intact(output: Path) -> None:
    checkpointer = Checkpointer(output)
    assert checkpointer.published_steps() == [2] and Checkpointer.verify(checkpointer.path_for(2))
    assert checkpointer.latest_resume() == checkpointer.resume_path_for(2)


def test_nan_loss_is_skipped_then_fails_with_its_code(tiny_fibo_base, dataset, tmp_path, monkeypatch):
    poison_from(monkeypatch, 3)
    engine = tiny_engine(optim={"max_consecutive_nonfinite": 1})
    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_fibo_base, tmp_path / "out", params(6, rank=4, interval=2), dataset=dataset, engine=engine)
    assert info.value.code == "non_finite_loss" and "step 4" in info.value.message
    assert_step_two_intact(tmp_path / "out")


def test_a_single_nan_step_is_skipped_and_the_run_finishes(tiny_fibo_base, dataset, tmp_path, monkeypatch):
    original = FiboFamily.compute_loss
    calls = {"n": 0}

    def once(self, denoiser, batch, generator):
        calls["n"] += 1
        loss = original(self, denoiser, batch, generator)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(FiboFamily, "compute_loss", once)
    result = train(tiny_fibo_base, tmp_path / "out", params(4, rank=4, interval=2), dataset=dataset)
    assert [r.skipped for r in result.history] == [False, True, False, False]
    for path in result.checkpoints:
        assert all(torch.isfinite(t).all() for t in load_file(path / "pytorch_lora_weights.safetensors").values())


def test_out_of_memory_fails_with_oom_and_a_hint(tiny_fibo_base, dataset, tmp_path, monkeypatch):
    poison_from(monkeypatch, 3, lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(OutOfMemoryError) as info:
        train(tiny_fibo_base, tmp_path / "out", params(6, rank=4, interval=2), dataset=dataset)
    assert info.value.code == "oom"
    for hint in ("gradient_checkpointing", "data.resolution", "data.batch_size"):
        assert hint in info.value.message
    assert_step_two_intact(tmp_path / "out")


class DiskFullAtStep4(Storage):
    def write_bytes(self, path, data):
        # the manifest of the step-4 LoRA is the first write through the seam at that step
        if path.name == "manifest.json" and ".checkpoint-4." in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write_bytes(path, data)


def test_disk_full_keeps_the_previous_checkpoint_valid(tiny_fibo_base, dataset, tmp_path):
    job = JobSpec(base=str(tiny_fibo_base), dataset_dir=str(dataset), output_dir=str(tmp_path / "out"),
                  training_version="fibo", params=params(6, rank=4, interval=2), engine=tiny_engine())
    with pytest.raises(CheckpointWriteError) as info:
        run_training(job, storage=DiskFullAtStep4())
    assert info.value.code == "checkpoint_write_failed"
    assert "disk is full" in info.value.message and "resume/step-2" in info.value.message
    assert_step_two_intact(tmp_path / "out")
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # staging cleaned up
    # the run continues from there once the disk is fixed
    result = run_training(dataclasses.replace(job, resume=True))
    assert [r.step for r in result.history] == [3, 4, 5, 6]


def test_an_io_error_while_writing_the_resume_state_is_reported(tiny_fibo_base, dataset, tmp_path):
    class BrokenDisk(Storage):
        def write_bytes(self, path, data):
            if path.name == "optimizer.pt":
                raise OSError(errno.EIO, "Input/output error")
            super().write_bytes(path, data)

    with pytest.raises(CheckpointWriteError, match="Input/output error"):
        run_training(JobSpec(base=str(tiny_fibo_base), dataset_dir=str(dataset), output_dir=str(tmp_path / "o"),
                             training_version="fibo", params=params(2, rank=4), engine=tiny_engine()),
                     storage=BrokenDisk())
    assert Checkpointer(tmp_path / "o").resume_steps() == []


# ---- resume discovery and refusal ------------------------------------------------------------


def test_all_resume_states_damaged_is_refused_not_restarted(tiny_fibo_base, dataset, tmp_path):
    train(tiny_fibo_base, tmp_path / "out", params(4, rank=4, interval=2), dataset=dataset)
    for state in (tmp_path / "out" / "resume").iterdir():
        target = state / "optimizer.pt"
        target.write_bytes(target.read_bytes()[:-8])  # truncated
    with pytest.raises(ResumeError, match="damaged"):
        train(tiny_fibo_base, tmp_path / "out", params(4, rank=4, interval=2), dataset=dataset, resume=True)


def test_resume_refuses_other_target_modules(tiny_fibo_base, dataset, tmp_path):
    train(tiny_fibo_base, tmp_path / "out", params(2, rank=4), dataset=dataset)
    with pytest.raises(ResumeError, match="lora"):
        train(tiny_fibo_base, tmp_path / "out", params(4, rank=4), dataset=dataset, resume=True,
              engine=tiny_engine(lora={"target_modules": ["attn.to_q", "attn.to_k"]}))


def test_resume_refuses_another_base_model(tiny_fibo_base, dataset, tmp_path):
    other_base = tmp_path / "other-base"
    make_tiny_base("fibo", other_base, seed=1)
    train(tiny_fibo_base, tmp_path / "out", params(2, rank=4), dataset=dataset)
    with pytest.raises(ResumeError, match="base_fingerprint"):
        train(other_base, tmp_path / "out", params(4, rank=4), dataset=dataset, resume=True)


def test_resume_state_retention_keeps_two(tiny_fibo_base, dataset, tmp_path):
    train(tiny_fibo_base, tmp_path / "out", params(8, rank=4, interval=2), dataset=dataset)
    checkpointer = Checkpointer(tmp_path / "out")
    assert checkpointer.published_steps() == [8, 6, 4, 2]
    assert checkpointer.resume_steps() == [8, 6]


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_dataset_folder_is_never_modified(tiny_fibo_base, dataset, tmp_path):
    before = tree_digest(dataset)
    listing = sorted(p.name for p in dataset.rglob("*"))
    train(tiny_fibo_base, tmp_path / "out", params(2, rank=4), dataset=dataset)
    assert tree_digest(dataset) == before and sorted(p.name for p in dataset.rglob("*")) == listing
    assert (tmp_path / "out" / "cache").is_dir()  # caches live in the run folder
