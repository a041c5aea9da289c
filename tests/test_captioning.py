"""Captioning with the tiny random Qwen3-VL (built with the real classes, loaded as `--vlm DIR` loads):
valid captions for every image, the failure path, reruns, overwrite, untouched images, atomic writes,
visual schemas, prompt expansion, and the prompt the VLM sees."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tailoredgen_train.captioning import (
    Captioner,
    CaptionLimits,
    CaptionResult,
    caption_dataset,
    fibo_prompt,
    inspire_messages,
    load_vlm,
)
from tailoredgen_train.cli import EXIT_USER_ERROR, main
from tailoredgen_train.data import SAMPLE_DATASET_DIR
from tailoredgen_train.data.caption_format import unknown_fields
from tailoredgen_train.data.preflight import validate_dataset
from tailoredgen_train.errors import CaptionFailedError, CaptionInputError, DatasetInvalidError, VlmInvalidError
from tailoredgen_train.fixtures.tiny_vlm import TINY_MAX_PIXELS, TINY_MIN_PIXELS

LIMITS = CaptionLimits.uniform(3, max_objects=1, max_text_renders=1)
REPO = Path(__file__).resolve().parents[1]
FAST = ["--string-tokens", "3", "--max-pixels", str(TINY_MAX_PIXELS // 4)]


pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny VLM: one intra-op thread is faster


@pytest.fixture(scope="module")
def captioner(tiny_vlm) -> Captioner:
    return Captioner.load(str(tiny_vlm), min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS // 4,
                          limits=LIMITS, batch_size=6)


def image_folder(root: Path, count: int = 6) -> Path:
    """The sample dataset's images, without their metadata: what a new user has."""
    root.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in SAMPLE_DATASET_DIR.iterdir() if p.suffix in (".png", ".jpg"))[:count]:
        shutil.copy(path, root / path.name)
    return root


def image_hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())
            if p.suffix in (".png", ".jpg")}


def captions(root: Path) -> dict[str, str]:
    lines = (root / "metadata.jsonl").read_text().splitlines()
    return {row["file_name"]: row["caption"] for row in map(json.loads, lines)}


# ---- the prompt the VLM sees -----------------------------------------------------------------------------


