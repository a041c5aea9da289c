"""The HTTP service's API over real HTTP (uvicorn on 127.0.0.1): auth, every documented error path,
the atomic claim and the limits. Jobs here are sleeping stand-ins started through the real local
backend; real trainings are in test_service_lifecycle.py and test_service_restart.py."""

from __future__ import annotations

import io
import json
import threading

import httpx
import pytest
from PIL import Image as PILImage

from service_helpers import (COLLEAGUE_TOKEN, ORGANIZATION, OTHER_TOKEN, TOKEN, SleepingBackend, ThreadServer, client,
                             completed_fibo_dataset, create_model, sample_rows, settings_for, two_family_server,
                             upload_sample, wait_for_status)

# on SQLite and again on PostgreSQL (conftest.py): the error paths do not depend on the database
pytestmark = pytest.mark.both_databases


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_fibo_base, legacy_bases, service_database):
    with two_family_server(tmp_path_factory.mktemp("service-api"), tiny_fibo_base, legacy_bases) as running:
        yield running


@pytest.fixture(scope="module")
def api(server):
    with client(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def dataset_id(api):
    return completed_fibo_dataset(api)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


# ---- 401 ---------------------------------------------------------------------------------------

ENDPOINTS = [
    ("POST", "/projects"), ("GET", "/projects"), ("GET", "/projects/1"),
    ("POST", "/datasets"), ("GET", "/datasets"), ("GET", "/datasets/1"), ("PUT", "/datasets/1"),
    ("POST", "/datasets/1/images"), ("GET", "/datasets/1/images"), ("GET", "/datasets/1/images/1"),
    ("PUT", "/datasets/1/images/1"), ("DELETE", "/datasets/1/images/1"),
    ("PUT", "/datasets/1/images"), ("POST", "/generate_visual_schema"), ("POST", "/refine_structured_prompt"),
    ("POST", "/generate_prefix"),
    ("POST", "/models"), ("GET", "/models"), ("GET", "/models/1"), ("PUT", "/models/1"), ("DELETE", "/models/1"),
    ("POST", "/models/1/start_training"), ("POST", "/models/1/stop_training"),
    ("GET", "/models/1/checkpoints"), ("GET", "/models/1/checkpoints/100"), ("GET", "/models/1/download"),
    ("GET", "/models/1/logs"), ("GET", "/models/1/report"),
    ("DELETE", "/projects/1"), ("DELETE", "/datasets/1"), ("POST", "/datasets/1/clone"),
    ("POST", "/datasets/1/images/bulk-upload"), ("GET", "/datasets/1/images/bulk-upload/status"),
    ("POST", "/models/upload_model"),
]
# Bria's generation paths are not under /tailored-gen: (method, path, its template)
GENERATION_ENDPOINTS = [
    ("POST", "/v2/image/generate/tailored", "/v2/image/generate/tailored"),
    ("POST", "/v1/text-to-image/tailored/1", "/v1/text-to-image/tailored/{model_id}"),
    ("POST", "/v1/text-to-image/tailored/1/100", "/v1/text-to-image/tailored/{model_id}/{checkpoint_step}"),
    ("GET", "/v2/status/0123", "/v2/status/{request_id}"),
]


def test_the_endpoint_table_covers_every_authenticated_route(server):
    paths = server.app.openapi()["paths"]
    routes = {(method.upper(), path.removeprefix("/tailored-gen")) for path, item in paths.items()
              if "/files/" not in path for method in item}
    assert routes == ({(method, _template(path)) for method, path in ENDPOINTS}
                      | {(method, template) for method, _, template in GENERATION_ENDPOINTS})


def _template(path: str) -> str:
    """/models/1/checkpoints/100 -> /models/{model_id}/checkpoints/{checkpoint_step}"""
    names = {"projects": "{project_id}", "datasets": "{dataset_id}", "images": "{image_id}", "models": "{model_id}",
             "checkpoints": "{checkpoint_step}"}
    parts = path.split("/")
    return "/".join(names[parts[i - 1]] if part.isdigit() else part for i, part in enumerate(parts))


def _every_endpoint(server) -> list[tuple[str, str]]:
    """(method, URL) of every authenticated endpoint: relative to /tailored-gen, or absolute."""
    return ENDPOINTS + [(method, f"{server.url}{path}") for method, path, _ in GENERATION_ENDPOINTS]


@pytest.mark.parametrize("endpoint", range(len(ENDPOINTS) + len(GENERATION_ENDPOINTS)))
@pytest.mark.parametrize("token", [None, "", "wrong-token-value", TOKEN + "x", TOKEN[:-1]])
def test_every_endpoint_refuses_a_missing_or_wrong_token(server, endpoint, token):
    method, path = _every_endpoint(server)[endpoint]
    with client(server.url, token=None) as anonymous:
        headers = {} if token is None else {"api_token": token}
        response = anonymous.request(method, path, headers=headers)
    assert response.status_code == 401, response.text
    assert "api_token" in response.json()["message"]


def test_a_valid_token_passes_the_same_requests(api, server):
    # negative control for the table above: the same calls with a good token are not 401
    for method, path in _every_endpoint(server):
        assert api.request(method, path).status_code != 401, (method, path)
    with client(server.url, token=OTHER_TOKEN) as other:
        assert other.get("/models").status_code == 200


def test_tokens_never_reach_the_logs(server, caplog):
    caplog.set_level("DEBUG")
    with client(server.url) as good, client(server.url, token="leaky-secret-token") as bad:
        good.get("/models")
        bad.get("/models")
    assert caplog.records, "the request log line is missing"
    assert TOKEN not in caplog.text and "leaky-secret-token" not in caplog.text


# ---- 404 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,what", [
    ("GET", "/projects/999999", "Project not found"),
    ("GET", "/datasets/999999", "Dataset not found"),
    ("GET", "/datasets/999999/images", "Dataset not found"),
    ("GET", "/models/999999", "Model not found"),
    ("POST", "/models/999999/start_training", "Model not found"),
    ("POST", "/models/999999/stop_training", "Model not found"),
    ("DELETE", "/models/999999", "Model not found"),
    ("GET", "/models/999999/download", "Model not found"),
    ("GET", "/models/999999/logs", "Model not found"),
    ("GET", "/models/999999/report", "Model not found"),
])
def test_unknown_ids_get_404(api, method, path, what):
    response = api.request(method, path)
    assert response.status_code == 404
    assert response.json()["message"].startswith(what)


