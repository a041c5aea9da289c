"""The whole Tailored Generation lifecycle over real HTTP against `tailoredgen-train serve`, with a
real training job on the tiny FIBO base: the LoRA it serves loads into BriaFiboPipeline."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from diffusers import BriaFiboPipeline
from safetensors.torch import load_file

from service_helpers import (CliServer, client, completed_fibo_dataset, engine_yaml, wait_for_status)
from tailoredgen_train.engine.checkpoint import Checkpointer

pytestmark = pytest.mark.slow
PROMPT = json.dumps({"short_description": "A flat red circle on a pale background."})


def _generate(pipe: BriaFiboPipeline) -> torch.Tensor:
    return pipe(PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=5.0, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_project_to_downloaded_lora_over_http(tmp_path, tiny_fibo_base):
    server = CliServer(tmp_path / "data", tiny_fibo_base, engine_yaml(tmp_path)).start()
    try:
        with client(server.url) as api:
            dataset_id = completed_fibo_dataset(api, images=5)
            model = api.post("/models", json={"name": "shapes", "dataset_id": dataset_id, "training_mode": "expert",
                                              "training_version": "fibo", "description": "tiny"})
            assert model.status_code == 201 and model.json()["status"] == "Created"
            model_id = model.json()["id"]

            started = api.post(f"/models/{model_id}/start_training",
                               json={"total_training_steps": 200, "checkpoint_interval": 100, "rank": 8,
                                     "learning_rate": 1e-3, "lr_scheduler": "constant"})
            assert started.status_code == 200, started.text
            assert started.json()["status"] == "InProgress" and started.json()["training_parameters"]["rank"] == 8

            done = wait_for_status(api, model_id, {"Completed", "Failed"}, timeout=600)
            assert done["status"] == "Completed", done
            assert done["checkpoint_steps"] == ["200", "100"] and done["active_model_version"] == "200"

            listed = api.get(f"/models/{model_id}/checkpoints").json()
            assert [c["checkpoint_step"] for c in listed["checkpoints"]] == [200, 100]
            assert listed["active_model_version"] == "200"
            one = api.get(f"/models/{model_id}/checkpoints/100").json()
            assert one == listed["checkpoints"][1]

            link = api.get(f"/models/{model_id}/download").json()
            assert link["base_model_name"] == "BRIA-FIBO" and link["checkpoint_step"] == 200
            assert link["base_model_card"] == "https://huggingface.co/briaai/FIBO"  # the family's hub_id
            early = api.get(f"/models/{model_id}/download", params={"checkpoint_step": 100}).json()
        lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
        lora.parent.mkdir()
        response = httpx.get(link["download_url"], timeout=60)  # pre-signed: no api_token
        assert response.status_code == 200
        lora.write_bytes(response.content)
        run_dir = tmp_path / "data" / "runs" / f"model-{model_id}"
        assert Checkpointer.verify(run_dir / "checkpoint-200")
        assert response.content == (run_dir / "checkpoint-200" / lora.name).read_bytes()
        early_bytes = httpx.get(early["download_url"], timeout=60).content
        assert early_bytes == (run_dir / "checkpoint-100" / lora.name).read_bytes()
        assert any(".lora_A." in key for key in load_file(lora))
    finally:
        server.stop()

    base = _generate(BriaFiboPipeline.from_pretrained(tiny_fibo_base))
    pipe = BriaFiboPipeline.from_pretrained(tiny_fibo_base)
    pipe.load_lora_weights(lora.parent)
    tuned = _generate(pipe)
    assert torch.isfinite(tuned).all()
    assert not torch.allclose(tuned, base, atol=1e-3)  # the downloaded LoRA changes what the pipeline makes
