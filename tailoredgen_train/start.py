"""`start_training`: the Python entry point behind POST /tailored-gen/models/{id}/start_training.

It checks the preconditions in the documented order (409, 412, 400), resolves the contract's
hyperparameters, hands a JobSpec to a launcher, and returns the 200 body. The launcher decides
where the job runs: a subprocess (the default; under `accelerate launch` when more than one
process is asked for) or this process (for the CLI and tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

from .config import EngineConfig
from .contract import (
    DatasetRecord,
    ModelRecord,
    StartTrainingResponse,
    build_response,
    check_can_start,
    resolve_training_parameters,
    utcnow_iso,
)
from .families import family_for_config, load_version_map
from .recipe import JobSpec, TrainingResult, run_training, save_job
from .report.metrics import JOB_FILE


class Launcher(Protocol):
    def launch(self, job: JobSpec) -> Any: ...


@dataclass
class InProcessLauncher:
    """Runs the job to completion before start_training returns (CLI, tests, notebooks)."""

    results: list[TrainingResult] = field(default_factory=list)

    def launch(self, job: JobSpec) -> TrainingResult:
        result = run_training(job)
        self.results.append(result)
        return result


@dataclass
class SubprocessLauncher:
    """Starts `python -m tailoredgen_train run-job OUTPUT/job.json` (or `accelerate launch` with
    `num_processes` > 1) in its own process group; output goes to OUTPUT/train.log."""

    num_processes: int = 1
    env: dict[str, str] | None = None
    processes: list[subprocess.Popen] = field(default_factory=list)

    def command(self, job_file: Path, main_process_port: int | None = None) -> list[str]:
        if self.num_processes > 1:
            # --multi_gpu also starts a gloo group on CPU-only machines (--cpu would start one process)
            port = ["--main_process_port", str(main_process_port)] if main_process_port else []
            return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                    "--num_processes", str(self.num_processes), *port, "-m", "tailoredgen_train", "run-job",
                    str(job_file)]
        return [sys.executable, "-m", "tailoredgen_train", "run-job", str(job_file)]

    def launch(self, job: JobSpec, env: dict[str, str] | None = None,
               main_process_port: int | None = None) -> subprocess.Popen:
        """`env` is added to this launcher's own; `main_process_port`: accelerate's rendezvous port."""
        output = Path(job.output_dir)
        job_file = write_job_file(job)
        with open(output / "train.log", "ab") as log_file:
            process = subprocess.Popen(
                self.command(job_file, main_process_port), stdout=log_file, stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {}), **(env or {})}, start_new_session=True,
            )
        self.processes.append(process)
        return process


def write_job_file(job: JobSpec) -> Path:
    """OUTPUT/job.json, what `run-job` runs, written whole or not at all (recipe.save_job)."""
    target = Path(job.output_dir) / JOB_FILE
    save_job(job, target)
    return target


def start_training(
    model: ModelRecord,
    dataset: DatasetRecord,
    request: Mapping[str, Any] | None,
    *,
    base: str,
    output_dir: str | Path,
    engine: EngineConfig | None = None,
    launcher: Launcher | None = None,
    version_map: str | None = None,
) -> StartTrainingResponse:
    """Validate, resolve, launch, and return the Model as the 200 response describes it.

    On success `model.status` becomes "InProgress" (so a second call raises the 409 error).
    """
    check_can_start(model, dataset)
    params = resolve_training_parameters(model.training_version, model.training_mode, request)
    # fail now, not inside the job, when this build has no family for the version
    family_for_config(model.training_version, engine or EngineConfig(), load_version_map(version_map))
    job = JobSpec(
        base=base,
        dataset_dir=dataset.path,
        output_dir=str(output_dir),
        training_version=model.training_version,
        params=params,
        engine=engine or EngineConfig(),
        caption_prefix=dataset.caption_prefix,
        version_map=version_map,
    )
    (launcher or SubprocessLauncher()).launch(job)
    model.status = "InProgress"
    model.updated_at = utcnow_iso()
    return build_response(model, dataset, params, model.updated_at)
