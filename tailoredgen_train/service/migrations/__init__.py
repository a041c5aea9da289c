"""The database's schema versions (Alembic, run from code: there is no alembic.ini).

`upgrade(engine)` brings any database this project ever created to the newest revision, in one
transaction that holds a lock (PostgreSQL: an advisory lock; SQLite: BEGIN IMMEDIATE), so that
replicas starting together migrate once. A database from before migrations (no alembic_version,
the tables of revision 0001) is stamped 0001 first. How to add a revision: README.md here.
"""

from __future__ import annotations

import logging
from pathlib import Path

logging.getLogger("alembic").setLevel(logging.WARNING)  # before its import logs: one line per upgrade is ours

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from alembic.util import CommandError  # noqa: E402
from sqlalchemy import create_engine, inspect  # noqa: E402
from sqlalchemy.engine import Connection, Engine  # noqa: E402

from ...errors import ConfigError  # noqa: E402

HERE = Path(__file__).resolve().parent
BASELINE = "0001"
"""the schema of the last release without migrations (what `create_all` made)"""
BASELINE_TABLES = {"projects", "datasets", "images", "models", "training_jobs", "checkpoints", "generation_requests"}
log = logging.getLogger(__name__)
_LOCK_KEY = 0x74676D69  # "tgmi": the PostgreSQL advisory lock that serializes migrations


def config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("version_locations", str(HERE / "versions"))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(config()).get_current_head()


def current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Migrate to the newest revision; (the revision before, the revision now)."""
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:  # batch mode rebuilds a table by drop and rename: the rows that refer to it must stay
            _pragma(connection, "foreign_keys=OFF")  # outside the transaction, or SQLite ignores it
        try:
            with connection.begin():
                if connection.dialect.name == "postgresql":
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
                tables = set(inspect(connection).get_table_names())
                before = current(connection)
                if before is None and tables & BASELINE_TABLES:  # made by create_all before migrations
                    _check_baseline(connection, tables, engine)
                    command.stamp(config(connection), BASELINE)
                    before = BASELINE
                try:
                    if before != head():
                        command.upgrade(config(connection), "head")
                except CommandError as exc:
                    if "Can't locate revision" not in str(exc):
                        raise
                    raise ConfigError(f"the database {_name(engine)} is at revision {before}, which this version of "
                                      "tailoredgen-train does not know: a newer version migrated it; run that version "
                                      "(or a newer one)") from None
                now = current(connection)
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise ConfigError(f"the database {_name(engine)} has rows whose references are broken after "
                                      "the migration; nothing was changed (restore it from a backup)")
        finally:
            if sqlite:
                _pragma(connection, "foreign_keys=ON")
    if now != before:
        log.info("database %s: upgraded from revision %s to %s", _name(engine), before or "none (empty)", now)
    return before, now


def check_current(engine: Engine) -> tuple[str, str]:
    """For `serve --no-migrate`: the database must already be at the newest revision."""
    with engine.connect() as connection:
        found, wanted = current(connection), head()
    if found != wanted:
        raise ConfigError(f"the database {_name(engine)} is at revision {found or 'none (not migrated)'}, this "
                          f"version of tailoredgen-train needs {wanted}: run `tailoredgen-train db upgrade` with the "
                          "same --db/--data-dir (or start serve without --no-migrate)")
    return found, found


def new_revision(message: str) -> Path:
    """Write versions/NNNN_<message>.py with what the models have that the newest revision lacks."""
    number = 1 + max(int(p.name[:4]) for p in (HERE / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))
    engine = create_engine("sqlite://")
    upgrade(engine)
    with engine.begin() as connection:
        script = command.revision(config(connection), message, autogenerate=True, rev_id=f"{number:04d}")
    return Path(script.path)


def _check_baseline(connection: Connection, tables: set[str], engine: Engine) -> None:
    """A database without alembic_version must have every table and column of revision 0001."""
    scratch = create_engine("sqlite://")
    with scratch.begin() as fresh:
        command.upgrade(config(fresh), BASELINE)
        baseline = {t: {c["name"] for c in inspect(fresh).get_columns(t)}
                    for t in inspect(fresh).get_table_names() if t != "alembic_version"}
    found = inspect(connection)
    missing = [f"{table}.{column}" for table, columns in baseline.items() for column in sorted(columns)
               if table not in tables or column not in {c["name"] for c in found.get_columns(table)}]
    if missing:
        raise ConfigError(f"the database {_name(engine)} was created by an earlier version of tailoredgen-train and "
                          f"lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; start the service "
                          "with a new --data-dir (or --db), or add the columns")


def _pragma(connection: Connection, setting: str) -> None:
    connection.connection.dbapi_connection.execute(f"PRAGMA {setting}")


def _name(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)
