"""Generation: settings, sizes, prompts, the warm LoRA pipeline of each family, and sample files.

Images are compared as uint8 arrays with torch.equal: a served LoRA at influence 0 adds exactly
0 * (B A x) to every adapted layer, so the base's output is reproduced bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from generation_helpers import (FAMILY_NAMES, PROMPTS, base_paths, denoiser_with_lora, fast_settings,
                                pixels, save_lora)
from PIL import Image
from safetensors.torch import save_file

from tailoredgen_train.data import SAMPLE_TEXT_CAPTION_PREFIX, SAMPLE_TEXT_DATASET_DIR, validate_dataset
from tailoredgen_train.errors import BaseModelError, InvalidParameterError, LoraFileError, PromptError
from tailoredgen_train.families import family_class, family_for_base
from tailoredgen_train.inference import (ASPECT_RATIOS, GeneratedImage, GenerationSettings, LoraPipeline,
                                         sample_grid, size_for, write_samples)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def served(tiny_fibo_base, legacy_bases, tmp_path_factory):
    """Per family: its base, a LoRA file made from a non-identity adapter, and a warm LoraPipeline."""
    bases = base_paths(tiny_fibo_base, legacy_bases)
    out = {}
    for name in FAMILY_NAMES:
        family = family_class(name)()
        lora = save_lora(family, denoiser_with_lora(family, bases[name]), tmp_path_factory.mktemp(f"lora-{name}"))
        out[name] = (family, bases[name], lora, LoraPipeline(family, bases[name], device="cpu", dtype=torch.float32))
    return out


# ---- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("influence", 1.6), ("influence", -0.1), ("influence", float("nan")), ("seed", -1), ("seed", 1.5),
    ("num_images", 0), ("num_images", True), ("steps", 0), ("guidance", 0.5), ("aspect_ratio", "7:5"),
    ("resolution", 32), ("negative_prompt", 3),
])
def test_settings_name_the_bad_field(field, value):
    with pytest.raises(InvalidParameterError) as info:
        GenerationSettings(**{field: value})
    assert info.value.errors[0].field_name == field
    assert info.value.code == "invalid_parameter" and info.value.http_status == 400


def test_settings_accept_the_edges():
    GenerationSettings(influence=0, seed=0, num_images=16, steps=1, guidance=1, resolution=64)
    GenerationSettings(influence=1.5, aspect_ratio="16:9", negative_prompt="")


@pytest.mark.parametrize("aspect_ratio", ASPECT_RATIOS)
@pytest.mark.parametrize("multiple", [16, 32, 64])
def test_size_for_keeps_area_ratio_and_multiple(aspect_ratio, multiple):
    w, h = size_for(aspect_ratio, 1024, multiple)
    a, b = (int(x) for x in aspect_ratio.split(":"))
    assert w % multiple == 0 and h % multiple == 0
    assert abs(w * h / 1024**2 - 1) < 0.1
    assert abs(w / h - a / b) / (a / b) < 0.08


def test_size_for_known_sizes():
    assert size_for("1:1", 1024, 16) == (1024, 1024)
    assert size_for("2:3", 1024, 16) == (832, 1248)  # one of FIBO's training buckets
    assert size_for("16:9", 64, 64) == (64, 64)  # never below one step


# ---- prompts ----------------------------------------------------------------------------------

def test_fibo_prompt_is_compact_json_as_training_stores_it():
    fibo = family_class("fibo")()
    assert fibo.prepare_prompt('{ "short_description" : "a fox",\n "objects": [] }') == \
        '{"short_description":"a fox","objects":[]}'


@pytest.mark.parametrize("text", ["a red fox", "[1, 2]", '{"short_description": '])
def test_fibo_plain_text_prompt_is_refused_with_the_shape(text):
    with pytest.raises(PromptError) as info:
        family_class("fibo")().prepare_prompt(text)
    assert info.value.code == "structured_prompt_required" and info.value.http_status == 400
    assert '{"short_description"' in info.value.message and "captioning model" in info.value.message


def test_fibo_takes_no_prefix_and_no_empty_prompt():
    fibo = family_class("fibo")()
    with pytest.raises(InvalidParameterError, match="generation_prefix"):
        fibo.prepare_prompt('{"short_description": "a fox"}', "A photo of")
    with pytest.raises(InvalidParameterError, match="prompt"):
        fibo.prepare_prompt("  ")


@pytest.mark.parametrize("name", ["bria-3.2", "bria-2.3"])
def test_legacy_prompt_gets_the_prefix_exactly_as_training_captions(name):
    family = family_class(name)()
    # what preflight made of the sample dataset's first caption is what generation makes of it
    report = validate_dataset(SAMPLE_TEXT_DATASET_DIR, caption_format="text", min_side=16,
                              max_pixels=10**8, caption_prefix=SAMPLE_TEXT_CAPTION_PREFIX + "  ")
    first = report.samples[0]
    raw = [json.loads(line) for line in (SAMPLE_TEXT_DATASET_DIR / "metadata.jsonl").read_text().splitlines()
           if line.strip()]
    caption = next(r["caption"] for r in raw if r["file_name"] == first.sample_id)
    assert family.prepare_prompt(f"  {caption} ", SAMPLE_TEXT_CAPTION_PREFIX + "  ") == first.caption
    assert family.prepare_prompt("a fox", None) == "a fox"
    with pytest.raises(InvalidParameterError, match="prompt"):
        family.prepare_prompt("")


def test_family_is_found_from_the_base(served, tmp_path):
    for name, (family, base, _, _) in served.items():
        assert family_for_base(base).name == name
    with pytest.raises(BaseModelError, match="model_index.json"):
        family_for_base(str(tmp_path))


# ---- the warm pipeline, for each family -------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_influence_zero_is_the_base_and_one_is_not(served, name):
    family, _, lora, runner = served[name]
    prompt = family.prepare_prompt(PROMPTS[name])
    base = pixels(runner.generate(None, [prompt], fast_settings()))
    zero = pixels(runner.generate(lora, [prompt], fast_settings(influence=0.0)))
    one = pixels(runner.generate(lora, [prompt], fast_settings(influence=1.0)))
    again = pixels(runner.generate(None, [prompt], fast_settings()))  # the LoRA is switched off again
    assert base.shape == (1, 64, 64, 3)
    assert torch.equal(zero, base)
    assert not torch.equal(one, base)  # the negative control: the comparison does see the LoRA
    assert (one.int() - base.int()).abs().max() > 10
    assert torch.equal(again, base)


def test_seeds_and_images_per_prompt(served):
    family, _, lora, runner = served["bria-3.2"]
    prompts = [family.prepare_prompt("a fox"), family.prepare_prompt("a cat")]
    images = runner.generate(lora, prompts, fast_settings(seed=5, num_images=2))
    assert [(i.prompt, i.seed) for i in images] == [("a fox", 5), ("a fox", 6), ("a cat", 5), ("a cat", 6)]
    single = runner.generate(lora, prompts[:1], fast_settings(seed=5))
    assert torch.equal(pixels(single), pixels(images[:1]))  # image 0 does not depend on how many are drawn
    assert not torch.equal(pixels(images[:1]), pixels(images[1:2]))


def test_loaded_loras_are_bounded_and_reloaded(served, tmp_path):
    family, base, lora, _ = served["bria-3.2"]
    other = save_lora(family, denoiser_with_lora(family, base, seed=2), tmp_path / "other")
    runner = LoraPipeline(family, base, device="cpu", dtype=torch.float32, max_loaded=1)
    prompt = [family.prepare_prompt("a fox")]
    first = pixels(runner.generate(lora, prompt, fast_settings()))
    second = pixels(runner.generate(other.parent, prompt, fast_settings()))  # a checkpoint folder works too
    assert runner.loaded == [other.resolve()]
    assert list(runner.pipeline.transformer.peft_config) == ["lora_2"]  # the first was unloaded
    assert not torch.equal(first, second)
    assert torch.equal(pixels(runner.generate(lora, prompt, fast_settings())), first)


@pytest.mark.parametrize("name, foreign", [("bria-2.3", "fibo"), ("fibo", "bria-2.3"), ("bria-3.2", "fibo")])
def test_a_lora_of_another_family_is_refused(served, name, foreign):
    family, _, _, runner = served[name]
    with pytest.raises(LoraFileError, match="does not fit|cannot be loaded"):
        runner.use(served[foreign][2])
    assert not getattr(getattr(runner.pipeline, family.denoiser_component), "peft_config", {}).keys() - {
        n for n in runner._adapters.values()}  # nothing half-loaded stays behind


def test_missing_and_junk_lora_files_are_refused(served, tmp_path):
    _, _, _, runner = served["fibo"]
    with pytest.raises(LoraFileError, match="does not exist"):
        runner.use(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(LoraFileError, match="not a readable safetensors file"):
        runner.use(junk)
    weights = tmp_path / "weights.safetensors"
    save_file({"transformer.proj_out.weight": torch.zeros(2)}, weights)
    with pytest.raises(LoraFileError, match="holds no LoRA tensors"):
        runner.use(weights)
    with pytest.raises(InvalidParameterError, match="influence"):
        runner.use(None, influence=2.0)


# ---- sample files -----------------------------------------------------------------------------

def test_write_samples(tmp_path):
    colours = ["red", "green", "blue", "white", "black"]
    images = [GeneratedImage(Image.new("RGB", (64, 48), c), prompt, seed) for c, prompt, seed in zip(
        colours, ['{"short_description":"a fox on a hill"}', "x" * 500, "a cat", "a", "b"], range(5))]
    paths = write_samples(tmp_path / "samples", images)
    names = [p.name for p in paths]
    assert names == ["00.png", "01.png", "02.png", "03.png", "04.png", "grid.png", "prompts.json"]
    assert Image.open(tmp_path / "samples" / "02.png").getpixel((0, 0)) == (0, 0, 255)
    index = json.loads((tmp_path / "samples" / "prompts.json").read_text())
    assert index[1] == {"file": "01.png", "prompt": "x" * 500, "seed": 1}
    grid = Image.open(tmp_path / "samples" / "grid.png")
    assert grid.width == 4 * 64 and grid.height > 2 * 48  # two rows of four, labels underneath
    assert grid.getpixel((64 + 10, 10)) == (0, 128, 0)


def test_grid_label_shows_the_short_description():
    from tailoredgen_train.inference.samples import prompt_label

    assert prompt_label('{"short_description": "a fox", "objects": []}') == "a fox"
    assert prompt_label('{"objects": []}') == '{"objects": []}'
    assert len(prompt_label("word " * 100)) == 160
    assert sample_grid([GeneratedImage(Image.new("RGB", (32, 32)), "a", 0)]).width == 32
