"""Bria's captioning endpoints over real HTTP on the tiny random Qwen3-VL (`serve --vlm`): uploads to a
dataset with a visual schema are captioned by the captioning worker, Regenerate All Captions runs to
completed, a dataset completes only once no caption is pending and then trains; visual schemas from
base64 and URL images, caption prefixes, refined prompts, plain-text FIBO prompts, the failure and
restart paths, and every error a client can cause."""

from __future__ import annotations

import base64
import http.server
import io
import json
import socket
import threading
from contextlib import contextmanager

import pytest
from PIL import Image as PILImage

from console_helpers import Console
from service_helpers import (OTHER_TOKEN, TOKEN, ThreadServer, client, completed_fibo_dataset,
                             engine_yaml, sample_rows, settings_for, wait_for_status, wait_until)
from tailoredgen_train.captioning.prefix import common_caption_prefix
from tailoredgen_train.data import SAMPLE_DATASET_DIR, SAMPLE_TEXT_CAPTION_PREFIX
from tailoredgen_train.data.caption_format import unknown_fields
from tailoredgen_train.errors import InvalidParameterError
from tailoredgen_train.fixtures.tiny_vlm import TINY_MAX_PIXELS
from tailoredgen_train.service.captioning import normalize_visual_schema
from tailoredgen_train.service.captions import read_images
from tailoredgen_train.service.db import Database, Image
from tailoredgen_train.service.datasets import UnsupportedImageError

SCHEMA = {"style_medium": "digital illustration", "lighting": {"conditions": "flat studio light"}}
VLM_SETTINGS = {"vlm_string_tokens": 3, "vlm_max_pixels": TINY_MAX_PIXELS // 4}  # short captions, small images


def vlm_settings(tmp, tiny_fibo_base, legacy_bases, tiny_vlm, **extra):
    bases = {"fibo": str(tiny_fibo_base), "bria-3.2": str(legacy_bases["bria-3.2"])}
    engine = str(engine_yaml(tmp))  # 64 px images for both families
    return settings_for(tmp, tiny_fibo_base, bases=bases, engine_configs={"fibo": engine, "bria-3.2": engine},
                        vlm=str(tiny_vlm), **VLM_SETTINGS, **extra)


# the tiny VLM: one intra-op thread is faster; on SQLite and again on PostgreSQL
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.both_databases]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_fibo_base, legacy_bases, tiny_vlm, service_database):
    with ThreadServer(vlm_settings(tmp_path_factory.mktemp("captioning"), tiny_fibo_base, legacy_bases,
                                   tiny_vlm)) as running:
        yield running


@pytest.fixture(scope="module")
def api(server):
    with client(server.url) as c:
        yield c


@contextmanager
def held(server):
    """The captioning worker busy with a task of ours, so that what waits for it can be observed."""
    running, release = threading.Event(), threading.Event()

    def hold(captioner):
        running.set()
        release.wait(120)
    done = server.service.captioning.submit(hold)
    assert running.wait(120), "the captioning worker did not pick up the holding task"
    try:
        yield
    finally:
        release.set()
        done.result(timeout=120)


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def sample_paths(count: int = 5) -> list:
    return [SAMPLE_DATASET_DIR / row["file_name"] for row in sample_rows()[:count]]


def new_dataset(api, training_version: str = "fibo", **fields) -> int:
    project = api.post("/projects", json={"project_name": "p", "ip_medium": "illustration",
                                          "ip_type": "stylized_scene"}).json()
    created = api.post("/datasets", json={"project_id": project["id"], "name": "d",
                                          "training_version": training_version, **fields})
    assert created.status_code == 201, created.text
    return created.json()["id"]


def upload(api, dataset_id: int, path) -> dict:
    response = api.post(f"/datasets/{dataset_id}/images", files={"file": (path.name, path.read_bytes())})
    assert response.status_code == 201, response.text
    return response.json()


