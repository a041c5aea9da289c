"""The web console over real HTTP, without a browser (test_console_browser.py drives one): sign-in
and its cookies, CSRF refusal, every form refusing what the API refuses with the API's status and
message, escaping, and thumbnails made once."""

from __future__ import annotations

import io
import json
import re

import httpx
import pytest
from PIL import Image as PILImage

from console_helpers import Console, shown, text_of
from service_helpers import (COLLEAGUE_TOKEN, OTHER_TOKEN, TOKEN, SleepingBackend, ThreadServer, client,
                             completed_fibo_dataset, create_model, sample_rows, settings_for, upload_sample)
from tailoredgen_train.data import SAMPLE_DATASET_DIR
from test_service_generation import completed_model, fibo_body, v2

pytestmark = pytest.mark.both_databases  # on SQLite and again on PostgreSQL


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_fibo_base, service_database):
    tmp = tmp_path_factory.mktemp("console")
    backend = SleepingBackend()
    with ThreadServer(settings_for(tmp, tiny_fibo_base), backend) as running:
        yield running
    backend.kill_all()


@pytest.fixture(scope="module")
def api(server):
    with client(server.url) as c:
        yield c


@pytest.fixture()
def console(server):
    with Console(server.url) as c:
        c.sign_in(TOKEN)
        yield c


