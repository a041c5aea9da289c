"""Organizations cannot see each other: every endpoint, called by another organization's token with
our resource ids, answers as if they did not exist (404; /v2 generation: Bria's 403) and changes
nothing (every row and every file hashed before and after). A colleague's token (same organization)
passes the same calls: the negative control."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import httpx
import pytest
from sqlalchemy import select

from service_helpers import (COLLEAGUE_TOKEN, ORGANIZATION, OTHER_TOKEN, TOKEN, SleepingBackend, ThreadServer, client,
                             completed_fibo_dataset, sample_rows, settings_for, upload_sample, wait_until)
from tailoredgen_train.data import SAMPLE_DATASET_DIR
from tailoredgen_train.errors import ConfigError
from tailoredgen_train.report.html import REPORT_FILE
from tailoredgen_train.service.auth import token_id
from tailoredgen_train.service.db import Base, Database, TokenLimit
from tailoredgen_train.service.settings import ServiceSettings, load_organizations, load_tokens
from test_service_api import ENDPOINTS, GENERATION_ENDPOINTS, _template
from test_service_generation import completed_model, fibo_body

pytestmark = pytest.mark.both_databases  # the cross-organization table, on SQLite and on PostgreSQL
# routes that take no id of ours: POST /projects creates in the caller's organization, and
# generate_visual_schema reads only the images it is sent
NO_RESOURCE = {("POST", "/projects"), ("POST", "/generate_visual_schema")}
LISTS = {("GET", "/projects"), ("GET", "/datasets"), ("GET", "/models")}
NOT_FOUND = ("Project not found", "Dataset not found", "Model not found", "Request not found")


@pytest.fixture(scope="module")
def acme(tmp_path_factory, tiny_fibo_base, service_database):
    """A server, and what TOKEN's organization has on it: a completed dataset and model with two
    checkpoints, a draft dataset with an image, and a settled generation request."""
    backend = SleepingBackend()
    with ThreadServer(settings_for(tmp_path_factory.mktemp("organizations"), tiny_fibo_base), backend) as server, \
            client(server.url) as api:
        dataset_id = completed_fibo_dataset(api)
        dataset = api.get(f"/datasets/{dataset_id}").json()
        model_id = completed_model(server, api, dataset_id)
        (server.service.runner.run_dir(model_id) / REPORT_FILE).write_text("<html>the run's report</html>")
        draft = api.post("/datasets", json={"project_id": dataset["project_id"], "name": "draft",
                                            "training_version": "fibo"}).json()["id"]
        image_id = upload_sample(api, draft, sample_rows()[0]).json()["id"]
        zipped = api.post("/datasets", json={"project_id": dataset["project_id"], "name": "zipped",
                                             "training_version": "fibo", "upload_type": "advanced"}).json()["id"]
        bulk = api.post(f"/datasets/{zipped}/images/bulk-upload", json={"zip_url": "http://127.0.0.1:9/none.zip"})
        assert bulk.status_code == 202, bulk.text
        wait_until(lambda: api.get(f"/datasets/{zipped}/images/bulk-upload/status").json()["status"] == "failed", 60,
                   "the bulk upload to fail")
        accepted = api.post(f"{server.url}/v2/image/generate/tailored", json=fibo_body(model_id))
        assert accepted.status_code == 202, accepted.text
        request_id = accepted.json()["request_id"]
        wait_until(lambda: api.get(f"{server.url}/v2/status/{request_id}").json()["status"] != "IN_PROGRESS", 300,
                   "the generation request to settle")
        yield {"server": server, "project": dataset["project_id"], "dataset": dataset_id, "draft": draft,
               "image": image_id, "model": model_id, "request": request_id, "zipped": zipped}
    backend.kill_all()


def _calls(ids: dict) -> list[tuple[str, str, dict]]:
    """(method, URL, request keywords) of every endpoint that takes one of our ids."""
    url, project, dataset, draft, image, model = (ids["server"].url, ids["project"], ids["dataset"], ids["draft"],
                                                  ids["image"], ids["model"])
    name = sample_rows()[1]["file_name"]
    png = (name, (SAMPLE_DATASET_DIR / name).read_bytes())
    return [
        ("GET", f"/projects/{project}", {}),
        ("POST", "/datasets", {"json": {"project_id": project, "name": "mine", "training_version": "fibo"}}),
        ("GET", f"/datasets/{dataset}", {}),
        ("PUT", f"/datasets/{draft}", {"json": {"name": "renamed"}}),
        ("POST", f"/datasets/{draft}/images", {"files": {"file": png}}),
        ("GET", f"/datasets/{draft}/images", {}),
        ("GET", f"/datasets/{draft}/images/{image}", {}),
        ("PUT", f"/datasets/{draft}/images/{image}", {"json": {"caption": '{"short_description": "mine"}'}}),
        ("DELETE", f"/datasets/{draft}/images/{image}", {}),
        ("PUT", f"/datasets/{draft}/images", {}),
        ("POST", "/refine_structured_prompt", {"json": {"dataset_id": draft, "structured_prompt": "{}",
                                                        "instruction": "night"}}),
        ("POST", "/generate_prefix", {"json": {"images": ["AAAA"], "dataset_id": draft}}),
        ("POST", "/models", {"json": {"name": "mine", "dataset_id": dataset}}),
        ("GET", f"/models/{model}", {}),
        ("PUT", f"/models/{model}", {"json": {"name": "renamed"}}),
        ("DELETE", f"/models/{model}", {}),
        ("POST", f"/models/{model}/start_training", {}),
        ("POST", f"/models/{model}/stop_training", {}),
        ("GET", f"/models/{model}/checkpoints", {}),
        ("GET", f"/models/{model}/checkpoints/100", {}),
        ("GET", f"/models/{model}/download", {}),
        ("GET", f"/models/{model}/logs", {}),
        ("GET", f"/models/{model}/report", {}),
        ("POST", f"{url}/v2/image/generate/tailored", {"json": fibo_body(model)}),
        ("POST", f"{url}/v1/text-to-image/tailored/{model}", {"json": {"prompt": "a fox"}}),
        ("POST", f"{url}/v1/text-to-image/tailored/{model}/100", {"json": {"prompt": "a fox"}}),
        ("GET", f"{url}/v2/status/{ids['request']}", {}),
        ("DELETE", f"/projects/{project}", {}),
        ("DELETE", f"/datasets/{draft}", {}),
        ("POST", f"/datasets/{dataset}/clone", {}),
        ("POST", f"/datasets/{ids['zipped']}/images/bulk-upload", {"json": {"zip_url": "http://127.0.0.1:9/a.zip"}}),
        ("GET", f"/datasets/{ids['zipped']}/images/bulk-upload/status", {}),
        ("POST", "/models/upload_model", {"json": {"model_url": "http://127.0.0.1:9/a.safetensors",
                                                   "training_version": "max", "project_id": project}}),
    ]


def _route(method: str, url: str, server_url: str) -> tuple[str, str]:
    """The route's template: /models/7/checkpoints/100 -> /models/{model_id}/checkpoints/{checkpoint_step}."""
    if not url.startswith(server_url):
        return method, _template(url)
    path = url.removeprefix(server_url)
    for _, example, template in GENERATION_ENDPOINTS:  # Bria's generation paths, by their shape
        fixed = template.split("{")[0]
        if path.startswith(fixed) and path.count("/") == example.count("/"):
            return method, template
    raise AssertionError(f"not a route: {url}")


