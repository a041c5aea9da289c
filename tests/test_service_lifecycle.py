"""The whole Tailored Generation lifecycle over real HTTP against `tailoredgen-train serve`, with one
real training on the tiny FIBO base shared by this module: its progress while it trains, its log,
its checkpoints with their sample images, its report, the LoRA it serves (which loads into
BriaFiboPipeline), and images generated with its first and its final checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
import torch
from diffusers import BriaFiboPipeline
from safetensors.torch import load_file

from service_helpers import (OTHER_TOKEN, CliServer, client, completed_fibo_dataset, engine_yaml, is_png,
                             poll_generation, wait_until)
from tailoredgen_train.engine.checkpoint import Checkpointer

pytestmark = [pytest.mark.slow, pytest.mark.both_databases]  # the whole lifecycle on SQLite and on PostgreSQL
PROMPT = json.dumps({"short_description": "A flat red circle on a pale background."})
TRAINING = {"total_training_steps": 200, "checkpoint_interval": 100, "rank": 8, "learning_rate": 1e-3,
            "lr_scheduler": "constant"}


class Trained:
    def __init__(self, server: CliServer, data_dir: Path, model_id: int, seen: list[dict], final: dict):
        self.server, self.data_dir, self.model_id, self.seen, self.final = server, data_dir, model_id, seen, final

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "runs" / f"model-{self.model_id}"

    def api(self, token: str | None = None) -> httpx.Client:
        return client(self.server.url, **({"token": token} if token else {}))

    def generate(self, api: httpx.Client, **extra) -> httpx.Response:
        body = {"tailored_model_id": str(self.model_id), "structured_prompt": PROMPT, "steps_num": 20,
                "guidance_scale": 3, "seed": 3, **extra}
        return api.post(f"{self.server.url}/v2/image/generate/tailored", json=body)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_fibo_base, service_database):
    """Project -> dataset -> expert model -> 200 steps with a checkpoint every 100, watching the
    model's training_progress on every poll while it trains."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    server = CliServer(tmp / "data", tiny_fibo_base, engine_yaml(tmp)).start()
    try:
        with client(server.url) as api:
            dataset_id = completed_fibo_dataset(api, images=5)
            model = api.post("/models", json={"name": "shapes", "dataset_id": dataset_id, "training_mode": "expert",
                                              "training_version": "fibo", "description": "tiny"})
            assert model.status_code == 201 and model.json()["status"] == "Created"
            assert "training_progress" not in model.json()
            model_id = model.json()["id"]
            started = api.post(f"/models/{model_id}/start_training", json=TRAINING)
            assert started.status_code == 200, started.text
            assert started.json()["status"] == "InProgress" and started.json()["training_parameters"]["rank"] == 8
            seen = []

            def settled():
                body = api.get(f"/models/{model_id}").json()
                if body["status"] == "InProgress" and "training_progress" in body:
                    seen.append(body["training_progress"])
                return body if body["status"] in ("Completed", "Failed") else None
            final = wait_until(settled, 900, f"model {model_id} to end", interval=0.3)
            assert final["status"] == "Completed", final
        yield Trained(server, tmp / "data", model_id, seen, final)
    finally:
        server.stop()


# ---- while it trains, and what it leaves ------------------------------------------------------------


def test_progress_advances_while_training(trained):
    steps = [p["current_step"] for p in trained.seen]
    assert len(set(steps)) >= 2 and steps == sorted(steps) and steps[0] < 200, steps
    for progress in trained.seen:
        assert progress["total_steps"] == 200
        assert math.isfinite(progress["last_loss"]) and progress["step_seconds"] > 0
        assert progress["eta_seconds"] >= 0 and progress["updated_at"].startswith("20")
    done = trained.final["training_progress"]
    assert done["current_step"] == 200 and done["total_steps"] == 200 and done["eta_seconds"] == 0


def test_the_log_endpoint_returns_the_end_of_train_log(trained):
    with trained.api() as api:
        tail = api.get(f"/models/{trained.model_id}/logs", params={"lines": 5}).json()
        everything = api.get(f"/models/{trained.model_id}/logs", params={"lines": 2000}).json()["lines"]
        assert api.get(f"/models/{trained.model_id}/logs", params={"lines": 0}).status_code == 400
        assert api.get(f"/models/{trained.model_id}/logs", params={"lines": 2001}).status_code == 400
        assert api.get("/models/999999/logs").status_code == 404
    on_disk = (trained.run_dir / "train.log").read_text().splitlines()
    assert tail["model_id"] == trained.model_id and tail["lines"] == on_disk[-5:]
    assert everything == on_disk[-2000:] and any("step 200/200" in line for line in everything)


