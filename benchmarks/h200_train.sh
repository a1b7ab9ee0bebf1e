#!/usr/bin/env bash
# Training throughput on the H200, in one device call: infer's Trainer against SentenceTransformerTrainer, bf16,
# MultipleNegativesRankingLoss, random-weight MiniLM and BERT-base shapes. Expects the MiniLM tokenizer folder at
# .bench/tokenizer and fastcore, datasets, dill and multiprocess in .bench/pylib (carried; the device has none of
# them), and writes JSON and logs under ${OUT:-benchmarks/results}.
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD:$PWD/.bench/pylib PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import sys; from infer.cli import main; sys.exit(main(['env']))" 2>&1 | tee "$out/env.txt"
python3 -c "import sentence_transformers as s, datasets as d, accelerate as a; print('sentence-transformers', s.__version__, 'datasets', d.__version__, 'accelerate', a.__version__)" | tee -a "$out/env.txt"
for run in "minilm 128" "minilm 32" "bge-base 64"; do
  set -- $run
  timeout ${RUN_TIMEOUT:-240} python3 benchmarks/train.py --device cuda --bf16 --shape "$1" --batch "$2" --steps ${STEPS:-40} \
    --warmup 5 --repeats 3 --tokenizer .bench/tokenizer --out "$out/train_$1_b$2.json" 2>&1 | grep -v -e Loading -e 'Writing model' \
    | tee "$out/train_$1_b$2.log"
done