def captions_settled(api, dataset_id: int) -> dict:
    def settled():
        body = api.get(f"/datasets/{dataset_id}").json()
        return body if body["captions_update_status"] != "in_progress" else None
    return wait_until(settled, 300, f"the captions of dataset {dataset_id}", interval=0.2)


# ---- the acceptance run: schema -> automatic captions -> regenerate -> complete -> train -> generate ----------


@pytest.mark.slow
def test_a_dataset_with_a_visual_schema_is_captioned_completed_trained_and_prompted(server, api):
    dataset_id = new_dataset(api, visual_schema=json.dumps(SCHEMA, indent=2))
    created = api.get(f"/datasets/{dataset_id}").json()
    assert created["visual_schema"] == json.dumps(SCHEMA, separators=(",", ":"))  # stored compact
    assert created["captions_update_status"] == "empty"

    with held(server):
        uploads = [upload(api, dataset_id, path) for path in sample_paths()]
        assert all(u["caption_source"] == "pending" and u["caption"] is None for u in uploads)
        assert api.get(f"/datasets/{dataset_id}").json()["captions_update_status"] == "in_progress"
        refused = api.put(f"/datasets/{dataset_id}", json={"status": "completed"})
        assert refused.status_code == 409 and "5 caption(s) are still pending" in refused.json()["message"]
    dataset = captions_settled(api, dataset_id)
    assert dataset["captions_update_status"] == "completed"
    first = {}
    for image in dataset["images"]:
        assert image["caption_source"] == "automatic" and image["caption_error"] is None
        caption = json.loads(image["caption"])
        assert unknown_fields(caption) == [] and caption["style_medium"] == "digital illustration"
        assert caption["lighting"]["conditions"] == "flat studio light"  # the schema's values, in every caption
        first[image["id"]] = image["caption"]

    with held(server):
        regenerating = api.put(f"/datasets/{dataset_id}/images")
        assert regenerating.status_code == 202, regenerating.text
        assert regenerating.json()["captions_update_status"] == "in_progress"
        assert {i["caption_source"] for i in api.get(f"/datasets/{dataset_id}/images").json()} == {"pending"}
    dataset = captions_settled(api, dataset_id)
    assert dataset["captions_update_status"] == "completed"
    assert all(i["caption_source"] == "automatic" for i in dataset["images"])
    assert {i["id"]: i["caption"] for i in dataset["images"]} != first  # regenerated: new draws

    assert api.put(f"/datasets/{dataset_id}", json={"status": "completed"}).json()["status"] == "completed"
    model = api.post("/models", json={"name": "m", "dataset_id": dataset_id, "training_mode": "expert"}).json()
    started = api.post(f"/models/{model['id']}/start_training",
                       json={"total_training_steps": 10, "rank": 4})  # one checkpoint, the final
    assert started.status_code == 200, started.text
    assert wait_for_status(api, model["id"], {"Completed", "Failed"}, timeout=900)["status"] == "Completed"

    # a plain-text prompt: the same VLM writes the structured prompt, keeping the dataset's visual schema
    body = {"tailored_model_id": str(model["id"]), "prompt": "a red circle", "seed": 3, "steps_num": 20,
            "sync": True}
    generated = api.post(f"{server.url}/v2/image/generate/tailored", json=body)
    assert generated.status_code == 200, generated.text
    structured = json.loads(generated.json()["structured_prompt"])
    assert structured["style_medium"] == "digital illustration" and unknown_fields(structured) == []
    with client(server.url, OTHER_TOKEN) as other:  # another organization's model: refused, nothing expanded
        assert other.post(f"{server.url}/v2/image/generate/tailored", json=body).status_code == 403


