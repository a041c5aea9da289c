"""The command line: the contract's rules apply to the train flags, errors name the field and the
fix, and `validate-dataset` / `make-tiny-base` do what they say."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import BriaFiboPipeline
from PIL import Image

from helpers import subset_dataset
from tailoredgen_train.cli import EXIT_USER_ERROR, main

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "fibo-tiny.yaml")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_args(base: Path, dataset: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--base", str(base), "--dataset", str(dataset), "--output", str(output),
            "--training-version", "fibo", "--config", TINY_CONFIG, "--set", "run.log_with=none", *extra]


def test_fully_automated_refuses_advanced_flags(capsys, tiny_fibo_base, tmp_path):
    code, _, err = run_cli(capsys, *train_args(tiny_fibo_base, tmp_path, tmp_path / "out", "--rank", "64"))
    assert code == EXIT_USER_ERROR
    assert "[expert_mode_required]" in err and "rank" in err and "training_mode='expert'" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--rank", "300", "rank=300: Input should be less than or equal to 256"),
    ("--learning-rate", "0.01", "learning_rate=0.01: Input should be less than or equal to 0.001"),
    ("--total-training-steps", "0", "total_training_steps=0: Input should be greater than or equal to 1"),
    ("--lr-scheduler", "warmup_cosine", "lr_scheduler=warmup_cosine: Input should be one of"),
    ("--checkpoint-interval", "50", "checkpoint_interval=50: Input should be greater than or equal to 100"),
    ("--lr-warmup-steps", "2000", "lr_warmup_steps=2000: Input should be less than or equal to 1000"),
])
def test_out_of_range_flags_name_the_field_and_value(capsys, tiny_fibo_base, tmp_path, flag, value, message):
    code, _, err = run_cli(capsys, *train_args(tiny_fibo_base, tmp_path, tmp_path / "out",
                                               "--training-mode", "expert", flag, value))
    assert code == EXIT_USER_ERROR
    assert "[invalid_parameter]" in err and message in err


def test_unknown_training_version(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--base", "x", "--dataset", "y", "--output", str(tmp_path),
                           "--training-version", "fibo-2")
    assert code == EXIT_USER_ERROR and "[unknown_training_version]" in err and "bria-3.2" in err


def test_a_base_of_another_family_is_refused(capsys, tiny_fibo_base, tmp_path):
    code, _, err = run_cli(capsys, "train", "--base", str(tiny_fibo_base), "--dataset", "y", "--output",
                           str(tmp_path / "out"), "--training-version", "bria-3.2")
    assert code != 0 and "[base_model_invalid]" in err and "BriaFiboPipeline" in err and "BriaPipeline" in err
    assert not (tmp_path / "out").exists()


def test_bad_engine_override_names_the_key(capsys, tiny_fibo_base, tmp_path):
    code, _, err = run_cli(capsys, *train_args(tiny_fibo_base, tmp_path, tmp_path / "out",
                                               "--set", "data.resolutoin=512"))
    assert code != 0 and "data.resolutoin" in err


def test_caption_prefix_is_refused_for_json_captions(capsys, tiny_fibo_base, tmp_path):
    code, _, err = run_cli(capsys, *train_args(tiny_fibo_base, tmp_path, tmp_path / "out",
                                               "--caption-prefix", "a photo of"))
    assert code == EXIT_USER_ERROR and "[incompatible_dataset]" in err


def test_validate_dataset_lists_every_bad_file(capsys, tmp_path):
    dataset = subset_dataset(tmp_path / "data", 3)
    rows = [json.loads(line) for line in (dataset / "metadata.jsonl").read_text().splitlines()]
    (dataset / rows[0]["file_name"]).write_bytes(b"")                          # empty
    Image.new("RGB", (40, 40)).save(dataset / rows[1]["file_name"])           # too small
    rows[2]["caption"] = "not json"                                            # invalid caption
    (dataset / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    code, out, _ = run_cli(capsys, "validate-dataset", str(dataset), "--training-version", "fibo",
                           "--config", TINY_CONFIG)
    assert code == EXIT_USER_ERROR
    assert f"{rows[0]['file_name']}: empty_file" in out
    assert f"{rows[1]['file_name']}: too_small" in out
    assert f"{rows[2]['file_name']}: invalid_json" in out

    code, out, _ = run_cli(capsys, "validate-dataset", str(dataset), "--training-version", "fibo",
                           "--config", TINY_CONFIG, "--json")
    report = json.loads(out)
    assert report["ok"] is False and report["valid_images"] == 0
    assert sorted(p["reason"] for p in report["problems"]) == ["empty_file", "invalid_json", "too_small"]


def test_validate_dataset_accepts_the_sample_dataset(capsys):
    from tailoredgen_train.data import SAMPLE_DATASET_DIR

    code, out, _ = run_cli(capsys, "validate-dataset", str(SAMPLE_DATASET_DIR), "--training-version", "fibo",
                           "--config", TINY_CONFIG)
    assert code == 0 and "6 valid images, 0 problems" in out


def test_make_tiny_base_saves_what_the_pipeline_loads(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "make-tiny-base", "--family", "fibo", str(tmp_path / "base"))
    assert code == 0
    pipe = BriaFiboPipeline.from_pretrained(tmp_path / "base")
    assert type(pipe.transformer).__name__ == "BriaFiboTransformer2DModel"
    assert type(pipe.vae).__name__ == "AutoencoderKLWan"
    assert type(pipe.text_encoder).__name__ == "SmolLM3ForCausalLM"
    assert pipe.tokenizer("{}").input_ids  # built locally, loads without a hub


def test_make_tiny_base_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    for name in ("a", "b"):
        assert main(["make-tiny-base", "--family", "fibo", str(tmp_path / name)]) == 0
    for component in ("transformer", "vae", "text_encoder"):
        [fa] = (tmp_path / "a" / component).glob("*.safetensors")
        [fb] = (tmp_path / "b" / component).glob("*.safetensors")
        a, b = load_file(fa), load_file(fb)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_train_command_in_expert_mode_writes_checkpoints(capsys, tiny_fibo_base, tmp_path):
    """The demo's command, shortened: 100 steps is the smallest run with the contract's smallest interval."""
    dataset = subset_dataset(tmp_path / "data", 2)
    code, out, _ = run_cli(capsys, *train_args(tiny_fibo_base, dataset, tmp_path / "out", "--training-mode", "expert",
                                               "--total-training-steps", "100", "--checkpoint-interval", "100",
                                               "--set", "run.log_with=tensorboard"))
    assert code == 0
    assert '"lr_warmup_steps": 100' in out and "checkpoint steps: [100]" in out
    assert (tmp_path / "out" / "checkpoint-100" / "pytorch_lora_weights.safetensors").is_file()
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job["params"]["lr_scheduler"] == "constant_with_warmup"
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))  # TensorBoard via accelerate


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tailoredgen_train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "make-tiny-base" in result.stdout
    assert shutil.which("tailoredgen-train") or (Path(sys.executable).parent / "tailoredgen-train").exists()
