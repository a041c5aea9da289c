"""The web console in a real browser: headless Debian chromium driven by Python Playwright, through
the whole walkthrough on a real server with a real (tiny) training: sign in, a project and a fibo
dataset, six images dropped on the upload zone, a caption the preflight refuses and its fix, the
dataset completed, an expert model started, its step counter and loss curve advancing, the samples
of checkpoint 100, an image generated from checkpoint 200, signing out; and another token's view.

It takes the screenshots of the README (dataset page and run page, 1280 and 390 px wide): into
docs/console/ with TAILOREDGEN_UPDATE_SCREENSHOTS=1, else into the test's temporary folder.

Playwright's own browser download is not used: `make test` installs Debian's chromium with apt-get
when /usr/bin/chromium is missing; without it this module is skipped with that reason."""

from __future__ import annotations

import base64
import json
import os
import re
import time
from pathlib import Path

import pytest

from service_helpers import OTHER_TOKEN, TOKEN, ThreadServer, sample_rows, settings_for
from tailoredgen_train.data import SAMPLE_DATASET_DIR

pytestmark = [pytest.mark.slow, pytest.mark.browser]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "console"
REFUSED_CAPTION = '{"mood": "calm", "palette": "warm"}'  # JSON, so the API stores it; no field FIBO knows
PROMPT = json.dumps({"short_description": "A flat red circle on a pale background."}, indent=2)
WIDTHS = (1280, 390)
# one drop event carrying the six files, as a file manager would drop them on the zone
DROP = """([zone, files]) => {
  const transfer = new DataTransfer();
  for (const f of files) {
    const bytes = Uint8Array.from(atob(f.data), (c) => c.charCodeAt(0));
    transfer.items.add(new File([bytes], f.name, {type: f.type}));
  }
  const target = document.querySelector(zone);
  target.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
  target.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
}"""


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: `make test` installs it (apt-get install -y chromium); Playwright's "
                    "own browser download is not used")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra's playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_fibo_base):
    tmp = tmp_path_factory.mktemp("console-browser")
    with ThreadServer(settings_for(tmp, tiny_fibo_base)) as running:  # the real local launcher: a real training
        yield running


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    if os.environ.get("TAILOREDGEN_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        return DOCS
    return tmp_path_factory.mktemp("screenshots")


def _screenshots(page, name: str, folder: Path) -> None:
    """The page at each width, whole, as a PNG; nothing on it may come from another host."""
    original = page.viewport_size
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(300)  # let the layout (and the charts' SVG) settle at the new width
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 1, f"{name} at {width} px scrolls sideways by {overflow} px"
        path = folder / f"{name}-{width}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 10_000
    page.set_viewport_size(original)


def _wait_until(page, expression: str, timeout_s: float = 30) -> None:
    """Polls a JS expression from here: Playwright's wait_for_function evaluates its predicate with eval,
    which the console's Content-Security-Policy forbids (as it should)."""
    from playwright.sync_api import Error

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if page.evaluate(expression):
                return
        except Error:  # the page was navigating (the run page reloads when its status changes)
            pass
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {expression}"
        page.wait_for_timeout(200)


def _number(page, selector: str) -> int:
    text = page.locator(selector).inner_text()
    return int(text) if text.isdigit() else -1


def test_the_console_walkthrough_in_chromium(browser, server, shots):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    remote: list[str] = []
    page.on("request", lambda r: remote.append(r.url) if not r.url.startswith(server.url) else None)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(30_000)

    # sign in: a page asked for while signed out comes back after signing in
    page.goto(f"{server.url}/console/projects")
    assert "/console/sign-in" in page.url
    page.get_by_label("API token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/console/projects$"))

    # a project and a fibo dataset
    page.get_by_label("Project name").fill("Shapes")
    page.get_by_label("Medium").select_option("illustration")
    page.get_by_label("Type of IP").select_option("stylized_scene")
    page.get_by_role("button", name="Create project").click()
    page.wait_for_url(re.compile(r"/console/projects/\d+$"))
    project_url = page.url
    page.get_by_label("Dataset name").fill("shapes")
    page.get_by_label("Training version").select_option("fibo")
    page.get_by_role("button", name="Create dataset").click()
    page.wait_for_url(re.compile(r"/console/datasets/\d+$"))
    dataset_url = page.url

    # six images dropped on the upload zone: one result per file
    rows = sample_rows()
    files = [{"name": r["file_name"], "type": "image/png" if r["file_name"].endswith(".png") else "image/jpeg",
              "data": base64.b64encode((SAMPLE_DATASET_DIR / r["file_name"]).read_bytes()).decode()} for r in rows]
    assert len(files) == 6
    with page.expect_navigation():
        page.evaluate(DROP, ["[data-dropzone]", files])
    results = page.locator("#upload-results li")
    assert results.count() == 6 and page.locator("#upload-results li.ok").count() == 6
    assert page.locator("[data-caption-source]").all_inner_texts() == ["no caption"] * 6
    thumbnails = page.locator("ul.images img")
    _wait_until(page, "[...document.querySelectorAll('ul.images img')].every(i => i.complete && i.naturalWidth)")
    assert thumbnails.count() == 6

    # captions: five from the sample dataset, one that the API stores but the preflight refuses
    captions = {r["file_name"]: json.dumps(r["caption"]) if not isinstance(r["caption"], str) else r["caption"]
                for r in rows}
    refused_name = rows[2]["file_name"]
    captions[refused_name] = REFUSED_CAPTION
    for name, caption in captions.items():
        editor = page.get_by_label(f"Caption of {name}")
        editor.fill(caption)
        with page.expect_navigation():
            page.locator("li.card", has=editor).get_by_role("button", name="Save caption").click()
    assert page.locator("[data-caption-source]").all_inner_texts() == ["caption manual"] * 6

    # the JSON editor says at once when the text is not JSON, beside the field
    editor = page.get_by_label(f"Caption of {rows[0]['file_name']}")
    editor.fill('{"short_description": ')
    _wait_until(page, "document.querySelector('[data-json-message]:not([hidden])') !== null")
    assert "not valid JSON" in page.locator("li.card", has=editor).locator("[data-json-message]").inner_text()
    page.reload()

    # completing: the preflight refuses the odd caption, listed and shown beside its editor
    page.get_by_role("button", name="Complete dataset").click()
    page.wait_for_selector("#findings")
    assert "not_a_fibo_caption" in page.locator("#findings").inner_text()
    card = page.locator("li.card", has=page.get_by_label(f"Caption of {refused_name}"))
    assert "not_a_fibo_caption" in card.inner_text()
    assert page.get_by_label(f"Caption of {refused_name}").get_attribute("aria-invalid") == "true"
    _screenshots(page, "dataset", shots)

    page.goto(dataset_url)
    page.get_by_label(f"Caption of {refused_name}").fill(json.dumps(
        {"short_description": "A flat shape on a pale background.", "style_medium": "flat illustration"}))
    with page.expect_navigation():
        card.get_by_role("button", name="Save caption").click()
    page.get_by_role("button", name="Complete dataset").click()
    page.wait_for_selector("text=Train a model on this dataset")
    assert page.locator(".meta .badge").first.inner_text() == "completed"

    # an expert model, started with the contract's fields
    page.get_by_label("Model name").fill("shapes-lora")
    page.get_by_label("Expert").check()
    page.get_by_role("button", name="Create model").click()
    page.wait_for_url(re.compile(r"/console/models/\d+$"))
    model_id = int(page.url.rsplit("/", 1)[1])
    page.get_by_label("Total training steps").fill("200")
    page.get_by_label("Checkpoint interval").fill("100")
    page.get_by_label("LoRA rank").fill("8")
    page.get_by_label("Learning rate", exact=True).fill("1e-3")
    page.get_by_label("Learning-rate scheduler").select_option("constant")
    page.get_by_role("button", name="Start training").click()
    page.wait_for_selector("#run-status:text('InProgress')")
    assert page.locator("#run-total").inner_text() == "200"

    # while it trains: the step counter advances and the loss curve gets points
    _wait_until(page, "Number(document.getElementById('run-step').textContent) > 0", 120)
    first_step = _number(page, "#run-step")
    first_points = int(page.locator("#loss-chart").get_attribute("data-count"))
    assert 0 < first_step < 200 and first_points >= 1
    _wait_until(page, f"Number(document.getElementById('run-step').textContent) > {first_step}", 120)
    _wait_until(page, f"Number(document.getElementById('loss-chart').dataset.count) > {first_points}", 120)
    assert page.locator("#loss-chart polyline").count() == 2  # each step, and the smoothed line

    # the samples of checkpoint 100 beside the baseline, swapped in when the checkpoint lands
    page.wait_for_selector("#render-100 img", timeout=180_000)
    assert page.locator("#render-0 img").count() == page.locator("#render-100 img").count() == 2
    _wait_until(page, "[...document.querySelectorAll('#render-100 img')].every(i => i.complete && i.naturalWidth)")

    page.wait_for_selector("#run-status:text('Completed')", timeout=400_000)  # the page reloads when it ends
    assert page.locator("#run-step").inner_text() == "200"
    assert page.locator("#checkpoints li").count() == 2
    assert int(page.locator("#loss-chart").get_attribute("data-count")) == 200
    assert "step 200/200" in page.locator("#run-log").inner_text()
    download = page.locator("#checkpoints li[data-step='100'] a[download]").get_attribute("href")
    assert "/tailored-gen/files/models/" in download and "signature=" in download
    _screenshots(page, "run", shots)

    # generate from checkpoint 200
    page.locator("#checkpoints li[data-step='200']").get_by_role("link", name="generate with it").click()
    page.wait_for_url(re.compile(r"/console/generate\?"))
    assert page.get_by_label("Checkpoint").input_value() == "200"
    page.get_by_label("Structured prompt (JSON)").fill(PROMPT)
    page.get_by_label("Seed").fill("3")
    page.get_by_label("Steps").fill("20")
    page.get_by_label("Aspect ratio").select_option("1:1")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_url(re.compile(r"/console/generations/[0-9a-f]{32}$"))
    generation_url = page.url
    page.wait_for_selector("#generated-0", timeout=180_000)  # the page refreshes itself until it is done
    _wait_until(page, "document.getElementById('generated-0').naturalWidth === 64")
    assert "checkpoint 200" in page.locator(".meta").inner_text()

    # sign out: the pages are closed again
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r"/console/sign-in$"))
    page.goto(f"{server.url}/console/models/{model_id}")
    assert "/console/sign-in" in page.url

    # another organization's token sees none of it: no project listed, every page of it 404, no model
    # to generate with, neither this model nor this image
    other = browser.new_context().new_page()
    other.goto(f"{server.url}/console/sign-in")
    other.get_by_label("API token").fill(OTHER_TOKEN)
    other.get_by_role("button", name="Sign in").click()
    other.wait_for_url(re.compile(r"/console/projects$"))
    assert "Shapes" not in other.locator("main").inner_text()
    for url in (project_url, dataset_url, f"{server.url}/console/models/{model_id}"):
        assert other.goto(url).status == 404, url
    other.goto(f"{server.url}/console/generate")
    assert "No completed model to generate with yet" in other.content()
    assert other.goto(generation_url).status == 404
    assert other.goto(f"{server.url}/console/generate?model_id={model_id}&step=200").ok
    assert other.locator("select#pick-model").count() == 0
    other.context.close()

    assert not remote, f"the console asked another host for {remote[:3]}"
    assert not errors, errors
    context.close()
