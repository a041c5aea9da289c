"""Validation samples during training: where they go, when they are rendered, and that rendering
never changes what is trained (a run with renders ends bit-identical to one without)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import params, subset_dataset, tiny_engine
from tailoredgen_train.config import engine_config_from_dict
from tailoredgen_train.data import SAMPLE_TEXT_CAPTION_PREFIX, SAMPLE_TEXT_DATASET_DIR
from tailoredgen_train.engine.checkpoint import Checkpointer, Storage
from tailoredgen_train.errors import ConfigError
from tailoredgen_train.inference.render import TrainingRenderer
from tailoredgen_train.inference.validation import pick_training_captions, plan_validation
from tailoredgen_train.families import family_class
from tailoredgen_train.recipe import JobSpec, run_training

LORA = "pytorch_lora_weights.safetensors"
# lora_scale below 1: a render must put the training scale back exactly, not approximately
RENDERS = {"enabled": True, "num_prompts": 2, "num_inference_steps": 2, "lora_scale": 0.7, "resolution": 64}
JOB_PARAMS = params(4, lr=1e-3, rank=4, interval=2, scheduler="cosine")


def run(base: Path, dataset: Path, output: Path, *, version: str = "fibo", validation: dict | None = None,
        prefix: str | None = None, resume: bool = False, **engine_sections):
    engine = tiny_engine(validation=validation or {"enabled": False}, **engine_sections)
    return run_training(JobSpec(base=str(base), dataset_dir=str(dataset), output_dir=str(output),
                                training_version=version, params=JOB_PARAMS, engine=engine, caption_prefix=prefix,
                                resume=resume))


def loras(output: Path) -> dict[int, dict[str, torch.Tensor]]:
    return {step: load_file(output / f"checkpoint-{step}" / LORA) for step in (2, 4)}


def identical(a: dict[int, dict[str, torch.Tensor]], b: dict[int, dict[str, torch.Tensor]]) -> bool:
    return a.keys() == b.keys() and all(
        a[s].keys() == b[s].keys() and all(torch.equal(a[s][k], b[s][k]) for k in a[s]) for s in a)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return subset_dataset(tmp_path_factory.mktemp("data") / "three", 3)


@pytest.fixture(scope="module")
def plain(tiny_fibo_base, dataset, tmp_path_factory) -> dict[int, dict[str, torch.Tensor]]:
    output = tmp_path_factory.mktemp("plain") / "out"
    run(tiny_fibo_base, dataset, output)
    return loras(output)


@pytest.fixture(scope="module")
def rendered(tiny_fibo_base, dataset, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("rendered") / "out"
    run(tiny_fibo_base, dataset, output, validation={**RENDERS, "every": 3}, run={"log_with": "tensorboard"})
    return output


# ---- where the samples go ---------------------------------------------------------------------

def test_samples_land_in_the_baseline_each_checkpoint_and_between(rendered):
    for folder in (rendered / "samples" / "step-0", rendered / "checkpoint-2" / "samples",
                   rendered / "checkpoint-4" / "samples", rendered / "samples" / "step-3"):
        assert sorted(p.name for p in folder.iterdir()) == ["00.png", "01.png", "grid.png", "prompts.json"], folder
        prompts = json.loads((folder / "prompts.json").read_text())
        assert [entry["seed"] for entry in prompts] == [0, 0]  # the same seed at every render
    # steps 1 and 2 render nothing outside the checkpoint folders
    assert sorted(p.name for p in (rendered / "samples").iterdir()) == ["step-0", "step-3"]


def test_checkpoint_samples_are_part_of_its_manifest(rendered, tmp_path):
    manifest = json.loads((rendered / "checkpoint-2" / "manifest.json").read_text())
    assert {"samples/00.png", "samples/grid.png", "samples/prompts.json", LORA} <= set(manifest["files"])
    copy = shutil.copytree(rendered / "checkpoint-2", tmp_path / "checkpoint-2")
    assert Checkpointer.verify(copy)
    (copy / "samples" / "00.png").write_bytes(b"not the rendered image")
    assert not Checkpointer.verify(copy)  # a sample changed after the commit is caught like a damaged LoRA


def test_the_baseline_is_the_base_model_and_training_changes_the_samples(rendered):
    baseline = (rendered / "samples" / "step-0" / "00.png").read_bytes()
    assert (rendered / "checkpoint-4" / "samples" / "00.png").read_bytes() != baseline


def test_renders_are_logged_to_tensorboard(rendered):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(rendered / "logs" / "tailoredgen-train"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert "validation/00" in tags and "validation/01" in tags
    assert sorted(e.step for e in events.Images("validation/00")) == [0, 2, 3, 4]


# ---- sampling must not change training ----------------------------------------------------------

def test_a_run_with_renders_ends_bit_identical_to_one_without(rendered, plain):
    assert identical(loras(rendered), plain)


def test_negative_control_a_render_that_leaves_its_lora_scale_changes_training(
        tiny_fibo_base, dataset, plain, tmp_path, monkeypatch):
    """The bit-identity check can fail: a renderer that forgets to restore the LoRA scale it
    rendered with trains the following steps at that scale."""
    from peft.tuners.lora import LoraLayer

    original = TrainingRenderer.render

    def careless(self, denoiser, prompts, settings):
        images = original(self, denoiser, prompts, settings)
        for module in denoiser.modules():
            if isinstance(module, LoraLayer):
                module.scaling = {name: value * settings.influence for name, value in module.scaling.items()}
        return images

    monkeypatch.setattr(TrainingRenderer, "render", careless)
    run(tiny_fibo_base, dataset, tmp_path / "out", validation=RENDERS)
    assert not identical(loras(tmp_path / "out"), plain)


def test_a_resume_across_a_render_stays_bit_identical(tiny_fibo_base, dataset, plain, rendered, tmp_path):
    output = tmp_path / "out"
    # stops after step 3, i.e. after the render of checkpoint 2 and the one of step 3
    run(tiny_fibo_base, dataset, output, validation={**RENDERS, "every": 3}, run={"stop_after_steps": 3})
    assert not (output / "checkpoint-4").exists()
    run(tiny_fibo_base, dataset, output, validation={**RENDERS, "every": 3}, resume=True)
    assert identical(loras(output), plain)
    # the resumed run renders what the uninterrupted one rendered
    for image in ("checkpoint-4/samples/00.png", "samples/step-3/01.png", "samples/step-0/00.png"):
        assert (output / image).read_bytes() == (rendered / image).read_bytes(), image


def test_legacy_renders_with_its_prefix_and_do_not_change_training(legacy_bases, tmp_path):
    base = legacy_bases["bria-3.2"]
    dataset = subset_dataset(tmp_path / "data", 2, source=SAMPLE_TEXT_DATASET_DIR)
    runs = {}
    for name, validation in (("plain", None), ("rendered", {**RENDERS, "prompts": ["a red circle"]})):
        output = tmp_path / name
        run(base, dataset, output, version="3.2", validation=validation, prefix=SAMPLE_TEXT_CAPTION_PREFIX)
        runs[name] = output
    assert identical(loras(runs["rendered"]), loras(runs["plain"]))
    prompts = json.loads((runs["rendered"] / "checkpoint-2" / "samples" / "prompts.json").read_text())
    assert prompts[0]["prompt"] == f"{SAMPLE_TEXT_CAPTION_PREFIX} a red circle"


# ---- staged with the checkpoint, and failures -------------------------------------------------

class KillBeforeCommit(Storage):
    """Dies after the checkpoint's files (LoRA and samples) are written, before its manifest."""

    def fault(self, phase: str, step: int) -> None:
        if phase == "lora.files_written" and step == 2:
            raise KeyboardInterrupt("killed")


