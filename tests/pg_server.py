"""Which database the service tests run on, and the PostgreSQL server behind the second one.

Modules marked `pytest.mark.both_databases` run once on SQLite and once on PostgreSQL (conftest.py
parametrizes its `service_database` fixture); `settings_for`/`CliServer` (service_helpers.py) ask
`database_url(data_dir)` which one to use. Each pytest(-xdist) process starts its own server
(tailoredgen_train/fixtures/postgres.py); each service data folder gets a database of its own in it.
"""

from __future__ import annotations

from pathlib import Path

from tailoredgen_train.fixtures.postgres import BIN_ENV, PostgresServer, postgres_bin  # noqa: F401 (conftest's)

REQUIRE_ENV = "TAILOREDGEN_REQUIRE_POSTGRES"
"""set (CI does, .ci/run): missing PostgreSQL binaries fail the PostgreSQL tests instead of skipping them"""

_server: PostgresServer | None = None
_databases: dict[str, str] = {}


def use(server: PostgresServer | None) -> None:
    """The service tests from now on run on this server (None: on SQLite in their data folder)."""
    global _server
    _server = server
    _databases.clear()


def database_url(data_dir: Path) -> str | None:
    """The --db of a service on `data_dir`: None (SQLite in it), or the same PostgreSQL database for
    the same folder (a restarted server finds its data)."""
    if _server is None:
        return None
    key = str(Path(data_dir).resolve())
    if key not in _databases:
        _databases[key] = _server.new_database()
    return _databases[key]
