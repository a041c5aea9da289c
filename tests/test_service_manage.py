"""The rest of Bria's dataset and model API over HTTP: DELETE projects and datasets (409 while a model
trains), Clone Dataset As Draft, upload_model (a legacy LoRA loaded into the family's pipeline
before it is Completed); validation errors that list every bad field at once; and /docs and
/redoc that load nothing from outside the server."""

from __future__ import annotations

import re

import httpx
import pytest
import torch
from fastapi.openapi.docs import get_swagger_ui_html
from safetensors.torch import load_file, save_file

from generation_helpers import denoiser_with_lora, save_lora
from service_helpers import (SleepingBackend, ThreadServer, client, completed_fibo_dataset, create_model, is_png,
                             settings_for, wait_for_status)
from tailoredgen_train.families import family_class

pytestmark = pytest.mark.both_databases  # on SQLite and again on PostgreSQL


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_fibo_base, legacy_bases, service_database):
    root = tmp_path_factory.mktemp("manage")
    imports = root / "imports"
    imports.mkdir()
    backend = SleepingBackend()
    settings = settings_for(root, tiny_fibo_base, import_roots=[imports],
                            bases={"fibo": str(tiny_fibo_base), "bria-3.2": str(legacy_bases["bria-3.2"])})
    with ThreadServer(settings, backend) as server, client(server.url) as api:
        yield {"server": server, "api": api, "imports": imports, "base": legacy_bases["bria-3.2"]}
    backend.kill_all()


def test_deleting_waits_for_trainings_and_a_clone_outlives_its_source(setup):
    api, server = setup["api"], setup["server"]
    dataset_id = completed_fibo_dataset(api)
    source = api.get(f"/datasets/{dataset_id}").json()
    model_id = create_model(api, dataset_id)
    assert api.post(f"/models/{model_id}/start_training", json={}).status_code == 200
    busy = api.delete(f"/datasets/{dataset_id}")
    assert busy.status_code == 409 and "used by a model in training" in busy.json()["message"]
    busy = api.delete(f"/projects/{source['project_id']}")
    assert busy.status_code == 409 and "models are in training" in busy.json()["message"]

    cloned = api.post(f"/datasets/{dataset_id}/clone")
    assert cloned.status_code == 201, cloned.text
    clone = cloned.json()
    assert (clone["name"], clone["status"], clone["images_count"]) == ("Copy of shapes", "draft", 5)
    assert clone["id"] != dataset_id and clone["project_id"] == source["project_id"]
    captions = [i["caption"] for i in api.get(f"/datasets/{dataset_id}").json()["images"]]
    assert [i["caption"] for i in api.get(f"/datasets/{clone['id']}").json()["images"]] == captions
    renamed = api.post(f"/datasets/{dataset_id}/clone", json={"name": "v2"}).json()
    assert renamed["name"] == "v2"

    assert api.post(f"/models/{model_id}/stop_training").status_code == 200
    wait_for_status(api, model_id, {"Stopped"}, timeout=60)
    assert api.delete(f"/datasets/{dataset_id}").status_code == 204
    assert api.get(f"/datasets/{dataset_id}").status_code == 404
    assert dataset_id not in {d["id"] for d in api.get("/datasets").json()}
    assert not server.service.dataset_dir(dataset_id).exists()
    assert api.get(f"/models/{model_id}").status_code == 200  # a model outlives the dataset it trained on
    # the clone keeps its own files, and can be completed without its source
    assert api.put(f"/datasets/{clone['id']}", json={"status": "completed"}).status_code == 200

    assert api.delete(f"/projects/{source['project_id']}").status_code == 204
    for path in (f"/projects/{source['project_id']}", f"/datasets/{clone['id']}", f"/models/{model_id}"):
        assert api.get(path).status_code == 404, path
    assert api.delete(f"/projects/{source['project_id']}").status_code == 404
    assert not server.service.dataset_dir(clone["id"]).exists()


def test_a_clone_keeps_the_caption_prefix_and_the_visual_schema(setup):
    api = setup["api"]
    project = api.post("/projects", json={"project_name": "p", "ip_medium": "illustration",
                                          "ip_type": "other"}).json()["id"]
    legacy = api.post("/datasets", json={"project_id": project, "name": "l", "training_version": "max",
                                         "caption_prefix": "A flat illustration of"}).json()["id"]
    assert api.post(f"/datasets/{legacy}/clone").json()["caption_prefix"] == "A flat illustration of"
    fibo_project = api.post("/projects", json={"project_name": "f", "ip_medium": "illustration",
                                               "ip_type": "other"}).json()["id"]
    schema = '{"style_medium":"flat illustration"}'
    fibo = api.post("/datasets", json={"project_id": fibo_project, "name": "f", "training_version": "fibo",
                                       "visual_schema": schema}).json()["id"]
    assert api.post(f"/datasets/{fibo}/clone").json()["visual_schema"] == schema