def test_the_prompt_is_fibos_inspire_turn_in_qwen3vls_chat_format(captioner):
    image = Image.new("RGB", (96, 64), (10, 20, 30))
    processor = captioner.processor
    text = processor.apply_chat_template(inspire_messages(image), tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><inspire><|im_end|>\n"
                    "<|im_start|>assistant\n")
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grid = inputs["image_grid_thw"][0]
    # one pad per 2x2 merge of 16-pixel patches, between vision_start and vision_end
    assert ids.count(pad) == int(grid.prod()) // processor.image_processor.merge_size ** 2 > 0
    start = ids.index(processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    assert ids[start + 1 + ids.count(pad)] == processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    tail = processor.tokenizer.decode(ids[start + 2 + ids.count(pad):])
    assert tail == "<inspire><|im_end|>\n<|im_start|>assistant\n"
    assert inputs["mm_token_type_ids"][0].tolist() == [int(i == pad) for i in ids]


# ---- captions --------------------------------------------------------------------------------------------


def test_every_image_gets_a_valid_caption(captioner):
    images = [Image.new("RGB", (48 + 16 * i, 64), (40 * i, 200 - 30 * i, 90)) for i in range(6)]  # mixed sizes
    results = captioner.caption_images(images)
    assert len(results) == 6 and all(r.ok and r.attempts == 1 for r in results)
    for result in results:
        caption = json.loads(result.caption)
        assert result.caption == json.dumps(caption, separators=(",", ":"))  # compact, as stored
        assert unknown_fields(caption) == [] and "short_description" in caption


def test_caption_writes_every_missing_caption_and_never_touches_the_images(captioner, tmp_path):
    root = image_folder(tmp_path / "ds")
    before = image_hashes(root)
    summary = caption_dataset(root, captioner, progress=False)
    assert (len(summary.captioned), len(summary.kept), summary.failed) == (6, 0, [])
    assert image_hashes(root) == before
    assert set(captions(root)) == set(before)
    assert validate_dataset(root, caption_format="json", min_side=32).ok
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging file left

    stamp = (root / "metadata.jsonl").stat().st_mtime_ns
    again = caption_dataset(root, captioner, progress=False)
    assert (len(again.captioned), len(again.kept)) == (0, 6)
    assert (root / "metadata.jsonl").stat().st_mtime_ns == stamp  # nothing new: not even rewritten

    first = captions(root)
    redone = caption_dataset(root, captioner, overwrite=True, seed=7, progress=False)
    assert (len(redone.captioned), len(redone.kept)) == (6, 0)
    assert captions(root) != first and image_hashes(root) == before


def test_existing_captions_and_other_keys_are_kept(captioner, tmp_path):
    root = image_folder(tmp_path / "ds", 4)
    names = sorted(image_hashes(root))
    lines = [{"file_name": names[0], "caption": '{"short_description":"mine"}', "source": "hand-written"},
             {"file_name": names[1], "caption": None, "source": "scraped"},
             {"file_name": names[2], "caption": "   "}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = caption_dataset(root, captioner, progress=False)
    assert summary.kept == [names[0]] and sorted(summary.captioned) == names[1:]
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert rows[0] == lines[0] and rows[1]["source"] == "scraped" and rows[3]["file_name"] == names[3]


def test_a_budget_too_small_fails_every_image_and_writes_nothing(tiny_vlm, tmp_path):
    small = Captioner.load(str(tiny_vlm), min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS // 4,
                           limits=LIMITS, batch_size=6, max_new_tokens=30)
    root = image_folder(tmp_path / "ds", 3)
    summary = caption_dataset(root, small, progress=False)
    assert summary.captioned == [] and len(summary.failed) == 3
    for failure in summary.failed:
        assert failure.code == "caption_failed" and "token budget (30) ran out" in failure.detail
        assert failure.raw.startswith('{"short_description":')  # the raw text comes back for the report
    assert not (root / "metadata.jsonl").exists()
    result = small.caption_images([Image.new("RGB", (64, 64))])[0]
    assert not result.ok and result.attempts == 2  # retried once at another seed
    with pytest.raises(CaptionFailedError) as error:
        small.expand_prompt("a cat")
    assert error.value.raw and error.value.code == "caption_failed"


def test_legacy_captions_are_text_that_continues_the_prefix(captioner, tmp_path):
    root = image_folder(tmp_path / "ds", 3)
    prefix = "A minimalist flat illustration of"
    summary = caption_dataset(root, captioner, caption_format="text", caption_prefix=prefix, progress=False)
    assert len(summary.captioned) == 3
    report = validate_dataset(root, caption_format="text", min_side=32, caption_prefix=prefix)
    assert report.ok and all(s.caption.startswith(prefix + " ") for s in report.samples)
    assert not any(c.startswith(prefix) for c in captions(root).values())  # stored without the prefix


def test_a_visual_schema_keeps_captions_consistent(captioner):
    images = [Image.new("RGB", (64, 64), (60 * i, 90, 200)) for i in range(3)]
    schema = {"style_medium": "digital illustration", "lighting": {"conditions": "flat studio light"}}
    fixed = [json.loads(r.caption) for r in captioner.caption_images(images, visual_schema=schema)]
    assert all(c["style_medium"] == "digital illustration" for c in fixed)
    assert all(c["lighting"]["conditions"] == "flat studio light" for c in fixed)
    free = [json.loads(r.caption) for r in captioner.caption_images(images)]  # negative control
    assert not any(c.get("style_medium") == "digital illustration" for c in free)


def test_visual_schema_takes_five_to_ten_images(captioner):
    images = [Image.new("RGB", (64, 64), (40 * i, 0, 0)) for i in range(5)]
    with pytest.raises(CaptionInputError, match="5 to 10 images, got 4"):
        captioner.visual_schema(images[:4])
    schema = captioner.visual_schema(images)
    assert isinstance(schema, dict) and unknown_fields(schema) == []


def test_expand_and_refine_return_compact_json_prompts(captioner):
    expanded = captioner.expand_prompt("a cat on a sofa", {"style_medium": "photograph"})
    assert json.loads(expanded)["style_medium"] == "photograph" and " " not in expanded[:2]
    refined = captioner.refine(expanded, "make it night")
    assert unknown_fields(json.loads(refined)) == [] and refined == json.dumps(json.loads(refined),
                                                                                separators=(",", ":"))
    with pytest.raises(CaptionInputError, match="must be a JSON object"):
        captioner.refine("a cat", "make it night")
    with pytest.raises(CaptionInputError, match="empty"):
        captioner.expand_prompt("  ")


def test_fibo_prompt_expands_plain_text_only(captioner):
    assert fibo_prompt(' {"short_description": "a cat"} ', None) == ('{"short_description":"a cat"}', False)
    with pytest.raises(CaptionInputError, match="configure a captioning model"):
        fibo_prompt("a cat", None)
    text, expanded = fibo_prompt("a cat", captioner)
    assert expanded and "short_description" in json.loads(text)


# ---- loading ---------------------------------------------------------------------------------------------


def test_a_folder_that_is_not_a_qwen3vl_is_refused(tmp_path, tiny_vlm):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(VlmInvalidError, match="'llama' model, not a Qwen3-VL"):
        load_vlm(str(tmp_path / "llama"))
    with pytest.raises(VlmInvalidError, match="none of its subfolders holds a Qwen3-VL"):
        load_vlm(str(tmp_path))
    with pytest.raises(VlmInvalidError, match="does not exist"):
        load_vlm(str(tmp_path / "nowhere" / "vlm"))
    # a diffusers-style folder whose component is the VLM loads
    shutil.copytree(tiny_vlm, tmp_path / "pipeline" / "vlm")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    assert load_vlm(str(tmp_path / "pipeline")).source == str(tmp_path / "pipeline" / "vlm")


# ---- the command line ------------------------------------------------------------------------------------


def test_cli_caption_and_make_tiny_base(capsys, tmp_path):
    vlm = tmp_path / "vlm"
    assert main(["make-tiny-base", "--family", "fibo-vlm", str(vlm)]) == 0
    root = image_folder(tmp_path / "ds", 2)
    assert main(["caption", str(root), "--training-version", "fibo", "--vlm", str(vlm), *FAST]) == 0
    assert "captioned 2, kept 0, failed 0" in capsys.readouterr().out
    assert main(["caption", str(root), "--training-version", "fibo", "--vlm", str(vlm), *FAST,
                 "--max-new-tokens", "20", "--overwrite", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [f["code"] for f in report["failed"]] == ["caption_failed"] * 2 and report["failed"][0]["raw"]
    assert main(["caption", str(root), "--training-version", "fibo", "--vlm", str(root), "--overwrite"]) == 1
    assert "[vlm_invalid]" in capsys.readouterr().err
    assert main(["caption", str(root), "--training-version", "2.3", "--caption-prefix", "A photo of",
                 "--vlm", str(vlm), *FAST, "--overwrite"]) == 0
    assert validate_dataset(root, caption_format="text", min_side=32, caption_prefix="A photo of").ok


def test_cli_visual_schema_and_expand_prompt(capsys, tmp_path, tiny_vlm):
    root = image_folder(tmp_path / "ds", 5)
    assert main(["visual-schema", str(root), "--vlm", str(tiny_vlm), *FAST]) == 0
    assert (root / "visual_schema.json").is_file() and capsys.readouterr().err.endswith(
        f"visual schema written to {root / 'visual_schema.json'}\n")
    (root / "visual_schema.json").write_text(json.dumps({"style_medium": "watercolor"}))
    assert main(["caption", str(root), "--training-version", "fibo", "--vlm", str(tiny_vlm), *FAST]) == 0
    assert all(json.loads(c)["style_medium"] == "watercolor" for c in captions(root).values())
    assert main(["expand-prompt", "a cat on a sofa", "--vlm", str(tiny_vlm), "--schema",
                 str(root / "visual_schema.json"), *FAST]) == 0  # --refine: the API test covers refine()
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["style_medium"] == "watercolor"
    assert main(["visual-schema", *[str(p) for p in sorted(root.glob("*.png"))[:2]], "--vlm", str(tiny_vlm)]) \
        == EXIT_USER_ERROR
    assert "[invalid_caption_input]" in capsys.readouterr().err


@pytest.mark.slow
def test_a_kill_while_writing_leaves_the_old_metadata_and_a_rerun_continues(tmp_path, tiny_vlm):
    root = image_folder(tmp_path / "ds", 4)
    before = image_hashes(root)
    # the CLI in a child that SIGKILLs itself inside the second write: after the staging file is
    # complete and fsynced, before the rename
    driver = (
        "import os, signal, sys\n"
        "from tailoredgen_train.cli import main\n"
        "replace, calls = os.replace, []\n"
        "def dying_replace(src, dst):\n"
        "    calls.append(dst)\n"
        "    if len(calls) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    replace(src, dst)\n"
        "os.replace = dying_replace\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["caption", str(root), "--training-version", "fibo", "--vlm", str(tiny_vlm), *FAST, "--batch-size", "2"]
    child = subprocess.run([sys.executable, "-c", driver, *args], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert len(captions(root)) == 2  # the first batch's file, whole: every line parses
    staging = [p for p in root.iterdir() if p.name.startswith(".metadata.jsonl.tmp-")]
    assert len(staging) == 1 and len(staging[0].read_text().splitlines()) == 4  # the new one never went live

    rerun = subprocess.run([sys.executable, "-m", "tailoredgen_train", *args], env=env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "captioned 2, kept 2, failed 0" in rerun.stdout
    assert len(captions(root)) == 4 and image_hashes(root) == before
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # the dead run's staging file is gone


def test_bench_caption_tiny_prints_both_modes_and_the_overhead(capsys):
    spec = importlib.util.spec_from_file_location("bench_caption", REPO / "scripts" / "bench_caption.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--size", "tiny", "--images", "2", "--batch-size", "2", "--repeat", "1",
                       "--string-tokens", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    constrained, unconstrained, overhead = lines
    assert (constrained["mode"], unconstrained["mode"]) == ("constrained", "unconstrained")
    assert constrained["failed"] == 0 and constrained["tokens_per_caption"] == unconstrained["tokens_per_caption"] > 0
    for key in ("images_per_s", "tokens_per_s", "ms_per_step", "peak_gib"):
        assert constrained[key] > 0 and unconstrained[key] > 0
    assert 0 < constrained["grammar_ms_per_step"] < constrained["ms_per_step"] and overhead["grammar_overhead"] > 0


class _FlakyCaptioner(Captioner):
    """Runs out of memory on batches of more than one image, and on the image named "huge"."""

    def __init__(self):
        self.batch_size = 3
        self.calls = []

    def caption_images(self, images, **options):
        self.calls.append(len(images))
        if len(images) > 1 or images[0].size == (99, 99):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [CaptionResult('{"short_description":"x"}')]


def test_out_of_memory_redoes_the_batch_image_by_image(tmp_path):
    root = image_folder(tmp_path / "ds", 2)
    Image.new("RGB", (99, 99)).save(root / "huge.png")
    captioner = _FlakyCaptioner()
    summary = caption_dataset(root, captioner, progress=False)
    assert captioner.calls == [3, 1, 1, 1]
    assert [(f.file_name, f.code) for f in summary.failed] == [("huge.png", "oom")] and len(summary.captioned) == 2
    assert "huge.png" not in captions(root)


class _NamingCaptioner(Captioner):
    """Captions each image with its size: enough to check what caption_dataset writes where."""

    def __init__(self):
        self.batch_size = 2

    def caption_images(self, images, **options):
        return [CaptionResult(json.dumps({"short_description": f"{i.size}"}, separators=(",", ":"))) for i in images]


def test_a_csv_dataset_gets_a_jsonl_and_odd_lines_are_left_alone(tmp_path):
    root = image_folder(tmp_path / "ds", 3)
    names = sorted(image_hashes(root))
    csv_text = f"file_name,caption\n{names[0]},\n{names[1]},\"{{\"\"short_description\"\":\"\"mine\"\"}}\"\n"
    (root / "metadata.csv").write_text(csv_text)
    summary = caption_dataset(root, _NamingCaptioner(), progress=False)
    assert summary.kept == [names[1]] and summary.captioned == [names[0], names[2]]
    assert (root / "metadata.csv").read_text() == csv_text  # left as it was; metadata.jsonl now wins
    assert validate_dataset(root, caption_format="json", min_side=32).ok

    lines = [{"file_name": "../outside.png", "caption": None}, {"file_name": names[0], "caption": None},
             {"file_name": f"./{names[0]}", "caption": None}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = caption_dataset(root, _NamingCaptioner(), progress=False)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert rows[0] == lines[0] and rows[2] == lines[2]  # unsafe and duplicate lines: preflight reports them
    assert rows[1]["caption"] and sorted(summary.captioned) == names


def test_a_broken_metadata_file_is_refused_not_rewritten(tmp_path):
    root = image_folder(tmp_path / "ds", 1)
    (root / "metadata.jsonl").write_text('{"file_name": "a.png"\n')
    with pytest.raises(DatasetInvalidError, match="malformed"):
        caption_dataset(root, _NamingCaptioner(), progress=False)
    assert (root / "metadata.jsonl").read_text() == '{"file_name": "a.png"\n'
