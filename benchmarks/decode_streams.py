"""A decode step of a Qwen2-0.5B-shaped model (dummy bf16 weights) at 256 requests, context 192, logits and argmax
included: one CUDA graph of all 256, or the batch split over 2 or 4 graphs (their own memory pools) replayed on as
many streams at once, to see whether one part's small kernels fill the gaps of another's. Median of 30 steps timed
with CUDA events.

    python benchmarks/decode_streams.py --out results.json
"""
import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
import transformers

from infer.models import load_model, step_context
from infer.paging import KVCache
from infer.ops import argmax_rows

parser = argparse.ArgumentParser()
parser.add_argument('--out', help='write the times here as JSON')
args = parser.parse_args()

tmp = Path(tempfile.mkdtemp())
transformers.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True, architectures=['Qwen2ForCausalLM']).save_pretrained(tmp)
model = load_model(tmp, dtype=torch.bfloat16, device='cuda', load_format='dummy')
B, ctx_len, bs = 256, 192, 16
cache = KVCache(model.kv_cache_spec(bs), 1 + B * ctx_len // bs, 'cuda')
caches = [(cache.key(i), cache.value(i)) for i in range(24)]
tables = (1 + torch.arange(B * ctx_len // bs)).view(B, -1).int()

def make(rows):
    ctx = step_context([1] * len(rows), [ctx_len] * len(rows), tables[rows], tables[rows, -1].long() * bs + bs - 1, caches, backend='triton')
    ids = torch.randint(0, 151936, (len(rows),), device='cuda')
    pos = torch.full((len(rows),), ctx_len - 1, device='cuda')
    stream = torch.cuda.Stream()
    with torch.inference_mode():
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3): argmax_rows(model.compute_logits(model(ids, pos, ctx), False))
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            argmax_rows(model.compute_logits(model(ids, pos, ctx), False))
    return g, stream

def timed(parts, n=30):
    start, end, times = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), []
    main = torch.cuda.current_stream()
    for _ in range(n):
        start.record(main)
        for g, s in parts:
            s.wait_stream(main)
            with torch.cuda.stream(s): g.replay()
        for g, s in parts: main.wait_stream(s)
        end.record(main); end.synchronize(); times.append(start.elapsed_time(end))
    return statistics.median(times)

results = {}
for k in (1, 2, 4):
    parts = [make(torch.arange(i * B // k, (i + 1) * B // k)) for i in range(k)]
    t = timed(parts)
    alone = timed(parts[:1]) if k > 1 else t
    results[k] = dict(step_ms=t, one_part_alone_ms=alone)
    print(f'{k} graph(s) of {B // k} on {k} stream(s): {t:.3f} ms a step (one of them alone: {alone:.3f} ms)', flush=True)
    del parts
    torch.cuda.empty_cache()
if args.out:
    with open(args.out, 'w') as f: json.dump(dict(device=torch.cuda.get_device_name(), batch=B, context=ctx_len, parts=results), f, indent=1)
