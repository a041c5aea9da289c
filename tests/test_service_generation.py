"""The generation endpoints' rules over real HTTP, without a training: the error rules, the worker's
failures, the restart rule, the queue limit and the prompt-expander seam. Models here are marked
Completed in the database with a LoRA file of our choosing; renders from really trained models are in
test_service_lifecycle.py (FIBO, /v2) and test_service_legacy.py (max, /v1)."""

from __future__ import annotations

import json
import socket
import threading
import uuid

import httpx
import pytest
import torch
from PIL import Image as PILImage

from service_helpers import (COLLEAGUE_TOKEN, ORGANIZATION, OTHER_TOKEN, TOKEN, SleepingBackend, ThreadServer,
                             client, completed_fibo_dataset, create_model, poll_generation, settings_for,
                             two_family_server)
from tailoredgen_train.data import SAMPLE_TEXT_CAPTION_PREFIX
from tailoredgen_train.inference import GeneratedImage, LoraPipeline
from tailoredgen_train.service.auth import token_id
from tailoredgen_train.service.db import Checkpoint, Database, GenerationRequest, Model, TrainingJob

STRUCTURED = json.dumps({"short_description": "a red circle on a pale background"})
NOT_A_LORA = b"this is not a safetensors file"


pytestmark = pytest.mark.both_databases  # on SQLite and again on PostgreSQL


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_fibo_base, legacy_bases, service_database):
    with two_family_server(tmp_path_factory.mktemp("service-generation"), tiny_fibo_base, legacy_bases) as running:
        yield running