def test_the_console_regenerates_captions_through_the_worker(server, api):
    dataset_id = new_dataset(api)
    with Console(server.url) as console:
        console.sign_in(TOKEN)
        saved = console.post(f"/console/datasets/{dataset_id}/visual-schema", {"visual_schema": json.dumps(SCHEMA)})
        assert saved.status_code == 303
        with held(server):
            image = upload(api, dataset_id, sample_paths(1)[0])  # a visual schema: captioned as it arrives
            page = console.get(f"/console/datasets/{dataset_id}").text
            assert "data-captions-pending" in page and "caption pending" in page
        settled = captions_settled(api, dataset_id)
        assert settled["images"][0]["caption_source"] == "automatic"
        page = console.get(f"/console/datasets/{dataset_id}").text
        assert "data-captions-pending" not in page and "caption automatic" in page
        assert "Regenerate caption" in page and "Regenerate all captions" in page
        first = settled["images"][0]["caption"]
        with held(server):
            assert console.post(f"/console/datasets/{dataset_id}/captions/regenerate").status_code == 303
            assert api.get(f"/datasets/{dataset_id}").json()["captions_update_status"] == "in_progress"
        again = captions_settled(api, dataset_id)["images"][0]
        assert again["caption_source"] == "automatic" and again["caption"] != first
        assert json.loads(again["caption"])["style_medium"] == SCHEMA["style_medium"]
        with held(server):
            one = console.post(f"/console/datasets/{dataset_id}/images/{image['id']}/regenerate")
            assert one.status_code == 303
            assert api.get(f"/datasets/{dataset_id}/images/{image['id']}").json()["caption_source"] == "pending"
        assert captions_settled(api, dataset_id)["images"][0]["caption_source"] == "automatic"


# ---- one image at a time, legacy captions, failures ------------------------------------------------------


def test_regenerate_caption_queues_one_image_and_a_manual_caption_wins(server, api):
    dataset_id = new_dataset(api)  # no visual schema: uploads are not captioned (as Bria)
    image = upload(api, dataset_id, sample_paths(1)[0])
    assert image["caption_source"] is None and image["caption"] is None
    assert api.get(f"/datasets/{dataset_id}").json()["captions_update_status"] == "empty"
    path = f"/datasets/{dataset_id}/images/{image['id']}"
    with held(server):
        queued = api.put(path, json={"regenerate_caption": True})
        assert queued.status_code == 200 and queued.json()["caption_source"] == "pending"
        # a caption by hand while the worker is busy: the queued request is superseded
        manual = api.put(path, json={"caption": '{"short_description": "mine"}'}).json()
        assert manual["caption_source"] == "manual"
    kept = api.get(path).json()
    assert kept["caption_source"] == "manual" and kept["caption"] == '{"short_description":"mine"}'
    again = api.put(path, json={"regenerate_caption": True})
    assert again.json()["caption_source"] == "pending"
    done = wait_until(lambda: (b := api.get(path).json())["caption_source"] != "pending" and b, 120, "the caption")
    assert done["caption_source"] == "automatic" and "short_description" in json.loads(done["caption"])
    assert json.loads(done["caption"]).get("style_medium") != SCHEMA["style_medium"]  # without a schema, free
    assert api.put(path, json={"regenerate_caption": False}).status_code == 400


def test_legacy_uploads_get_text_captions_that_continue_the_prefix(api):
    dataset_id = new_dataset(api, "max", caption_prefix=SAMPLE_TEXT_CAPTION_PREFIX)
    image = upload(api, dataset_id, sample_paths(1)[0])
    assert image["caption_source"] == "pending"
    dataset = captions_settled(api, dataset_id)
    caption = dataset["images"][0]
    assert caption["caption_source"] == "automatic" and caption["caption"]
    assert not caption["caption"].startswith("{")  # plain text, stored without the prefix
    assert api.put(f"/datasets/{dataset_id}", json={"status": "completed"}).status_code == 200


