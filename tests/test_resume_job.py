"""`train --output DIR --resume` reads the job the run saved (no other flag needed) and refuses a flag
that changes it, naming each field with both values, unless run.allow_changed_on_resume names it;
and one training per output folder (OUTPUT/train.lock, released by the kernel when its holder dies).
The bit-identical bare --resume runs are the kill/resume tests in test_fault_tolerance.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import params, subset_dataset, tiny_engine
from tailoredgen_train import cli
from tailoredgen_train.contract import resolve_training_parameters
from tailoredgen_train.engine.output_lock import LOCK_FILE, OutputLock, lock_output
from tailoredgen_train.errors import OutputInUseError, ResumeError
from tailoredgen_train.recipe import JobSpec, save_job
from tailoredgen_train.saved_job import job_fields, job_for_resume

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("fault_driver.py")


@pytest.fixture
def saved(tmp_path) -> JobSpec:
    """A run's OUTPUT/job.json: 4 cosine steps at rank 4, cut short by run.stop_after_steps."""
    job = JobSpec(base=str(tmp_path / "base"), dataset_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"),
                  training_version="fibo", params=params(4, rank=4, interval=2, scheduler="cosine"),
                  engine=tiny_engine(run={"stop_after_steps": 1}))
    save_job(job, tmp_path / "out" / "job.json")
    return job


def resume(output: Path, *, request=None, overrides=(), config=None, **flags) -> JobSpec | None:
    given = dict(base=None, dataset=None, training_version=None, training_mode=None, caption_prefix=None,
                 version_map=None)
    return job_for_resume(str(output), **{**given, **flags}, request=request or {}, config=config,
                          overrides=list(overrides))


def test_bare_resume_takes_every_field_from_the_saved_job(saved, tmp_path):
    job = resume(tmp_path / "out")
    assert job_fields(job) == job_fields(saved) and job.params == saved.params
    assert job.resume and job.engine.data.resolution == 128
    # run.stop_after_steps belongs to the run it cut short: the resume goes on to the end
    assert saved.engine.run.stop_after_steps == 1 and job.engine.run.stop_after_steps is None
    # negative control: the flags alone, resolved afresh as before, describe another run (750 steps, ...)
    assert resolve_training_parameters("fibo", "fully_automated", {}) != saved.params


def test_flags_that_change_the_saved_job_are_refused_field_by_field(saved, tmp_path, capsys):
    code = cli.main(["train", "--output", str(tmp_path / "out"), "--resume", "--training-mode", "expert",
                     "--rank", "64", "--lr-scheduler", "constant", "--total-training-steps", "4",
                     "--dataset", os.path.relpath(saved.dataset_dir), "--set", "data.resolution=1024"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USER_ERROR and "[cannot_resume]" in err, err
    assert "data.resolution: 128 → 1024; lr_scheduler: cosine → constant; rank: 4 → 64." in err
    assert "--set run.allow_changed_on_resume=[data.resolution,lr_scheduler,rank]" in err
    # the same values given again (the dataset as a relative path) are no change
    assert "total_training_steps" not in err and "dataset" not in err.split("change it:")[1]
    assert len(err.strip().splitlines()) == 1


def test_the_allow_list_lets_the_named_fields_change(saved, tmp_path, caplog):
    with pytest.raises(ResumeError, match=r"total_training_steps: 4 → 8\. "):  # negative control: not allowed
        resume(tmp_path / "out", request={"total_training_steps": 8})
    job = resume(tmp_path / "out", request={"total_training_steps": 8},
                 overrides=["run.log_every=5", "run.allow_changed_on_resume=total_training_steps,run.log_every"])
    assert job.params.total_training_steps == 8 and job.engine.run.log_every == 5
    assert job.params.rank == 4 and job.params.lr_scheduler == "cosine" and job.params.checkpoint_interval == 2
    assert "run.log_every: 1 → 5 (allowed" in caplog.text and "total_training_steps: 4 → 8 (allowed" in caplog.text


def test_the_allow_list_refuses_unknown_fields_and_a_new_lora_shape(saved, tmp_path):
    with pytest.raises(ResumeError, match=r"total_training_step is not a field.*did you mean total_training_steps"):
        resume(tmp_path / "out", overrides=["run.allow_changed_on_resume=[total_training_step]"])
    with pytest.raises(ResumeError, match=r"cannot change the LoRA's shape \(rank: 4 → 8\)"):
        resume(tmp_path / "out", request={"rank": 8}, overrides=["run.allow_changed_on_resume=[rank]"])


def test_a_given_config_is_compared_with_the_saved_one(saved, tmp_path):
    with pytest.raises(ResumeError) as info:
        resume(tmp_path / "out", config=str(REPO / "configs" / "fibo-tiny.yaml"))
    assert "run.log_with: none → tensorboard" in info.value.message
    assert "data.resolution" not in info.value.message  # 128 in both


def test_resume_without_a_saved_job_needs_the_flags_of_a_fresh_run(tmp_path, capsys):
    assert cli.main(["train", "--output", str(tmp_path / "empty"), "--resume"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "required: --base, --dataset, --training-version; --resume found no saved job in" in err
    assert cli.main(["train", "--output", str(tmp_path / "empty"), "--base", "b"]) == cli.EXIT_USER_ERROR
    assert "required: --dataset, --training-version; see" in capsys.readouterr().err


# ---- one job per output folder ---------------------------------------------------------------


def test_the_output_lock_refuses_a_second_holder_until_released(tmp_path):
    first = OutputLock(tmp_path).acquire()
    with pytest.raises(OutputInUseError, match=rf"in use by another training \(pid {os.getpid()} on host "
                                               rf"{socket.gethostname()}, started 20"):
        OutputLock(tmp_path).acquire()  # flock is per open file: the same process is refused too
    first.release()
    OutputLock(tmp_path).acquire().release()  # negative control: free again
    assert lock_output(tmp_path / "other", is_main_process=False) is None  # only the main process locks
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_a_second_train_into_the_same_output_is_refused_until_the_first_is_killed(tiny_fibo_base, tmp_path, capsys):
    output = tmp_path / "out"
    argv = ["train", "--base", str(tiny_fibo_base), "--dataset", str(subset_dataset(tmp_path / "data", 1)),
            "--output", str(output), "--training-version", "fibo", "--training-mode", "expert",
            "--total-training-steps", "2", "--config", str(REPO / "configs" / "fibo-tiny.yaml"),
            "--set", "validation.enabled=false", "--set", "run.log_with=none"]
    with open(tmp_path / "first.log", "w") as log:
        # the first holds the step boundary after step 1 (up to 60 s) until it is killed
        first = subprocess.Popen([sys.executable, str(DRIVER), "--pause-after-step", "1", "--", *argv],
                                 stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        for line in first.stdout:
            if line.startswith("step 1 done"):
                break
        assert cli.main(argv) == cli.EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert "[output_in_use]" in err and f"pid {first.pid} on host {socket.gethostname()}" in err, err
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -9 and (output / LOCK_FILE).is_file()  # SIGKILL: nobody cleaned up
    # the kernel released the dead process's lock: the next run is accepted (and needs no other flag)
    assert cli.main(["train", "--output", str(output), "--resume"]) == 0
    assert (output / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
