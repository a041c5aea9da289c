"""Schemathesis, driven by the app's own OpenAPI description, finds no server error on any
operation, and every response has a documented status and matches its documented schema."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service_helpers import (TOKEN, SleepingBackend, ThreadServer, client, completed_fibo_dataset, create_model,
                             settings_for)
from tailoredgen_train.fixtures.tiny_vlm import TINY_MAX_PIXELS

pytestmark = pytest.mark.slow


def _schemathesis() -> str:
    found = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert found, "schemathesis is not installed: make test installs it (pip install -e .[test])"
    return found


def _fuzz(server, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [_schemathesis(), "run", f"{server.url}/openapi.json", "--checks",
               "not_a_server_error,response_schema_conformance,status_code_conformance",
               "--header", f"api_token: {TOKEN}", "--workers", "1", "--generation-deterministic", "--no-color",
               "--request-timeout", "60", "--suppress-health-check", "all", *extra]
    # cwd: schemathesis keeps its example database in ./.schemathesis
    return subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)


@pytest.fixture
def fuzz_server(tmp_path, tiny_fibo_base, tiny_vlm):
    backend = SleepingBackend()
    # with the tiny captioning model, so that the captioning endpoints answer as they do in production
    settings = settings_for(tmp_path, tiny_fibo_base, rate_limit_per_minute=100_000, max_concurrent_trainings=1000,
                            vlm=str(tiny_vlm), vlm_string_tokens=3, vlm_max_pixels=TINY_MAX_PIXELS // 4)
    with ThreadServer(settings, backend) as server:
        with client(server.url) as api:  # objects with id 1, so that examples reach real rows too
            create_model(api, completed_fibo_dataset(api))
        yield server
    backend.kill_all()


def test_fuzzing_the_openapi_description_finds_no_server_error(fuzz_server, tmp_path):
    result = _fuzz(fuzz_server, tmp_path, "--max-examples", "25", "--phases", "examples,coverage,fuzzing")
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    counts = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert counts and int(counts.group(1)) >= 500 and counts.group(1) == counts.group(2), report


def test_the_fuzzer_does_report_a_server_error(fuzz_server, tmp_path, monkeypatch):
    # negative control: a handler that fails must make the same run fail
    def broken(*args, **kwargs):
        raise RuntimeError("injected")
    monkeypatch.setattr("tailoredgen_train.service.routes_models.model_view", broken)
    result = _fuzz(fuzz_server, tmp_path, "--max-examples", "5", "--phases", "examples,coverage",
                   "--include-path", "/tailored-gen/models/{model_id}", "--include-method", "GET")
    assert result.returncode != 0 and "500" in result.stdout, result.stdout[-3000:]