def test_a_caption_that_fails_leaves_no_caption_and_says_why(server, api):
    captioner = server.service.captioning.submit(lambda c: c).result(timeout=120)
    dataset_id = new_dataset(api, visual_schema=json.dumps(SCHEMA))
    server.service.captioning.submit(lambda c: setattr(c, "max_new_tokens", 20)).result(timeout=120)
    try:  # a token budget below any caption: every attempt runs out, the retry too
        image = upload(api, dataset_id, sample_paths(1)[0])
        settled = captions_settled(api, dataset_id)
    finally:
        captioner.max_new_tokens = None
    failed = settled["images"][0]
    assert settled["captions_update_status"] == "completed"  # settled, so that a poll for completed ends
    assert settled["images_count"] == 1 and [i["caption_source"] for i in settled["images"]] == ["failed"]
    assert failed["id"] == image["id"] and failed["caption_source"] == "failed" and failed["caption"] is None
    assert failed["caption_error"]["code"] == "caption_failed"
    assert "token budget (20) ran out" in failed["caption_error"]["message"]
    for path in sample_paths()[1:]:
        api.post(f"/datasets/{dataset_id}/images", files={"file": (path.name, path.read_bytes())},
                 data={"caption": '{"short_description": "a shape"}'})
    refused = api.put(f"/datasets/{dataset_id}", json={"status": "completed"})
    assert refused.status_code == 409 and f"images [{image['id']}] have no caption" in refused.json()["message"]
    api.put(f"/datasets/{dataset_id}/images/{image['id']}", json={"regenerate_caption": True})  # the budget is back
    assert captions_settled(api, dataset_id)["images"][0]["caption_source"] == "automatic"
    assert api.put(f"/datasets/{dataset_id}", json={"status": "completed"}).status_code == 200


def test_captions_of_a_completed_dataset_cannot_be_regenerated(api):
    dataset_id = completed_fibo_dataset(api)
    image_id = api.get(f"/datasets/{dataset_id}/images").json()[0]["id"]
    one = api.put(f"/datasets/{dataset_id}/images/{image_id}", json={"regenerate_caption": True})
    every = api.put(f"/datasets/{dataset_id}/images")
    assert one.status_code == every.status_code == 409 and "completed dataset" in one.json()["message"]
    schema = api.put(f"/datasets/{dataset_id}", json={"visual_schema": json.dumps(SCHEMA)})
    assert schema.status_code == 409
    assert api.put("/datasets/999999/images").status_code == 404


# ---- visual schemas --------------------------------------------------------------------------------------


class ImageHost:
    """A local HTTP server with the sample images at /<name>, a large file and a 404."""

    def __init__(self):
        files = {f"/{p.name}": p.read_bytes() for p in sample_paths()}
        files["/large.png"] = b"\0" * (10 * 2**20 + 1)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def image_host():
    host = ImageHost()
    yield host
    host.httpd.shutdown()


def test_a_visual_schema_from_base64_or_url_images_can_be_set_on_a_dataset(api, image_host):
    by_value = api.post("/generate_visual_schema", json={"images": [b64(p) for p in sample_paths()]})
    assert by_value.status_code == 200, by_value.text
    urls = [f"{image_host.url}/{p.name}" for p in sample_paths()]
    data_uri = f"data:image/png;base64,{b64(sample_paths()[0])}"
    by_url = api.post("/generate_visual_schema", json={"images": urls[1:] + [data_uri], "content_moderation": True})
    assert by_url.status_code == 200, by_url.text
    for answer in (by_value, by_url):
        schema = answer.json()["visual_schema"]
        assert isinstance(json.loads(schema), dict) and unknown_fields(json.loads(schema)) == []
        dataset_id = new_dataset(api)
        assert api.put(f"/datasets/{dataset_id}", json={"visual_schema": schema}).json()["visual_schema"] == schema


@pytest.mark.parametrize("images, status, field", [
    (4, 400, "images"), (11, 400, "images"),
    (["not base64 !"], 400, "images.0"), (["ftp://example.com/a.png"], 400, "images.0"),
    (["file:///etc/passwd"], 400, "images.0"), (["data:image/png,abc"], 400, "images.0"),
    ([base64.b64encode(b"not an image").decode()], 415, None),
    (["{host}/missing.png"], 400, "images.0"), (["{host}/large.png"], 413, None),
    (["http://127.0.0.1:{closed}/a.png"], 400, "images.0"),
])
def test_bad_visual_schema_requests(api, image_host, images, status, field):
    if isinstance(images, int):
        images = [b64(sample_paths(1)[0])] * images
    else:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        images = [v.format(host=image_host.url, closed=closed) for v in images] + [b64(p) for p in sample_paths(4)]
    response = api.post("/generate_visual_schema", json={"images": images})
    assert response.status_code == status, response.text
    if field:
        assert response.json()["errors"][0]["field_name"] == field
    else:
        assert "message" in response.json()


