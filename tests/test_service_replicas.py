"""Two replicas (`create_app` under uvicorn, each its own process) on one PostgreSQL database and one
data folder: concurrent starts spread over both give one 200, a job is settled exactly once by
whichever replica sees it end, also when the replica that launched it was SIGKILLed, and stop and
delete work from either. The jobs are stand-ins (replica_server.py) that end when the test says."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from service_helpers import CliServer, client, completed_fibo_dataset, create_model, wait_for_status, wait_until
from replica_server import RELEASE_FILE

pytestmark = pytest.mark.slow
REPLICA = Path(__file__).resolve().parent / "replica_server.py"


class Replica(CliServer):
    def __init__(self, data_dir: Path, db_url: str, base: Path):
        super().__init__(data_dir, base, base)
        self.command = [sys.executable, str(REPLICA), str(data_dir), db_url, str(self.port), str(base)]

    def settled(self, model_id: int) -> list[str]:
        """This replica's log lines that settled the model."""
        settle = re.compile(rf"model {model_id}: (Completed|Stopped|Failed)\b")
        return [line for line in self.log.read_text().splitlines() if settle.search(line)]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, postgres):
    """Two replicas for the module; the last test kills the first one. The stand-in jobs never read
    the base, so it is an empty folder."""
    db_url = postgres.new_database()
    data_dir = tmp_path_factory.mktemp("replicas") / "data"
    base = tmp_path_factory.mktemp("unused-base")
    pair = [Replica(data_dir, db_url, base) for _ in range(2)]
    # together: both migrate, one wins (a loaded 2-core machine needs minutes to import torch twice)
    starting = [threading.Thread(target=r.start, kwargs={"timeout": 300}) for r in pair]
    for thread in starting:
        thread.start()
    for thread in starting:
        thread.join()
    assert all(r.process and r.process.poll() is None for r in pair), [r.log.read_text()[-2000:] for r in pair]
    yield pair, data_dir, create_engine(db_url)
    for replica in pair:
        replica.stop()


def _jobs(engine, model_id: int) -> list[tuple]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(
            text("SELECT attempt, outcome FROM training_jobs WHERE model_id = :m ORDER BY attempt"), {"m": model_id})]


def test_twenty_starts_over_two_replicas_give_one_200_and_either_stops_and_deletes(replicas):
    (a, b), data_dir, engine = replicas
    with client(a.url) as api_a, client(b.url) as api_b:
        dataset_id = completed_fibo_dataset(api_a)
        model_id = create_model(api_b, dataset_id)
        barrier = threading.Barrier(20)
        codes: list[int] = []

        def start(url: str) -> None:
            with client(url) as own:
                barrier.wait()
                codes.append(own.post(f"/models/{model_id}/start_training").status_code)

        threads = [threading.Thread(target=start, args=((a, b)[i % 2].url,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(codes) == [200] + [409] * 19
        wait_until(lambda: _jobs(engine, model_id), 30, "the job's row")
        assert _jobs(engine, model_id) == [(1, None)]  # one process launched
        # stop through one replica, delete through the other
        assert api_b.post(f"/models/{model_id}/stop_training").status_code == 200
        assert wait_for_status(api_a, model_id, {"Stopped", "Completed", "Failed"}, 60)["status"] == "Stopped"
        assert api_a.delete(f"/models/{model_id}").status_code == 204
        assert api_b.get(f"/models/{model_id}").status_code == 404
    assert _jobs(engine, model_id) == [(1, "stopped")]
    assert len(a.settled(model_id) + b.settled(model_id)) == 1


def test_a_job_is_settled_once_also_when_the_replica_that_launched_it_is_killed(replicas):
    (a, b), data_dir, engine = replicas
    with client(a.url) as api_a, client(b.url) as api_b:
        dataset_id = completed_fibo_dataset(api_a)
        both_alive, orphan = create_model(api_b, dataset_id), create_model(api_a, dataset_id)
        assert api_b.post(f"/models/{both_alive}/start_training").status_code == 200
        assert api_a.post(f"/models/{orphan}/start_training").status_code == 200
        wait_until(lambda: _jobs(engine, orphan) and _jobs(engine, both_alive), 30, "the jobs' rows")
        # both replicas watch the first job (same host): it ends, and one of them settles it
        (data_dir / "runs" / f"model-{both_alive}" / RELEASE_FILE).touch()
        assert wait_for_status(api_a, both_alive, {"Completed", "Failed"}, 60)["status"] == "Completed"
        a.kill()  # mid-training of `orphan`, the job A launched (it runs in its own session and lives on)
        (data_dir / "runs" / f"model-{orphan}" / RELEASE_FILE).touch()
        settled = wait_for_status(api_b, orphan, {"Completed", "Failed"}, 60)
        assert settled["status"] == "Completed" and settled["active_model_version"] == "100"
        wait_until(lambda: _jobs(engine, orphan) == [(1, "completed")], 10, "the job's outcome")
    assert _jobs(engine, both_alive) == [(1, "completed")]
    assert len(a.settled(both_alive) + b.settled(both_alive)) == 1
    assert (a.settled(orphan), len(b.settled(orphan))) == ([], 1)  # the survivor took it over, once