def test_model_on_an_unknown_dataset_is_404(api):
    response = api.post("/models", json={"name": "m", "dataset_id": 999999})
    assert response.status_code == 404 and response.json()["message"].startswith("Dataset not found")


def test_unknown_image_and_checkpoint_are_404(api, dataset_id):
    assert api.get(f"/datasets/{dataset_id}/images/999999").status_code == 404
    model_id = create_model(api, dataset_id)
    assert api.get(f"/models/{model_id}/checkpoints/100").json()["message"].startswith("Checkpoint not found")


# ---- start_training: 200, 409, 412, 400 --------------------------------------------------------

def test_start_returns_the_model_in_progress_with_resolved_parameters(api, server, dataset_id):
    model_id = create_model(api, dataset_id)
    response = api.post(f"/models/{model_id}/start_training", json={"rank": 16, "total_training_steps": 300})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "InProgress" and body["checkpoint_steps"] == [] and body["generation_prefix"] is None
    assert body["training_parameters"] == {"learning_rate": 0.0001, "lr_scheduler": "constant_with_warmup",
                                           "rank": 16, "total_training_steps": 300, "checkpoint_interval": 300,
                                           "lr_warmup_steps": 100}
    assert api.get(f"/models/{model_id}").json()["training_parameters"] == body["training_parameters"]
    job = json.loads((server.service.runner.run_dir(model_id) / "job.json").read_text())
    assert job["params"] == body["training_parameters"] and job["dataset_dir"].endswith(f"dataset-{dataset_id}")
    _stop(api, model_id)


def _stop(api, model_id):
    assert api.post(f"/models/{model_id}/stop_training").status_code == 200
    return wait_for_status(api, model_id, {"Stopped"}, timeout=60)


def test_a_second_start_is_409(api, dataset_id):
    model_id = create_model(api, dataset_id)
    assert api.post(f"/models/{model_id}/start_training").status_code == 200
    second = api.post(f"/models/{model_id}/start_training")
    assert second.status_code == 409 and "already started" in second.json()["message"]
    _stop(api, model_id)
    assert api.post(f"/models/{model_id}/start_training").status_code == 409  # a stopped model is not resumed


