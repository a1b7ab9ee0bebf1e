#!/usr/bin/env bash
# The H200 run of issues 4 and 5: the KV cache on the GPU (sizing from free memory, swap bandwidth),
# then the CPU-side benchmarks on that machine's host CPU (infer alone: vLLM is not installed there).
# Writes JSON and logs under ${OUT:-benchmarks/results}.
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD:$PWD/.bench/pylib PYTHONUNBUFFERED=1   # .bench/pylib: fastcore, carried (not installed there)
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$out/gpu.txt"
lscpu | grep -E 'Model name|^CPU\(s\)' | tee -a "$out/gpu.txt"
python3 benchmarks/kv_cache_gpu.py --out "$out/kv_cache_gpu.json" 2>&1 | tee "$out/kv_cache_gpu.log"
python3 benchmarks/scheduler.py --anchor-path '' --clock wall --out "$out/scheduler_h200_host.json" 2>&1 | tee "$out/scheduler_h200_host.log"
python3 benchmarks/kv_cache.py --anchor-path '' --out "$out/kv_cache_h200_host.json" 2>&1 | tee "$out/kv_cache_h200_host.log"
