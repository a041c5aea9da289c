"""The service trains a legacy version with no code of its own for it: only `--base bria-3.2=...`.
A `max` model (mapped to the bria-3.2 family) trains on a text-caption dataset with a caption_prefix,
its LoRA loads into BriaPipeline, and it generates through Bria's v1 endpoint with its final and its
first checkpoint, with and without its generation prefix."""

from __future__ import annotations

import json

import httpx
import pytest
from diffusers import BriaPipeline

from service_helpers import ThreadServer, client, is_png, poll_generation, settings_for, wait_for_status
from tailoredgen_train.data import SAMPLE_TEXT_CAPTION_PREFIX, SAMPLE_TEXT_DATASET_DIR

pytestmark = pytest.mark.slow
ENGINE = """\
data: {resolution: 64, min_side: 64, batch_size: 1, num_workers: 0}
lora: {init: gaussian}
run: {seed: 0, log_with: none, log_every: 50}
model: {max_sequence_length: 128, shift: 4.0}
validation: {num_prompts: 1, num_inference_steps: 2}
"""


def _png(url: str) -> bytes:
    data = httpx.get(url, timeout=60).content  # pre-signed: no api_token
    assert is_png(data)
    return data


def test_a_max_model_trains_on_a_legacy_dataset_and_generates_through_v1(tmp_path, tiny_fibo_base, legacy_bases):
    engine = tmp_path / "bria32.yaml"
    engine.write_text(ENGINE)
    settings = settings_for(tmp_path, tiny_fibo_base,
                            bases={"fibo": str(tiny_fibo_base), "bria-3.2": str(legacy_bases["bria-3.2"])})
    settings.engine_configs["bria-3.2"] = str(engine)
    with ThreadServer(settings) as server, client(server.url) as api:
        project = api.post("/projects", json={"project_name": "shapes", "ip_medium": "illustration",
                                              "ip_type": "stylized_scene"}).json()
        dataset = api.post("/datasets", json={"project_id": project["id"], "name": "shapes", "training_version": "max",
                                              "caption_prefix": SAMPLE_TEXT_CAPTION_PREFIX}).json()
        for line in (SAMPLE_TEXT_DATASET_DIR / "metadata.jsonl").read_text().splitlines()[:2]:
            row = json.loads(line)
            path = SAMPLE_TEXT_DATASET_DIR / row["file_name"]
            uploaded = api.post(f"/datasets/{dataset['id']}/images", files={"file": (path.name, path.read_bytes())},
                                data={"caption": row["caption"]})
            assert uploaded.status_code == 201, uploaded.text
        assert api.put(f"/datasets/{dataset['id']}", json={"status": "completed"}).status_code == 200
        model = api.post("/models", json={"name": "m", "dataset_id": dataset["id"], "training_mode": "expert",
                                          "training_version": "max"}).json()
        started = api.post(f"/models/{model['id']}/start_training",
                           json={"total_training_steps": 200, "checkpoint_interval": 100, "rank": 8})
        assert started.status_code == 200, started.text
        body = started.json()
        # the legacy defaults, and Bria's generation_prefix rule
        assert body["training_parameters"]["lr_scheduler"] == "constant"
        assert body["training_parameters"]["lr_warmup_steps"] is None
        assert body["generation_prefix"] == SAMPLE_TEXT_CAPTION_PREFIX
        done = wait_for_status(api, model["id"], {"Completed", "Failed"}, timeout=900)
        assert done["status"] == "Completed", done
        assert done["checkpoint_steps"] == ["200", "100"]
        link = api.get(f"/models/{model['id']}/download").json()
        assert link["base_model_name"] == "BRIA-3.2"
        assert link["base_model_card"] == "https://huggingface.co/briaai/BRIA-3.2"
        lora_dir = tmp_path / "lora"
        lora_dir.mkdir()
        (lora_dir / "pytorch_lora_weights.safetensors").write_bytes(httpx.get(link["download_url"], timeout=60).content)

        _generate_through_v1(server, api, model["id"])

    pipe = BriaPipeline.from_pretrained(legacy_bases["bria-3.2"])
    pipe.transformer.load_lora_adapter(str(lora_dir), prefix="transformer",
                                       weight_name="pytorch_lora_weights.safetensors")
    trained = {n: p for n, p in pipe.transformer.named_parameters() if "lora_B" in n}
    assert trained and any(p.abs().max() > 0 for p in trained.values())  # B starts at zero: these were trained


def _generate_through_v1(server, api, model_id: int) -> None:
    url = f"{server.url}/v1/text-to-image/tailored/{model_id}"
    request = {"prompt": "a red circle", "num_results": 1, "seed": 5, "steps_num": 20, "sync": True}

    # Bria's synchronous v1 body: result[0].urls[0]; one item per image, image i drawn with seed + i
    two = api.post(url, json={**request, "num_results": 2})
    assert two.status_code == 200, two.text
    assert [item["seed"] for item in two.json()["result"]] == [5, 6]
    final = _png(two.json()["result"][0]["urls"][0])
    assert _png(two.json()["result"][1]["urls"][0]) != final
    assert _png(api.post(f"{url}/200", json=request).json()["result"][0]["urls"][0]) == final  # the active version

    first = _png(api.post(f"{url}/100", json=request).json()["result"][0]["urls"][0])
    assert first != final
    accepted = api.post(f"{url}/100", json={**request, "sync": False})
    assert accepted.status_code == 202
    done = poll_generation(api, accepted.json()["status_url"])
    assert done["status"] == "COMPLETED" and _png(done["result"]["urls"][0]) == first

    # include_generation_prefix (default true) puts the model's generation_prefix before the prompt
    bare = _png(api.post(url, json={**request, "include_generation_prefix": False}).json()["result"][0]["urls"][0])
    spelled_out = api.post(url, json={**request, "include_generation_prefix": False,
                                      "prompt": f"{SAMPLE_TEXT_CAPTION_PREFIX} a red circle"})
    assert bare != final and _png(spelled_out.json()["result"][0]["urls"][0]) == final

    missing = api.post(f"{url}/150", json=request)
    assert missing.status_code == 400 and "its checkpoints: 200, 100" in missing.json()["message"]
    fibo_endpoint = api.post(f"{server.url}/v2/image/generate/tailored",
                             json={"tailored_model_id": model_id, "structured_prompt": "{}", "sync": True})
    assert fibo_endpoint.status_code == 400 and "/v1/text-to-image/tailored" in fibo_endpoint.json()["message"]