def test_samples_exist_exactly_when_their_checkpoint_does(tiny_fibo_base, dataset, tmp_path):
    output = tmp_path / "out"
    job = JobSpec(base=str(tiny_fibo_base), dataset_dir=str(dataset), output_dir=str(output),
                  training_version="fibo", params=JOB_PARAMS, engine=tiny_engine(validation=RENDERS))
    with pytest.raises(KeyboardInterrupt):
        run_training(job, storage=KillBeforeCommit())
    assert not (output / "checkpoint-2").exists()
    # what a killed run leaves is a hidden staging folder, removed by the next run; published: the baseline only
    published = [p.relative_to(output) for p in output.rglob("grid.png")
                 if not any(part.startswith(".") for part in p.relative_to(output).parts)]
    assert published == [Path("samples/step-0/grid.png")]
    run(tiny_fibo_base, dataset, output, validation=RENDERS, resume=True)
    assert (output / "checkpoint-2" / "samples" / "grid.png").is_file()
    assert not [p for p in output.rglob(".checkpoint-*")]


def test_a_failed_render_costs_its_samples_not_the_run(tiny_fibo_base, dataset, plain, tmp_path, monkeypatch, caplog):
    def broken(self, denoiser, prompts, settings):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(TrainingRenderer, "render", broken)
    with caplog.at_level(logging.WARNING):
        run(tiny_fibo_base, dataset, tmp_path / "out", validation=RENDERS)
    assert identical(loras(tmp_path / "out"), plain)
    assert not (tmp_path / "out" / "checkpoint-2" / "samples").exists()
    assert "validation render at step 2 failed" in caplog.text


