"""The command line: the contract's rules apply to the train flags, errors name the field and the
fix, and `validate-dataset` / `make-tiny-base` do what they say."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import BriaFiboPipeline
from PIL import Image

from helpers import params, subset_dataset, tiny_engine, train
from tailoredgen_train.cli import EXIT_FAILURE, EXIT_USER_ERROR, main
from tailoredgen_train.data import (
    SAMPLE_DATASET_DIR,
    SAMPLE_TEXT_CAPTION_PREFIX,
    SAMPLE_TEXT_DATASET_DIR,
    validate_dataset,
)
from tailoredgen_train.engine.cache import FeatureCache, fill_cache
from tailoredgen_train.errors import OutOfMemoryError
from tailoredgen_train.families.fibo import FiboFamily

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
    assert code == EXIT_USER_ERROR
    # blamed on the --set, not on the --config file, with the closest valid key
    assert err.startswith("error [invalid_config]: --set data.resolutoin=512: unknown key data.resolutoin")
    assert "(did you mean data.resolution?)" in err and TINY_CONFIG not in err


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
    log = (tmp_path / "out" / "train.log").read_text()  # the startup summary, as the console showed it
    assert '"lr_warmup_steps": 100' in log and "checkpoint steps: [100]" in log
    assert (tmp_path / "out" / "checkpoint-100" / "pytorch_lora_weights.safetensors").is_file()
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job["params"]["lr_scheduler"] == "constant_with_warmup"
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))  # TensorBoard via accelerate


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tailoredgen_train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "make-tiny-base" in result.stdout
    assert shutil.which("tailoredgen-train") or (Path(sys.executable).parent / "tailoredgen-train").exists()


# ---- what a newcomer meets -----------------------------------------------------------------------


def test_commands_print_no_torchvision_warning():
    """Importing a diffusers pipeline makes transformers warn that its CLIP/SigLIP image processors
    need torchvision; the engine uses neither, and no command prints it."""
    result = subprocess.run([sys.executable, "-m", "tailoredgen_train", "validate-dataset", str(SAMPLE_DATASET_DIR),
                             "--training-version", "fibo", "--config", TINY_CONFIG], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "torchvision" not in result.stderr
    if importlib.util.find_spec("torchvision") is None:  # negative control: without the package, the warning is there
        bare = subprocess.run([sys.executable, "-c", "from diffusers import BriaFiboPipeline"],
                              capture_output=True, text=True)
        assert "requires torchvision (not installed)" in bare.stderr


def test_the_torchvision_filter_drops_nothing_else():
    logger = logging.getLogger("transformers.utils.import_utils")

    def shown(message: str) -> bool:
        return bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, None, None)))

    assert not shown("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                     "`CLIPImageProcessorPil` for backward compatibility.")
    assert shown("Could not import module 'X'. Are this object's requirements defined correctly?")


@pytest.mark.parametrize(("typo", "suggestion"), [
    ("--learnig-rate", " (did you mean --learning-rate?)"),
    ("--learning_rate=1e-4", " (did you mean --learning-rate?)"),
    ("--total-steps", " (did you mean --total-training-steps?)"),
    ("--zzz", ""),  # nothing close: no suggestion
])
def test_a_misspelt_flag_is_one_line_with_the_closest_option(capsys, typo, suggestion):
    with pytest.raises(SystemExit) as info:
        main(["train", "--base", "b", "--dataset", "d", "--output", "o", "--training-version", "fibo", typo, "1"])
    err = capsys.readouterr().err
    assert info.value.code == EXIT_USER_ERROR
    assert err.splitlines() == [f"tailoredgen-train train: error: unrecognized arguments: {typo} 1{suggestion}; "
                                "see tailoredgen-train train --help"]


def test_a_missing_dataset_folder_names_the_flag(capsys, tiny_fibo_base, tmp_path):
    code, _, err = run_cli(capsys, *train_args(tiny_fibo_base, tmp_path / "no-such-folder", tmp_path / "out"))
    assert code == EXIT_USER_ERROR
    assert err.startswith(f"error [dataset_invalid]: --dataset {tmp_path / 'no-such-folder'} does not exist")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("scheduler", "warned"), [("cosine", True), ("linear", True),
                                                   ("constant_with_warmup", False)])
def test_a_warmup_the_scheduler_ignores_is_warned_about(caplog, capsys, tmp_path, scheduler, warned):
    code, _, _ = run_cli(capsys, "train", "--base", "hub/id", "--dataset", str(tmp_path / "missing"), "--output",
                         str(tmp_path / "out"), "--training-version", "fibo", "--training-mode", "expert",
                         "--lr-scheduler", scheduler, "--lr-warmup-steps", "50")
    assert code == EXIT_USER_ERROR  # stopped at the missing dataset, after resolving the parameters
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = f"--lr-warmup-steps 50 is ignored: warmup applies only with --lr-scheduler constant_with_warmup " \
               f"and this run uses {scheduler}"
    assert any(w.startswith(expected) for w in warnings) == warned, warnings


def test_validate_dataset_refuses_a_caption_prefix_the_family_has_none_of(capsys):
    code, _, err = run_cli(capsys, "validate-dataset", str(SAMPLE_DATASET_DIR), "--training-version", "fibo",
                           "--config", TINY_CONFIG, "--caption-prefix", "a photo of")
    assert code == EXIT_USER_ERROR  # what `train` answers too (test_caption_prefix_is_refused_for_json_captions)
    assert err.startswith("error [incompatible_dataset]: a caption_prefix ('a photo of') is for legacy text captions")
    # negative control: a legacy family takes its prefix
    code, out, _ = run_cli(capsys, "validate-dataset", str(SAMPLE_TEXT_DATASET_DIR), "--training-version", "3.2",
                           "--config", str(REPO / "configs" / "bria-3.2-tiny.yaml"),
                           "--caption-prefix", SAMPLE_TEXT_CAPTION_PREFIX)
    assert code == 0 and "6 valid images" in out


@pytest.mark.parametrize(("command", "version", "config"), [
    ("validate-dataset", "fibo", "bria-3.2-tiny.yaml"),
    ("train", "fibo", "bria-3.2-tiny.yaml"),
    ("train", "max", "fibo.yaml"),
    ("validate-dataset", "light", "bria-3.2.yaml"),
])
def test_a_config_of_another_family_is_refused_as_a_family_mismatch(capsys, tmp_path, command, version, config):
    path = str(REPO / "configs" / config)
    argv = ([command, str(SAMPLE_DATASET_DIR)] if command == "validate-dataset" else
            [command, "--base", "hub/id", "--dataset", str(SAMPLE_DATASET_DIR), "--output", str(tmp_path / "out")])
    code, _, err = run_cli(capsys, *argv, "--training-version", version, "--config", path)
    config_family = config.removesuffix(".yaml").removesuffix("-tiny")
    version_family = {"fibo": "fibo", "max": "bria-3.2", "light": "bria-2.3"}[version]
    assert code == EXIT_USER_ERROR
    assert err.startswith(f"error [invalid_config]: family mismatch: --config {path} is written for family "
                          f"{config_family} (its family: key), but training_version '{version}' trains family "
                          f"{version_family}. Pass a {version_family} config (configs/{version_family}.yaml")
    assert not (tmp_path / "out").exists()


def test_a_misspelt_family_gets_the_closest_name(capsys, tmp_path):
    code, _, err = run_cli(capsys, "make-tiny-base", "--family", "fibbo", str(tmp_path / "base"))
    assert code == EXIT_USER_ERROR
    assert err.startswith("error [invalid_config]: --family 'fibbo' has no tiny base (did you mean fibo?); choose "
                          "one of fibo, bria-3.2, bria-2.3, fibo-vlm")
    assert not (tmp_path / "base").exists()


def test_a_config_without_a_family_key_fits_any_family(capsys, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("data:\n  resolution: 128\n  min_side: 128\n")
    for dataset, version in ((SAMPLE_DATASET_DIR, "fibo"), (SAMPLE_TEXT_DATASET_DIR, "2.3")):
        code, out, err = run_cli(capsys, "validate-dataset", str(dataset), "--training-version", version,
                                 "--config", str(config))
        assert code == 0 and "6 valid images" in out, err


def _bad_yaml(tmp_path: Path) -> list[str]:
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n  resolution: : 512\n")
    return ["--config", str(tmp_path / "bad.yaml")]


def _python_tag(tmp_path: Path) -> list[str]:
    marker = tmp_path / "executed"
    (tmp_path / "tag.yaml").write_text(f'data: !!python/object/apply:os.system ["touch {marker}"]\n')
    return ["--config", str(tmp_path / "tag.yaml")]


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path / "a-file"


# (case, command, extra argv from tmp_path, exit code, error code, what the line must name)
BAD_INPUTS = [
    ("unparseable_yaml", "validate", _bad_yaml, EXIT_USER_ERROR, "invalid_config", ["bad.yaml", "line 2, column 13"]),
    ("yaml_python_tag", "validate", _python_tag, EXIT_USER_ERROR, "invalid_config", ["tag.yaml", "python/object"]),
    ("str_family_option", "validate", lambda t: ["--set", "model.max_sequence_length=abc"], EXIT_USER_ERROR,
     "invalid_config", ["model.max_sequence_length='abc' should be of type int"]),
    ("set_value_not_yaml", "validate", lambda t: ["--set", "data.resolution=[512"], EXIT_USER_ERROR,
     "invalid_config", ["--set data.resolution=[512: the value is not valid YAML"]),
    ("set_unknown_section", "validate", lambda t: ["--set", "dta.resolution=512"], EXIT_USER_ERROR,
     "invalid_config", ["--set dta.resolution=512: unknown section dta (did you mean data?)"]),
    ("cache_dir_unwritable", "train", lambda t: ["--set", f"run.cache_dir={_a_file(t)}/cache"], EXIT_USER_ERROR,
     "invalid_config", ["run.cache_dir", "a-file is a file"]),
    ("output_is_a_file", "train", lambda t: ["--output", str(_a_file(t))], EXIT_USER_ERROR, "output_dir_invalid",
     ["--output", "a-file is a file, not a folder"]),
]


@pytest.mark.parametrize(("case", "command", "extra", "exit_code", "error_code", "names"), BAD_INPUTS,
                         ids=[case[0] for case in BAD_INPUTS])
def test_a_bad_config_value_or_file_is_one_coded_line(capsys, tiny_fibo_base, tmp_path, case, command, extra,
                                                       exit_code, error_code, names):
    if command == "validate":
        argv = ["validate-dataset", str(SAMPLE_DATASET_DIR), "--training-version", "fibo", "--config", TINY_CONFIG]
    else:  # --output comes last so that a case may give its own (argparse keeps the last)
        argv = train_args(tiny_fibo_base, subset_dataset(tmp_path / "data", 1), tmp_path / "out")
    code, _, err = run_cli(capsys, *argv, *extra(tmp_path))
    assert code == exit_code, err
    [line] = err.splitlines()
    assert line.startswith(f"error [{error_code}]: ") and "Traceback" not in err
    for name in names:
        assert name in line
    assert not (tmp_path / "executed").exists()  # the python tag was never run


def test_the_real_process_prints_one_line_for_a_bad_config(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tailoredgen_train", "validate-dataset", str(SAMPLE_DATASET_DIR),
                             "--training-version", "fibo", *_python_tag(tmp_path)], capture_output=True, text=True)
    assert result.returncode == EXIT_USER_ERROR
    [line] = result.stderr.splitlines()
    assert line.startswith("error [invalid_config]: config file ") and "Traceback" not in result.stderr


def test_out_of_memory_while_caching_is_an_oom_error_with_the_fix(capsys, tiny_fibo_base, tmp_path, monkeypatch):
    def encode(self, model, pixels, caption, geometry):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setattr(FiboFamily, "encode_sample", encode)
    code, _, err = run_cli(capsys, *train_args(tiny_fibo_base, subset_dataset(tmp_path / "data", 1), tmp_path / "out"))
    assert code == EXIT_FAILURE  # the machine's limit, not a typo
    [line] = [line for line in err.splitlines() if "error [" in line]  # after the loaders' progress bars
    assert err.splitlines()[-1] == line and "Traceback" not in err
    assert line.startswith("error [oom]: out of memory while encoding ") and "Tried to allocate 40.00 GiB" in line
    assert "data.resolution" in line
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.parametrize(("error", "converted"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes."), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x3 and 4x5)"), False),  # a bug stays a bug
])
def test_the_feature_cache_turns_only_out_of_memory_into_oom(tmp_path, error, converted):
    sample = validate_dataset(SAMPLE_DATASET_DIR, caption_format="json", min_side=16).samples[0]
    cache = FeatureCache(tmp_path / "cache", namespace="test")

    def encode(pixels, caption, geometry):
        raise error

    with pytest.raises(RuntimeError if not converted else OutOfMemoryError) as info:
        fill_cache(cache, [cache.item(sample, (128, 128))], encode, rank=0, world_size=1, max_pixels=10**8)
    assert isinstance(info.value, OutOfMemoryError) == converted and not (tmp_path / "cache").exists()


def test_a_run_stopped_by_stop_after_steps_says_where_and_how_to_continue(capsys, caplog, tiny_fibo_base, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, *train_args(tiny_fibo_base, subset_dataset(tmp_path / "data", 1), out,
                                                  "--set", "run.stop_after_steps=1"))
    assert code == 0
    [message] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped after step")]
    assert message == (
        f"stopped after step 1 of 750 (run.stop_after_steps=1): resume state in {out / 'resume' / 'step-1'}; "
        "no LoRA published (the next checkpoint is step 500). To continue, run the same command with --resume "
        "and without --set run.stop_after_steps (or with a larger value)."
    )
    assert (out / "resume" / "step-1" / "manifest.json").is_file()
    assert "stopped early at step 1 of 750. No LoRA file published." in caplog.text


def test_a_stopped_run_names_the_lora_it_did_publish(caplog, tiny_fibo_base, tmp_path):
    engine = tiny_engine(run={"stop_after_steps": 3})
    train(tiny_fibo_base, tmp_path / "out", params(4, rank=4, interval=2), dataset=subset_dataset(tmp_path / "d", 1),
          engine=engine)
    [message] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped after step")]
    assert (f"LoRA published for step(s) 2, newest in {tmp_path / 'out' / 'checkpoint-2'}; none for step 3."
            in message)
