#!/usr/bin/env bash
# Issue 10 part 4, the GPU path: every check that needs a GPU, as ONE script for a lent GPU machine.
#
#   1. the tests marked `gpu` (tests/test_device.py): greedy parity with the CPU float32 engine, float16 /
#      bfloat16 / int8 within a logprob tolerance, seeded batch invariance, the paged cache, int8 layers,
#      CUDA-graph replays against eager steps;
#   2. the GPU bench (src/logitlab/bench_gpu.py): 1-stream and 8-stream decode tok/s in float16, bfloat16 and
#      int8, CUDA graphs on and off, against transformers' LlamaForCausalLM on the same GPU and weights.
#
# Each step has its own time limit; the whole stays under 8 minutes on an H100 (give the call >= 9).
# Results go to $OUT (the device tool's folder) or artifacts/gpu_check: env.txt, gpu_tests.log, bench.log,
# bench_gpu.json, bench_gpu.txt. Exit status 0 only if both steps pass.
#
# Weights: the default model when its GGUF is in logitlab's cache, else random weights of its shape (speed is
# the same; the report says which). A GPU machine without network can be given the real model by carrying
#   .gpu_model/SmolLM2-135M-Instruct.Q4_1.gguf.part*   (split -b 40M; one call carries at most 64 MiB, so
#                                                       the pieces come over two calls on a warm machine)
#   .whl/gguf-*.whl                                     (the gguf package, to read it)
# both ignored by git (.git/info/exclude) and named in the call's `carry`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-artifacts/gpu_check}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ -d .gpu_model ]; then
    "$PY" -m logitlab.bench_gpu --install-model .gpu_model
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} 2>&1 | tee "$OUTDIR/env.txt"

timeout 240 "$PY" -m pytest -q -m gpu tests/test_device.py -p no:cacheprovider 2>&1 | tee "$OUTDIR/gpu_tests.log"
rc_tests=${PIPESTATUS[0]}

timeout 220 "$PY" -m logitlab.bench_gpu --out "$OUTDIR" 2>&1 | tee "$OUTDIR/bench.log"
rc_bench=${PIPESTATUS[0]}

echo "gpu_check: tests exit $rc_tests, bench exit $rc_bench; results in $OUTDIR"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