def test_a_draft_dataset_is_412(api):
    project = api.post("/projects", json={"project_name": "p", "ip_medium": "photography", "ip_type": "other"})
    draft = api.post("/datasets", json={"project_id": project.json()["id"], "name": "d", "training_version": "fibo"})
    model_id = create_model(api, draft.json()["id"])
    response = api.post(f"/models/{model_id}/start_training", json={"rank": 100000})
    assert response.status_code == 412  # 412 comes before the body's 400
    assert "completed" in response.json()["message"]


@pytest.mark.parametrize("field,value", [
    ("learning_rate", 0.5), ("learning_rate", 1e-9), ("learning_rate", "fast"),
    ("total_training_steps", 0), ("total_training_steps", 5001), ("total_training_steps", 10.5),
    ("rank", 2), ("rank", 512), ("rank", True),
    ("checkpoint_interval", 50), ("checkpoint_interval", 5000),
    ("lr_warmup_steps", -1), ("lr_warmup_steps", 1001),
    ("lr_scheduler", "exponential"), ("lr_scheduler", 3),
    ("max_train_steps", 100),
])
def test_each_invalid_field_is_400_naming_it(api, dataset_id, field, value):
    model_id = create_model(api, dataset_id)
    response = api.post(f"/models/{model_id}/start_training", json={field: value})
    assert response.status_code == 400, response.text
    errors = response.json()["errors"]
    assert [e["field_name"] for e in errors] == [field]
    assert set(errors[0]) == {"msg", "field_name", "field_input"} and errors[0]["field_input"] == str(value)
    assert api.get(f"/models/{model_id}").json()["status"] == "Created"  # nothing was claimed


