"""kill -9 the server in the middle of a real training and start it again: the job is reconciled as
`--lost-jobs` says (resumed from its checkpoint, or marked Failed), or adopted when it survived, and
nothing in the database, the dataset or the run folder is lost or corrupted."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
from pathlib import Path

import psutil
import pytest

from service_helpers import (CliServer, client, completed_fibo_dataset, create_model, engine_yaml, wait_for_status,
                             wait_until)
from tailoredgen_train.engine.checkpoint import Checkpointer

pytestmark = pytest.mark.slow
TRAINING = {"total_training_steps": 200, "checkpoint_interval": 100, "rank": 8, "lr_scheduler": "constant"}


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _job_pid(data_dir: Path, model_id: int) -> int:
    with sqlite3.connect(data_dir / "tailoredgen.sqlite3") as db:
        (pid,) = db.execute("SELECT external_id FROM training_jobs WHERE model_id=? ORDER BY attempt DESC LIMIT 1",
                            (model_id,)).fetchone()
    return int(pid)


def _database_is_sound(data_dir: Path) -> dict[str, int]:
    with sqlite3.connect(data_dir / "tailoredgen.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("projects", "datasets", "images", "models")}


def _train_until_first_checkpoint(tmp_path: Path, base: Path, lost_jobs: str):
    data_dir = tmp_path / "data"
    server = CliServer(data_dir, base, engine_yaml(tmp_path), "--lost-jobs", lost_jobs).start()
    api = client(server.url)
    dataset_id = completed_fibo_dataset(api)
    model_id = create_model(api, dataset_id)
    assert api.post(f"/models/{model_id}/start_training", json=TRAINING).status_code == 200
    wait_until(lambda: "100" in api.get(f"/models/{model_id}").json()["checkpoint_steps"], 600,
               "the first checkpoint")
    # and its resume state, so that "resumed from" below is about step 100, not a restart from 0
    wait_until(lambda: (data_dir / "runs" / f"model-{model_id}" / "resume" / "step-100").is_dir(), 120,
               "the resume state of step 100")
    api.close()
    return server, data_dir, dataset_id, model_id


def _kill_job(data_dir: Path, model_id: int) -> None:
    pid = _job_pid(data_dir, model_id)
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 30,
               "the job to die")


def test_a_lost_job_is_resumed_from_its_checkpoint(tmp_path, tiny_fibo_base):
    server, data_dir, dataset_id, model_id = _train_until_first_checkpoint(tmp_path, tiny_fibo_base, "resume")
    server.kill()
    _kill_job(data_dir, model_id)  # the node went down with the server
    rows = _database_is_sound(data_dir)
    dataset_files = _snapshot(data_dir / "datasets" / f"dataset-{dataset_id}")
    first_lora = data_dir / "runs" / f"model-{model_id}" / "checkpoint-100" / "pytorch_lora_weights.safetensors"
    first = first_lora.read_bytes()

    restarted = CliServer(data_dir, tiny_fibo_base, engine_yaml(tmp_path), "--lost-jobs", "resume").start()
    try:
        with client(restarted.url) as api:
            done = wait_for_status(api, model_id, {"Completed", "Failed"}, timeout=600)
            assert done["status"] == "Completed", done
            assert done["checkpoint_steps"] == ["200", "100"] and done["active_model_version"] == "200"
    finally:
        restarted.stop()
    run_dir = data_dir / "runs" / f"model-{model_id}"
    assert all(Checkpointer.verify(run_dir / f"checkpoint-{s}") for s in (100, 200))
    assert (run_dir / "checkpoint-100" / "pytorch_lora_weights.safetensors").read_bytes() == first
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert _database_is_sound(data_dir) == rows
    assert _snapshot(data_dir / "datasets" / f"dataset-{dataset_id}") == dataset_files
    with sqlite3.connect(data_dir / "tailoredgen.sqlite3") as db:
        attempts = db.execute("SELECT attempt, outcome FROM training_jobs WHERE model_id=? ORDER BY attempt",
                              (model_id,)).fetchall()
    assert attempts == [(1, "lost"), (2, "completed")]


def test_a_lost_job_is_marked_failed_when_configured(tmp_path, tiny_fibo_base):
    server, data_dir, _, model_id = _train_until_first_checkpoint(tmp_path, tiny_fibo_base, "fail")
    server.kill()
    _kill_job(data_dir, model_id)
    restarted = CliServer(data_dir, tiny_fibo_base, engine_yaml(tmp_path), "--lost-jobs", "fail").start()
    try:
        with client(restarted.url) as api:
            failed = api.get(f"/models/{model_id}").json()  # settled before the server took requests
            assert failed["status"] == "Failed"
            assert failed["error"]["code"] == "job_lost" and "lost_jobs=fail" in failed["error"]["message"]
            assert "100" in failed["checkpoint_steps"]
            link = api.get(f"/models/{model_id}/download", params={"checkpoint_step": 100})
            assert link.status_code == 200  # what was published is still served
    finally:
        restarted.stop()
    _database_is_sound(data_dir)


def test_a_job_that_outlived_the_server_is_adopted(tmp_path, tiny_fibo_base):
    server, data_dir, _, model_id = _train_until_first_checkpoint(tmp_path, tiny_fibo_base, "fail")
    pid = _job_pid(data_dir, model_id)
    server.kill()
    assert psutil.pid_exists(pid)  # the job runs in its own session: the server's death does not take it
    restarted = CliServer(data_dir, tiny_fibo_base, engine_yaml(tmp_path), "--lost-jobs", "fail").start()
    try:
        with client(restarted.url) as api:
            assert api.get(f"/models/{model_id}").json()["status"] == "InProgress"
            done = wait_for_status(api, model_id, {"Completed", "Failed"}, timeout=600)
            assert done["status"] == "Completed" and done["checkpoint_steps"] == ["200", "100"]
    finally:
        restarted.stop()
    with sqlite3.connect(data_dir / "tailoredgen.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM training_jobs WHERE model_id=?", (model_id,)).fetchone() == (1,)
