#!/usr/bin/env bash
# The encode side on the H200, in one device call: dense (issue 3: both model shapes), sparse SPLADE
# (BERT-base shape, with the peak memory of a 64 x 512-token batch) and cross-encoder (MiniLM and
# BERT-base shapes), float16, against sentence-transformers in the same run. KINDS picks a subset
# (default: "dense sparse cross"). Expects the MiniLM tokenizer folder at .bench/tokenizer and
# fastcore in .bench/pylib (carried; the device has neither) and writes JSON and logs under
# ${OUT:-benchmarks/results}.
set -uo pipefail
out=${OUT:-benchmarks/results}
kinds=${KINDS:-dense sparse cross}
mkdir -p "$out"
export PYTHONPATH=$PWD:$PWD/.bench/pylib PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import sys; from infer.cli import main; sys.exit(main(['env']))" 2>&1 | tee "$out/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee -a "$out/env.txt"
python3 -c "import sentence_transformers as s; print('sentence-transformers', s.__version__)" | tee -a "$out/env.txt"
common=(--device cuda --dtype float16 --tokenizer .bench/tokenizer --repeats 3 --st-batch-sizes ${ST_SIZES:-128,256,512,1024}
        --infer-batch-tokens ${INFER_TOKENS:-8192,16384,32768,65536})
for run in "dense minilm 20000" "dense bge-base 20000" "sparse bge-base 20000 --memory" "cross minilm 20000" "cross bge-base 20000"; do
  set -- $run
  [[ " $kinds " == *" $1 "* ]] || continue
  name=$1_$2; [ "$1" = dense ] && name=$2
  timeout ${RUN_TIMEOUT:-300} python3 benchmarks/encode.py --kind "$1" --shape "$2" --texts "$3" "${@:4}" "${common[@]}" \
    --out "$out/encode_$name.json" 2>&1 | grep -v -e Loading -e 'Writing model' | tee "$out/encode_$name.log"
done