@pytest.fixture(scope="module")
def lora_files(setup):
    """A Bria 3.2 LoRA made by the engine's own add_lora and the family's saver, and two that do not fit."""
    family = family_class("bria-3.2")()
    good = save_lora(family, denoiser_with_lora(family, str(setup["base"])), setup["imports"] / "good")
    tensors = load_file(good)
    misfit = setup["imports"] / "misfit.safetensors"  # a LoRA for modules this base does not have
    save_file({k.replace("transformer_blocks", "missing_blocks"): v for k, v in tensors.items()}, misfit)
    not_lora = setup["imports"] / "weights.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, not_lora)
    return good, misfit, not_lora


def test_an_uploaded_lora_is_checked_in_the_pipeline_then_served_like_a_trained_one(setup, lora_files):
    api, server = setup["api"], setup["server"]
    good, misfit, not_lora = lora_files
    body = {"model_url": str(good), "training_version": "max", "model_name": "mascot",
            "caption_prefix": "A flat illustration of",
            "project_parameters": {"project_name": "byo", "ip_medium": "illustration"}}
    uploaded = api.post("/models/upload_model", json=body)
    assert uploaded.status_code == 200, uploaded.text
    model = uploaded.json()
    assert (model["status"], model["dataset_id"], model["generation_prefix"]) == (
        "Completed", None, "A flat illustration of")
    link = api.get(f"/models/{model['id']}/download").json()["download_url"]
    assert httpx.get(link).content == good.read_bytes()
    assert api.post(f"/models/{model['id']}/start_training").status_code == 409
    rendered = api.post(f"{server.url}/v1/text-to-image/tailored/{model['id']}",
                        json={"prompt": "a fox", "num_results": 1, "steps_num": 20, "sync": True})
    assert rendered.status_code == 200, rendered.text
    assert is_png(httpx.get(rendered.json()["result"][0]["urls"][0]).content)

    count = len(api.get("/models").json())
    project = model["project_id"]
    for url, status, words in ((misfit, 400, "cannot be loaded into this bria-3.2 base"),
                               (not_lora, 400, "holds no LoRA tensors"),
                               (setup["imports"] / "good" / "nothing.bin", 400, "inside the server's import folders")):
        refused = api.post("/models/upload_model", json={**body, "model_url": str(url), "project_parameters": None,
                                                         "project_id": project})
        assert refused.status_code == status, refused.text
        assert words in refused.text and str(setup["imports"]) not in refused.json().get("message", "")
    (setup["imports"] / "model.bin").write_bytes(b"x")
    wrong_format = api.post("/models/upload_model", json={**body, "model_url": str(setup["imports"] / "model.bin")})
    assert wrong_format.status_code == 415, wrong_format.text
    assert len(api.get("/models").json()) == count  # nothing refused became a model
    assert not list((server.service.settings.data_dir / "runs").glob(".upload-*"))


def test_a_bad_body_lists_every_bad_or_missing_field_in_one_answer(setup):
    api = setup["api"]
    refused = api.post("/projects", json={"ip_medium": "photography", "ip_type": "defined_character"})
    assert refused.status_code == 400
    assert {e["field_name"] for e in refused.json()["errors"]} == {"project_name", "ip_name", "ip_description"}
    refused = api.post("/models/upload_model", json={"training_version": "fibo", "model_name": ""})
    assert {e["field_name"] for e in refused.json()["errors"]} == {"model_url", "training_version", "model_name",
                                                                    "project_id"}
    refused = api.post("/projects", content=b'{"project_name": ', headers={"content-type": "application/json"})
    assert refused.status_code == 400 and refused.json()["errors"][0]["field_name"] == "body"
    # negative control: a good body passes
    assert api.post("/projects", json={"project_name": "p", "ip_medium": "photography", "ip_type": "other"}
                    ).status_code == 201


def _outside_urls(html: str) -> list[str]:
    """Every src/href/url of a page that leaves the server (absolute http(s) or protocol-relative)."""
    found = re.findall(r"""(?:src|href|url)\s*[=:(]\s*['"]?([^'")\s>]+)""", html)
    return [u for u in found if re.match(r"(https?:)?//", u)]


def test_docs_and_redoc_load_nothing_from_outside_the_server(setup):
    url = setup["server"].url
    # negative control: FastAPI's default page (from a CDN) is caught by the same check
    assert _outside_urls(get_swagger_ui_html(openapi_url="/openapi.json", title="t").body.decode())
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{url}{page}").text
        assert not _outside_urls(html), (page, _outside_urls(html))
        assets = re.findall(r"""(?:src|href)=["'](/docs-assets/[^"']+)""", html)
        assert len(assets) >= 2, html
        for asset in assets:
            response = httpx.get(f"{url}{asset}")
            assert response.status_code == 200 and len(response.content) > 1000, asset
