"""The service trains a legacy version with no code of its own for it: only `--base bria-3.2=...`.
A `max` model (mapped to the bria-3.2 family) trains on a text-caption dataset with a caption_prefix,
and its LoRA loads into BriaPipeline."""

from __future__ import annotations

import json

import httpx
import pytest
from diffusers import BriaPipeline

from service_helpers import ThreadServer, client, settings_for, wait_for_status
from tailoredgen_train.data import SAMPLE_TEXT_CAPTION_PREFIX, SAMPLE_TEXT_DATASET_DIR

pytestmark = pytest.mark.slow
ENGINE = """\
data: {resolution: 128, min_side: 128, batch_size: 1, num_workers: 0}
lora: {init: gaussian}
run: {seed: 0, log_with: none, log_every: 50}
model: {max_sequence_length: 128, shift: 4.0}
"""


def test_a_max_model_trains_on_a_legacy_dataset_through_the_api(tmp_path, tiny_fibo_base, legacy_bases):
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
        started = api.post(f"/models/{model['id']}/start_training", json={"total_training_steps": 20, "rank": 8})
        assert started.status_code == 200, started.text
        body = started.json()
        # the legacy defaults, and Bria's generation_prefix rule
        assert body["training_parameters"]["lr_scheduler"] == "constant"
        assert body["training_parameters"]["lr_warmup_steps"] is None
        assert body["generation_prefix"] == SAMPLE_TEXT_CAPTION_PREFIX
        done = wait_for_status(api, model["id"], {"Completed", "Failed"}, timeout=300)
        assert done["status"] == "Completed", done
        link = api.get(f"/models/{model['id']}/download").json()
        assert link["base_model_name"] == "BRIA-3.2"
        assert link["base_model_card"] == "https://huggingface.co/briaai/BRIA-3.2"
        lora_dir = tmp_path / "lora"
        lora_dir.mkdir()
        (lora_dir / "pytorch_lora_weights.safetensors").write_bytes(httpx.get(link["download_url"], timeout=60).content)

    pipe = BriaPipeline.from_pretrained(legacy_bases["bria-3.2"])
    pipe.transformer.load_lora_adapter(str(lora_dir), prefix="transformer",
                                       weight_name="pytorch_lora_weights.safetensors")
    trained = {n: p for n, p in pipe.transformer.named_parameters() if "lora_B" in n}
    assert trained and any(p.abs().max() > 0 for p in trained.values())  # B starts at zero: these were trained
