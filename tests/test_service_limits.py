"""The request rate and the per-token training cap are enforced in the database: exact when many
threads of two replicas (two Database instances, as two processes have) hit them at once, on SQLite
and on PostgreSQL."""

from __future__ import annotations

import threading

import pytest

from tailoredgen_train.errors import RateLimitedError, TrainingAlreadyStartedError
from tailoredgen_train.service.auth import RateLimiter
from tailoredgen_train.service.db import Database, Dataset, Model, Project
from tailoredgen_train.service.launchers import LocalBackend
from tailoredgen_train.service.runner import JobRunner
from tailoredgen_train.service.settings import ServiceSettings

CALLS = 40


@pytest.fixture(params=["sqlite", "postgresql"])
def two_replicas(request, tmp_path):
    url = (f"sqlite:///{tmp_path / 'db.sqlite3'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres").new_database())
    pair = [Database(url), Database(url)]
    yield pair
    for database in pair:
        database.dispose()


def _at_once(calls: list) -> list:
    """Run the calls in threads released together; what each returned or raised."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 (the caller counts them)
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_the_request_rate_is_exact_across_replicas(two_replicas):
    clock = lambda: 60 * 1000 + 5.0  # noqa: E731 (one minute for the whole test)
    limiters = [RateLimiter(database, 15, clock=clock) for database in two_replicas]
    results = _at_once([lambda i=i: limiters[i % 2].check("token-a") for i in range(CALLS)])
    refused = [r for r in results if isinstance(r, RateLimitedError)]
    assert (CALLS - len(refused), len(refused)) == (15, CALLS - 15), [r for r in results if r and r not in refused]
    limiters[0].check("token-b")  # another token has its own count


def test_the_training_cap_is_exact_across_replicas(two_replicas, tmp_path):
    settings = ServiceSettings(data_dir=tmp_path, tokens=["token-a-123"], bases={"fibo": "unused"},
                               max_concurrent_trainings=3)
    runners = [JobRunner(database, LocalBackend(), settings) for database in two_replicas]
    with two_replicas[0].transaction() as session:
        project = Project(project_name="p", ip_medium="illustration", ip_type="stylized_scene", org="acme")
        session.add(project)
        session.flush()
        dataset = Dataset(project_id=project.id, org="acme", name="d", training_version="fibo", status="completed")
        session.add(dataset)
        session.flush()
        models = [Model(name=f"m{i}", dataset_id=dataset.id, project_id=project.id, org="acme",
                        training_version="fibo", training_mode="expert") for i in range(12)]
        session.add_all(models)
    model_ids = [m.id for m in models]
    # each model started twice (once per replica): 3 claims win; the rest hit the cap or find it started
    results = _at_once([lambda i=i: runners[i % 2].claim(model_ids[i // 2], "owner-a", {}, None)
                        for i in range(2 * len(model_ids))])
    kinds = [type(r).__name__ for r in results]
    assert kinds.count("NoneType") == 3, kinds
    assert set(kinds) == {"NoneType", RateLimitedError.__name__, TrainingAlreadyStartedError.__name__}, results
    with two_replicas[1].transaction() as session:
        assert session.query(Model).filter(Model.status == "InProgress").count() == 3
    runners[0].claim(_created(two_replicas[0]), "owner-b", {}, None)  # another token still starts


def _created(database: Database) -> int:
    with database.transaction() as session:
        return session.query(Model.id).filter(Model.status == "Created").first()[0]
