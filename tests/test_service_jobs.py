"""The service's jobs through the real route -> runner -> backend -> process path: a stop accepted at
any moment of a launch ends the job Stopped; a server that dies during a start leaves no orphan
(its successor adopts the process or knows none was started); the local launcher gives each job
its own GPU slice and rendezvous port and queues jobs while none is free.

The processes are tests/standin_job.py (the job's stop protocol with the engine's StopFlag and
outcome file, no model), so that a test can start a hundred of them; the engine side of the
protocol (run-job honouring the stop file at start-up) is tested on its own below."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import pytest

from service_helpers import (ORGANIZATION, TOKEN, StandInBackend, ThreadServer, client, completed_fibo_dataset,
                             create_model, free_port, live_job_processes, settings_for, wait_for_status,
                             wait_until)
from tailoredgen_train import cli
from tailoredgen_train.engine.preemption import STOP_FILE, StopFlag, request_stop
from tailoredgen_train.errors import ConfigError
from tailoredgen_train.outcome import read_outcome
from tailoredgen_train.service import models
from tailoredgen_train.service.access import Caller
from tailoredgen_train.service.auth import token_id
from tailoredgen_train.service.core import Service
from tailoredgen_train.service.launchers import DeviceSlices, visible_gpus

FINAL = {"Completed", "Failed", "Stopped"}


def _run_dir(data_dir: Path, model_id: int) -> Path:
    return data_dir / "runs" / f"model-{model_id}"


def _kill_leftovers(data_dir: Path) -> None:
    for pid in live_job_processes(data_dir):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- the parts on their own -----------------------------------------------------------------------


def test_the_stop_file_is_a_stop_request(tmp_path):
    flag = StopFlag(tmp_path / STOP_FILE)
    assert flag.requested is None
    assert request_stop(tmp_path) == tmp_path / STOP_FILE
    assert flag.requested == signal.SIGTERM
    assert StopFlag().requested is None  # no file to look at: signals only


def test_run_job_honours_a_stop_requested_before_it_started(tmp_path, tiny_fibo_base):
    from helpers import params, subset_dataset, tiny_engine
    from tailoredgen_train.recipe import JobSpec

    job = JobSpec(base=str(tiny_fibo_base), dataset_dir=str(subset_dataset(tmp_path / "data", 1)),
                  output_dir=str(tmp_path / "out"), training_version="fibo", params=params(2), engine=tiny_engine())
    (tmp_path / "job.json").write_text(json.dumps(job.to_dict()))
    request_stop(tmp_path / "out")
    assert cli.main(["run-job", str(tmp_path / "job.json")]) == 128 + signal.SIGTERM
    outcome = read_outcome(tmp_path / "out")
    assert outcome["status"] == "preempted" and "before it started" in outcome["message"]
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # nothing was trained


def test_gpu_slices_are_disjoint_and_handed_out_first_free_first():
    slices = DeviceSlices(["0", "1", "2", "3", "4"], 2)
    assert slices.slices == [["0", "1"], ["2", "3"]]  # the fifth GPU makes no slice of two
    assert slices.free([]) == ["0", "1"]
    assert slices.free(["1"]) == ["2", "3"]
    assert slices.free(["0", "3"]) is None
    with pytest.raises(ConfigError, match="num_processes=2 needs 2 GPUs"):
        DeviceSlices(["0"], 2)


def test_a_multi_process_job_gets_its_own_rendezvous_port(tmp_path):
    from accelerate.commands.launch import launch_command_parser

    from tailoredgen_train.start import SubprocessLauncher

    command = SubprocessLauncher(num_processes=2).command(tmp_path / "job.json", main_process_port=29555)
    parsed = launch_command_parser().parse_args(command[3:])  # what `accelerate launch` makes of it
    assert parsed.main_process_port == 29555 and parsed.num_processes == 2 and parsed.module
    assert parsed.training_script_args == ["run-job", str(tmp_path / "job.json")]


def test_the_visible_gpus_come_from_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5,GPU-ab12")
    assert visible_gpus() == ["2", "5", "GPU-ab12"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    import torch

    assert visible_gpus() == [str(i) for i in range(torch.cuda.device_count())]


# ---- stop always wins ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_stop_sent_at_any_moment_of_a_launch_ends_the_job_stopped(tmp_path, tiny_fibo_base):
    """Stops at 0-100 ms after the start, 20 each: before the claim (409, sent again), between the
    claim and the process, while it starts, while it runs. A lost stop would let the stand-in run
    its 10 s to `completed` (well inside stop_grace_s); a stopped one exits at its next check."""
    delays = [d for d in (0.0, 0.01, 0.025, 0.05, 0.1) for _ in range(20)]
    settings = settings_for(tmp_path, tiny_fibo_base, max_concurrent_trainings=1000, rate_limit_per_minute=100000)
    data_dir = settings.data_dir
    try:
        with ThreadServer(settings, StandInBackend(steps=200, step_seconds=0.05)) as server:
            with client(server.url) as api:
                dataset_id = completed_fibo_dataset(api)

            clients, opened = threading.local(), []  # a client per thread: a new one costs more than a request

            def api() -> httpx.Client:
                if not hasattr(clients, "api"):
                    clients.api = client(server.url)
                    opened.append(clients.api)
                return clients.api

            def race(delay: float) -> tuple[int, bool]:
                model_id = create_model(api(), dataset_id)
                start = starters.submit(lambda: api().post(f"/models/{model_id}/start_training"))
                time.sleep(delay)
                deadline = time.monotonic() + 30
                while (stop := api().post(f"/models/{model_id}/stop_training")).status_code != 200:
                    assert stop.status_code == 409 and time.monotonic() < deadline, stop.text  # not claimed yet
                during_launch = not start.done()
                assert start.result().status_code == 200, start.result().text
                return model_id, during_launch

            with ThreadPoolExecutor(4) as pool, ThreadPoolExecutor(4) as starters:
                races = list(pool.map(race, delays))
            for each in opened:
                each.close()
            with client(server.url) as api:
                ended = {m: wait_for_status(api, m, FINAL, timeout=120)["status"] for m, _ in races}
        assert sorted(set(ended.values())) == ["Stopped"], {m: s for m, s in ended.items() if s != "Stopped"}
        outcomes = [read_outcome(_run_dir(data_dir, m)) for m, _ in races]
        assert not [o for o in outcomes if o and o["status"] != "preempted"]  # none ran to its end
        assert sum(during for _, during in races) > 0  # some stops landed before the start had answered
        assert live_job_processes(data_dir) == {}
    finally:
        _kill_leftovers(data_dir)


# ---- no orphans after a crash -------------------------------------------------------------------


class ServerDied(BaseException):
    """The server dies here: as under kill -9, nothing after this point of the start runs (no
    handler catches a BaseException, and the dead server's watcher never runs)."""


# where the start dies -> what the restarted server must make of it (lost_jobs=fail); the queued
# job comes last, or the next dying server would launch it as the oldest in the queue
CRASH_POINTS = {
    "after the claim": ("runner", "submit", "before", "Failed"),
    "after the token, before the process": ("backend", "submit", "before", "Failed"),
    "after the process, before its pid": ("backend", "submit", "after", "InProgress"),
    "after its pid": ("runner", "_record_handle", "after", "InProgress"),
    "after queueing": ("runner", "launch_queued", "before", "InProgress"),
}


def _dying_service(settings, point: str) -> Service:
    service = Service(settings, StandInBackend())
    owner, name, when, _ = CRASH_POINTS[point]
    target = service.runner if owner == "runner" else service.runner.backend
    original = getattr(target, name)

    def dies(*args, **kwargs):
        if when == "after":
            original(*args, **kwargs)
        raise ServerDied(point)

    setattr(target, name, dies)
    return service


def test_a_server_that_dies_during_a_start_leaves_no_orphan(tmp_path, tiny_fibo_base):
    """The start dies at each step of its path; the next server's reconciliation adopts the process
    that exists, fails (or starts) the job that has none, and never fails a model whose process lives."""
    settings = settings_for(tmp_path, tiny_fibo_base, lost_jobs="fail", max_concurrent_trainings=8)
    data_dir = settings.data_dir
    try:
        with ThreadServer(settings, StandInBackend()) as server, client(server.url) as api:
            dataset_id = completed_fibo_dataset(api)
            model_of = {point: create_model(api, dataset_id) for point in CRASH_POINTS}
        caller = Caller(token_id(TOKEN), ORGANIZATION)
        for point, model_id in model_of.items():
            dead = _dying_service(settings, point)
            with pytest.raises(ServerDied):
                models.start_model(dead, model_id, b"", caller)
            dead.db.dispose()
        orphans = live_job_processes(data_dir)  # the processes the dead servers left
        dead_writer = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                     text=True, check=True).stdout.strip()  # one killed writing a job.json
        torn = _run_dir(data_dir, model_of["after the claim"]) / f".job.json.tmp-{socket.gethostname()}-{dead_writer}"
        torn.parent.mkdir(parents=True, exist_ok=True)
        torn.write_text('{"base": ')
        assert set(orphans.values()) == {model_of["after its pid"], model_of["after the process, before its pid"]}

        with ThreadServer(settings, StandInBackend()) as restarted, client(restarted.url) as api:
            found = {point: api.get(f"/models/{m}").json() for point, m in model_of.items()}
            assert {p: b["status"] for p, b in found.items()} == {p: c[3] for p, c in CRASH_POINTS.items()}
            assert {b["error"]["code"] for b in found.values() if b["status"] == "Failed"} == {"job_lost"}
            live = live_job_processes(data_dir)
            assert orphans.keys() <= live.keys()  # adopted, not killed
            assert not set(live.values()) & {m for p, m in model_of.items() if found[p]["status"] == "Failed"}
            recorded = restarted.service.runner
            for pid, model_id in live.items():  # every live process is the recorded job of a training model
                with recorded.db.transaction() as session:
                    assert recorded._latest_job(session, model_id).external_id == str(pid)
            for model_id in live.values():
                assert api.post(f"/models/{model_id}/stop_training").status_code == 200
            for model_id in live.values():
                assert wait_for_status(api, model_id, FINAL, timeout=60)["status"] == "Stopped"
        assert live_job_processes(data_dir) == {}
        assert not [p for p in data_dir.rglob(".*") if ".tmp-" in p.name or p.name.startswith(".upload-")]
    finally:
        _kill_leftovers(data_dir)