def test_the_table_covers_every_route_that_takes_an_id(acme):
    routes = {(m, _template(p)) for m, p in ENDPOINTS} | {(m, t) for m, _, t in GENERATION_ENDPOINTS}
    covered = {_route(method, url, acme["server"].url) for method, url, _ in _calls(acme)}
    assert covered | NO_RESOURCE | LISTS == routes


def _fingerprint(server) -> str:
    """Every row of every table (but the requests each token made) and every file under the data
    folder (but the database's own files)."""
    digest = hashlib.sha256()
    with server.service.db.transaction() as session:
        for table in Base.metadata.sorted_tables:
            if table.name == TokenLimit.__tablename__:
                continue
            for row in session.execute(select(table).order_by(*table.primary_key.columns)).all():
                digest.update(json.dumps([table.name, list(row)], default=str).encode())
    data_dir = server.service.settings.data_dir
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file() and "tailoredgen.sqlite3" not in p.name):
        digest.update(str(path.relative_to(data_dir)).encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def test_another_organization_gets_404_on_every_id_of_ours_and_changes_nothing(acme):
    server = acme["server"]
    before = _fingerprint(server)
    with client(server.url, token=OTHER_TOKEN) as other:
        for method, url, kwargs in _calls(acme):
            response = other.request(method, url, **kwargs)
            expected = 403 if url.endswith("/v2/image/generate/tailored") else 404
            if url.endswith(("/refine_structured_prompt", "/generate_prefix")):
                expected = 400  # no captioning model here: refused before any lookup, telling nothing
            assert response.status_code == expected, (method, url, response.text)
            if expected == 404:  # the resource's own "not found", never a later check's
                assert response.json()["message"].startswith(NOT_FOUND), (method, url, response.text)
        listed = {path: other.get(path).json() for _, path in LISTS}
    assert listed == {"/projects": [], "/datasets": [], "/models": []}
    assert _fingerprint(server) == before


def test_a_colleague_sees_and_changes_what_the_organization_has(acme):
    # the negative control: the same ids with a token of the same organization
    server = acme["server"]
    with client(server.url, token=COLLEAGUE_TOKEN) as colleague:
        for method, url, _ in _calls(acme):
            if method == "GET":
                assert colleague.get(url).status_code == 200, url
        assert {p["id"] for p in colleague.get("/projects").json()} == {acme["project"]}
        before = _fingerprint(server)
        assert colleague.put(f"/datasets/{acme['draft']}", json={"name": "renamed"}).status_code == 200
        assert _fingerprint(server) != before  # the fingerprint sees a change


def test_download_links_are_bound_to_the_organization_and_die_with_the_model(acme):
    server = acme["server"]
    with client(server.url) as api:
        model_id = completed_model(server, api, acme["dataset"])
        link = api.get(f"/models/{model_id}/download").json()["download_url"]
        assert httpx.get(link).status_code == 200  # the control: a fresh link works without a token
        path = link.removeprefix(server.url).split("?")[0]
        expires, signature = server.service.signer.sign(path, 60, f"token-{token_id(OTHER_TOKEN)}")
        forged = httpx.get(f"{server.url}{path}", params={"expires": expires, "signature": signature})
        assert forged.status_code == 401  # signed for another organization: not this file's
        assert api.delete(f"/models/{model_id}").status_code in (200, 204)
        assert httpx.get(link).status_code == 401  # the model is deleted: its links stop working


def test_the_tokens_file_maps_tokens_to_organizations(tmp_path, tiny_fibo_base):
    tokens = tmp_path / "tokens"
    tokens.write_text("# token organization\nalpha-token-1 acme\nalpha-token-2 acme\nlonely-token-3\n")
    assert load_tokens(str(tokens), environ={}) == ["alpha-token-1", "alpha-token-2", "lonely-token-3"]
    assert load_organizations(str(tokens)) == {"alpha-token-1": "acme", "alpha-token-2": "acme"}
    tokens.write_text("alpha-token-1 acme corp\n")
    with pytest.raises(ConfigError, match="line 1: expected `TOKEN` or `TOKEN ORGANIZATION`"):
        load_tokens(str(tokens), environ={})
    tokens.write_text("alpha-token-1 acme\nalpha-token-1 other\n")
    with pytest.raises(ConfigError, match="line 2: this token is listed twice"):
        load_organizations(str(tokens))
    with pytest.raises(ConfigError, match="organization 'a/b'"):
        ServiceSettings(data_dir=tmp_path, tokens=[TOKEN], organizations={TOKEN: "a/b"},
                        bases={"fibo": str(tiny_fibo_base)})
    assert ORGANIZATION == "acme"


@pytest.mark.sqlite_only  # edits the SQLite file itself
def test_a_database_of_an_earlier_version_is_refused_at_start_up_with_what_it_lacks(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    Database(url).dispose()
    Database(url).dispose()  # negative control: a database of this version opens again
    old = sqlite3.connect(tmp_path / "old.sqlite3")
    old.execute("DROP INDEX ix_projects_org")
    old.execute("ALTER TABLE projects DROP COLUMN org")  # as the version before organizations made it
    old.commit()
    old.close()
    with pytest.raises(ConfigError, match=r"earlier version of tailoredgen-train and lacks projects\.org; start the "
                                          r"service with a new --data-dir"):
        Database(url)