@pytest.mark.parametrize("schema, field_message", [
    ('{"lightning": {"conditions": "dim"}}', "lightning"), ('"a string"', "JSON object"),
    ('{"objects": [{"description": "a cat"}]}', "objects"), ("{not json", "JSON object"),
])
def test_a_visual_schema_is_validated_where_it_is_set(api, schema, field_message):
    project = api.post("/projects", json={"project_name": "p", "ip_medium": "illustration", "ip_type": "other"}).json()
    response = api.post("/datasets", json={"project_id": project["id"], "name": "d", "training_version": "fibo",
                                           "visual_schema": schema})
    assert response.status_code == 400 and response.json()["errors"][0]["field_name"] == "visual_schema"
    assert field_message in response.json()["errors"][0]["msg"]
    valid = api.post("/datasets", json={"project_id": project["id"], "name": "d", "training_version": "fibo",
                                        "visual_schema": json.dumps(SCHEMA)})
    assert valid.status_code == 201  # control: a valid schema is taken


def test_a_legacy_dataset_takes_no_visual_schema(api):
    dataset_id = new_dataset(api, "3.2")
    response = api.put(f"/datasets/{dataset_id}", json={"visual_schema": json.dumps(SCHEMA)})
    assert response.status_code == 400 and response.json()["errors"][0]["field_name"] == "visual_schema"


# ---- refine and caption prefixes ----------------------------------------------------------------------------


def test_refine_structured_prompt_on_a_draft_fibo_dataset(api):
    dataset_id = new_dataset(api)
    body = {"dataset_id": dataset_id, "structured_prompt": json.dumps(SCHEMA), "instruction": "make it night"}
    refined = api.post("/refine_structured_prompt", json=body)
    assert refined.status_code == 200, refined.text
    value = refined.json()["structured_prompt"]
    assert value == json.dumps(json.loads(value), separators=(",", ":")) and unknown_fields(json.loads(value)) == []

    bad_json = api.post("/refine_structured_prompt", json={**body, "structured_prompt": "a cat"})
    assert bad_json.status_code == 400 and bad_json.json()["errors"][0]["field_name"] == "structured_prompt"
    blank = api.post("/refine_structured_prompt", json={**body, "instruction": "   "})
    assert blank.status_code == 400 and blank.json()["errors"][0]["field_name"] == "instruction"
    completed = api.post("/refine_structured_prompt", json={**body, "dataset_id": completed_fibo_dataset(api)})
    assert completed.status_code == 400 and "draft datasets only" in completed.json()["message"]
    legacy = api.post("/refine_structured_prompt", json={**body, "dataset_id": new_dataset(api, "max")})
    assert legacy.status_code == 400 and "legacy" in legacy.json()["message"]
    assert api.post("/refine_structured_prompt", json={**body, "dataset_id": 999999}).status_code == 404


def test_generate_prefix_for_a_legacy_dataset(api, image_host):
    dataset_id = new_dataset(api, "3.2")
    body = {"images": [b64(p) for p in sample_paths(3)], "ip_medium": "illustration", "dataset_id": dataset_id}
    answer = api.post("/generate_prefix", json=body)
    assert answer.status_code == 200, answer.text
    # the tiny VLM's captions share no opening words, so the medium's prefix stands
    assert answer.json()["prefix"] == "An illustration of"
    named = api.post("/generate_prefix", json={"image_urls": [f"{image_host.url}/{sample_paths(1)[0].name}"],
                                               "ip_type": "defined_character", "ip_name": "Lucy",
                                               "ip_medium": "photography"})
    assert named.status_code == 200 and named.json()["prefix"] == "A photograph of Lucy"
    assert api.put(f"/datasets/{dataset_id}", json={"caption_prefix": answer.json()["prefix"]}).status_code == 200

    fibo = api.post("/generate_prefix", json={**body, "dataset_id": new_dataset(api)})
    assert fibo.status_code == 400 and fibo.json()["errors"][0]["field_name"] == "dataset_id"
    for wrong in ({"images": []}, {"images": [body["images"][0]] * 7}, {},
                  {"images": body["images"], "image_urls": [f"{image_host.url}/x.png"]},
                  {"image_urls": [body["images"][0]]}):
        assert api.post("/generate_prefix", json=wrong).status_code == 400, wrong


