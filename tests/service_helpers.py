"""Helpers for the HTTP service tests: real uvicorn servers (in a thread or as `tailoredgen-train
serve`), an httpx client, and the steps of the Tailored Generation lifecycle."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import uvicorn

from pg_server import database_url
from tailoredgen_train.data import SAMPLE_DATASET_DIR
from tailoredgen_train.service.app import create_app
from tailoredgen_train.service.launchers import LocalBackend
from tailoredgen_train.service.settings import ServiceSettings

TOKEN = "test-token-0001"
COLLEAGUE_TOKEN = "test-token-0003"
"""TOKEN's organization (acme) has a second token"""
OTHER_TOKEN = "test-token-0002"
"""a token of another organization (unmapped: an organization of its own)"""
ORGANIZATION = "acme"
GENERATION_RESOLUTION = 64  # what the generation endpoints render in these tests
# cheap training for the service tests: 64 px buckets, nothing logged, two 2-step validation renders
TEST_ENGINE_YAML = """\
data: {resolution: 64, min_side: 64, batch_size: 1, num_workers: 0}
lora: {init: gaussian}
run: {seed: 0, log_with: none, log_every: 50}
validation: {num_prompts: 2, num_inference_steps: 2}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_yaml(directory: Path) -> Path:
    path = directory / "engine.yaml"
    path.write_text(TEST_ENGINE_YAML)
    return path


def settings_for(tmp: Path, base: Path, **overrides: Any) -> ServiceSettings:
    values = dict(data_dir=tmp / "data", tokens=[TOKEN, OTHER_TOKEN, COLLEAGUE_TOKEN],
                  organizations={TOKEN: ORGANIZATION, COLLEAGUE_TOKEN: ORGANIZATION}, bases={"fibo": str(base)},
                  engine_configs={"fibo": str(engine_yaml(tmp))}, poll_interval_s=0.2)
    values.update(overrides)
    if "db_url" not in values:  # the module's database (conftest.py)
        values["db_url"] = database_url(values["data_dir"])
    values.setdefault("generation_resolution", {family: GENERATION_RESOLUTION for family in values["bases"]})
    return ServiceSettings(**values)


class SleepingBackend(LocalBackend):
    """The real local backend (Popen in its own session, psutil liveness, killpg), with a sleeping
    process standing in for training: for the API tests that need a model InProgress, not a LoRA."""

    def __init__(self):
        super().__init__()
        self._launcher.command = lambda job_file, port=None: [sys.executable, "-c", "import time; time.sleep(600)"]

    def kill_all(self) -> None:
        """Kill the sleeping stand-ins still running (a test's server is gone; nothing else will)."""
        for pid, process in list(self._children.items()):
            if process.poll() is None:
                os.killpg(pid, signal.SIGKILL)
                process.wait()


STANDIN_JOB = Path(__file__).resolve().parent / "standin_job.py"


class StandInBackend(SleepingBackend):
    """The real local backend running tests/standin_job.py: a process that follows the job's stop
    protocol (stop file, SIGTERM, result.json) and records its environment, in a fraction of a second."""

    def __init__(self, steps: int = 600, step_seconds: float = 0.05, num_processes: int = 1,
                 gpus: list[str] | None = None):
        LocalBackend.__init__(self, num_processes=num_processes, gpus=gpus)
        self._launcher.command = lambda job_file, port=None: [
            sys.executable, str(STANDIN_JOB), str(job_file), str(steps), str(step_seconds),
            *(["--port", str(port)] if port else [])]


def live_job_processes(data_dir: Path) -> dict[int, int]:
    """pid -> model id of the job processes still running (found by the launch tokens the database holds)."""
    import sqlite3

    import psutil

    with sqlite3.connect(data_dir / "tailoredgen.sqlite3") as db:
        tokens = dict(db.execute("SELECT launch_token, model_id FROM training_jobs WHERE launch_token IS NOT NULL"))
    live = {}
    for process in psutil.process_iter(["pid", "status"]):
        try:
            token = process.environ().get("TAILOREDGEN_LAUNCH_TOKEN")
            if token in tokens and process.info["status"] != psutil.STATUS_ZOMBIE:
                live[process.pid] = tokens[token]
        except psutil.Error:
            continue
    return live


@contextmanager
def two_family_server(tmp: Path, fibo_base: Path, legacy_bases: dict[str, Path]) -> Iterator[ThreadServer]:
    """A server of the fibo and bria-3.2 families on a SleepingBackend (no training runs)."""
    backend = SleepingBackend()
    settings = settings_for(tmp, fibo_base, bases={"fibo": str(fibo_base), "bria-3.2": str(legacy_bases["bria-3.2"])})
    with ThreadServer(settings, backend) as running:
        yield running
    backend.kill_all()


class ThreadServer:
    """uvicorn serving `create_app(settings)` on 127.0.0.1 in a background thread."""

    def __init__(self, settings: ServiceSettings, backend=None, prompt_expander=None):
        self.app = create_app(settings, backend, prompt_expander)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def service(self):
        return self.app.state.service

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "the server to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class CliServer:
    """`python -m tailoredgen_train serve ...` as its own process (so that a test can kill -9 it)."""

    def __init__(self, data_dir: Path, base: Path, engine: Path, *extra: str, log: Path | None = None):
        self.port = free_port()
        db = database_url(data_dir)
        self.command = [sys.executable, "-m", "tailoredgen_train", "serve", "--port", str(self.port),
                        "--data-dir", str(data_dir), "--base", f"fibo={base}", "--engine-config", f"fibo={engine}",
                        "--poll-interval", "0.2", "--generation-resolution", f"fibo={GENERATION_RESOLUTION}",
                        *(["--db", db] if db else []), *extra]
        self.log = log or data_dir.parent / f"server-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> CliServer:
        env = {**os.environ, "TAILOREDGEN_API_TOKENS": f"{TOKEN},{OTHER_TOKEN}"}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)

        def ready() -> bool:
            assert self.process.poll() is None, f"server exited: {self.log.read_text()[-3000:]}"
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, "the server to answer /healthz")
        return self

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def client(url: str, token: str | None = TOKEN) -> httpx.Client:
    return httpx.Client(base_url=f"{url}/tailored-gen", headers={"api_token": token} if token else {}, timeout=60)


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in (SAMPLE_DATASET_DIR / "metadata.jsonl").read_text().splitlines() if line]