def test_checkpoints_list_newest_first_and_their_lora_downloads(trained, tiny_fibo_base, tmp_path):
    model_id = trained.model_id
    assert trained.final["checkpoint_steps"] == ["200", "100"] and trained.final["active_model_version"] == "200"
    with trained.api() as api:
        listed = api.get(f"/models/{model_id}/checkpoints").json()
        link = api.get(f"/models/{model_id}/download").json()
        early = api.get(f"/models/{model_id}/download", params={"checkpoint_step": 100}).json()
    assert [c["checkpoint_step"] for c in listed["checkpoints"]] == [200, 100]
    assert listed["active_model_version"] == "200"
    assert link["base_model_name"] == "BRIA-FIBO" and link["checkpoint_step"] == 200
    assert link["base_model_card"] == "https://huggingface.co/briaai/FIBO"  # the family's hub_id
    response = httpx.get(link["download_url"], timeout=60)  # pre-signed: no api_token
    assert response.status_code == 200
    assert Checkpointer.verify(trained.run_dir / "checkpoint-200")
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    lora.write_bytes(response.content)
    assert response.content == (trained.run_dir / "checkpoint-200" / lora.name).read_bytes()
    assert httpx.get(early["download_url"], timeout=60).content == \
        (trained.run_dir / "checkpoint-100" / lora.name).read_bytes()
    assert any(".lora_A." in key for key in load_file(lora))

    def render(pipe: BriaFiboPipeline) -> torch.Tensor:
        return pipe(PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=5.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    base = render(BriaFiboPipeline.from_pretrained(tiny_fibo_base))
    pipe = BriaFiboPipeline.from_pretrained(tiny_fibo_base)
    pipe.load_lora_weights(tmp_path)
    tuned = render(pipe)
    assert torch.isfinite(tuned).all()
    assert not torch.allclose(tuned, base, atol=1e-3)  # the downloaded LoRA changes what the pipeline makes


def test_the_finished_job_lost_its_cache_and_old_resume_states_and_kept_its_checkpoints(trained):
    checkpointer = Checkpointer(trained.run_dir, is_main_process=False)
    assert not (trained.run_dir / "cache").exists()  # serve deletes it when the job settles
    assert checkpointer.resume_steps() == [200] and checkpointer.latest_resume() is not None
    assert checkpointer.published_steps() == [200, 100]
    assert all(Checkpointer.verify(checkpointer.path_for(step)) for step in (100, 200))


def test_a_checkpoint_lists_its_sample_images_and_they_download(trained):
    with trained.api() as api:
        one = api.get(f"/models/{trained.model_id}/checkpoints/100").json()
        listed = api.get(f"/models/{trained.model_id}/checkpoints").json()
    assert {k: one[k] for k in ("checkpoint_step", "training_job_id", "created_at")} == listed["checkpoints"][1]
    folder = trained.run_dir / "checkpoint-100" / "samples"
    index = json.loads((folder / "prompts.json").read_text())
    assert len(one["samples"]) == len(index) == 2  # validation.num_prompts in the test engine config
    for sample, record in zip(one["samples"], index):
        assert sample["prompt"] == record["prompt"] and sample["seed"] == record["seed"]
        image = httpx.get(sample["image_url"], timeout=60)  # pre-signed: no api_token
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert image.content == (folder / record["file"]).read_bytes() and is_png(image.content)
    assert httpx.get(one["samples_grid_url"], timeout=60).content == (folder / "grid.png").read_bytes()
    url = httpx.URL(one["samples"][0]["image_url"])  # a link is good for its own file only
    assert httpx.get(url.copy_with(path=url.path.replace("00.png", "01.png")), timeout=60).status_code == 401


def test_the_report_is_served_as_html(trained):
    with trained.api() as api:
        report = api.get(f"/models/{trained.model_id}/report")
        assert api.get("/models/999999/report").status_code == 404
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert "script-src" not in report.headers["content-security-policy"]  # default-src 'none' forbids scripts
    assert report.content == (trained.run_dir / "report.html").read_bytes()
    assert b"<html" in report.content[:500].lower()


# ---- generating with it -----------------------------------------------------------------------------


def test_generate_with_the_final_and_the_first_checkpoint_sync_and_async(trained):
    with trained.api() as api:
        final_sync = trained.generate(api, sync=True)
        assert final_sync.status_code == 200, final_sync.text
        body = final_sync.json()
        assert json.loads(body["structured_prompt"]) == json.loads(PROMPT) and body["seed"] == 3
        final_png = httpx.get(body["image_url"], timeout=60).content  # pre-signed: no api_token
        assert is_png(final_png)

        accepted = trained.generate(api)
        assert accepted.status_code == 202 and set(accepted.json()) == {"request_id", "status_url"}
        done = poll_generation(api, accepted.json()["status_url"])
        assert done["status"] == "COMPLETED" and done["result"]["seed"] == 3
        assert httpx.get(done["result"]["image_url"], timeout=60).content == final_png  # same request, same bytes

        # the first checkpoint: the client makes it the active version (extension), then back
        picked = api.put(f"/models/{trained.model_id}", json={"active_model_version": "100"})
        assert picked.status_code == 200 and picked.json()["active_model_version"] == "100"
        assert api.put(f"/models/{trained.model_id}", json={"active_model_version": "150"}).status_code == 400
        first_sync = trained.generate(api, sync=True).json()
        first_async = poll_generation(api, trained.generate(api).json()["status_url"])
        assert api.put(f"/models/{trained.model_id}", json={"active_model_version": "200"}).status_code == 200
    first_png = httpx.get(first_sync["image_url"], timeout=60).content
    assert is_png(first_png) and first_png != final_png  # two checkpoints, two images
    assert httpx.get(first_async["result"]["image_url"], timeout=60).content == first_png


def test_generation_rules_on_the_trained_model(trained):
    with trained.api(OTHER_TOKEN) as other:
        assert trained.generate(other, sync=True).status_code == 403  # another organization's model
    with trained.api() as api:
        legacy = api.post(f"{trained.server.url}/v1/text-to-image/tailored/{trained.model_id}/100",
                          json={"prompt": "a red circle", "sync": True})
        assert legacy.status_code == 400 and "/v2/image/generate/tailored" in legacy.json()["message"]
        plain = trained.generate(api, structured_prompt=None, prompt="a red circle", sync=True)
        assert plain.status_code == 400 and "captioning model" in plain.json()["message"]
        assert trained.generate(api, steps_num=10).json()["errors"][0]["field_name"] == "steps_num"