def test_the_prefix_rule():
    shared = ["A flat vector illustration of a red fox", "a flat vector illustration of two owls."]
    assert common_caption_prefix(shared) == "A flat vector illustration of"
    assert common_caption_prefix(["A close-up shot of a cup of coffee"]) == "A close-up shot of"
    assert common_caption_prefix(["A red fox", "A blue owl"], ip_medium="photography") == "A photograph of"
    assert common_caption_prefix(["Of mice and men", "Of mice and cats"]) == "An image of"  # "of" needs a word
    nine = "one two three four five six seven eight of it"
    assert common_caption_prefix([nine]) == "An image of"  # the "of" comes too late
    assert common_caption_prefix(shared, ip_name="Lucy") == "A flat vector illustration of Lucy"


# ---- helpers that need no server -------------------------------------------------------------------------


def test_read_images_takes_base64_data_uris_and_refuses_other_schemes():
    png = io.BytesIO()
    PILImage.new("RGB", (4000, 1000), (255, 0, 0)).save(png, "PNG")
    encoded = base64.b64encode(png.getvalue()).decode()
    pictures = read_images([encoded, f"data:image/png;base64,{encoded}"], "images")
    assert [p.size for p in pictures] == [(2048, 512)] * 2  # shrunk for the VLM, aspect kept
    for bad in ("gopher://x", "not base64!", "data:image/png,abc"):
        with pytest.raises(InvalidParameterError) as error:
            read_images([encoded, bad], "images")
        assert error.value.errors[0].field_name == "images.1"
    with pytest.raises(UnsupportedImageError):
        read_images([base64.b64encode(b"GIF89a").decode()], "images")


def test_normalize_visual_schema():
    assert normalize_visual_schema(' { "style_medium" : "photograph" } ') == '{"style_medium":"photograph"}'
    with pytest.raises(InvalidParameterError, match="aesthetic_score must be one of"):
        normalize_visual_schema('{"aesthetics": {"aesthetic_score": "great"}}')


# ---- without a captioning model, and across restarts ---------------------------------------------------------


def test_without_a_captioning_model_every_captioning_endpoint_says_how_to_enable_one(tmp_path, tiny_fibo_base):
    with ThreadServer(settings_for(tmp_path, tiny_fibo_base)) as server, client(server.url) as api:
        dataset_id = new_dataset(api, visual_schema=json.dumps(SCHEMA))
        image = upload(api, dataset_id, sample_paths(1)[0])
        assert image["caption_source"] is None  # a schema, but nothing to caption with: no caption is coming
        images = [b64(p) for p in sample_paths()]
        responses = [
            api.put(f"/datasets/{dataset_id}/images"),
            api.put(f"/datasets/{dataset_id}/images/{image['id']}", json={"regenerate_caption": True}),
            api.post("/generate_visual_schema", json={"images": images}),
            api.post("/refine_structured_prompt", json={"dataset_id": dataset_id, "structured_prompt": "{}",
                                                        "instruction": "x"}),
            api.post("/generate_prefix", json={"images": images[:1]}),
        ]
        for response in responses:
            assert response.status_code == 400, response.text
            assert "serve --vlm" in response.json()["message"] and "errors" not in response.json()
        assert api.get(f"/datasets/{dataset_id}").json()["captions_update_status"] == "empty"


