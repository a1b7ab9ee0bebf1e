"""Three measurements behind the MoE layer's few-token and many-token paths, on one NVIDIA GPU (written for the H200):

    python benchmarks/moe_experiments.py                      # all three
    python benchmarks/moe_experiments.py --only router        # one (stream, router, halves)
    python benchmarks/moe_experiments.py --row-configs rows.json   # the rows path's blocks from a --tune-rows run

- stream: the ceiling for the one-token Qwen3 layer's reads. A kernel that only reads (and sums) the 8 routed
  experts' gate-and-up weights (50 MB), then their down weights (25 MB), at a few block shapes, timed per launch in a
  graph of 8 launches over 8 routings: what the rows kernels could reach if they did nothing but stream.
- router: `router_topk_triton`'s experts per program and warps, 1 to 8 by 1 to 4, as whole Qwen3 layers (graph
  replays, as benchmarks/moe.py times them) at 1, 2 and 4 tokens, and the experts alone for comparison.
- halves: `HALF_TILES` off and on, twice each in turn, whole layers of both shapes at 256, 1,024 and 4,096 tokens.

Writes $OUT/moe_experiments.json (else benchmarks/results/).
"""
import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe as B  # noqa: E402  (benchmarks/moe.py: shapes, timers, roofline)
from moe import DEV, M  # noqa: E402

triton, tl = M.triton, M.tl


@triton.jit
def _read_kernel(w_ptr, ids_ptr, out_ptr, stride_e, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    "Program (j, c) sums chunk c of expert ids[j]: ITERS loads of BLOCK elements, all issued before the first sum."
    j, c = tl.program_id(0), tl.program_id(1)
    e = tl.load(ids_ptr + j).to(tl.int64)
    base = w_ptr + e * stride_e + c.to(tl.int64) * (BLOCK * ITERS) + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(ITERS):
        acc += tl.load(base + i * BLOCK).to(tl.float32)
    tl.store(out_ptr + j * tl.num_programs(1) + c, tl.sum(acc))


@torch.no_grad()
def stream(res, g):
    E, H, I, k = B.SHAPES['qwen3']
    w13, w2 = M.random_experts(E, H, I, torch.bfloat16, DEV, g)
    id_sets = [torch.randperm(E, device=DEV, generator=g)[:k].contiguous() for _ in range(B.INPUT_SETS)]
    sums = torch.empty(k * 4096, device=DEV)
    for (name, w), (block, iters, warps) in itertools.product(
            (('w13', w13), ('w2', w2)), ((1024, 4, 4), (2048, 4, 4), (2048, 8, 8), (4096, 4, 8), (1024, 8, 4))):
        per_expert = w[0].numel()
        grid = (k, per_expert // (block * iters))
        us = 1e3 * B.kernel_ms(lambda i: _read_kernel[grid](w, id_sets[i], sums, w.stride(0), BLOCK=block, ITERS=iters,
                                                              num_warps=warps), B.INPUT_SETS)
        tbps = k * per_expert * w.element_size() / us / 1e6
        res[f'{name} {block}x{iters} w{warps}'] = dict(us=us, TBps=tbps)
        print(f'read {name} {k} x {per_expert * 2 / 1e6:.1f} MB  block {block} x {iters}, {warps} warps: {us:.1f} us = '
              f'{tbps:.2f} TB/s', flush=True)


@torch.no_grad()
def router(res, g):
    E, H, I, k = B.SHAPES['qwen3']
    layer = B.random_layer(g, E, H, I, k)
    default = M.ROUTER_EXPERTS, M.ROUTER_WARPS
    for T in (1, 2, 4):
        inputs = [torch.randn(T, H, generator=g, device=DEV).bfloat16() for _ in range(B.INPUT_SETS)]
        first = None
        for experts, warps in itertools.product((1, 2, 4, 8), (1, 2, 4)):
            M.ROUTER_EXPERTS, M.ROUTER_WARPS = experts, warps
            us = 1e3 * B.graph_ms(lambda x: layer(x, backend='triton'), inputs, 50)
            out = layer(inputs[0], backend='triton')
            first = out if first is None else first
            res[f'T{T} experts {experts} warps {warps}'] = dict(us=us, same_as_first=bool(torch.equal(out, first)))
            print(f'T={T} router: {experts} experts a program, {warps} warps: {us:.1f} us  (output the same as the first '
                  f'variant\'s: {torch.equal(out, first)})', flush=True)
        M.ROUTER_EXPERTS, M.ROUTER_WARPS = default
        routed = [layer.route(x) for x in inputs]
        us = 1e3 * B.graph_ms(lambda i: M.fused_experts_triton(inputs[i], layer.w13, layer.w2, *routed[i]),
                              list(range(B.INPUT_SETS)), 50)
        res[f'T{T} experts alone'] = us
        print(f'T={T} experts alone: {us:.1f} us', flush=True)


@torch.no_grad()
def halves(res, g):
    default = M.HALF_TILES
    for shape in ('qwen3', 'mixtral'):
        E, H, I, k = B.SHAPES[shape]
        layer = B.random_layer(g, E, H, I, k)
        for T in (256, 1024, 4096):
            inputs = [torch.randn(T, H, generator=g, device=DEV).bfloat16() for _ in range(B.INPUT_SETS)]
            floor, _ = B.roofline_ms(shape, T, [layer.route(x)[1] for x in inputs])
            row = dict(floor_us=floor * 1e3, off_us=[], on_us=[])
            for on in (False, True, False, True):
                M.HALF_TILES = on
                row['on_us' if on else 'off_us'].append(1e3 * B.graph_ms(lambda x: layer(x, backend='triton'), inputs, 30))
            outs = []
            for on in (False, True):
                M.HALF_TILES = on
                outs.append(layer(inputs[0], backend='triton'))
            row['on_vs_off'] = M.rel_err(outs[1], outs[0])
            res[f'{shape} {T}'] = row
            print(f"{shape} T={T}: half tiles off {row['off_us']} us, on {row['on_us']} us; floor {floor * 1e3:.1f} us "
                  f"({floor * 1e3 / min(row['off_us']):.2f} -> {floor * 1e3 / min(row['on_us']):.2f} of it); "
                  f"on against off {row['on_vs_off']:.1e}", flush=True)
        M.HALF_TILES = default
        del layer
        torch.cuda.empty_cache()


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--only', nargs='+', choices=('stream', 'router', 'halves'), default=('stream', 'router', 'halves'))
    p.add_argument('--row-configs', help="a --tune-rows run's JSON: the rows path's blocks instead of infer's table")
    args = p.parse_args()
    if args.row_configs: B.use_tuned_rows(args.row_configs)
    g = torch.Generator(DEV).manual_seed(7)
    results = dict(device=torch.cuda.get_device_name(), triton=triton.__version__)
    for name in args.only:
        results[name] = {}
        globals()[name](results[name], g)
    os.makedirs(B.OUT, exist_ok=True)
    with open(os.path.join(B.OUT, 'moe_experiments.json'), 'w') as f: json.dump(results, f, indent=1)
