#!/usr/bin/env bash
# The GPU measurements of docs/multi-gpu.md's "What has never run", as one prepared run (about 10 minutes on one
# H100/H200-class GPU; each step has its own time limit, and a step that fails or runs out does not stop the next):
#
#   1. ViT-B/16, bf16, batch 256: inference and training step (AdamW), eager and torch.compile, ours vs transformers'
#      ViTModel vs timm (where it imports), MFU against a bf16 matmul measured in the same run
#   2. the VLM training step vs transformers' Llava at a ViT-B/16 + 1024-wide LM size (full, align, align-cache)
#   3. packing on a GPU: a finetune step on mixed lengths, padded vs rows vs one row (sdpa_varlen)
#
# Runs from a checkout without installing it (PYTHONPATH), with the machine's own torch, transformers and timm.
# Logs go to $OUT (default gpu-results/). SMOKE=1 runs the same steps at tiny sizes on the CPU (a check of the
# script itself, not a measurement).
#
#   bash scripts/gpu_benchmarks.sh                # on the GPU machine
#   SMOKE=1 bash scripts/gpu_benchmarks.sh        # here
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-gpu-results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"

if [[ "${SMOKE:-0}" == 1 ]]; then
    device=(--device cpu --dtype float32)
    encoder=(--preset vit-ti16 --image-size 32 --patch-size 8 --hidden 32 --layers 1 --heads 2 --mlp 64 --batch-size 2
             --steps 1 --warmup 1 --matmul-size 128)
    vlm=(--batch-size 4 --image-size 32 --patch-size 8 --vision-hidden 32 --vision-layers 2 --vision-heads 2
         --vision-mlp 64 --text-hidden 32 --text-layers 1 --text-heads 2 --text-mlp 64 --vocab-size 200 --steps 1)
    mix=(--max-length 96 --text-length 16)
    limit=300
else
    device=(--device cuda --dtype bfloat16)
    encoder=(--preset vit-b16 --batch-size 256 --steps 10 --warmup 3)
    vlm=(--batch-size 32 --image-size 224 --patch-size 16 --vision-hidden 768 --vision-layers 12 --vision-heads 12
         --vision-mlp 3072 --text-hidden 1024 --text-layers 8 --text-heads 16 --text-mlp 4096 --vocab-size 32000
         --steps 10 --warmup 2)
    mix=(--max-length 1024 --text-length 128 --length-sigma 0.8)  # 196 image tokens + log-normal text
    limit=240
    nvidia-smi | tee "$OUT/device.txt"
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/device.txt"

step() {  # name, then the command: its output to $OUT/name.log, its status reported
    local name=$1
    shift
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit status ${PIPESTATUS[0]}"
}
step encoder "$PY" scripts/benchmark_encoder.py "${device[@]}" "${encoder[@]}" --compile --optimizer adamw
step vlm "$PY" scripts/benchmark_vlm.py "${device[@]}" "${vlm[@]}" --modes full align align-cache
step packed "$PY" scripts/benchmark_vlm.py "${device[@]}" "${vlm[@]}" "${mix[@]}" --modes packed