def test_a_body_that_is_not_a_json_object_is_400(api, dataset_id):
    model_id = create_model(api, dataset_id)
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b'{"rank": ' + DEEP.encode() + b"}", b'{"rank": NaN}'):
        response = api.post(f"/models/{model_id}/start_training", content=raw,
                            headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["errors"][0]["field_name"] == "body"


def test_advanced_parameters_for_a_fully_automated_model_are_400_with_a_message(api, dataset_id):
    model_id = create_model(api, dataset_id, mode="fully_automated")
    response = api.post(f"/models/{model_id}/start_training", json={"rank": 64})
    assert response.status_code == 400
    assert response.json()["message"].startswith(
        "Advanced training parameters are only supported when training_mode is set to 'expert'.")


def test_an_empty_body_takes_every_default(api, dataset_id):
    model_id = create_model(api, dataset_id, mode="fully_automated")
    response = api.post(f"/models/{model_id}/start_training")
    assert response.status_code == 200
    assert response.json()["training_parameters"]["total_training_steps"] == 750
    _stop(api, model_id)


def test_twenty_concurrent_starts_give_exactly_one_200(server, dataset_id):
    with client(server.url) as api:
        model_id = create_model(api, dataset_id)
    barrier = threading.Barrier(20)
    codes: list[int] = []

    def start():
        with client(server.url) as own:
            barrier.wait()
            codes.append(own.post(f"/models/{model_id}/start_training").status_code)

    threads = [threading.Thread(target=start) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] + [409] * 19
    with client(server.url) as api:
        with server.service.db.transaction() as session:
            from tailoredgen_train.service.db import TrainingJob
            assert session.query(TrainingJob).filter_by(model_id=model_id).count() == 1  # one process launched
        _stop(api, model_id)


# ---- stop and delete ---------------------------------------------------------------------------

def test_stop_moves_in_progress_through_stopping_to_stopped(api, dataset_id):
    model_id = create_model(api, dataset_id)
    api.post(f"/models/{model_id}/start_training")
    stopping = api.post(f"/models/{model_id}/stop_training")
    assert stopping.status_code == 200 and stopping.json()["status"] == "Stopping"
    assert wait_for_status(api, model_id, {"Stopped"}, timeout=60)["status"] == "Stopped"
    again = api.post(f"/models/{model_id}/stop_training")
    assert again.status_code == 409 and "not in training" in again.json()["message"]


def test_stopping_a_model_that_never_started_is_409(api, dataset_id):
    model_id = create_model(api, dataset_id)
    response = api.post(f"/models/{model_id}/stop_training")
    assert response.status_code == 409


def test_delete_while_training_is_409_and_after_stopping_is_204(api, dataset_id):
    model_id = create_model(api, dataset_id)
    api.post(f"/models/{model_id}/start_training")
    refused = api.delete(f"/models/{model_id}")
    assert refused.status_code == 409 and "in training" in refused.json()["message"]
    _stop(api, model_id)
    assert api.delete(f"/models/{model_id}").status_code == 204
    assert api.get(f"/models/{model_id}").status_code == 404
    assert model_id not in [m["id"] for m in api.get("/models").json()]


# ---- datasets ----------------------------------------------------------------------------------

def _draft_dataset(api, version="fibo", **extra):
    project = api.post("/projects", json={"project_name": "p", "ip_medium": "illustration", "ip_type": "icons"})
    response = api.post("/datasets", json={"project_id": project.json()["id"], "name": "d",
                                           "training_version": version, **extra})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_completed_dataset_is_frozen(api, dataset_id):
    row = sample_rows()[5]
    image_id = api.get(f"/datasets/{dataset_id}/images").json()[0]["id"]
    path = f"/datasets/{dataset_id}/images"
    attempts = [
        api.post(path, files={"file": ("x.png", _png(256, 256))}, data={"caption": json.dumps(row["caption"])}),
        api.put(f"{path}/{image_id}", json={"caption": '{"short_description": "changed"}'}),
        api.delete(f"{path}/{image_id}"),
        api.put(f"/datasets/{dataset_id}", json={"status": "draft"}),
    ]
    for response in attempts:
        assert response.status_code == 409, response.text
    assert api.get(f"/datasets/{dataset_id}").json()["images_count"] == 5


def test_a_completed_legacy_dataset_refuses_a_new_caption_prefix(api):
    dataset_id = _draft_dataset(api, "3.2", caption_prefix="A flat illustration of")
    # bria-3.2 runs on the engine defaults here: min_side 256
    uploaded = api.post(f"/datasets/{dataset_id}/images", files={"file": ("a.png", _png(256, 300))},
                        data={"caption": "a dot"})
    assert uploaded.status_code == 201, uploaded.text
    assert api.put(f"/datasets/{dataset_id}", json={"caption_prefix": "A photo of"}).status_code == 200  # draft
    assert api.put(f"/datasets/{dataset_id}", json={"status": "completed"}).status_code == 200
    assert api.put(f"/datasets/{dataset_id}", json={"caption_prefix": "A sketch of"}).status_code == 409
    assert api.put(f"/datasets/{dataset_id}", json={"name": "renamed"}).json()["name"] == "renamed"


def test_completing_needs_five_fibo_images(api):
    dataset_id = _draft_dataset(api)
    for row in sample_rows()[:4]:
        upload_sample(api, dataset_id, row)
    refused = api.put(f"/datasets/{dataset_id}", json={"status": "completed"})
    assert refused.status_code == 409 and "insufficient images" in refused.json()["message"]
    upload_sample(api, dataset_id, sample_rows()[4])
    assert api.put(f"/datasets/{dataset_id}", json={"status": "completed"}).json()["status"] == "completed"


def test_completing_an_empty_legacy_dataset_is_409(api):
    dataset_id = _draft_dataset(api, "3.2")
    assert api.put(f"/datasets/{dataset_id}", json={"status": "completed"}).status_code == 409


def test_completing_with_an_uncaptioned_image_is_409_naming_it(api):
    dataset_id = _draft_dataset(api)
    for row in sample_rows()[:4]:
        upload_sample(api, dataset_id, row)
    bare = api.post(f"/datasets/{dataset_id}/images", files={"file": ("bare.png", _png(128, 128))}).json()
    assert bare["caption"] is None and bare["caption_source"] is None  # no captioning model: none is coming
    refused = api.put(f"/datasets/{dataset_id}", json={"status": "completed"})
    assert refused.status_code == 409 and str(bare["id"]) in refused.json()["message"]


def test_an_image_below_the_minimum_side_is_412(api):
    dataset_id = _draft_dataset(api)
    response = api.post(f"/datasets/{dataset_id}/images", files={"file": ("tiny.png", _png(63, 400))})
    assert response.status_code == 412 and "63x400" in response.json()["message"]
    assert api.get(f"/datasets/{dataset_id}").json()["images_count"] == 0


@pytest.mark.parametrize("payload", [b"", b"not an image at all", _png(128, 128)[:60],
                                     b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"])
def test_a_file_that_is_not_a_usable_image_is_415(api, server, payload):
    dataset_id = _draft_dataset(api)
    response = api.post(f"/datasets/{dataset_id}/images", files={"file": ("x.png", payload)})
    assert response.status_code == 415, response.text
    leftovers = [p.name for p in server.service.dataset_dir(dataset_id).iterdir()]
    assert leftovers == []  # the staged upload is gone


DEEP = "[" * 20_000 + "]" * 20_000  # under the 100,000-character limit, past Python's recursion limit


@pytest.mark.parametrize("caption", ["not json", "[1, 2]", '{"a": NaN}', '{"a": Infinity}', "   ",
                                     '{"short_description": ' + DEEP + "}"])
def test_a_fibo_caption_must_be_a_json_object(api, caption):
    dataset_id = _draft_dataset(api)
    response = api.post(f"/datasets/{dataset_id}/images", files={"file": ("x.png", _png(128, 128))},
                        data={"caption": caption})
    assert response.status_code == 400 and response.json()["errors"][0]["field_name"] == "caption"


def test_deep_json_is_400_everywhere_it_is_sent(api, server, dataset_id):
    from test_service_generation import completed_model

    model_id = completed_model(server, api, dataset_id)
    draft = _draft_dataset(api)  # a fibo draft
    image = upload_sample(api, draft, sample_rows()[0]).json()
    deep = '{"short_description": ' + DEEP + "}"
    answers = {
        "caption": api.put(f"/datasets/{draft}/images/{image['id']}", json={"caption": deep}),
        "visual_schema": api.put(f"/datasets/{draft}", json={"visual_schema": deep}),
        "structured_prompt": api.post(f"{server.url}/v2/image/generate/tailored",
                                      json={"tailored_model_id": str(model_id), "structured_prompt": deep}),
    }
    for field, response in answers.items():
        assert response.status_code == 400 and "deeper than 32" in response.text, (field, response.text)
        errors = response.json().get("errors")  # generation says it in its message, as for any bad prompt
        assert errors is None or errors[0]["field_name"] == field
    assert api.get(f"/datasets/{draft}/images/{image['id']}").json()["caption"] == image["caption"]
    # the control: the same calls with a shallow object pass
    assert api.put(f"/datasets/{draft}", json={"visual_schema": '{"style_medium": "photo"}'}).status_code == 200


def test_caption_update_validates_and_stores_compact_json(api):
    dataset_id = _draft_dataset(api)
    image = upload_sample(api, dataset_id, sample_rows()[0]).json()
    path = f"/datasets/{dataset_id}/images/{image['id']}"
    assert api.put(path, json={"caption": "{broken"}).status_code == 400
    assert api.put(path, json={"caption": "{}", "regenerate_caption": True}).status_code == 400
    assert api.put(path, json={"caption": '{ "a" : 1 }'}).json()["caption"] == '{"a":1}'


def test_project_locking_and_dataset_rules_are_400(api):
    project = api.post("/projects", json={"project_name": "p", "ip_medium": "illustration", "ip_type": "other",
                                          "training_version": "fibo"}).json()
    legacy = api.post("/datasets", json={"project_id": project["id"], "name": "d", "training_version": "3.2"})
    assert legacy.status_code == 400 and legacy.json()["errors"][0]["field_name"] == "training_version"
    prefixed = api.post("/datasets", json={"project_id": project["id"], "name": "d", "training_version": "fibo",
                                           "caption_prefix": "A photo of"})
    assert prefixed.status_code == 400 and prefixed.json()["errors"][0]["field_name"] == "caption_prefix"
    # 2.3 has no --base in this server
    project2 = api.post("/projects", json={"project_name": "q", "ip_medium": "illustration", "ip_type": "other"})
    response = api.post("/datasets", json={"project_id": project2.json()["id"], "name": "d",
                                           "training_version": "2.3"})
    assert response.status_code == 400 and "does not train" in response.json()["errors"][0]["msg"]


@pytest.mark.parametrize("path,body,field", [
    ("/projects", {"project_name": "p", "ip_medium": "video", "ip_type": "other"}, "ip_medium"),
    ("/projects", {"project_name": "p", "ip_medium": "photography", "ip_type": "icons"}, "ip_type"),
    ("/projects", {"project_name": "p", "ip_medium": "illustration", "ip_type": "defined_character"}, "ip_name"),
    ("/projects", {"ip_medium": "photography", "ip_type": "other"}, "project_name"),
    ("/datasets", {"project_id": "one", "name": "d"}, "project_id"),
    ("/datasets", {"project_id": 1, "name": "d", "training_version": "9.9"}, "training_version"),
    ("/datasets", {"project_id": 1, "name": "d", "colour": "red"}, "colour"),
    ("/models", {"name": "m", "dataset_id": 1, "training_mode": "turbo"}, "training_mode"),
    ("/models", {"name": "", "dataset_id": 1}, "name"),
    ("/models", {"name": "m\x00", "dataset_id": 1}, "name"),
    ("/models", {"name": "m", "dataset_id": 2**70}, "dataset_id"),
])
def test_invalid_bodies_get_bria_400_not_422(api, path, body, field):
    response = api.post(path, json=body)
    assert response.status_code == 400, response.text
    assert field in [e["field_name"] for e in response.json()["errors"]]


def test_a_fibo_model_on_a_legacy_dataset_is_400(api):
    dataset_id = _draft_dataset(api, "3.2")
    response = api.post("/models", json={"name": "m", "dataset_id": dataset_id, "training_version": "fibo"})
    assert response.status_code == 400 and response.json()["errors"][0]["field_name"] == "training_version"


# ---- checkpoints and download before training ended ---------------------------------------------

def test_checkpoints_are_for_expert_models_and_download_needs_completion(api, dataset_id):
    automated = create_model(api, dataset_id, mode="fully_automated")
    assert api.get(f"/models/{automated}/checkpoints").status_code == 400
    expert = create_model(api, dataset_id)
    assert api.get(f"/models/{expert}/checkpoints").json() == {"checkpoints": [], "active_model_version": "default"}
    response = api.get(f"/models/{expert}/download")
    assert response.status_code == 400 and "not completed" in response.json()["message"]


def test_a_download_link_needs_its_signature(server, api, dataset_id):
    service = server.service
    model_id = create_model(api, dataset_id)
    path = f"/tailored-gen/files/models/{model_id}/checkpoints/100/pytorch_lora_weights.safetensors"
    expires, signature = service.signer.sign(path, 60, ORGANIZATION)
    with client(server.url, token=None) as anonymous:
        url = path.removeprefix("/tailored-gen")
        assert anonymous.get(url, params={"expires": expires, "signature": "0" * 64}).status_code == 401
        assert anonymous.get(url, params={"expires": expires + 1, "signature": signature}).status_code == 401
        # a valid signature passes authentication; the file itself does not exist here
        assert anonymous.get(url, params={"expires": expires, "signature": signature}).status_code == 404


# ---- 500 and docs ------------------------------------------------------------------------------

def test_an_internal_failure_is_500_with_a_request_id_and_no_internals(server, dataset_id, caplog, monkeypatch):
    def explode(job, launch):
        raise RuntimeError("secret-internal-detail /srv/private/path")
    monkeypatch.setattr(server.service.runner.backend, "submit", explode)
    caplog.set_level("INFO")
    with client(server.url) as api:
        model_id = create_model(api, dataset_id)
        response = api.post(f"/models/{model_id}/start_training")
        assert response.status_code == 500
        body = response.json()
        assert set(body) == {"message", "request_id"} and "secret" not in response.text
        assert response.headers["X-Request-ID"] == body["request_id"]
        assert any(body["request_id"] in r.getMessage() and r.exc_info for r in caplog.records)
        failed = api.get(f"/models/{model_id}").json()
        assert failed["status"] == "Failed" and failed["error"]["code"] == "launch_failed"


def test_openapi_and_docs_are_served(server):
    with client(server.url, token=None) as anonymous:
        spec = anonymous.get(f"{server.url}/openapi.json").json()
        assert anonymous.get(f"{server.url}/docs").status_code == 200
    assert "/tailored-gen/models/{model_id}/start_training" in spec["paths"]
    start = spec["paths"]["/tailored-gen/models/{model_id}/start_training"]["post"]
    assert "rank" in start["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"200", "400", "401", "404", "409", "412", "429", "500"} <= set(start["responses"])
    # bad input is a 400 in Bria's shape everywhere, so FastAPI's 422 is documented nowhere
    assert not [p for p, item in spec["paths"].items() for op in item.values() if "422" in op["responses"]]
    model = spec["components"]["schemas"]["ModelOut"]["properties"]
    assert {"training_parameters", "checkpoint_steps", "active_model_version", "status"} <= set(model)
    assert "training_progress" in model
    progress = spec["components"]["schemas"]["TrainingProgressOut"]["properties"]
    assert {"current_step", "total_steps", "last_loss", "step_seconds", "eta_seconds"} <= set(progress)
    report = spec["paths"]["/tailored-gen/models/{model_id}/report"]["get"]["responses"]["200"]
    assert list(report["content"]) == ["text/html"]
    generate = spec["paths"]["/v2/image/generate/tailored"]["post"]
    assert {"200", "202", "400", "401", "404", "429", "500"} <= set(generate["responses"])
    fields = spec["components"]["schemas"]["GenerateTailoredRequest"]["properties"]
    assert fields["steps_num"]["minimum"] == 20 and fields["steps_num"]["maximum"] == 50


# ---- 429 ---------------------------------------------------------------------------------------

def test_a_token_over_its_request_rate_gets_429_with_retry_after(tmp_path, tiny_fibo_base):
    settings = settings_for(tmp_path, tiny_fibo_base, rate_limit_per_minute=5)
    with ThreadServer(settings, SleepingBackend()) as limited:
        with client(limited.url) as api, client(limited.url, token=OTHER_TOKEN) as other:
            assert [api.get("/models").status_code for _ in range(5)] == [200] * 5
            refused = api.get("/models")
            assert refused.status_code == 429
            assert 1 <= int(refused.headers["Retry-After"]) <= 60
            assert "Request limit exceeded" in refused.json()["message"]
            assert other.get("/models").status_code == 200  # the limit is per token


def test_a_token_over_its_training_cap_gets_429_and_others_still_start(tmp_path, tiny_fibo_base):
    backend = SleepingBackend()
    settings = settings_for(tmp_path, tiny_fibo_base, max_concurrent_trainings=1)
    with ThreadServer(settings, backend) as capped:
        with client(capped.url) as api, client(capped.url, token=COLLEAGUE_TOKEN) as other:
            dataset_id = completed_fibo_dataset(api)
            first, second, third = (create_model(api, dataset_id) for _ in range(3))
            assert api.post(f"/models/{first}/start_training").status_code == 200
            refused = api.post(f"/models/{second}/start_training")
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "60"
            assert api.get(f"/models/{second}").json()["status"] == "Created"  # the claim was rolled back
            assert api.post(f"/models/{first}/start_training").status_code == 409  # 409 wins over 429
            assert other.post(f"/models/{third}/start_training").status_code == 200
            _stop_with(api, first)
            assert api.post(f"/models/{second}/start_training").status_code == 200  # a slot is free again
            _stop_with(api, second)
            _stop_with(other, third)
    backend.kill_all()


def _stop_with(api, model_id):
    assert api.post(f"/models/{model_id}/stop_training").status_code == 200
    wait_for_status(api, model_id, {"Stopped"}, timeout=60)


# ---- the rest of the surface -------------------------------------------------------------------

def test_draft_images_can_be_listed_limited_and_deleted(api, server):
    dataset_id = _draft_dataset(api)
    ids = [upload_sample(api, dataset_id, row).json()["id"] for row in sample_rows()[:3]]
    assert [i["id"] for i in api.get(f"/datasets/{dataset_id}", params={"max_images": 2}).json()["images"]] == ids[:2]
    stored = server.service.dataset_dir(dataset_id)
    assert len(list(stored.iterdir())) == 3
    assert api.delete(f"/datasets/{dataset_id}/images/{ids[0]}").status_code == 204
    assert [i["id"] for i in api.get(f"/datasets/{dataset_id}/images").json()] == ids[1:]
    assert len(list(stored.iterdir())) == 2 and api.get(f"/datasets/{dataset_id}/images/{ids[0]}").status_code == 404


def test_models_can_be_renamed_and_listed_without_parameters(api, dataset_id):
    model_id = create_model(api, dataset_id)
    renamed = api.put(f"/models/{model_id}", json={"name": "mascot v2", "description": "second try"}).json()
    assert (renamed["name"], renamed["description"]) == ("mascot v2", "second try")
    assert api.put(f"/models/{model_id}", json={"training_mode": "expert"}).status_code == 400  # not updatable
    listed = {m["id"]: m for m in api.get("/models").json()}
    assert "training_parameters" not in listed[model_id]
    detailed = {m["id"]: m for m in api.get("/models", params={"include_training_parameters": True}).json()}
    assert detailed[model_id]["training_parameters"] == {} and detailed[model_id]["checkpoint_steps"] == []


@pytest.mark.sqlite_only  # a real job process (~20 s); settling is the same on both databases
def test_an_engine_failure_is_recorded_with_the_engine_s_code(tmp_path, tiny_fibo_base):
    # a real job process (the local backend, not the stand-in) on a base that does not exist
    settings = settings_for(tmp_path, tiny_fibo_base, bases={"fibo": str(tmp_path / "no-such-base")})
    with ThreadServer(settings) as broken, client(broken.url) as api:
        model_id = create_model(api, completed_fibo_dataset(api))
        assert api.post(f"/models/{model_id}/start_training").status_code == 200
        failed = wait_for_status(api, model_id, {"Failed", "Completed"}, timeout=120)
    assert failed["status"] == "Failed" and failed["error"]["code"] == "base_model_invalid"
    assert "no-such-base" in failed["error"]["message"]


def test_an_upload_that_fails_after_storing_its_file_leaves_no_file(api, server, monkeypatch):
    dataset_id = _draft_dataset(api)

    def fail(image):
        raise RuntimeError("the transaction dies after the file was moved into place")
    monkeypatch.setattr("tailoredgen_train.service.datasets.image_view", fail)
    response = api.post(f"/datasets/{dataset_id}/images", files={"file": ("x.png", _png(128, 128))})
    assert response.status_code == 500
    monkeypatch.undo()
    assert list(server.service.dataset_dir(dataset_id).iterdir()) == []
    assert api.get(f"/datasets/{dataset_id}").json()["images_count"] == 0


# ---- what a client written for Bria's hosted API expects ------------------------------------------


def test_a_dataset_takes_its_project_s_training_version_when_it_names_none(api):
    project = api.post("/projects", json={"project_name": "p", "ip_medium": "illustration", "ip_type": "icons",
                                          "training_version": "fibo"}).json()
    dataset = api.post("/datasets", json={"project_id": project["id"], "name": "d"})
    assert dataset.status_code == 201 and dataset.json()["training_version"] == "fibo"
    unlocked = api.post("/projects", json={"project_name": "p", "ip_medium": "illustration", "ip_type": "icons"}).json()
    legacy = api.post("/datasets", json={"project_id": unlocked["id"], "name": "d"}).json()
    assert legacy["training_version"] == "max"  # Bria's default for a project without one
    assert api.get(f"/projects/{unlocked['id']}").json()["training_version"] == "max"  # and it locks the project
    missing = api.post("/datasets", json={"project_id": 999999, "name": "d"})
    assert missing.status_code == 404 and missing.json()["message"].startswith("Project not found")


def test_a_fibo_caption_may_be_sent_as_a_json_object(api):
    dataset_id = _draft_dataset(api)
    image = upload_sample(api, dataset_id, sample_rows()[0]).json()
    path = f"/datasets/{dataset_id}/images/{image['id']}"
    as_object = api.put(path, json={"caption": {"short_description": "a red circle", "style_medium": "vector"}})
    assert as_object.status_code == 200, as_object.text
    assert as_object.json()["caption"] == '{"short_description":"a red circle","style_medium":"vector"}'
    as_string = api.put(path, json={"caption": '{"short_description": "a red circle", "style_medium": "vector"}'})
    assert as_string.json()["caption"] == as_object.json()["caption"]
    refused = api.put(path, json={"caption": ["not", "an", "object"]})
    assert refused.status_code == 400 and refused.json()["errors"][0]["field_name"] == "caption"


def test_the_management_api_also_answers_under_bria_s_v1_prefix(api, server):
    project = api.post("/projects", json={"project_name": "p", "ip_medium": "illustration", "ip_type": "icons"}).json()
    with client(server.url, token=None) as anonymous:
        assert anonymous.get(f"{server.url}/v1/tailored-gen/projects/{project['id']}").status_code == 401
    bria_style = api.get(f"{server.url}/v1/tailored-gen/projects/{project['id']}")
    assert bria_style.status_code == 200 and bria_style.json() == api.get(f"/projects/{project['id']}").json()
    created = api.post(f"{server.url}/v1/tailored-gen/datasets", json={"project_id": project["id"], "name": "v1"})
    assert created.status_code == 201 and api.get(f"/datasets/{created.json()['id']}").status_code == 200
    assert "/v1/tailored-gen/projects" not in server.app.openapi()["paths"]  # documented once, under /tailored-gen


def test_the_root_page_links_the_docs_the_console_and_health(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for link in ('href="/docs"', 'href="/console"', 'href="/healthz"'):
        assert link in page.text
