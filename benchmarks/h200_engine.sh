#!/usr/bin/env bash
# The engine on the H200, in one device call: the GPU tests (the fused ops compiled and captured in a graph; CUDA
# graphs against eager and transformers for every architecture), then benchmarks/throughput.py on the Qwen2-0.5B shape
# (async scheduling on, and the fixed batches again with it off), then the host profile of decode steps.
#   run: bash benchmarks/h200_engine.sh   (carry .bench/pylib: fastcore, which the H200 image lacks)
set -uo pipefail
export PYTHONPATH=$PWD:$PWD/.bench/pylib HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_engine.py -k "cuda or graph" 2>&1 \
  | grep -v "Assertion" | tail -15 | tee "$OUT/gpu_tests.log"
timeout ${BENCH_TIMEOUT:-420} python3 benchmarks/throughput.py --preset qwen2-0.5b ${BENCH_ARGS:---decode-step --nano --repeats 2 --in-order-too} \
  --out "$OUT/throughput_h200.json" 2>&1 | grep -v "Loading weights\|Writing model" | tee "$OUT/throughput_h200.log"
timeout ${PROFILE_TIMEOUT:-100} python3 benchmarks/profile_decode.py --batches 1,256 2>&1 | grep -v "Loading weights\|Writing model" \
  | head -80 | tee "$OUT/profile_decode_h200.txt"
