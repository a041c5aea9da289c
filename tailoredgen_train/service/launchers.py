"""Where a service job runs: a local process (default) or a Slurm batch job (`sbatch`).

A backend submits a JobSpec and later answers "is it still running?", stops it (SIGTERM: the engine
saves and exits at the next step boundary) or kills it. A JobHandle is what the database keeps, so
a restarted server can ask the same questions about jobs an earlier server started.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Protocol

import psutil

from ..errors import TailoredGenError
from ..outcome import clear_outcome
from ..recipe import JobSpec
from ..start import SubprocessLauncher

DEFAULT_SLURM_TEMPLATE = Path(__file__).resolve().parent / "templates" / "train.sbatch"
_SLURM_ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                 "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "REQUEUE_HOLD", "REQUEUE_FED"}


class LaunchError(TailoredGenError):
    code = "launch_failed"
    http_status = 500


@dataclass
class JobHandle:
    launcher: str
    external_id: str
    host: str
    process_started: float | None = None


class Backend(Protocol):
    name: str

    def submit(self, job: JobSpec) -> JobHandle: ...
    def is_running(self, handle: JobHandle) -> bool: ...
    def stop(self, handle: JobHandle) -> None: ...
    def kill(self, handle: JobHandle) -> None: ...


class LocalBackend:
    """`python -m tailoredgen_train run-job` in its own session (it outlives a server restart);
    `accelerate launch --multi_gpu` when num_processes > 1."""

    name = "local"

    def __init__(self, num_processes: int = 1, env: dict[str, str] | None = None):
        self._launcher = SubprocessLauncher(num_processes=num_processes, env=env)
        self._children: dict[int, subprocess.Popen] = {}  # this server's own children, to reap them

    def submit(self, job: JobSpec) -> JobHandle:
        clear_outcome(job.output_dir)
        try:
            process = self._launcher.launch(job)
        except OSError as exc:
            raise LaunchError(f"could not start the training process: {exc}") from exc
        self._children[process.pid] = process
        return JobHandle(self.name, str(process.pid), socket.gethostname(), _start_time(process.pid))

    def is_running(self, handle: JobHandle) -> bool:
        pid = int(handle.external_id)
        child = self._children.get(pid)
        if child is not None:
            if child.poll() is None:
                return True
            del self._children[pid]
            return False
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return False
            # a pid the system has since given to another process is not our job
            return handle.process_started is None or abs(process.create_time() - handle.process_started) < 1.0
        except psutil.Error:
            return False

    def stop(self, handle: JobHandle) -> None:
        self._signal(handle, signal.SIGTERM)

    def kill(self, handle: JobHandle) -> None:
        self._signal(handle, signal.SIGKILL)

    def _signal(self, handle: JobHandle, signum: int) -> None:
        if not self.is_running(handle):
            return
        try:  # the job leads its own process group: accelerate's workers get the signal too
            os.killpg(int(handle.external_id), signum)
        except ProcessLookupError:
            pass


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class SlurmBackend:
    """Renders the sbatch template into RUN_DIR/train.sbatch and submits it with `sbatch --parsable`.
    A job takes `num_nodes` nodes with `num_processes` GPUs (processes) on each; `python` is the
    interpreter on the compute nodes (this server's by default)."""

    name = "slurm"

    def __init__(self, template: str | Path | None = None, num_processes: int = 1, num_nodes: int = 1,
                 python: str = sys.executable):
        self.template_path = Path(template) if template else DEFAULT_SLURM_TEMPLATE
        self.template = Template(self.template_path.read_text())
        self.num_processes = num_processes
        self.num_nodes = num_nodes
        self.python = python

    def render(self, job: JobSpec, job_file: Path) -> str:
        # ${command}: the single-node command, for templates written before multi-node jobs
        if self.num_processes > 1:
            command = [self.python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                       str(self.num_processes), "-m", "tailoredgen_train", "run-job", str(job_file)]
        else:
            command = [self.python, "-m", "tailoredgen_train", "run-job", str(job_file)]
        return self.template.substitute(
            job_name=f"tailoredgen-{Path(job.output_dir).name}", run_dir=shlex.quote(str(job.output_dir)),
            workdir=shlex.quote(os.getcwd()), num_nodes=self.num_nodes, gpus_per_node=self.num_processes,
            num_processes=self.num_nodes * self.num_processes, python=shlex.quote(self.python),
            job_file=shlex.quote(str(job_file)), command=shlex.join(command),
        )

    def submit(self, job: JobSpec) -> JobHandle:
        output = Path(job.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        clear_outcome(output)
        job_file = output / "job.json"
        job_file.write_text(json.dumps(job.to_dict(), indent=1))
        script = output / "train.sbatch"
        script.write_text(self.render(job, job_file))
        result = _slurm(["sbatch", "--parsable", str(script)])
        if result.returncode != 0:
            raise LaunchError(f"sbatch refused the job: {result.stderr.strip() or result.stdout.strip()}")
        job_id = result.stdout.strip().split(";")[0]  # --parsable prints "jobid" or "jobid;cluster"
        return JobHandle(self.name, job_id, socket.gethostname())

    def is_running(self, handle: JobHandle) -> bool:
        result = _slurm(["squeue", "--noheader", "--jobs", handle.external_id, "--format", "%T"])
        if result.returncode == 0:
            return bool(set(result.stdout.split()) & _SLURM_ACTIVE)
        # squeue forgets finished jobs ("Invalid job id"); any other failure says nothing, so keep waiting
        return "invalid job id" not in result.stderr.lower()

    def stop(self, handle: JobHandle) -> None:
        _slurm(["scancel", "--signal=TERM", "--full", handle.external_id])

    def kill(self, handle: JobHandle) -> None:
        _slurm(["scancel", handle.external_id])


def _slurm(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(command, 1, "", f"{command[0]} failed: {exc}")
