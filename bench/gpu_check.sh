#!/usr/bin/env bash
# The GPU checks, prepared to run in one call of the device tool on an H100 (Python 3.12, jax
# with CUDA, flax, optax, orbax; no network). From the repository root:
#
#   bash bench/gpu_check.sh [tests|attention|train|all]     (default: all; ~12 min in all)
#
# Wheels for what that image lacks go in wheels/ (ignored by git; carry it), fetched here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
#     -d wheels ml-collections grain portpicker array-record dm-tree tensorboardX
# Results (logs and JSON) go to $OUT (the device tool's folder), else bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
stage="${1:-all}"
if compgen -G "wheels/*.whl" > /dev/null; then
  pip install -q --no-deps wheels/*.whl 2>&1 | tail -2
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
python -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/device.txt"

if [[ "$stage" == tests || "$stage" == all ]]; then
  # cuDNN with and without documents against the blocked kernel; auto's choice; splash
  # (interpret mode, as on a CPU).
  python -m pytest -q tests/model/test_cudnn.py tests/model/test_splash.py \
    tests/model/test_attention.py -k "cudnn or auto or splash or packed" \
    2>&1 | tee "$out/tests.log" | tail -5
fi
if [[ "$stage" == attention || "$stage" == all ]]; then
  # The table of issue 9: 16 heads, bf16, window 1024, forward+backward, n = 32k and 131k,
  # head_dim 64 and 128, with and without 8k-token documents.
  python bench/attention.py --sizes 32768,131072 --window 1024 --documents 0,8192 \
    --methods xla,cudnn,causal_cudnn --repeats 5 --timeout 300 \
    --json "$out/attention_gpu.json" 2>&1 | tee "$out/attention.log" | tail -12
fi
if [[ "$stage" == train || "$stage" == all ]]; then
  # pg19:32768's model and step (16 × 32k tokens, grad_accum 4) on the stdlib corpus with
  # bytes (no network here): document packing (cuDNN's packed layout) against stream packing.
  for packing in stream documents; do
    python bench/train.py --config=configs/pg19.py:32768 --steps=12 --save_every=100 \
      --config.data.source=stdlib --config.data.tokenizer=bytes --config.grad_accum_steps=4 \
      --config.data.packing=$packing --config.model.max_documents_per_row=512 \
      --json="$out/train_$packing.json" 2>&1 | tee "$out/train_$packing.log" | tail -4
  done
fi