def completed_fibo_dataset(api: httpx.Client, images: int = 5) -> int:
    """Project -> fibo dataset -> `images` sample images with their JSON captions -> completed."""
    project = api.post("/projects", json={"project_name": "shapes", "ip_medium": "illustration",
                                          "ip_type": "stylized_scene"})
    assert project.status_code == 201, project.text
    dataset = api.post("/datasets", json={"project_id": project.json()["id"], "name": "shapes",
                                          "training_version": "fibo"})
    assert dataset.status_code == 201, dataset.text
    dataset_id = dataset.json()["id"]
    for row in sample_rows()[:images]:
        upload_sample(api, dataset_id, row)
    done = api.put(f"/datasets/{dataset_id}", json={"status": "completed"})
    assert done.status_code == 200, done.text
    return dataset_id


def upload_sample(api: httpx.Client, dataset_id: int, row: dict) -> httpx.Response:
    path = SAMPLE_DATASET_DIR / row["file_name"]
    caption = row["caption"] if isinstance(row["caption"], str) else json.dumps(row["caption"])
    response = api.post(f"/datasets/{dataset_id}/images", files={"file": (path.name, path.read_bytes())},
                        data={"caption": caption})
    assert response.status_code == 201, response.text
    return response


def create_model(api: httpx.Client, dataset_id: int, mode: str = "expert") -> int:
    response = api.post("/models", json={"name": "m", "dataset_id": dataset_id, "training_mode": mode})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def wait_for_status(api: httpx.Client, model_id: int, statuses: set[str], timeout: float = 300) -> dict:
    def settled():
        body = api.get(f"/models/{model_id}").json()
        return body if body["status"] in statuses else None
    return wait_until(settled, timeout, f"model {model_id} to reach {sorted(statuses)}", interval=0.3)


def is_png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n")


def poll_generation(api: httpx.Client, status_url: str, timeout: float = 300) -> dict:
    """GET the status_url until the request has ended, as Bria's clients do (status upper-cased)."""
    def ended():
        body = api.get(status_url)
        assert body.status_code == 200, body.text
        return body.json() if body.json()["status"].upper() in ("COMPLETED", "FAILED") else None
    return wait_until(ended, timeout, f"generation {status_url} to end", interval=0.2)