@pytest.fixture(scope="module")
def api(server):
    with client(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def fibo_dataset(api):
    return completed_fibo_dataset(api)


@pytest.fixture(scope="module")
def legacy_dataset(api):
    project = api.post("/projects", json={"project_name": "p", "ip_medium": "illustration", "ip_type": "other"}).json()
    dataset = api.post("/datasets", json={"project_id": project["id"], "name": "d", "training_version": "max",
                                          "caption_prefix": SAMPLE_TEXT_CAPTION_PREFIX}).json()
    return dataset["id"]


def completed_model(server, api, dataset_id: int, *, steps=(100, 200), lora: bytes = NOT_A_LORA,
                    owner: str = TOKEN, mode: str = "expert") -> int:
    """A model as a finished training leaves it in the database, with `lora` as every checkpoint's file."""
    model_id = create_model(api, dataset_id, mode=mode)
    run_dir = server.service.runner.run_dir(model_id)
    for step in steps:
        (run_dir / f"checkpoint-{step}").mkdir(parents=True)
        (run_dir / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors").write_bytes(lora)
    with server.service.db.transaction() as session:
        job = TrainingJob(model_id=model_id, attempt=1, run_dir=str(run_dir), launcher="local", host="elsewhere")
        session.add(job)
        session.flush()
        session.add_all([Checkpoint(model_id=model_id, training_job_id=job.id, step=step) for step in steps])
        model = session.get(Model, model_id)
        model.status, model.owner = "Completed", token_id(owner)
        model.training_parameters = {"total_training_steps": max(steps), "checkpoint_interval": min(steps)}
        model.active_model_version = str(max(steps)) if mode == "expert" else "default"
        model.generation_prefix = None if model.training_version == "fibo" else SAMPLE_TEXT_CAPTION_PREFIX
    return model_id


def v2(server, api, body: dict, token: str | None = None):
    headers = {"api_token": token} if token else None
    return api.post(f"{server.url}/v2/image/generate/tailored", json=body, headers=headers)


def v1(server, api, path: str, body: dict, token: str | None = None):
    headers = {"api_token": token} if token else None
    return api.post(f"{server.url}/v1/text-to-image/tailored/{path}", json=body, headers=headers)


def fibo_body(model_id, **extra) -> dict:
    return {"tailored_model_id": str(model_id), "structured_prompt": STRUCTURED, "steps_num": 20, "seed": 1, **extra}


# ---- 404 -----------------------------------------------------------------------------------------


def test_a_missing_model_is_404(server, api):
    for response in (v2(server, api, fibo_body(999999)), v2(server, api, fibo_body("not-an-id")),
                     v1(server, api, "999999", {"prompt": "a fox"}),
                     v1(server, api, "999999/100", {"prompt": "a fox"})):
        assert response.status_code == 404, response.text
        assert response.json()["message"].startswith("Model not found")


def test_another_organization_s_model_is_refused_and_its_organization_passes(server, api, fibo_dataset,
                                                                             legacy_dataset):
    fibo = completed_model(server, api, fibo_dataset)
    legacy = completed_model(server, api, legacy_dataset)
    # Bria's /v2 answers 403 for another organization's model; /v1 documents no 403: 404, as if it did not exist
    for token, on_v2, on_v1 in ((OTHER_TOKEN, 403, 404), (TOKEN, 202, 202), (COLLEAGUE_TOKEN, 202, 202)):
        assert v2(server, api, fibo_body(fibo), token=token).status_code == on_v2
        assert v1(server, api, f"{legacy}/100", {"prompt": "a fox", "num_results": 1}, token).status_code == on_v1
        assert v1(server, api, f"{legacy}", {"prompt": "a fox", "num_results": 1}, token).status_code == on_v1
    assert v2(server, api, fibo_body(fibo), token=OTHER_TOKEN).json()["message"] == \
        "Model does not belong to organization"
    assert v1(server, api, f"{legacy}", {"prompt": "a fox"}, OTHER_TOKEN).json()["message"] == \
        f"Model not found: there is no model {legacy}"


def test_a_request_is_visible_only_to_its_organization(server, api, fibo_dataset):
    model_id = completed_model(server, api, fibo_dataset)
    accepted = v2(server, api, fibo_body(model_id))
    assert accepted.status_code == 202, accepted.text
    status_url = accepted.json()["status_url"]
    assert status_url == f"{server.url}/v2/status/{accepted.json()['request_id']}"
    with client(server.url, token=OTHER_TOKEN) as other:
        assert other.get(status_url).status_code == 404
    with client(server.url, token=COLLEAGUE_TOKEN) as colleague:
        assert colleague.get(status_url).status_code == 200
    assert api.get(f"{server.url}/v2/status/{uuid.uuid4().hex}").status_code == 404
    poll_generation(api, status_url)


# ---- 400 -----------------------------------------------------------------------------------------


def test_a_model_that_is_not_completed_is_400(server, api, fibo_dataset):
    model_id = create_model(api, fibo_dataset)
    response = v2(server, api, fibo_body(model_id))
    assert response.status_code == 400 and "not completed" in response.json()["message"]


def test_a_checkpoint_that_does_not_exist_is_400_naming_the_existing_ones(server, api, legacy_dataset):
    model_id = completed_model(server, api, legacy_dataset)
    response = v1(server, api, f"{model_id}/150", {"prompt": "a fox"})
    assert response.status_code == 400
    assert "no checkpoint at step 150" in response.json()["message"] and "200, 100" in response.json()["message"]
    automated = completed_model(server, api, legacy_dataset, steps=(300,), mode="fully_automated")
    response = v1(server, api, f"{automated}/300", {"prompt": "a fox"})
    assert response.status_code == 400 and "fully_automated" in response.json()["message"]


def test_the_wrong_endpoint_for_the_model_s_family_is_400(server, api, fibo_dataset, legacy_dataset):
    fibo = completed_model(server, api, fibo_dataset)
    legacy = completed_model(server, api, legacy_dataset)
    for response in (v1(server, api, str(fibo), {"prompt": "a fox"}), v2(server, api, fibo_body(legacy))):
        assert response.status_code == 400
        assert "/v2/image/generate/tailored" in response.json()["message"]


@pytest.mark.parametrize("field,value", [
    ("steps_num", 19), ("steps_num", 51), ("guidance_scale", 2), ("guidance_scale", 6),
    ("tailored_model_influence", 1.6), ("tailored_model_influence", -0.1), ("aspect_ratio", "7:3"), ("seed", -2),
    ("sync", "maybe"), ("unknown_field", 1),
])
def test_an_out_of_range_v2_field_is_400_naming_it(server, api, fibo_dataset, field, value):
    model_id = completed_model(server, api, fibo_dataset)
    response = v2(server, api, {**fibo_body(model_id), field: value})
    assert response.status_code == 400
    assert response.json()["errors"][0]["field_name"] == field


@pytest.mark.parametrize("field,value", [("num_results", 0), ("num_results", 5), ("steps_num", 19),
                                         ("model_influence", 2), ("prompt", ""), ("aspect_ratio", "1:2")])
def test_an_out_of_range_v1_field_is_400_naming_it(server, api, legacy_dataset, field, value):
    model_id = completed_model(server, api, legacy_dataset)
    response = v1(server, api, str(model_id), {"prompt": "a fox", field: value})
    assert response.status_code == 400
    assert response.json()["errors"][0]["field_name"] == field


def test_a_plain_prompt_without_a_captioning_model_is_400(server, api, fibo_dataset):
    model_id = completed_model(server, api, fibo_dataset)
    body = {"tailored_model_id": model_id, "prompt": "a red circle", "steps_num": 20}
    for request in (body, {**body, "structured_prompt": STRUCTURED}):
        response = v2(server, api, request)
        assert response.status_code == 400
        assert "captioning model" in response.json()["message"]
        assert response.json()["code"] == "structured_prompt_required"
    not_json = v2(server, api, {**body, "prompt": None, "structured_prompt": "a red circle"})
    assert not_json.status_code == 400 and not_json.json()["code"] == "structured_prompt_required"
    neither = v2(server, api, {**body, "prompt": None})
    assert neither.status_code == 400 and neither.json()["errors"][0]["field_name"] == "structured_prompt"


# ---- the worker ------------------------------------------------------------------------------------


def test_a_checkpoint_that_cannot_load_ends_the_request_failed(server, api, fibo_dataset):
    model_id = completed_model(server, api, fibo_dataset, lora=NOT_A_LORA)
    synchronous = v2(server, api, fibo_body(model_id, sync=True))
    assert synchronous.status_code == 500
    body = synchronous.json()
    assert body["code"] == "lora_invalid" and "checkpoint 200 of model" in body["message"]
    assert str(server.service.settings.data_dir) not in synchronous.text  # no server path leaks
    status = api.get(f"{server.url}/v2/status/{body['request_id']}").json()
    assert status["status"] == "FAILED" and status["error"]["code"] == "lora_invalid" and status["result"] is None


def test_out_of_memory_ends_the_request_failed_and_the_worker_goes_on(server, api, fibo_dataset, monkeypatch):
    model_id = completed_model(server, api, fibo_dataset)

    def out_of_memory(self, lora, prompts, settings):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(LoraPipeline, "generate", out_of_memory)
    accepted = v2(server, api, fibo_body(model_id))
    assert accepted.status_code == 202
    ended = poll_generation(api, accepted.json()["status_url"])
    assert ended["status"] == "FAILED" and ended["error"]["code"] == "oom"
    assert "out of memory" in ended["error"]["message"]

    monkeypatch.setattr(LoraPipeline, "generate", _solid_images)  # the same worker serves the next request
    done = poll_generation(api, v2(server, api, fibo_body(model_id)).json()["status_url"])
    assert done["status"] == "COMPLETED"


def _solid_images(self, lora, prompts, settings):
    return [GeneratedImage(PILImage.new("RGB", (8, 8), (255, 0, 0)), prompts[0], settings.seed)]


def test_a_prompt_expander_turns_plain_text_into_the_structured_prompt(tmp_path, tiny_fibo_base, monkeypatch):
    calls = []

    class Expander:
        def expand(self, prompt, structured_prompt, seed, visual_schema=None):
            calls.append((prompt, structured_prompt, seed, visual_schema))
            return json.dumps({"short_description": prompt.upper()})

    rendered = []

    def record(self, lora, prompts, settings):
        rendered.append((lora, prompts))
        return _solid_images(self, lora, prompts, settings)
    monkeypatch.setattr(LoraPipeline, "generate", record)
    with ThreadServer(settings_for(tmp_path, tiny_fibo_base), SleepingBackend(), Expander()) as server, \
            client(server.url) as api:
        model_id = completed_model(server, api, completed_fibo_dataset(api))
        response = v2(server, api, {"tailored_model_id": model_id, "prompt": "a red circle", "seed": 7,
                                    "steps_num": 20, "sync": True})
        assert response.status_code == 200, response.text
        assert response.json()["structured_prompt"] == '{"short_description":"A RED CIRCLE"}'  # compact, as trained
        assert response.json()["seed"] == 7
    assert calls == [("a red circle", None, 7, None)]  # the dataset has no visual schema
    assert rendered[0][0].name == "checkpoint-200" and rendered[0][1] == ['{"short_description":"A RED CIRCLE"}']


def test_a_full_queue_is_429(tmp_path, tiny_fibo_base, monkeypatch):
    rendering, release = threading.Event(), threading.Event()

    def blocked(self, lora, prompts, settings):
        rendering.set()
        release.wait(60)
        return _solid_images(self, lora, prompts, settings)
    monkeypatch.setattr(LoraPipeline, "generate", blocked)
    settings = settings_for(tmp_path, tiny_fibo_base, generation_queue_size=1)
    with ThreadServer(settings, SleepingBackend()) as server, client(server.url) as api:
        model_id = completed_model(server, api, completed_fibo_dataset(api))
        first = v2(server, api, fibo_body(model_id))
        assert first.status_code == 202 and rendering.wait(60)
        # the worker holds the first; the second waits in the queue; the third does not fit
        waiting = v2(server, api, fibo_body(model_id))
        refused = v2(server, api, fibo_body(model_id))
        release.set()
        assert waiting.status_code == 202 and refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"] == "5"
        for accepted in (first, waiting):
            assert poll_generation(api, accepted.json()["status_url"])["status"] == "COMPLETED"


def test_a_request_the_server_never_finished_is_failed_at_start_up(tmp_path, tiny_fibo_base):
    settings = settings_for(tmp_path, tiny_fibo_base)
    with ThreadServer(settings, SleepingBackend()) as server, client(server.url) as api:
        model_id = completed_model(server, api, completed_fibo_dataset(api))
    # as if the server had died with this request queued: it is only in the database now
    request_id = uuid.uuid4().hex
    database = Database(settings.database_url)
    with database.transaction() as session:
        session.add(GenerationRequest(id=request_id, api="v2", owner=token_id(TOKEN), org=ORGANIZATION,
                                      model_id=model_id, checkpoint_step=200, family="fibo", prompt=STRUCTURED, settings={"seed": 1},
                                      host=socket.gethostname()))
    database.dispose()
    with ThreadServer(settings, SleepingBackend()) as restarted, client(restarted.url) as api:
        status = api.get(f"{restarted.url}/v2/status/{request_id}").json()
    assert status["status"] == "FAILED" and status["error"]["code"] == "server_restarted"
    assert "restarted" in status["error"]["message"]


def test_generation_counts_against_the_request_rate(tmp_path, tiny_fibo_base):
    settings = settings_for(tmp_path, tiny_fibo_base, rate_limit_per_minute=3)
    with ThreadServer(settings, SleepingBackend()) as server, client(server.url) as api:
        codes = [v2(server, api, fibo_body(999999)).status_code for _ in range(3)]
        refused = v1(server, api, "999999", {"prompt": "a fox"})
        status = api.get(f"{server.url}/v2/status/{uuid.uuid4().hex}")
    assert codes == [404] * 3 and refused.status_code == 429 and status.status_code == 429
    assert "Request limit exceeded" in refused.json()["message"]


# ---- sample files: only what a checkpoint's samples/ folder holds ---------------------------------


def test_the_sample_route_serves_only_png_files_inside_samples(server, api, fibo_dataset):
    model_id = completed_model(server, api, fibo_dataset)
    samples = server.service.runner.run_dir(model_id) / "checkpoint-100" / "samples"
    samples.mkdir()
    PILImage.new("RGB", (8, 8), (0, 0, 255)).save(samples / "00.png")
    (samples / "prompts.json").write_text(json.dumps([{"file": "00.png", "prompt": STRUCTURED, "seed": 0},
                                                      {"file": "../pytorch_lora_weights.safetensors"}]))
    (samples / "evil.png").symlink_to(samples.parent / "pytorch_lora_weights.safetensors")
    listed = api.get(f"/models/{model_id}/checkpoints/100").json()
    assert [s["seed"] for s in listed["samples"]] == [0] and listed["samples_grid_url"] is None
    assert httpx.get(listed["samples"][0]["image_url"]).content == (samples / "00.png").read_bytes()

    def signed(name: str) -> httpx.Response:  # links as the service would sign them, for names it never lists
        path = f"/tailored-gen/files/models/{model_id}/checkpoints/100/samples/{name}"
        expires, signature = server.service.signer.sign(path, 60, ORGANIZATION)
        return httpx.get(f"{server.url}{path}", params={"expires": expires, "signature": signature})
    assert signed("00.png").status_code == 200  # control: a signed link to a real sample works
    assert signed("evil.png").status_code == 404  # a symlink out of samples/
    assert signed("prompts.json").status_code == 400  # not a PNG name
    assert signed("..%2Fpytorch_lora_weights.safetensors").status_code in (400, 404)
    assert signed("missing.png").status_code == 404