def _png(width: int, height: int, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def _draft(api, **extra) -> int:
    project = api.post("/projects", json={"project_name": "p", "ip_medium": "illustration", "ip_type": "other"})
    dataset = api.post("/datasets", json={"project_id": project.json()["id"], "name": "d", "training_version": "fibo",
                                          **extra})
    assert dataset.status_code == 201, dataset.text
    return dataset.json()["id"]


def _api_message(response: httpx.Response) -> str:
    body = response.json()
    return body["errors"][0]["msg"] if "errors" in body else body["message"]


# ---- signing in ------------------------------------------------------------------------------------


def test_pages_send_a_signed_out_visitor_to_sign_in(server):
    with Console(server.url) as visitor:
        for path in ("/console/projects", "/console/models/1", "/console/generate"):
            response = visitor.get(path)
            assert response.status_code == 303 and response.headers["location"].startswith("/console/sign-in?next=")
        # a form posted without signing in is not even read: back to the sign-in page
        posted = visitor.post("/console/projects", {"project_name": "x"}, csrf=False)
        assert posted.status_code == 303 and posted.headers["location"] == "/console/sign-in"


def test_sign_in_keeps_the_token_in_an_http_only_same_site_cookie(server):
    with Console(server.url) as browser:
        page = browser.get("/console/sign-in")
        assert page.status_code == 200 and "tg_console_sid" in page.headers["set-cookie"]
        wrong = browser.post("/console/sign-in", {"api_token": "not-a-token-at-all"})
        assert wrong.status_code == 401 and "this API token is not valid" in text_of(wrong)
        response = browser.sign_in(TOKEN)
        cookies = response.headers.get_list("set-cookie")
        token_cookie = next(c for c in cookies if c.startswith("tg_console_token="))
        assert TOKEN in token_cookie
        for cookie in cookies:  # both cookies: HttpOnly, SameSite=Strict, only under /console, not Secure on http
            flags = [f.strip().lower() for f in cookie.split(";")]
            assert "httponly" in flags and "samesite=strict" in flags and "path=/console" in flags
            assert "secure" not in flags
        assert response.headers["location"] == "/console/projects"
        assert browser.get("/console/projects").status_code == 200
        signed_out = browser.post("/console/sign-out")
        assert signed_out.status_code == 303
        assert browser.get("/console/projects").status_code == 303


def test_the_cookies_are_secure_over_https(server):
    with Console(server.url) as browser:
        browser.http.headers["X-Forwarded-Proto"] = "https"  # uvicorn trusts it from 127.0.0.1, as behind a proxy
        page = browser.get("/console/sign-in")
        csrf = re.search(r'name="csrf_token" value="(\w+)"', page.text).group(1)
        # httpx keeps Secure cookies for https URLs only: send the session cookie by hand
        sid = re.search(r"tg_console_sid=(\w+)", page.headers["set-cookie"]).group(1)
        response = browser.http.post("/console/sign-in", data={"csrf_token": csrf, "api_token": TOKEN},
                                     headers={"Cookie": f"tg_console_sid={sid}"})
        assert response.status_code == 303
        assert all("; secure" in c.lower() for c in response.headers.get_list("set-cookie"))


def test_a_form_without_its_csrf_token_is_refused(server, api, console):
    before = len(api.get("/projects").json())
    fields = {"project_name": "forged", "ip_medium": "illustration", "ip_type": "other"}
    missing = console.post("/console/projects", fields, csrf=False)
    assert missing.status_code == 403 and "CSRF token" in text_of(missing)
    with Console(server.url) as other:  # a token that belongs to another session
        other.sign_in(TOKEN)
        stolen = other.csrf()
    assert console.post("/console/projects", {**fields, "csrf_token": stolen}).status_code == 403
    assert console.post("/console/projects", {**fields, "csrf_token": "0" * 64}).status_code == 403
    assert len(api.get("/projects").json()) == before
    # negative control: the same form with this session's token is accepted
    accepted = console.post("/console/projects", fields)
    assert accepted.status_code == 303 and len(api.get("/projects").json()) == before + 1


def test_pages_carry_a_content_security_policy_and_escape_user_text(console, api):
    project = api.post("/projects", json={"project_name": "<script>alert(1)</script>", "ip_medium": "illustration",
                                          "ip_type": "other"}).json()
    page = console.get(f"/console/projects/{project['id']}")
    assert page.status_code == 200
    assert "<script>alert(1)</script>" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    assert re.search(r"<script[^>]*>", page.text).group(0) == '<script src="/console/static/console.js" defer>'


def test_the_static_assets_are_served_locally(console):
    for asset in ("console.css", "console.js"):
        response = console.get(f"/console/static/{asset}")
        assert response.status_code == 200 and len(response.content) > 1000
    page = console.get("/console/projects")
    assert not re.search(r'(src|href)="(https?:)?//', page.text)  # nothing from another host


# ---- forms refuse what the API refuses, with its message ---------------------------------------------


def _same_refusal(api_response: httpx.Response, console_response: httpx.Response) -> None:
    assert api_response.status_code >= 400, api_response.text
    assert console_response.status_code == api_response.status_code, text_of(console_response)[:2000]
    message = _api_message(api_response)
    assert shown(message, console_response), (message, text_of(console_response)[:3000])


PROJECT = {"project_name": "shapes", "ip_medium": "illustration", "ip_type": "other"}


@pytest.mark.parametrize("fields", [
    {**PROJECT, "ip_type": "defined_character"},                      # needs ip_name
    {**PROJECT, "ip_type": "object_variants", "ip_name": "x"},        # needs ip_description
    {**PROJECT, "ip_medium": "photography", "ip_type": "icons"},       # icons are illustrations
    {"ip_medium": "illustration", "ip_type": "other"},                 # no name: the schema's own message
    {**PROJECT, "ip_medium": "watercolour"},
])
def test_the_project_form_refuses_what_the_api_refuses(api, console, fields):
    _same_refusal(api.post("/projects", json=fields), console.post("/console/projects", fields))


@pytest.mark.parametrize("fields", [
    {"name": "d", "training_version": "fibo", "caption_prefix": "A photo of"},   # FIBO takes no prefix
    {"name": "d", "training_version": "max"},                                    # not served here
    {"name": "", "training_version": "fibo"},                                    # no name
    {"name": "d", "training_version": "fibo", "project_id": 999999},             # no such project
])
def test_the_dataset_form_refuses_what_the_api_refuses(api, console, fields):
    project_id = api.post("/projects", json=PROJECT).json()["id"]
    fields = {"project_id": project_id, **fields}
    api_fields = {k: v for k, v in fields.items() if v != ""}  # an empty input is an omitted field
    _same_refusal(api.post("/datasets", json=api_fields), console.post("/console/datasets", fields))


def test_uploads_report_each_file_with_the_api_s_reason(api, console):
    dataset_id = _draft(api)
    files = [("files", ("good.png", _png(96, 96), "image/png")),
             ("files", ("small.png", _png(32, 32), "image/png")),
             ("files", ("notes.txt", b"not an image at all", "text/plain"))]
    page = console.post(f"/console/datasets/{dataset_id}/images", files=files)
    assert page.status_code == 200  # one file went in
    results = re.findall(r'<li class="(ok|refused)" data-code="(\w+)"', page.text)
    assert results == [("ok", "ok"), ("refused", "resolution_too_low"), ("refused", "unsupported_image")]
    for name, data in (("small.png", _png(32, 32)), ("notes.txt", b"not an image at all")):
        assert shown(_api_message(api.post(f"/datasets/{dataset_id}/images", files={"file": (name, data)})), page)
    images = api.get(f"/datasets/{dataset_id}/images").json()
    assert [i["image_name"] for i in images] == ["good.png"] and images[0]["caption_source"] is None  # no VLM here
    # every file refused: the page answers with the API's status
    refused = console.post(f"/console/datasets/{dataset_id}/images",
                           files=[("files", ("small.png", _png(32, 32), "image/png"))])
    assert refused.status_code == 412
    nothing = console.post(f"/console/datasets/{dataset_id}/images", files=[("files", ("", b"", "image/png"))])
    assert nothing.status_code == 400 and "Choose one or more images" in text_of(nothing)


def test_the_caption_editor_refuses_what_the_api_refuses_and_saves_compact_json(api, console):
    dataset_id = _draft(api)
    image = upload_sample(api, dataset_id, sample_rows()[0]).json()
    path = f"/datasets/{dataset_id}/images/{image['id']}"
    for bad in ('{"short_description": "a red circle",}', '["a list"]', ""):
        page = console.post(f"/console{path}/caption", {"caption": bad})
        _same_refusal(api.put(path, json={"caption": bad}), page)
        assert 'aria-invalid="true"' in page.text and bad in text_of(page)  # the text as typed stays in the editor
    pretty = json.dumps({"short_description": "a red circle", "style_medium": "flat illustration"}, indent=2)
    saved = console.post(f"/console{path}/caption", {"caption": pretty.replace("\n", "\r\n")})  # as browsers send
    assert saved.status_code == 303 and saved.headers["location"].endswith(f"#image-{image['id']}")
    stored = api.get(path).json()
    assert stored["caption"] == '{"short_description":"a red circle","style_medium":"flat illustration"}'
    assert stored["caption_source"] == "manual"
    page = console.get(f"/console/datasets/{dataset_id}")
    assert pretty.replace('"', "&#34;") in page.text  # shown formatted in its editor


def test_completing_lists_the_preflight_s_findings_and_the_api_s_message(api, console):
    dataset_id = _draft(api)
    few = console.post(f"/console/datasets/{dataset_id}/complete")
    _same_refusal(api.put(f"/datasets/{dataset_id}", json={"status": "completed"}), few)  # no images: 409
    rows = sample_rows()[:5]
    for row in rows[:4]:
        upload_sample(api, dataset_id, row)
    odd = api.post(f"/datasets/{dataset_id}/images", files={"file": ("odd.png", (SAMPLE_DATASET_DIR /
                                                                                 rows[4]["file_name"]).read_bytes())},
                   data={"caption": '{"mood": "calm"}'}).json()  # JSON, but no field FIBO knows
    page = console.post(f"/console/datasets/{dataset_id}/complete")
    api_refusal = api.put(f"/datasets/{dataset_id}", json={"status": "completed"})
    assert page.status_code == api_refusal.status_code == 409
    assert shown(api_refusal.json()["message"].splitlines()[0], page)
    finding = re.search(r'<ul class="findings" id="findings">(.*?)</ul>', page.text, re.S).group(1)
    assert f'href="#image-{odd["id"]}"' in finding and "not_a_fibo_caption" in finding
    assert f'id="caption-{odd["id"]}-findings"' in page.text  # also beside that image's caption
    fixed = console.post(f"/console/datasets/{dataset_id}/images/{odd['id']}/caption",
                         {"caption": '{"short_description": "a calm scene"}'})
    assert fixed.status_code == 303
    done = console.post(f"/console/datasets/{dataset_id}/complete")
    assert done.status_code == 303 and api.get(f"/datasets/{dataset_id}").json()["status"] == "completed"
    frozen = console.post(f"/console/datasets/{dataset_id}/images/{odd['id']}/caption", {"caption": "{}"})
    _same_refusal(api.put(f"/datasets/{dataset_id}/images/{odd['id']}", json={"caption": "{}"}), frozen)


def test_without_a_captioning_model_the_regenerate_forms_refuse_what_the_api_refuses(api, console):
    dataset_id = _draft(api)
    image = upload_sample(api, dataset_id, sample_rows()[0]).json()
    page = console.post(f"/console/datasets/{dataset_id}/images/{image['id']}/regenerate")
    _same_refusal(api.put(f"/datasets/{dataset_id}/images/{image['id']}", json={"regenerate_caption": True}), page)
    every = console.post(f"/console/datasets/{dataset_id}/captions/regenerate")
    _same_refusal(api.put(f"/datasets/{dataset_id}/images"), every)
    shown_page = console.get(f"/console/datasets/{dataset_id}").text
    assert "Regenerate caption" not in shown_page and "Regenerate all captions" not in shown_page
    assert 'id="no-captioner"' in shown_page and "serve --vlm" in shown_page


@pytest.mark.parametrize("schema", [
    "not json",
    '["a list"]',
    '{"aesthetics": {"aesthetic_score": "great"}}',   # not a value a caption can keep
])
def test_the_visual_schema_form_refuses_what_the_api_refuses(api, console, schema):
    dataset_id = _draft(api)
    _same_refusal(api.put(f"/datasets/{dataset_id}", json={"visual_schema": schema}),
                  console.post(f"/console/datasets/{dataset_id}/visual-schema", {"visual_schema": schema}))
    assert api.get(f"/datasets/{dataset_id}").json()["visual_schema"] is None


def test_the_visual_schema_form_stores_compact_json(api, console):
    dataset_id = _draft(api)
    saved = console.post(f"/console/datasets/{dataset_id}/visual-schema",
                         {"visual_schema": '{\r\n  "style_medium": "flat vector illustration"\r\n}'})
    assert saved.status_code == 303
    assert api.get(f"/datasets/{dataset_id}").json()["visual_schema"] == '{"style_medium":"flat vector illustration"}'
    assert '"style_medium": "flat vector illustration"' in text_of(console.get(f"/console/datasets/{dataset_id}"))


def test_the_model_and_start_forms_refuse_what_the_api_refuses(api, console):
    dataset_id = completed_fibo_dataset(api)
    for fields in ({"name": "m", "training_mode": "sometimes"}, {"name": "", "training_mode": "expert"},
                   {"name": "m", "dataset_id": 999999}):
        fields = {"dataset_id": dataset_id, **fields}
        api_fields = {k: v for k, v in fields.items() if v != ""}
        page = console.post("/console/models", fields)
        if fields["dataset_id"] == 999999:  # the page it would come back to does not exist either
            assert page.status_code == 404 and shown(_api_message(api.post("/models", json=api_fields)), page)
        else:
            _same_refusal(api.post("/models", json=api_fields), page)
    model_id = create_model(api, dataset_id, mode="expert")
    start = f"/models/{model_id}/start_training"
    for fields, body in (({"rank": "3"}, {"rank": 3}),
                         ({"learning_rate": "fast"}, {"learning_rate": "fast"}),
                         ({"total_training_steps": "300", "checkpoint_interval": "400"},
                          {"total_training_steps": 300, "checkpoint_interval": 400}),
                         ({"lr_scheduler": "sometimes"}, {"lr_scheduler": "sometimes"})):
        _same_refusal(api.post(start, json=body), console.post(f"/console/models/{model_id}/start", fields))
    automated = create_model(api, dataset_id, mode="fully_automated")
    _same_refusal(api.post(f"/models/{automated}/start_training", json={"rank": 8}),
                  console.post(f"/console/models/{automated}/start", {"rank": "8"}))
    draft_model = create_model(api, _draft(api))
    _same_refusal(api.post(f"/models/{draft_model}/start_training"),
                  console.post(f"/console/models/{draft_model}/start", {}))
    _same_refusal(api.post(f"/models/{model_id}/stop_training"), console.post(f"/console/models/{model_id}/stop"))


def test_the_start_form_shows_the_contract_s_defaults_and_ranges(api, console):
    model_id = create_model(api, completed_fibo_dataset(api), mode="expert")
    page = text_of(console.get(f"/console/models/{model_id}"))
    for expected in ("Default 128 · allowed 4 – 256", "Default 0.0001 · allowed 1e-06 – 0.001",
                     "Default 750 · allowed 1 – 5000", "Default 500 · allowed ≥ 100 and ≤ total steps",
                     "Default 100 · allowed 0 – 1000", "default (constant_with_warmup)"):
        assert expected in page, expected


def test_starting_and_stopping_from_the_console(server, api, console):
    model_id = create_model(api, completed_fibo_dataset(api), mode="expert")
    started = console.post(f"/console/models/{model_id}/start", {"rank": "8", "total_training_steps": "300",
                                                                  "learning_rate": "2e-4", "lr_scheduler": ""})
    assert started.status_code == 303, text_of(started)[:2000]
    model = api.get(f"/models/{model_id}").json()
    assert model["status"] == "InProgress"
    assert model["training_parameters"] == {"learning_rate": 0.0002, "lr_scheduler": "constant_with_warmup",
                                            "rank": 8, "total_training_steps": 300, "checkpoint_interval": 300,
                                            "lr_warmup_steps": 100}
    page = console.get(f"/console/models/{model_id}")
    assert "Stop training" in page.text and 'data-status="InProgress"' in page.text
    progress = console.get(f"/console/models/{model_id}/progress").json()
    assert progress["status"] == "InProgress" and progress["points"] == []
    assert console.post(f"/console/models/{model_id}/stop").status_code == 303
    assert api.get(f"/models/{model_id}").json()["status"] in ("Stopping", "Stopped")


def test_generation_forms_refuse_what_the_api_refuses(server, api, console):
    dataset_id = completed_fibo_dataset(api)
    model_id = completed_model(server, api, dataset_id)
    cases = [({"structured_prompt": "a fox"}, {"structured_prompt": "a fox"}),       # not JSON
             ({"structured_prompt": "{}", "seed": "-7"}, {"structured_prompt": "{}", "seed": -7}),
             ({"structured_prompt": "{}", "steps_num": "5"}, {"structured_prompt": "{}", "steps_num": 5}),
             ({"structured_prompt": "{}", "tailored_model_influence": "2"},
              {"structured_prompt": "{}", "tailored_model_influence": 2}),
             ({"prompt": "a fox"}, {"prompt": "a fox"}),                                  # no expander here
             ({}, {})]
    for fields, body in cases:
        api_body = {"tailored_model_id": str(model_id), **body}
        page = console.post("/console/generate", {"model_id": str(model_id), "step": "100", **fields})
        _same_refusal(api.post(f"{server.url}/v2/image/generate/tailored", json=api_body), page)
    not_done = create_model(api, dataset_id)
    _same_refusal(v2(server, api, fibo_body(not_done)),
                  console.post("/console/generate", {"model_id": str(not_done), "structured_prompt": "{}"}))


def test_another_organization_cannot_generate_with_a_model_of_ours(server, api, console):
    model_id = completed_model(server, api, completed_fibo_dataset(api))  # trained by TOKEN
    assert f'value="{model_id}"' in console.get("/console/generate").text
    with Console(server.url) as other:
        other.sign_in(OTHER_TOKEN)
        assert f'value="{model_id}"' not in other.get("/console/generate").text
        page = other.post("/console/generate", {"model_id": str(model_id), "structured_prompt": "{}"})
        # the API's /v2 answers Bria's 403; the console's pages never tell another organization's model exists
        assert v2(server, api, fibo_body(model_id), token=OTHER_TOKEN).status_code == 403
        assert page.status_code == 404 and shown(f"Model not found: there is no model {model_id}", page)


def test_another_organization_sees_none_of_it_and_a_colleague_sees_all(server, api):
    dataset_id = completed_fibo_dataset(api)
    dataset = api.get(f"/datasets/{dataset_id}").json()
    model_id = completed_model(server, api, dataset_id)
    pages = [f"/console/projects/{dataset['project_id']}", f"/console/datasets/{dataset_id}",
             f"/console/datasets/{dataset_id}/images/{dataset['images'][0]['id']}/thumbnail",
             f"/console/models/{model_id}"]
    with Console(server.url) as other, Console(server.url) as colleague:
        other.sign_in(OTHER_TOKEN)
        colleague.sign_in(COLLEAGUE_TOKEN)
        for path in pages:
            assert other.get(path).status_code == 404, path
            assert colleague.get(path).status_code == 200, path  # negative control: the same organization
        links = {"/console/projects": f'href="/console/projects/{dataset["project_id"]}"',
                 "/console/models": f'href="/console/models/{model_id}"', "/console/generate": f'value="{model_id}"'}
        for listing, link in links.items():
            assert link not in other.get(listing).text, listing
            assert link in colleague.get(listing).text, listing


# ---- thumbnails ---------------------------------------------------------------------------------------


def test_thumbnails_are_made_once_and_remade_when_the_image_changes(server, api, console):
    dataset_id = _draft(api)
    image = api.post(f"/datasets/{dataset_id}/images", files={"file": ("big.png", _png(600, 400))}).json()
    url = f"/console/datasets/{dataset_id}/images/{image['id']}/thumbnail"
    first = console.get(url)
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    with PILImage.open(io.BytesIO(first.content)) as thumb:
        assert thumb.size == (256, 171)
    folder = server.service.settings.data_dir / "thumbnails" / f"dataset-{dataset_id}"
    [made] = list(folder.glob("*.jpg"))
    stamp = made.stat().st_mtime_ns
    assert console.get(url).content == first.content
    assert [p.name for p in folder.glob("*.jpg")] == [made.name] and made.stat().st_mtime_ns == stamp  # not remade
    source = server.service.dataset_dir(dataset_id) / f"{image['id']:08d}.png"
    source.write_bytes(_png(300, 300, color=(20, 200, 40)))  # the image file changes on disk
    second = console.get(url)
    assert second.content != first.content
    [remade] = list(folder.glob("*.jpg"))
    assert remade.name != made.name  # the old thumbnail is gone
    with PILImage.open(io.BytesIO(second.content)) as thumb:
        assert thumb.size == (256, 256)
    assert console.get(f"/console/datasets/{dataset_id}/images/999999/thumbnail").status_code == 404
    with Console(server.url) as visitor:  # thumbnails need a signed-in session
        assert visitor.get(url).status_code == 303
