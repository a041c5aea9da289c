"""The service's small parts on their own: settings, tokens, rate limits, signed links, job outcomes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tailoredgen_train import cli
from tailoredgen_train.errors import ConfigError, RateLimitedError, UnauthorizedError
from tailoredgen_train.outcome import clear_outcome, read_outcome, write_outcome
from tailoredgen_train.service.auth import RateLimiter, TokenAuth, UrlSigner, token_id
from tailoredgen_train.service.db import Database
from tailoredgen_train.service.settings import ServiceSettings, load_tokens, parse_assignments, parse_resolutions


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_allows_a_minute_s_burst_then_the_rate_per_token(tmp_path):
    clock = Clock()
    limiter = RateLimiter(Database(f"sqlite:///{tmp_path / 'db.sqlite3'}"), 3, clock=clock)  # one per 20 s
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(RateLimitedError) as refused:
        limiter.check("a")
    assert refused.value.retry_after_s == 20 and refused.value.http_status == 429
    limiter.check("b")  # another token has its own schedule
    clock.now += 15
    with pytest.raises(RateLimitedError) as later:
        limiter.check("a")
    assert later.value.retry_after_s == 5
    clock.now += 5
    limiter.check("a")  # one interval later, one more request
    with pytest.raises(RateLimitedError):
        limiter.check("a")
    clock.now += 60
    for _ in range(3):  # a minute idle: a full burst again, and no more
        limiter.check("a")
    with pytest.raises(RateLimitedError):
        limiter.check("a")


def test_token_auth_accepts_only_configured_tokens():
    auth = TokenAuth(["alpha-token-1", "beta-token-22"])
    assert auth.check("beta-token-22") == token_id("beta-token-22") != "beta-token-22"
    for bad in (None, "", "alpha-token-", "alpha-token-11", "ALPHA-TOKEN-1", "\udcff"):
        with pytest.raises(UnauthorizedError):
            auth.check(bad)


def test_signed_links_expire_and_bind_their_path_and_owner():
    clock = Clock(5000)
    signer = UrlSigner("secret", clock=clock)
    expires, signature = signer.sign("/files/a", 60, "acme")
    signer.verify("/files/a", expires, signature, "acme")
    with pytest.raises(UnauthorizedError):
        signer.verify("/files/b", expires, signature, "acme")
    for owner in ("other", None):  # another organization's file, or one whose model is gone
        with pytest.raises(UnauthorizedError):
            signer.verify("/files/a", expires, signature, owner)
    with pytest.raises(UnauthorizedError):
        UrlSigner("other-secret", clock=clock).verify("/files/a", expires, signature, "acme")
    clock.now += 61
    with pytest.raises(UnauthorizedError, match="expired"):
        signer.verify("/files/a", expires, signature, "acme")


def _settings(tmp_path, **overrides):
    values = dict(data_dir=tmp_path, tokens=["token-0001"], bases={"fibo": "base"})
    values.update(overrides)
    return ServiceSettings(**values)


@pytest.mark.parametrize("overrides,message", [
    ({"tokens": []}, "TAILOREDGEN_API_TOKENS"),
    ({"tokens": ["short"]}, "at least 8"),
    ({"bases": {}}, "--base FAMILY=PATH_OR_ID"),
    ({"launcher": "kubernetes"}, "launcher"),
    ({"lost_jobs": "ignore"}, "lost_jobs"),
    ({"rate_limit_per_minute": 0}, "rate_limit_per_minute"),
    ({"max_concurrent_trainings": 0}, "max_concurrent_trainings"),
    ({"poll_interval_s": 0}, "poll_interval_s"),
    ({"engine_configs": {"bria-3.2": "x.yaml"}}, "no --base"),
    ({"generation_resolution": {"bria-3.2": 128}}, "--generation-resolution given for bria-3.2 but no --base"),
    ({"generation_resolution": {"fibo": 32}}, "--generation-resolution fibo=32: use an integer in 64..4096"),
    ({"generation_queue_size": 0}, "generation_queue_size"),
    ({"vlm": "briaai/FIBO-vlm", "vlm_string_tokens": 0}, "vlm_string_tokens must be >= 1"),
    ({"vlm_max_pixels": 4096}, "vlm_max_pixels is given but no captioning model: add --vlm"),
])
def test_settings_name_what_is_wrong(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("-", r"\-").replace(".", r"\.")):
        _settings(tmp_path, **overrides)


def test_settings_defaults_and_the_url_secret_is_created_once(tmp_path, monkeypatch):
    monkeypatch.delenv("TAILOREDGEN_URL_SECRET", raising=False)
    settings = _settings(tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path / 'tailoredgen.sqlite3'}"
    secret = settings.resolved_url_secret()
    assert len(secret) == 64 and settings.resolved_url_secret() == secret
    assert (tmp_path / ".url_secret").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("TAILOREDGEN_URL_SECRET", "shared-by-instances")
    assert settings.resolved_url_secret() == "shared-by-instances"


def test_tokens_come_from_the_environment_and_a_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# ops team\nfile-token-1\n\n  file-token-2  \nenv-token-1\n")
    tokens = load_tokens(str(path), {"TAILOREDGEN_API_TOKENS": "env-token-1, env-token-2,"})
    assert tokens == ["env-token-1", "env-token-2", "file-token-1", "file-token-2"]
    with pytest.raises(ConfigError, match="--tokens-file"):
        load_tokens(str(tmp_path / "missing"), {})


@pytest.mark.parametrize("item", ["fibo", "=path", "fibo=", "fibo path"])
def test_family_assignments_must_look_like_family_equals_value(item):
    with pytest.raises(ConfigError, match="--base"):
        parse_assignments([item], "--base")
    assert parse_assignments(["fibo=a=b"], "--base") == {"fibo": "a=b"}


def test_generation_resolutions_are_integers_per_family():
    assert parse_resolutions(["fibo=128", "bria-3.2=1024"]) == {"fibo": 128, "bria-3.2": 1024}
    with pytest.raises(ConfigError, match="--generation-resolution fibo=big: the value must be an integer"):
        parse_resolutions(["fibo=big"])


def test_serve_refuses_to_start_without_tokens(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TAILOREDGEN_API_TOKENS", raising=False)
    code = cli.main(["serve", "--data-dir", str(tmp_path), "--base", "fibo=base"])
    assert code == cli.EXIT_USER_ERROR and "TAILOREDGEN_API_TOKENS" in capsys.readouterr().err


def test_serve_refuses_an_unknown_family(tmp_path, monkeypatch, capsys):
    from tailoredgen_train.service.app import create_app

    with pytest.raises(ConfigError, match="unknown model family 'flux'"):
        create_app(_settings(tmp_path, bases={"flux": "base"}))


def test_serve_refuses_an_engine_config_of_another_family(tmp_path):
    from tailoredgen_train.service.app import create_app

    configs = Path(__file__).resolve().parents[1] / "configs"
    with pytest.raises(ConfigError, match="family mismatch: --engine-config fibo=.*bria-3.2-tiny.yaml is written for "
                                          "family bria-3.2"):
        create_app(_settings(tmp_path, engine_configs={"fibo": str(configs / "bria-3.2-tiny.yaml")}))


def test_serve_refuses_a_global_batch_its_processes_cannot_share(tmp_path):
    from tailoredgen_train.service.app import create_app

    configs = Path(__file__).resolve().parents[1] / "configs"
    with pytest.raises(ConfigError, match=r"the engine config of family fibo with --num-processes 8: "
                                          r"optim.global_batch_size=4 is not a multiple of .* = 8"):
        create_app(_settings(tmp_path, engine_configs={"fibo": str(configs / "fibo.yaml")}, num_processes=8))


def test_serve_refuses_a_data_dir_it_cannot_write_with_one_line(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TAILOREDGEN_API_TOKENS", "token-0001")
    code = cli.main(["serve", "--data-dir", str(blocker / "data"), "--base", "fibo=base"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USER_ERROR and "Traceback" not in err
    assert f"--data-dir {blocker / 'data'} cannot be used" in err and "pass a folder the service can create" in err


def test_staged_uploads_a_crash_left_are_removed_at_start_up(tmp_path, tiny_fibo_base):
    from service_helpers import ThreadServer, settings_for

    settings = settings_for(tmp_path, tiny_fibo_base)
    folder = settings.data_dir / "datasets" / "dataset-1"
    folder.mkdir(parents=True)
    old, fresh, image = folder / ".upload-0123abcd", folder / ".upload-4567ef01", folder / "00000001.png"
    for path in (old, fresh, image):
        path.write_bytes(b"x")
    # an unfinished clone and dataset removal (folders), and an upload_model's staged file
    folders = [settings.data_dir / "datasets" / ".clone-89ab", settings.data_dir / "datasets" / ".deleted-dataset-2-cd"]
    for path in folders:
        path.mkdir()
        (path / "00000002.png").write_bytes(b"x")
    (settings.data_dir / "runs").mkdir()
    lora = settings.data_dir / "runs" / ".upload-ef01.safetensors"
    lora.write_bytes(b"x")
    for path in (old, lora, *folders):
        os.utime(path, (time.time() - 3600, time.time() - 3600))  # cut off by a crash an hour ago
    with ThreadServer(settings):
        pass
    assert not old.exists() and not lora.exists() and not any(path.exists() for path in folders)
    assert fresh.exists() and image.exists()  # another live server's upload in flight, and a stored image


def test_outcomes_round_trip_and_a_failed_rank_wins(tmp_path):
    assert read_outcome(tmp_path) is None
    write_outcome(tmp_path, "completed", final_step=200, rank=0)
    assert read_outcome(tmp_path)["status"] == "completed" and read_outcome(tmp_path)["final_step"] == 200
    write_outcome(tmp_path, "failed", code="oom", message="rank 1 ran out of memory", rank=1)
    assert read_outcome(tmp_path)["code"] == "oom"
    (tmp_path / "result.rank2.json").write_text("{torn")  # a torn file is no outcome, not a crash
    assert read_outcome(tmp_path)["code"] == "oom"
    clear_outcome(tmp_path)
    assert read_outcome(tmp_path) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging files left


def test_run_job_writes_its_outcome(tmp_path, tiny_fibo_base):
    from helpers import params, subset_dataset, tiny_engine
    from tailoredgen_train.recipe import JobSpec

    job = JobSpec(base=str(tiny_fibo_base), dataset_dir=str(subset_dataset(tmp_path / "data", 1)),
                  output_dir=str(tmp_path / "out"), training_version="fibo", params=params(2), engine=tiny_engine())
    (tmp_path / "job.json").write_text(json.dumps(job.to_dict()))
    assert cli.main(["run-job", str(tmp_path / "job.json")]) == 0
    outcome = read_outcome(tmp_path / "out")
    summary = outcome.pop("summary")
    assert outcome == {"status": "completed", "code": None, "message": None, "final_step": 2, "rank": 0}
    assert summary["steps_done"] == summary["total_steps"] == 2
    assert summary["checkpoints"] == [{"step": 2, "path": "checkpoint-2"}]
    assert summary["final_loss"] is not None and summary["wall_time_s"] > 0
    assert (tmp_path / "out" / "report.html").is_file()
    kept = json.loads((tmp_path / "out" / "job.json").read_text())  # the engine's copy, which a relaunch reads
    assert "engine_version" in kept and JobSpec.from_dict(kept).to_dict() == job.to_dict()
    broken = JobSpec(**{**job.__dict__, "base": str(tmp_path / "no-such-base"), "output_dir": str(tmp_path / "o2")})
    (tmp_path / "broken.json").write_text(json.dumps(broken.to_dict()))
    assert cli.main(["run-job", str(tmp_path / "broken.json")]) == cli.EXIT_FAILURE
    outcome = read_outcome(tmp_path / "o2")
    assert outcome["status"] == "failed" and outcome["code"] == "base_model_invalid"
