"""What every run leaves in its output folder, from the CLI as from the service: train.log (the
console's lines), metrics.jsonl, result.json (how it ended, with its summary) and report.html."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import params, subset_dataset, tiny_engine
from tailoredgen_train import cli
from tailoredgen_train.outcome import read_outcome
from tailoredgen_train.recipe import JobSpec, run_training

QUIET = ["--set", "validation.enabled=false", "--set", "run.log_with=none", "--set", "run.log_every=2"]


def train_argv(base: Path, dataset: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--base", str(base), "--dataset", str(dataset), "--output", str(output),
            "--training-version", "fibo", "--training-mode", "expert", "--total-training-steps", "4",
            "--config", "configs/fibo-tiny.yaml", *QUIET, *extra]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return subset_dataset(tmp_path_factory.mktemp("data") / "two", 2)


@pytest.fixture(scope="module")
def cli_run(tiny_fibo_base, dataset, tmp_path_factory):
    """`tailoredgen-train train` as a user runs it, with stderr a pipe (a batch job)."""
    output = tmp_path_factory.mktemp("cli") / "out"
    result = subprocess.run([sys.executable, "-m", "tailoredgen_train", *train_argv(tiny_fibo_base, dataset, output)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


def test_a_cli_run_leaves_its_log_metrics_result_and_report(cli_run):
    output, _ = cli_run
    assert {"train.log", "metrics.jsonl", "result.json", "report.html", "job.json"} <= {p.name for p in output.iterdir()}
    outcome = read_outcome(output)
    assert outcome["status"] == "completed" and outcome["final_step"] == 4
    summary = outcome["summary"]
    assert summary["steps_done"] == 4 and summary["total_steps"] == 4
    assert summary["checkpoints"] == [{"step": 4, "path": "checkpoint-4"}]
    assert summary["best_loss"] <= summary["final_loss"] or summary["best_loss_step"] == 4
    assert [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_pipe_gets_step_lines_and_no_progress_bar(cli_run):
    _, result = cli_run
    assert "step 2/4: loss" in result.stderr and "step 4/4: loss" in result.stderr
    assert "train:" not in result.stderr and "it/s" not in result.stderr  # tqdm's bar would show these


def test_train_log_holds_the_console_lines(cli_run):
    output, result = cli_run
    log = (output / "train.log").read_text()
    for line in ("resolved training_parameters", "step 2/4: loss", "step 4/4: loss", "done. LoRA files:"):
        assert line in log and line in result.stderr, line


def test_a_log_redirected_into_train_log_is_not_written_twice(tiny_fibo_base, dataset, tmp_path):
    """The service's launchers send stdout and stderr into OUTPUT/train.log themselves."""
    output = tmp_path / "out"
    output.mkdir()
    with open(output / "train.log", "ab") as log_file:
        result = subprocess.run([sys.executable, "-m", "tailoredgen_train",
                                 *train_argv(tiny_fibo_base, dataset, output)],
                                stdout=log_file, stderr=subprocess.STDOUT, timeout=600)
    assert result.returncode == 0
    log = (output / "train.log").read_text()
    assert log.count("resolved training_parameters") == 1
    assert log.count("step 4/4: loss") == 1


def test_a_refused_run_leaves_the_earlier_run_s_result_alone(cli_run, tiny_fibo_base, dataset, capsys):
    output, _ = cli_run
    before = (output / "result.json").read_bytes()
    code = cli.main(train_argv(tiny_fibo_base, dataset, output))  # checkpoints there, no --resume
    assert code == 2 and "already holds checkpoints" in capsys.readouterr().err
    assert (output / "result.json").read_bytes() == before


def test_a_failed_run_records_its_code_and_a_report(tiny_fibo_base, dataset, tmp_path, monkeypatch):
    from tailoredgen_train.errors import NonFiniteLossError
    from tailoredgen_train.families.fibo import FiboFamily

    def poisoned(self, denoiser, batch, generator):
        raise NonFiniteLossError("injected")

    monkeypatch.setattr(FiboFamily, "compute_loss", poisoned)
    job = JobSpec(base=str(tiny_fibo_base), dataset_dir=str(dataset), output_dir=str(tmp_path / "out"),
                  training_version="fibo", params=params(2), engine=tiny_engine())
    with pytest.raises(NonFiniteLossError):
        run_training(job)
    outcome = read_outcome(tmp_path / "out")
    assert (outcome["status"], outcome["code"]) == ("failed", "non_finite_loss")
    assert "non_finite_loss" in (tmp_path / "out" / "report.html").read_text()


def test_a_run_cut_short_is_recorded_as_stopped_and_resume_clears_it(tiny_fibo_base, dataset, tmp_path):
    output = tmp_path / "out"
    stopped = tiny_engine(run={"stop_after_steps": 1})
    run_training(JobSpec(base=str(tiny_fibo_base), dataset_dir=str(dataset), output_dir=str(output),
                         training_version="fibo", params=params(3), engine=stopped))
    stopped_outcome = read_outcome(output)
    assert (stopped_outcome["status"], stopped_outcome["code"], stopped_outcome["final_step"]) == (
        "stopped", "stop_after_steps", 1)
    run_training(JobSpec(base=str(tiny_fibo_base), dataset_dir=str(dataset), output_dir=str(output),
                         training_version="fibo", params=params(3), engine=tiny_engine(), resume=True))
    outcome = read_outcome(output)
    assert outcome["status"] == "completed" and outcome["summary"]["steps_done"] == 3


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_terminal_gets_the_bar_and_no_step_lines(tiny_fibo_base, dataset, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    output = tmp_path / "out"
    leader, follower = pty.openpty()
    # a terminal 120 columns wide (a new pseudo-terminal has none, and tqdm draws into the width)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "tailoredgen_train", *train_argv(tiny_fibo_base, dataset, output)],
                               stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert process.wait(timeout=600) == 0
    text = seen.decode(errors="replace")
    assert "train:" in text  # the bar
    assert "step 2/4: loss" not in text
    assert "step 2/4: loss" in (output / "train.log").read_text()  # the file still has every line
