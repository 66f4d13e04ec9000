#!/usr/bin/env bash
# The GPU checks, prepared to run in one call of the device tool on an NVIDIA H200 (Python 3.12,
# jax 0.11.2 with CUDA 13, flax, optax, orbax, torch, transformers; no network; the project
# pins jax 0.12.1). From the repository root, carrying wheels/:
#
#   bash bench/gpu_check.sh [STAGES]     STAGES: comma-separated of tests,attention,long,train
#                                        (default: all four, in that order, within 560 s)
#
# Each stage has a time budget (`timeout`), so that the whole call ends inside the device
# tool's 600 s per command; a stage that runs out keeps what it wrote so far (every script
# prints and logs its rows as it goes). Budgets: tests 30 + 90 s, attention 170 s, long 150 s,
# train 120 s. What each measures:
#   tests      first grouped k/v heads with packed documents on cuDNN against the blocked
#              kernel (outputs and gradients: the pair that jax before 0.11.1 computed wrong,
#              silently), then the GPU tests of the kernels: cuDNN with and without documents
#              against the blocked kernel, auto's choice, splash (interpret mode, as on a CPU)
#   attention  bench/attention.py: xla, cudnn, cudnn with 8k-token documents, full causal
#              cuDNN; n = 32k and 131k; head_dim 64 and 128; 16 heads, bf16, window 1024
#   long       the pg19 model's train step at 1,048,576 and 2,097,152 tokens on one GPU
#              (the AOT analysis says 54.3 and 106.4 GiB; stream packing of the stdlib)
#   train      pg19:32768 with documents (cuDNN's packed layout) against stream packing
#
# Wheels for what that image lacks are in wheels/ (ignored by git; name it in `carry`):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any -d wheels \
#     ml-collections==1.1.0 grain==0.2.18 portpicker array-record dm-tree cloudpickle \
#     tensorboardX==2.6.5 sentencepiece==0.2.3 pytest==9.2.0 pluggy iniconfig
# Results (logs and JSON) go to $OUT (the device tool's folder, which comes back), else
# bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
stages=",${1:-tests,attention,long,train},"
if compgen -G "wheels/*.whl" > /dev/null; then
  pip install -q --no-deps wheels/*.whl 2>&1 | tail -2
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
python -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/device.txt"
bytes_stdlib=(--config.data.source=stdlib --config.data.tokenizer=bytes)

if [[ "$stages" == *,tests,* ]]; then
  timeout 30 python -m pytest -q tests/model/test_cudnn.py \
    -k "grouped_heads_with_packed_documents or grouped_heads_with_documents" \
    2>&1 | tee "$out/tests_grouped_heads_documents.log" | tail -3
  timeout 90 python -m pytest -q tests/model/test_cudnn.py tests/model/test_splash.py \
    tests/model/test_attention.py -k "cudnn or auto or splash or packed" \
    2>&1 | tee "$out/tests.log" | tail -5
fi
if [[ "$stages" == *,attention,* ]]; then
  timeout 170 python bench/attention.py --sizes 32768,131072 --window 1024 --documents 0,8192 \
    --methods xla,cudnn,causal_cudnn --repeats 5 --timeout 60 \
    --json "$out/attention_gpu.json" 2>&1 | tee "$out/attention.log" | tail -14
fi
if [[ "$stages" == *,long,* ]]; then
  # Batch 1 (the preset's 512k tokens per batch), 4 steps (2 timed), the final evaluation on
  # one batch.
  for context in 1048576 2097152; do
    timeout 75 python bench/train.py --config=configs/pg19.py:$context --steps=4 \
      --save_every=100 "${bytes_stdlib[@]}" --config.data.packing=stream \
      --config.eval_batches=1 --config.sample_tokens=0 \
      --json="$out/train_$context.json" 2>&1 | tee "$out/train_$context.log" | tail -4
  done
fi
if [[ "$stages" == *,train,* ]]; then
  # pg19:32768's model and step (16 × 32k tokens, grad_accum 4) on the stdlib corpus with
  # bytes (no network here): document packing (cuDNN's packed layout) against stream packing.
  for packing in stream documents; do
    timeout 60 python bench/train.py --config=configs/pg19.py:32768 --steps=8 \
      --save_every=100 "${bytes_stdlib[@]}" --config.grad_accum_steps=4 \
      --config.data.packing=$packing --config.model.max_documents_per_row=512 \
      --config.eval_batches=1 --config.sample_tokens=0 \
      --json="$out/train_$packing.json" 2>&1 | tee "$out/train_$packing.log" | tail -4
  done
fi
