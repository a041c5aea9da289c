"""Shared fixtures: a tiny FIBO base built with the real diffusers/transformers classes, and the
databases the service tests run on (SQLite; PostgreSQL for modules marked both_databases). Nothing
here touches a model hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import pg_server
from tailoredgen_train.fixtures.tiny_bases import make_tiny_base


@pytest.fixture(scope="session")
def tiny_fibo_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-fibo-base")
    make_tiny_base("fibo", out, seed=0)
    return out


@pytest.fixture(scope="session")
def legacy_bases(tmp_path_factory) -> dict[str, Path]:
    """Tiny Bria 3.2 and Bria 2.3 (SDXL) bases, by family name."""
    bases = {}
    for name in ("bria-3.2", "bria-2.3"):
        bases[name] = tmp_path_factory.mktemp(f"tiny-{name}")
        make_tiny_base(name, bases[name], seed=0)
    return bases


@pytest.fixture(autouse=True)
def _seed_everything():
    # model construction in tests must not depend on test order
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """A tiny random Qwen3-VL captioner saved as a real one (make-tiny-base --family fibo-vlm)."""
    from tailoredgen_train.fixtures.tiny_vlm import make_tiny_vlm

    return make_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~20x faster than two
    contending ones (OpenMP barriers), and every comparison in a module runs under the same setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server for this test process (pg_server.py)."""
    bindir = pg_server.postgres_bin()
    if bindir is None or not (bindir / "initdb").exists():
        reason = (f"PostgreSQL binaries not found (looked in ${pg_server.BIN_ENV}, /usr/lib/postgresql/*/bin, PATH): "
                  "install postgresql-15 to run the service tests on PostgreSQL")
        if os.environ.get(pg_server.REQUIRE_ENV):
            pytest.fail(reason + f" ({pg_server.REQUIRE_ENV} is set: CI must run them)")
        pytest.skip(reason)
    server = pg_server.PostgresServer(bindir).start()
    yield server
    server.stop()


def pytest_generate_tests(metafunc):
    # a module marked both_databases runs twice: every test on SQLite, then again on PostgreSQL
    # (a test marked sqlite_only, such as one that reads the SQLite file itself, only once)
    if "service_database" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_databases"):
        sqlite_only = metafunc.definition.get_closest_marker("sqlite_only")
        metafunc.parametrize("service_database", ["sqlite"] if sqlite_only else ["sqlite", "postgresql"],
                             indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def service_database(request):
    """Which database the service servers of this module use: "sqlite" (in their data folder) or
    "postgresql" (a fresh database per data folder on the `postgres` server). Module fixtures that
    start a server request it, so that they are started again for the second database."""
    name = getattr(request, "param", "sqlite")
    pg_server.use(request.getfixturevalue("postgres") if name == "postgresql" else None)
    yield name
    pg_server.use(None)