# ---- GPU slices and the queue -------------------------------------------------------------------


def test_jobs_get_their_own_gpu_slice_and_port_and_queue_in_order(tmp_path, tiny_fibo_base):
    settings = settings_for(tmp_path, tiny_fibo_base, lost_jobs="fail", max_concurrent_trainings=8)
    data_dir = settings.data_dir
    backend = StandInBackend(num_processes=2, gpus=["g0", "g1", "g2", "g3"])  # two slices; jobs run 30 s

    def env(model_id: int) -> dict | None:
        path = _run_dir(data_dir, model_id) / "env.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def progress(api, model_id: int) -> dict:
        body = api.get(f"/models/{model_id}").json()
        assert body["status"] == "InProgress", body
        return body.get("training_progress") or {}

    try:
        with ThreadServer(settings, backend) as server, client(server.url) as api:
            dataset_id = completed_fibo_dataset(api)
            first, second, third, fourth, fifth = ids = [create_model(api, dataset_id) for _ in range(5)]
            for model_id in ids:
                assert api.post(f"/models/{model_id}/start_training").status_code == 200
            wait_until(lambda: env(first) and env(second), 30, "the first two jobs to start")
            assert env(first)["env"]["CUDA_VISIBLE_DEVICES"] == "g0,g1"
            assert env(second)["env"]["CUDA_VISIBLE_DEVICES"] == "g2,g3"
            assert env(first)["port"] and env(first)["port"] != env(second)["port"]  # own rendezvous ports
            assert env(first)["env"]["TAILOREDGEN_LAUNCH_TOKEN"] != env(second)["env"]["TAILOREDGEN_LAUNCH_TOKEN"]
            for position, model_id in enumerate((third, fourth, fifth), 1):
                assert progress(api, model_id) == {**progress(api, model_id), "phase": "queued",
                                                   "queue_position": position}
            assert progress(api, first).get("phase") is None

            stopped = api.post(f"/models/{fifth}/stop_training")  # a queued job ends without ever running
            assert stopped.status_code == 200 and stopped.json()["status"] == "Stopped"

            os.killpg(env(first)["pid"], signal.SIGKILL)  # a crash frees its slice
            failed = wait_for_status(api, first, FINAL, timeout=30)
            assert failed["status"] == "Failed" and failed["error"]["code"] == "job_lost"
            wait_until(lambda: env(third), 30, "the next queued job to start")
            assert env(third)["env"]["CUDA_VISIBLE_DEVICES"] == "g0,g1"
            assert progress(api, fourth)["queue_position"] == 1 and env(fourth) is None

            for model_id in (fourth, second, third):  # the queued one first, or it would start
                assert api.post(f"/models/{model_id}/stop_training").status_code == 200
            for model_id in (fourth, second, third):
                assert wait_for_status(api, model_id, FINAL, timeout=60)["status"] == "Stopped"
        assert env(fourth) is None and env(fifth) is None  # never launched
        assert live_job_processes(data_dir) == {}
    finally:
        _kill_leftovers(data_dir)


