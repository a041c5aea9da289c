#!/usr/bin/env bash
# The short GPU check: the demo's training on CUDA (bf16 base, fp32 LoRA, fused AdamW, cuDNN SDPA
# off), the LoRA loaded back into BriaFiboPipeline on the GPU, and the tiny benchmark.
# Usage on a GPU machine with torch, transformers, accelerate, peft and diffusers installed:
#   bash scripts/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-check}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rm -rf "$out"; mkdir -p "$out"
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
python3 scripts/bench.py --base "$out/base" --steps 40 2>/dev/null | tail -1
python3 scripts/bench.py --base "$out/base" --steps 40 --set data.batch_size=4 2>/dev/null | tail -1
echo GPU_CHECK_OK
