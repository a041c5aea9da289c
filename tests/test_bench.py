"""scripts/bench.py and its module: the JSON it prints (fields and types, never the times), the
full-size build path (on the meta device: no memory, no time), and the FLOP formula."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import BriaFiboPipeline, BriaFiboTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from tailoredgen_train.benchmark import BenchOptions, bf16_peak_tflops, fibo_step_flop_parts, recipe_config
from tailoredgen_train.engine.lora import add_lora
from tailoredgen_train.families.fibo import FIBO_LORA_TARGETS
from tailoredgen_train.fixtures.tiny_bases import build_random_fibo

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"recipe": str, "size": str, "device": str, "s_per_step": float, "peak_gib": float, "tflops": float,
          "flop_per_step": float, "steps_timed": int, "image_tokens": int, "text_tokens": int, "rank": int,
          "loss_finite": bool, "skipped_steps": int}


@pytest.mark.slow
def test_tiny_bench_of_both_recipes_prints_one_line_each_and_the_ratio(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--size", "tiny", "--recipe", "both", "--steps", "1",
         "--warmup", "1", "--rank", "4", "--text-tokens", "64", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 3
    engine, reference, ratio = lines
    for report, recipe in ((engine, "engine"), (reference, "reference")):
        assert report["recipe"] == recipe and report["size"] == "tiny"
        for name, kind in FIELDS.items():
            assert isinstance(report[name], kind), (name, report[name])
        assert report["mfu"] is None  # CPU: no bf16 peak to compare with
        assert report["text_tokens"] == 64 and report["loss_finite"]
    assert reference["attention_mask"] == "dense_additive" and reference["encoders_every_step"]
    assert reference["gradient_checkpointing"] is True and engine["gradient_checkpointing"] is False
    assert isinstance(ratio["ratio_reference_over_engine"], float)
    # the engine's line times one validation render beside the step; the reference renders nothing
    assert engine["render_ok"] and engine["render_prompts"] == 1 and engine["render_size"] == [128, 128]
    assert engine["render_s"] > 0 and engine["render_peak_gib"] > 0
    assert "render_s" not in reference
    # and one checkpoint save per rank: only the main process copies, serialises and writes
    assert engine["save_s_rank0"] > 0 and engine["resume_state_gib"] > 0
    assert engine["save_host_gib_other_rank"] is None or engine["save_host_gib_other_rank"] < 0.01
    assert "save_s_rank0" not in reference


def test_full_size_fibo_builds_with_the_published_shapes():
    model = build_random_fibo(device=torch.device("meta"), weight_dtype=torch.bfloat16)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model.denoiser) == 8_285_836_848  # models.md 1.1
    assert count(model.encoders["vae"]) == 704_688_668
    assert model.extras["num_blocks"] == 46
    assert model.encoders["text"].text_encoder.config.hidden_size == 2048


def test_full_size_shrinks_for_smoke_runs():
    model = build_random_fibo(device=torch.device("meta"), weight_dtype=torch.bfloat16, num_layers=1,
                                      text_layers=1)
    assert model.extras["num_blocks"] == 2
    assert model.encoders["text"].text_encoder.config.num_hidden_layers == 1


def test_flop_formula_matches_torch_flop_counter_for_the_linear_work():
    torch.manual_seed(0)
    transformer = BriaFiboTransformer2DModel(
        patch_size=1, in_channels=48, num_layers=2, num_single_layers=3, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=96, text_encoder_dim=64, axes_dims_rope=[0, 16, 16])
    add_lora(transformer, rank=16, targets=FIBO_LORA_TARGETS, init="gaussian")
    h = w = 8
    text = 32
    counter = FlopCounterMode(display=False)
    with counter:
        out = transformer(
            hidden_states=torch.randn(1, h * w, 48), encoder_hidden_states=torch.randn(1, text, 96),
            text_encoder_layers=[torch.randn(1, text, 64) for _ in range(5)], timestep=torch.tensor([500.0]),
            img_ids=BriaFiboPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32),
            txt_ids=torch.zeros(text, 3), return_dict=False)[0]
        out.square().mean().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    linear = counts.pop("aten.addmm", 0) + counts.pop("aten.mm", 0)
    parts = fibo_step_flop_parts(transformer.config, image_tokens=h * w, text_tokens=text, rank=16)
    # CPU attention kernels are not counted by FlopCounterMode; everything else is matmuls
    assert sum(v for k, v in parts.items() if k != "attention") == pytest.approx(linear, rel=0.01)


def test_mfu_peak_is_known_for_hopper_and_unknown_for_cpus():
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert bf16_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert bf16_peak_tflops("cpu (2 threads)") is None


def bench_script():
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [(["--sync-debug"], "use it with --recipe engine"),
                                           (["--sync-debug", "--recipe", "engine"], "needs CUDA")])
def test_the_sync_check_flag_is_refused_where_it_cannot_run(argv, message, capsys):
    if torch.cuda.is_available() and message == "needs CUDA":
        pytest.skip("this machine has CUDA: the flag is accepted")
    with pytest.raises(SystemExit) as exit_info:
        bench_script().main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_sync_check_reads_the_loss_back_only_after_its_steps(tmp_path):
    checked = recipe_config("engine", BenchOptions(sync_debug=True, steps=2, warmup=1), tmp_path)
    assert checked.run.host_sync == "log" and checked.run.log_every == 3
    plain = recipe_config("engine", BenchOptions(steps=2, warmup=1), tmp_path)
    assert plain.run.host_sync == "auto" and plain.run.log_every == 1
    assert recipe_config("reference", BenchOptions(sync_debug=True), tmp_path).run.host_sync == "auto"
