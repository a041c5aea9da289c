#!/usr/bin/env bash
# The short GPU check: the demo's training on CUDA (bf16 base, fp32 LoRA, fused AdamW, cuDNN SDPA
# off), the LoRA loaded back into BriaFiboPipeline on the GPU, and the tiny benchmark.
# Usage on a GPU machine with torch, transformers, accelerate, peft and diffusers installed (the
# device image lacks diffusers: carry the wheels in .whl/ and `pip install --no-deps --target /tmp/site`):
#   bash scripts/gpu_check.sh [OUT_DIR]
#   FULL_BENCH=1 bash scripts/gpu_check.sh      # then also the full-size FIBO benchmark (two runs, each meant to take < 5 min)
#   FULL_BENCH=only bash scripts/gpu_check.sh   # only the full-size FIBO benchmark
#   RENDER_BENCH=only bash scripts/gpu_check.sh # only a 4-prompt validation render at 1024^2 of the full-size
#                                               # FIBO in bf16 beside its step (render_s, render_peak_gib)
#   CAPTION_BENCH=only bash scripts/gpu_check.sh  # only 20 captions at 1024^2 with a Qwen3-VL-4B-shaped VLM
#   SYNC_CHECK=only bash scripts/gpu_check.sh   # only the full-size FIBO step under torch.cuda.set_sync_debug_mode
#                                               # ("error") with logging off: a hidden host sync fails it
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-check}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rm -rf "$out"; mkdir -p "$out"
full_bench() {
  # random-weight full-size FIBO, 1024^2, 1536-token caption, r=128: engine vs Bria's recipe, then low memory
  python3 scripts/bench.py --size full --recipe both 2> "$out/bench-full.log" | tee "$out/bench-full.jsonl"
  python3 scripts/bench.py --size full --recipe engine --low-memory 2> "$out/bench-low-memory.log" \
      | tee "$out/bench-low-memory.jsonl"
}
render_bench() {
  python3 scripts/bench.py --size full --recipe engine --steps 3 --warmup 2 --render-prompts 4 --render-steps 30 \
      2> "$out/bench-render.log" | tee "$out/bench-render.jsonl"
}
caption_bench() {
  python3 scripts/bench_caption.py --size full --images 20 2> "$out/bench-caption.log" | tee "$out/bench-caption.jsonl"
}
sync_check() {
  python3 scripts/bench.py --size full --recipe engine --steps 2 --warmup 2 --render-prompts 0 --sync-debug \
      2> "$out/bench-sync.log" | tee "$out/bench-sync.jsonl"
  grep -q '"sync_debug": "ok"' "$out/bench-sync.jsonl"
}
if [ "${SYNC_CHECK:-0}" = only ]; then
  sync_check
  echo GPU_CHECK_OK
  exit 0
fi
if [ "${FULL_BENCH:-0}" = only ]; then
  full_bench
  echo GPU_CHECK_OK
  exit 0
fi
if [ "${RENDER_BENCH:-0}" = only ]; then
  render_bench
  echo GPU_CHECK_OK
  exit 0
fi
if [ "${CAPTION_BENCH:-0}" = only ]; then
  caption_bench
  echo GPU_CHECK_OK
  exit 0
fi
python3 - <<'PY'
import torch, diffusers, transformers, peft, accelerate
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("diffusers", diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "accelerate", accelerate.__version__)
PY
python3 -m tailoredgen_train make-tiny-base --family fibo "$out/base"
python3 -m tailoredgen_train train --base "$out/base" --dataset tailoredgen_train/data/sample_dataset \
    --output "$out/demo" --training-version fibo --training-mode expert \
    --total-training-steps 200 --checkpoint-interval 100 --config configs/fibo-tiny.yaml 2>&1 | grep -v "it/s\]" | tail -20
python3 - "$out" <<'PY'
import sys, json, torch
from diffusers import BriaFiboPipeline
out = sys.argv[1]
job = json.load(open(f"{out}/demo/job.json"))
print("engine_version", job["engine_version"])
prompt = '{"short_description":"a red circle on a blue background"}'
def run(pipe):
    return pipe(prompt, height=128, width=128, num_inference_steps=4, output_type="pt",
                generator=torch.Generator("cuda").manual_seed(0)).images.float()
pipe = BriaFiboPipeline.from_pretrained(f"{out}/base", torch_dtype=torch.bfloat16).to("cuda")
base = run(pipe)
pipe.load_lora_weights(f"{out}/demo/checkpoint-200")
lora = run(pipe)
delta = (lora - base).abs().max().item()
print(json.dumps({"lora_changes_output_max_abs": delta, "finite": bool(torch.isfinite(lora).all())}))
assert delta > 1e-3 and torch.isfinite(lora).all()
print("cudnn_sdp_enabled_in_process_default", torch.backends.cuda.cudnn_sdp_enabled())
PY
python3 scripts/bench.py --size tiny --recipe both --steps 40 --warmup 5 2>/dev/null
# the legacy families in bf16: T5 keeps its wo layers fp32, the VAEs stay fp32
for family in bria-3.2 bria-2.3; do
  version=${family#bria-}
  python3 -m tailoredgen_train make-tiny-base --family "$family" "$out/base-$family"
  python3 -m tailoredgen_train train --base "$out/base-$family" --dataset tailoredgen_train/data/sample_dataset_text \
      --caption-prefix "A minimalist flat illustration of" --output "$out/demo-$version" --training-version "$version" \
      --training-mode expert --total-training-steps 100 --checkpoint-interval 100 \
      --config "configs/$family-tiny.yaml" 2>&1 | grep -E "processes:|resolved|checkpoint-100"
done
python3 - "$out" <<'PY'
import sys, json, torch
from diffusers import BriaPipeline, StableDiffusionXLPipeline
out, prompt = sys.argv[1], "A minimalist flat illustration of a red circle"
def run(pipe):
    return pipe(prompt, height=128, width=128, num_inference_steps=4, output_type="pt",
                generator=torch.Generator("cuda").manual_seed(0)).images.float()
pipe = BriaPipeline.from_pretrained(f"{out}/base-bria-3.2", torch_dtype=torch.bfloat16).to("cuda")
print("bria-3.2 T5 wo dtype:", pipe.text_encoder.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype)
base = run(pipe)
pipe.transformer.load_lora_adapter(f"{out}/demo-3.2/checkpoint-100", prefix="transformer",
                                   weight_name="pytorch_lora_weights.safetensors")
lora = run(pipe)
sdxl = StableDiffusionXLPipeline.from_pretrained(f"{out}/base-bria-2.3", torch_dtype=torch.bfloat16).to("cuda")
sdxl_base = run(sdxl)
sdxl.load_lora_weights(f"{out}/demo-2.3/checkpoint-100")
sdxl_lora = run(sdxl)
report = {"bria-3.2": (lora - base).abs().max().item(), "bria-2.3": (sdxl_lora - sdxl_base).abs().max().item()}
print(json.dumps({"lora_changes_output_max_abs": report}))
assert all(v > 1e-3 for v in report.values()) and torch.isfinite(lora).all() and torch.isfinite(sdxl_lora).all()
PY
if [ "${FULL_BENCH:-0}" = 1 ]; then
  full_bench
fi
echo GPU_CHECK_OK
