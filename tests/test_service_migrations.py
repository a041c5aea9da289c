"""The database's schema versions (service/migrations), on SQLite and on PostgreSQL: an empty database
is upgraded to exactly the models' schema; a database of the release before migrations (what
`create_all` made, no alembic_version) is stamped, upgraded and keeps its rows; replicas starting
together migrate once; an unknown or too new schema is refused with one line."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, insert, inspect, select, text

from tailoredgen_train import cli
from tailoredgen_train.errors import ConfigError
from tailoredgen_train.service import migrations
from tailoredgen_train.service.db import (Base, Checkpoint, Database, Dataset, GenerationRequest, Image, Model, Project,
                                          TrainingJob)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite3'}"
    return request.getfixturevalue("postgres").new_database()


def _previous(revision: str) -> str:
    return ScriptDirectory.from_config(migrations.config()).get_revision(revision).down_revision


def _release_before_migrations(engine) -> None:
    """The schema that release's `Base.metadata.create_all` made: revision 0001's tables, without
    an alembic_version table."""
    with engine.begin() as connection:
        command.upgrade(migrations.config(connection), migrations.BASELINE)
        connection.execute(text("DROP TABLE alembic_version"))


def _differences(url: str) -> list:
    engine = create_engine(url)
    with engine.connect() as connection:
        found = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    return found


def test_an_empty_database_is_upgraded_to_exactly_the_models_schema(empty_url):
    database = Database(empty_url)
    database.dispose()
    assert database.revisions == (None, migrations.head())
    assert _differences(empty_url) == []  # a model changed without a revision fails here
    engine = create_engine(empty_url)
    with engine.begin() as connection:  # the negative control: one revision short, the difference shows
        command.downgrade(migrations.config(connection), "-1")
    engine.dispose()
    assert "add_table" in [d[0] for d in _differences(empty_url) if isinstance(d, tuple)]
    assert Database(empty_url).revisions == (_previous(migrations.head()), migrations.head())


ROWS = {
    Project: dict(id=1, project_name="p", ip_medium="illustration", ip_type="stylized_scene", org="acme"),
    Dataset: dict(id=2, project_id=1, org="acme", name="d", training_version="fibo"),
    Image: dict(id=3, dataset_id=2, image_name="a.png", file_name="f.png", caption='{"a":1}', width=64, height=64),
    Model: dict(id=4, name="m", dataset_id=2, project_id=1, org="acme", training_version="fibo",
                training_mode="expert", status="Completed", training_parameters={"rank": 8}, owner="abc"),
    TrainingJob: dict(id=5, model_id=4, attempt=1, run_dir="/r", launcher="local", host="h", outcome="completed"),
    Checkpoint: dict(id=6, model_id=4, training_job_id=5, step=100),
    GenerationRequest: dict(id="r1", api="v2", owner="abc", org="acme", model_id=4, checkpoint_step=100,
                            family="fibo", settings={"seed": 1}, host="h", images=["0.png"]),
}


def test_a_database_of_the_release_before_migrations_is_stamped_upgraded_and_keeps_its_rows(empty_url):
    engine = create_engine(empty_url)
    _release_before_migrations(engine)
    with engine.begin() as connection:
        for model, row in ROWS.items():
            connection.execute(insert(model).values(**row))
    engine.dispose()
    database = Database(empty_url)
    assert database.revisions == (migrations.BASELINE, migrations.head())
    with database.transaction() as session:
        for model, row in ROWS.items():
            stored = session.execute(select(*[getattr(model, k) for k in row])).one()
            assert dict(zip(row, stored)) == row, model.__tablename__
        # a job of that release had its process when it got its row: it is never taken for a queued one
        assert session.scalar(select(TrainingJob.launch_token)) is not None
    database.dispose()
    assert _differences(empty_url) == []


def test_replicas_starting_together_migrate_once(empty_url):
    opened, errors = [], []

    def open_it():
        try:
            opened.append(Database(empty_url))
        except Exception as exc:  # noqa: BLE001 (the assertion shows it)
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    revisions = [d.revisions for d in opened]
    head = migrations.head()
    assert (revisions.count((None, head)), revisions.count((head, head))) == (1, 3)  # one migrated
    for database in opened:
        database.dispose()


def test_an_unknown_old_schema_is_refused_naming_what_it_lacks(tmp_path):
    path = tmp_path / "old.sqlite3"
    engine = create_engine(f"sqlite:///{path}")
    _release_before_migrations(engine)
    engine.dispose()
    with sqlite3.connect(path) as old:  # as a version before organizations made it
        old.execute("DROP INDEX ix_models_org")
        old.execute("ALTER TABLE models DROP COLUMN org")
    with pytest.raises(ConfigError, match=r"earlier version of tailoredgen-train and lacks models\.org; start the "
                                          r"service with a new --data-dir"):
        Database(f"sqlite:///{path}")
    assert "alembic_version" not in inspect(create_engine(f"sqlite:///{path}")).get_table_names()  # untouched


def test_a_newer_schema_and_an_unmigrated_one_under_no_migrate_are_refused(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    with pytest.raises(ConfigError, match=r"at revision none \(not migrated\), this version of tailoredgen-train "
                                          rf"needs {migrations.head()}: run `tailoredgen-train db upgrade`"):
        Database(url, migrate=False)
    assert cli.main(["db", "upgrade", "--db", url]) == 0
    assert f"upgraded from revision none (empty) to {migrations.head()}" in capsys.readouterr().out
    Database(url, migrate=False).dispose()  # the control: once upgraded, it opens
    with sqlite3.connect(tmp_path / "db.sqlite3") as db:
        db.execute("UPDATE alembic_version SET version_num = '0999'")
    with pytest.raises(ConfigError, match="at revision 0999, which this version of tailoredgen-train does not know"):
        Database(url)


def test_an_unreachable_or_unsupported_database_is_refused_with_one_line():
    with pytest.raises(ConfigError, match=r"cannot open the database postgresql\+psycopg://nobody@127.0.0.1:1/x: "
                                          r"connection failed.*check --db"):
        Database("postgresql://nobody@127.0.0.1:1/x")  # postgresql:// means psycopg 3
    with pytest.raises(ConfigError, match=r"--db mysql://\.\.\.: use sqlite:///PATH or postgresql://"):
        Database("mysql://user@host/db")
