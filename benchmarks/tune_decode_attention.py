"""Tile search for the decode launch of paged attention on the H200, at the engine benchmark's shapes.

    python benchmarks/tune_decode_attention.py          # Qwen2-0.5B (14 heads, 2 KV heads, head_dim 64) and Llama-3-8B heads
    python benchmarks/tune_decode_attention.py --splits 1,2,3,4 --shapes 1,2   # also split the context (flash decoding)

For each (batch, context) of the decode steps the engine issue times, every (BLOCK_M, TILE_N, num_warps, num_stages)
of a small grid is timed with `benchmarks/attention.py`'s method (10 calls in one CUDA graph, median of 15 replays)
against the current `H200_CONFIGS` entry, and checked against the torch reference first. With `--splits`, each
config is also timed with the context split over that many programs per (sequence, KV head), the reduce included. Prints a table per shape
and writes $OUT/tune_decode_attention.json.
"""
import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from attention import make_step, rel_err, time_graph  # noqa: E402
from infer import attention as A  # noqa: E402

SHAPES = [  # (name, heads, kv heads, head_dim, batch, context)
    ('qwen2-0.5b', 14, 2, 64, 1, 192), ('qwen2-0.5b', 14, 2, 64, 32, 192), ('qwen2-0.5b', 14, 2, 64, 256, 192),
    ('qwen2-0.5b', 14, 2, 64, 256, 1024), ('llama-3-8b', 32, 8, 128, 256, 1024), ('llama-3-8b', 32, 8, 128, 64, 4096)]
GRID = list(itertools.product((16,), (32, 64, 128), (2, 4, 8), (1, 2, 3)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--splits', default='1', help='comma-separated split counts (1: no split)')
    p.add_argument('--shapes', help='comma-separated indices into SHAPES (default: all)')
    args = p.parse_args()
    splits = [int(x) for x in args.splits.split(',')]
    shapes = [SHAPES[int(i)] for i in args.shapes.split(',')] if args.shapes else SHAPES
    out_dir = os.environ.get('OUT') or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
    results = []
    for name, H, KVH, D, B, ctx in shapes:
        q, kc, vc, cu, sl, bt = make_step([1] * B, [ctx] * B, H, KVH, D, 16, torch.bfloat16, seed=B + ctx)
        ref = A.paged_attention_reference(q, kc, vc, cu, sl, bt, validate=False)
        out = torch.empty_like(q)
        current = A.attention_config(D, q.dtype, torch.cuda.get_device_capability(), decode_only=True)
        rows = []
        grid = GRID if splits == [1] else [c for c in GRID if c[1] <= 64 and c[2] <= 4 and c[3] <= 2]  # smaller, with splits
        for (m, n, w, st), split in itertools.product(grid, splits):
            cfg = dict(BLOCK_M=m, TILE_N=n, num_warps=w, num_stages=st)
            call = lambda: A.paged_attention_triton(q, kc, vc, cu, sl, bt, out=out, max_seqlen_q=1,  # noqa: E731
                                                    max_seqlen_k=ctx, config=cfg, num_splits=split, validate=False)
            try:
                call()
                err = rel_err(out, ref)
                ms = time_graph(call) if err < 1e-2 else float('nan')
            except Exception as e:  # noqa: BLE001  (a config that does not compile: out of resources)
                err, ms = float('nan'), float('nan')
            rows.append(dict(cfg, num_splits=split, ms=ms, err=err, current=cfg == current and split == 1))
        done = sorted((r for r in rows if r['ms'] == r['ms']), key=lambda r: r['ms'])
        now = next(r for r in rows if r['current'])
        print(f"{name} batch {B} ctx {ctx}: current {now['ms'] * 1e3:.1f} us {tuple(now[k] for k in ('BLOCK_M', 'TILE_N', 'num_warps', 'num_stages'))}"
              f"; best " + ', '.join(f"{r['ms'] * 1e3:.1f} us {(r['TILE_N'], r['num_warps'], r['num_stages'], r['num_splits'])}"
                                     for r in done[:4]), flush=True)
        results.append(dict(name=name, heads=H, kv_heads=KVH, head_dim=D, batch=B, ctx=ctx, rows=rows))
        del q, kc, vc
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, 'tune_decode_attention.json'), 'w') as f: json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
