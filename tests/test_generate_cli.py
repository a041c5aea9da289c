"""`tailoredgen-train generate`: each family end to end from a run folder, the generation prefix,
and every bad input as exit code 2 with one coded line that names the flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from generation_helpers import FAMILY_NAMES, PROMPTS, base_paths, denoiser_with_lora, save_lora
from PIL import Image

from tailoredgen_train.cli import main
from tailoredgen_train.config import load_engine_config
from tailoredgen_train.contract import resolve_training_parameters
from tailoredgen_train.engine.checkpoint import LORA_FILE, Checkpointer
from tailoredgen_train.families import family_class
from tailoredgen_train.recipe import JobSpec

pytestmark = pytest.mark.usefixtures("one_thread")
PREFIX = "A minimalist flat illustration of"
VERSIONS = {"fibo": "fibo", "bria-3.2": "3.2", "bria-2.3": "2.3"}


@pytest.fixture(scope="module")
def runs(tiny_fibo_base, legacy_bases, tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """Per family: (base, run folder) with a real job.json (trained at resolution 64; legacy runs
    with a caption prefix) and two published checkpoints, 100 and 200."""
    bases = base_paths(tiny_fibo_base, legacy_bases)
    out = {}
    for name in FAMILY_NAMES:
        family = family_class(name)()
        denoiser = denoiser_with_lora(family, bases[name])
        run = tmp_path_factory.mktemp(f"run-{name}")
        job = JobSpec(base=bases[name], dataset_dir="unused", output_dir=str(run), training_version=VERSIONS[name],
                      params=resolve_training_parameters(VERSIONS[name], "fully_automated", {}),
                      engine=load_engine_config(None, ["data.resolution=64"]),
                      caption_prefix=None if name == "fibo" else PREFIX)
        (run / "job.json").write_text(json.dumps({**job.to_dict(), "engine_version": "test"}))
        checkpointer = Checkpointer(run)
        for step in (100, 200):
            checkpointer.publish(step, lambda staging: save_lora(family, denoiser, staging))
        out[name] = (bases[name], run)
    return out


def generate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", "--steps", "2", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_generate_from_a_run_folder(runs, name, tmp_path, capsys):
    base, run = runs[name]
    out = tmp_path / "out"
    code, stdout, stderr = generate(capsys, "--base", base, "--lora", str(run), "--prompt", PROMPTS[name],
                                    "--num-images", "2", "--out", str(out))
    assert code == 0, stderr
    assert "newest checkpoint" in stdout and "step 200" in stdout
    written = ["00.png", "01.png", "grid.png", "prompts.json"]
    assert [line for line in stdout.splitlines() if line.startswith(str(out))] == [str(out / f) for f in written]
    assert Image.open(out / "00.png").size == (64, 64)  # the run's training resolution, from its job.json
    assert Image.open(out / "grid.png").width == 2 * 64
    index = json.loads((out / "prompts.json").read_text())
    expected = family_class(name)().prepare_prompt(PROMPTS[name], None if name == "fibo" else PREFIX)
    assert [(r["prompt"], r["seed"]) for r in index] == [(expected, 0), (expected, 1)]
    if name != "fibo":
        assert expected == f"{PREFIX} {PROMPTS[name]}"


@pytest.mark.parametrize("flags, prompt", [
    ([], f"{PREFIX} a fox"),
    (["--no-generation-prefix"], "a fox"),
    (["--generation-prefix", "A photo of "], "A photo of a fox"),
])
def test_generation_prefix(runs, tmp_path, capsys, flags, prompt):
    base, run = runs["bria-3.2"]
    # a checkpoint folder inside a run still finds the run's job.json (prefix, resolution)
    code, _, stderr = generate(capsys, "--base", base, "--lora", str(run / "checkpoint-100"), "--prompt", "a fox",
                               "--out", str(tmp_path), *flags)
    assert code == 0, stderr
    assert json.loads((tmp_path / "prompts.json").read_text())[0]["prompt"] == prompt


def test_checkpoint_step_prompt_file_and_the_base_alone(runs, tmp_path, capsys):
    base, run = runs["bria-2.3"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n\na cat\n")
    code, stdout, stderr = generate(capsys, "--base", base, "--lora", str(run), "--checkpoint-step", "100",
                                    "--prompt-file", str(prompts), "--out", str(tmp_path / "a"))
    assert code == 0, stderr
    assert "newest" not in stdout
    assert [r["prompt"] for r in json.loads((tmp_path / "a" / "prompts.json").read_text())] == \
        [f"{PREFIX} a fox", f"{PREFIX} a cat"]
    code, _, stderr = generate(capsys, "--base", base, "--prompt", "a fox", "--resolution", "64", "--aspect-ratio",
                               "16:9", "--out", str(tmp_path / "b"))
    assert code == 0, stderr
    assert Image.open(tmp_path / "b" / "00.png").size == (64, 64)  # 2.3's sides are multiples of 64


def _error_cases(tmp: Path, runs) -> list[tuple[list[str], str, str]]:
    fibo, fibo_run = runs["fibo"]
    legacy, legacy_run = runs["bria-3.2"]
    junk = tmp / "junk" / LORA_FILE
    junk.parent.mkdir()
    junk.write_bytes(b"\x00" * 64)
    empty = tmp / "empty.txt"
    empty.write_text("\n  \n")
    fox = ["--prompt", "a fox"]
    return [
        (["--base", legacy, "--lora", str(tmp / "missing"), *fox], "lora_invalid", "--lora"),
        (["--base", legacy, "--lora", str(junk), *fox], "lora_invalid", "--lora"),
        (["--base", legacy, "--lora", str(tmp), *fox], "lora_invalid", "--lora"),
        (["--base", legacy, "--lora", str(legacy_run), "--checkpoint-step", "150", *fox], "not_found",
         "--checkpoint-step 150: run"),
        (["--base", legacy, "--lora", str(legacy_run / "checkpoint-100"), "--checkpoint-step", "100", *fox],
         "lora_invalid", "--checkpoint-step"),
        (["--base", legacy, "--checkpoint-step", "100", *fox], "lora_invalid", "--checkpoint-step"),
        (["--base", fibo, "--lora", str(legacy_run), "--prompt", PROMPTS["fibo"]], "lora_invalid", "--lora"),
        (["--base", legacy, *fox, "--influence", "1.6"], "invalid_parameter", "--influence=1.6"),
        (["--base", legacy, *fox, "--aspect-ratio", "7:5"], "invalid_parameter", "--aspect-ratio=7:5"),
        (["--base", legacy, *fox, "--num-images", "0"], "invalid_parameter", "--num-images=0"),
        (["--base", legacy, *fox, "--resolution", "8"], "invalid_parameter", "--resolution=8"),
        (["--base", legacy, *fox, "--device", "nonsense"], "invalid_parameter", "--device"),
        (["--base", fibo, *fox], "structured_prompt_required", "--prompt: FIBO needs a structured JSON prompt"),
        (["--base", fibo, "--prompt", PROMPTS["fibo"], "--generation-prefix", "A photo of"], "invalid_parameter",
         "--generation-prefix"),
        (["--base", legacy, "--prompt-file", str(empty)], "invalid_parameter", "--prompt-file"),
        (["--base", legacy, "--prompt-file", str(tmp / "nope.txt")], "invalid_parameter", "--prompt-file"),
        (["--base", legacy, "--prompt", "  "], "invalid_parameter", "--prompt"),
        (["--base", legacy], "invalid_parameter", "--prompt"),
    ]


def test_every_bad_input_is_one_coded_line_naming_the_flag(runs, tmp_path, capsys):
    for args, code_name, flag in _error_cases(tmp_path, runs):
        code, stdout, stderr = generate(capsys, *args, "--out", str(tmp_path / "out"))
        errors = [line for line in stderr.splitlines() if line.startswith("error [")]
        assert code == 2, (args, stderr)
        assert "Traceback" not in stderr, args
        assert len(errors) == 1 and errors[0] == stderr.splitlines()[-1], (args, stderr)
        assert errors[0].startswith(f"error [{code_name}]: ") and flag in errors[0], (args, errors)
        assert not (tmp_path / "out").exists()


def test_a_damaged_checkpoint_is_never_picked(runs, tmp_path):
    import shutil

    from tailoredgen_train.errors import LoraFileError
    from tailoredgen_train.inference import find_lora

    run = tmp_path / "run"
    shutil.copytree(runs["bria-3.2"][1], run)
    newest = run / "checkpoint-200" / LORA_FILE
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte: only the manifest's sha256 notices
    newest.write_bytes(bytes(data))
    source = find_lora(run)
    assert source.step == 100 and "step 100" in source.note and source.caption_prefix == PREFIX
    assert source.family_name == "bria-3.2" and source.training_resolution == 64
    with pytest.raises(LoraFileError, match="damaged"):
        find_lora(run, 200)
    assert find_lora(newest).job is not None  # the file alone still finds its run


def test_a_plain_fibo_prompt_is_expanded_by_the_captioning_model(runs, tiny_vlm, tmp_path, capsys):
    """With --vlm, plain text becomes a structured JSON prompt first (FIBO-VLM's <generate>), and
    the JSON used is reported; without it the same prompt is refused (the table above)."""
    base, run = runs["fibo"]
    out = tmp_path / "out"
    code, stdout, stderr = generate(capsys, "--base", base, "--lora", str(run), "--prompt", "a red fox in the snow",
                                    "--prompt", PROMPTS["fibo"], "--vlm", str(tiny_vlm), "--out", str(out))
    assert code == 0, stderr
    assert stdout.count("expanded by") == 1  # the JSON prompt is used as given
    used = [entry["prompt"] for entry in json.loads((out / "prompts.json").read_text())]
    expanded = json.loads(used[0])
    assert isinstance(expanded, dict) and expanded, used[0]
    assert f"into {used[0]}" in stdout
    assert used[1] == json.dumps(json.loads(PROMPTS["fibo"]), separators=(",", ":"))