@pytest.mark.slow
def test_kill_9_during_starts_leaves_no_failed_model_with_a_live_process(tmp_path, tiny_fibo_base):
    """A real server process is killed while a dozen starts are in flight, at whatever point each
    has reached; its successor must leave no Failed model with a live process, no unrecorded
    process, and no staging file."""
    from standin_server import CRASH_SETTINGS

    settings = settings_for(tmp_path, tiny_fibo_base, **CRASH_SETTINGS)
    data_dir = settings.data_dir
    try:
        with ThreadServer(settings, StandInBackend()) as server, client(server.url) as api:
            dataset_id = completed_fibo_dataset(api)
            ids = [create_model(api, dataset_id) for _ in range(12)]
        port = free_port()
        dying = subprocess.Popen([sys.executable, str(Path(__file__).parent / "standin_server.py"), str(tmp_path),
                                  str(tiny_fibo_base), str(port)])
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 120, "the server to start")

        def start(model_id: int) -> int | None:
            try:
                with client(f"http://127.0.0.1:{port}") as api:
                    return api.post(f"/models/{model_id}/start_training").status_code
            except httpx.HTTPError:
                return None  # the server died under it

        with ThreadPoolExecutor(len(ids)) as pool:
            starts = [pool.submit(start, m) for m in ids]
            wait(starts, return_when=FIRST_COMPLETED)
            dying.kill()  # SIGKILL while the others are in flight
        dying.wait()
        orphans = live_job_processes(data_dir)

        with ThreadServer(settings, StandInBackend()) as restarted, client(restarted.url) as api:
            status = {m: api.get(f"/models/{m}").json()["status"] for m in ids}
            assert set(status.values()) <= {"Created", "InProgress", "Failed"}, status
            assert "InProgress" in status.values()
            live = live_job_processes(data_dir)
            assert orphans.keys() <= live.keys()  # adopted, not killed
            assert not [m for m in live.values() if status[m] != "InProgress"], (status, live)
            runner = restarted.service.runner
            for pid, model_id in live.items():  # every live process is its training model's recorded job
                with runner.db.transaction() as session:
                    assert runner._latest_job(session, model_id).external_id == str(pid)
            training = [m for m, s in status.items() if s == "InProgress"]
            for model_id in training:
                assert api.post(f"/models/{model_id}/stop_training").status_code == 200
            for model_id in training:
                assert wait_for_status(api, model_id, FINAL, timeout=60)["status"] == "Stopped"
        assert live_job_processes(data_dir) == {}
        assert not [p for p in data_dir.rglob(".*") if ".tmp-" in p.name or p.name.startswith(".upload-")]
    finally:
        _kill_leftovers(data_dir)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