def test_pending_captions_survive_a_restart(tmp_path, tiny_fibo_base, legacy_bases, tiny_vlm):
    settings = vlm_settings(tmp_path, tiny_fibo_base, legacy_bases, tiny_vlm)
    with ThreadServer(settings) as server, client(server.url) as api:
        dataset_id = new_dataset(api, visual_schema=json.dumps(SCHEMA))
        with held(server):
            ours, theirs = (upload(api, dataset_id, p)["id"] for p in sample_paths(2))
            # as if a server had died while captioning them: claimed by a worker on this host, and on another
            with server.service.db.transaction() as session:
                session.get(Image, ours).caption_worker = socket.gethostname()
                session.get(Image, theirs).caption_worker = "another-host"
        assert api.get(f"/datasets/{dataset_id}/images/{ours}").json()["caption_source"] == "pending"

    with ThreadServer(settings) as server, client(server.url) as api:  # this host's claims are released
        done = wait_until(lambda: (b := api.get(f"/datasets/{dataset_id}/images/{ours}").json())["caption_source"]
                          != "pending" and b, 120, "the released image's caption")
        assert done["caption_source"] == "automatic"
        assert api.get(f"/datasets/{dataset_id}/images/{theirs}").json()["caption_source"] == "pending"

    without_vlm = settings_for(tmp_path, tiny_fibo_base, bases=settings.bases)
    with ThreadServer(without_vlm) as server, client(server.url) as api:  # nothing to caption with: failed, with the fix
        image = api.get(f"/datasets/{dataset_id}/images/{theirs}").json()
        assert image["caption_source"] == "failed" and image["caption"] is None
        assert image["caption_error"]["code"] == "captioning_unavailable"
        assert "--vlm" in image["caption_error"]["message"]
    database = Database(settings.database_url)  # the first caption was kept through it all
    with database.transaction() as session:
        assert session.get(Image, ours).caption_source == "automatic"
    database.dispose()


def test_a_vlm_folder_that_does_not_exist_fails_at_start_up(tmp_path, tiny_fibo_base):
    from tailoredgen_train.errors import VlmInvalidError
    from tailoredgen_train.service.app import create_app

    with pytest.raises(VlmInvalidError, match="does not exist"):
        create_app(settings_for(tmp_path, tiny_fibo_base, vlm=str(tmp_path / "no-such-vlm")))


def test_a_caption_set_by_hand_while_the_worker_captions_it_is_kept(tmp_path, tiny_fibo_base, tiny_vlm):
    from tailoredgen_train.service.captioning import CaptioningWorker, set_manual_caption
    from tailoredgen_train.service.db import Dataset, Project

    settings = settings_for(tmp_path, tiny_fibo_base, vlm=str(tiny_vlm))
    settings.data_dir.mkdir()
    database = Database(settings.database_url)
    worker = CaptioningWorker(database, settings, lambda dataset_id: tmp_path)  # its thread is never started
    with database.transaction() as session:
        project = Project(project_name="p", ip_medium="illustration", ip_type="other", org="o")
        session.add(project)
        session.flush()
        dataset = Dataset(project_id=project.id, org="o", name="d", training_version="fibo")
        session.add(dataset)
        session.flush()
        images = [Image(dataset_id=dataset.id, image_name=n, file_name=n, caption_source="pending", width=64,
                        height=64) for n in ("a.png", "b.png")]
        session.add_all(images)
    batch = worker._claim()
    assert [c.image_id for c in batch.images] == [i.id for i in images] and worker._claim() is None  # claimed once
    with database.transaction() as session:  # the user's caption arrives while the VLM works
        set_manual_caption(session.get(Image, images[0].id), '{"short_description":"mine"}')
    worker._store({claimed: ('{"short_description":"vlm"}', None, None) for claimed in batch.images})
    with database.transaction() as session:
        mine, other = (session.get(Image, i.id) for i in images)
        assert (mine.caption, mine.caption_source) == ('{"short_description":"mine"}', "manual")
        assert (other.caption, other.caption_source) == ('{"short_description":"vlm"}', "automatic")  # control
        assert mine.caption_worker is None and other.caption_worker is None
    database.dispose()