# ---- which prompts ------------------------------------------------------------------------------

def test_training_captions_are_picked_evenly_and_independent_of_metadata_order():
    captions = [(f"img{i:02d}.png", f"caption {i}") for i in range(10)]
    picked = pick_training_captions(captions, 4)
    assert picked == ["caption 0", "caption 2", "caption 5", "caption 7"]
    assert pick_training_captions(list(reversed(captions)), 4) == picked
    assert pick_training_captions(captions[:2], 4) == ["caption 0", "caption 1"]


def test_a_prompt_file_gives_one_prompt_per_line(tmp_path):
    family = family_class("bria-3.2")()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square  \n")
    config = engine_config_from_dict({"validation": {"prompts": str(prompts)}})
    plan = plan_validation(config, family, [], "An illustration of")
    assert plan.prompts == ["An illustration of a red circle", "An illustration of a blue square"]


@pytest.mark.parametrize("prompts, message", [
    (["a cat on a sofa"], "validation.prompts[0]"),  # fibo needs structured JSON
    ("missing.txt", "missing.txt does not exist"),
    ("empty.txt", "holds no prompt"),
])
def test_bad_validation_prompts_are_refused_before_training(tiny_fibo_base, dataset, tmp_path, prompts, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    if isinstance(prompts, str):
        prompts = str(tmp_path / prompts)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run(tiny_fibo_base, dataset, tmp_path / "out", validation={"enabled": True, "prompts": prompts})
    assert not (tmp_path / "out" / "cache").exists(), "no model was loaded, nothing was encoded"


@pytest.mark.parametrize("key, value, fix", [
    ("every", 0, "use 1 or more"),
    ("aspect_ratio", "7:3", "use one of 1:1"),
    ("lora_scale", 2.0, "use 0 to 1.5"),
    ("prompts", [], "non-empty list"),
    ("num_inference_steps", 0, "use 1 to 200"),
    ("enabled", "yes", "should be of type bool"),
])
def test_validation_config_errors_name_the_field(key, value, fix):
    with pytest.raises(ConfigError, match=f"validation.{key}.*{fix}|{fix}"):
        engine_config_from_dict({"validation": {key: value}})


def test_disabled_validation_renders_nothing(tiny_fibo_base, dataset, tmp_path):
    run(tiny_fibo_base, dataset, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.png"))
