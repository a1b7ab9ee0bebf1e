"""The fused mixture-of-experts layer on one NVIDIA GPU (written for the H200): full-size parity, speed against
`transformers`' own sparse-MoE block on the same weights, and tile tuning.

    python benchmarks/moe.py                  # parity + timings, Mixtral-8x7B and Qwen3-30B-A3B layers, bf16
    python benchmarks/moe.py --tune           # time a grid of tile configs per shape and token count; print the best
    python benchmarks/moe.py --tokens 1 64 --shapes qwen3      # a subset
    python benchmarks/moe.py --tune-rows --tokens 1 2 4 8 16  # the rows path (a few tokens) against the tiles
    python benchmarks/moe.py --no-rows                        # the tiles path at every token count
    python benchmarks/moe.py --launch-ab --tokens 1 2 4 16    # one-launch router and PDL on and off, whole layers

The anchor: `transformers`' `MixtralSparseMoeBlock` / `Qwen3MoeSparseMoeBlock` built from the model's config with
random bf16 weights, in both of its experts implementations ('eager': the Python loop over experts hit;
'grouped_mm': torch's grouped matrix product), and infer's `SparseMoE` holding the same weight tensors. Each is
timed as a whole layer (router included) on the same inputs, at 1, 16, 64, 256, 1,024 and 4,096 tokens.

Timings: CUDA events around each call, the median of --iters calls after warm-up; every call takes the next of 8
input sets, so that the experts touched change from call to call and small layers are not served from the L2
cache. infer's layer is timed three ways: eagerly, like the anchor; as a CUDA graph of one call, replayed (so each
call pays a graph launch); and in a graph of 8 calls back to back, one per input set, per call (how the engine's
decode steps run it: each layer inside one graph of the whole step). The anchor syncs with the host, so it cannot be
captured. The roofline of a call is the larger of
the bytes of the experts it touches (plus the router and the activations) over 4.1 TB/s and its FLOPs over 720
TFLOP/s (the copy bandwidth and bf16 matrix rate measured on this workplace's H200s); `% roof` = floor / time.

Parity: the fused layer against the plain-torch reference (`experts_reference`) computed in float32 from the same
bf16 weights, and against the anchor, by ||out - ref|| / ||ref||; int8 and fp8 experts against the bf16 layer (the
formats' accuracy cost) and their speed. Writes $OUT/moe_h200.json (else benchmarks/results/moe.json).
"""
import argparse
import itertools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from infer import moe as M  # noqa: E402

DEV = 'cuda'
OUT = os.environ.get('OUT') or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
BANDWIDTH, MATRIX_RATE = 4.1e12, 720e12
SHAPES = {   # experts, hidden, intermediate, top_k
    'mixtral': (8, 4096, 14336, 2),
    'qwen3': (128, 2048, 768, 8),
}
TOKENS = (1, 16, 64, 256, 1024, 4096)
INPUT_SETS = 8
T0 = time.time()


def hf_block(shape: str, implementation: str):
    "transformers' sparse-MoE block of `shape` with random bf16 weights on the GPU."
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    E, H, I, k = SHAPES[shape]
    if shape == 'mixtral':
        config, cls = transformers.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                                 num_experts_per_tok=k), MixtralSparseMoeBlock
    else:
        config, cls = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                                  num_experts_per_tok=k, norm_topk_prob=True), Qwen3MoeSparseMoeBlock
    config._experts_implementation = implementation
    with torch.device(DEV):
        block = cls(config).to(torch.bfloat16).eval()
    return block


def randomize_(block, generator):
    "Weights scaled like a trained layer's (unit-size activations), drawn on the GPU."
    E, I2, H = block.experts.gate_up_proj.shape
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(E, H, generator=generator, device=DEV) / H ** 0.5)
        for p, fan_in in ((block.experts.gate_up_proj, H), (block.experts.down_proj, I2 // 2)):
            for e in range(E):
                p[e].copy_(torch.randn(p.shape[1:], generator=generator, device=DEV) / fan_in ** 0.5)


def layer_sharing(block, shape: str) -> M.SparseMoE:
    "infer's layer over the same weight tensors (no copy)."
    E, H, I, k = SHAPES[shape]
    layer = M.SparseMoE(E, H, I, k, renormalize=True)
    layer.gate.weight, layer.w13, layer.w2 = block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj
    return layer


def random_layer(g, E, H, I, k) -> M.SparseMoE:
    "infer's softmax-routed (renormalized) bf16 layer alone: random experts, a router scaled like a trained one's."
    with torch.device(DEV): layer = M.SparseMoE(E, H, I, k, renormalize=True)
    layer.w13.data, layer.w2.data = M.random_experts(E, H, I, torch.bfloat16, DEV, g)
    layer.gate.weight.data = (torch.randn(E, H, generator=g, device=DEV) / H ** 0.5).bfloat16()
    return layer


def hf_out(block, x):
    "transformers' block on tokens [T, H] -> [T, H] (some versions also return the router logits)."
    out = block(x[None])
    return (out[0] if isinstance(out, tuple) else out)[0]


def median_ms(fn, inputs, iters: int) -> float:
    "Median of per-call CUDA-event times; call i takes inputs[i % len(inputs)]."
    for x in inputs[:3]: fn(x)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i, (start, end) in enumerate(events):
        start.record(); fn(inputs[i % len(inputs)]); end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def graph_ms(fn, inputs, iters: int) -> float:
    "Median time of a CUDA graph replay of fn(x), one graph per input set, replayed in turn."
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for x in inputs: fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for x in inputs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g): fn(x)
        graphs.append(g)
    return median_ms(lambda g: g.replay(), graphs, iters)


def roofline_ms(shape: str, T: int, ids_sets, weight_bytes: float = 2.0) -> tuple[float, float]:
    "The floor of one call (ms), averaged over the input sets' routings, and the mean number of experts touched."
    E, H, I, k = SHAPES[shape]
    touched = statistics.mean(ids.unique().numel() for ids in ids_sets)
    byts = touched * 3 * H * I * weight_bytes + E * H * 2 + 2 * T * H * 2
    flops = 2 * T * k * 3 * H * I + 2 * T * H * E
    return max(byts / BANDWIDTH, flops / MATRIX_RATE) * 1e3, touched


def use_tuned(path: str):
    "Replace the entries of infer's H200 tile table that a --tune run's JSON has with its best configs."
    keys = ('BLOCK_M', 'BLOCK_N', 'BLOCK_K', 'GROUP_M', 'num_warps', 'num_stages')
    for shape, by_T in json.load(open(path))['best'].items():
        M.H200_MOE_CONFIGS.setdefault(SHAPES[shape], {}).update(
            {int(T): tuple({k: b[part][k] for k in keys} for part in ('up', 'down')) for T, b in by_T.items()})


def use_tuned_rows(path: str):
    "Replace infer's rows-path table with a --tune-rows run's best blocks, at the token counts where rows beat tiles."
    M.H200_ROW_CONFIGS.clear()
    for shape, by_T in json.load(open(path))['best'].items():
        wins = {int(T): (b['up'], b['down']) for T, b in by_T.items() if b['rows_ms'] < b['tiles_ms']}
        if wins: M.H200_ROW_CONFIGS[SHAPES[shape]] = wins


def bench(args):
    if args.configs: use_tuned(args.configs)
    if args.row_configs: use_tuned_rows(args.row_configs)
    if args.no_rows: M.H200_ROW_CONFIGS.clear()
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=M.triton.__version__,
                   rows=[], quantized=[], configs={f'{k}': v for k, v in M.H200_MOE_CONFIGS.items()},
                   row_configs={f'{k}': v for k, v in M.H200_ROW_CONFIGS.items()})
    import transformers
    results['transformers'] = transformers.__version__
    g = torch.Generator(DEV).manual_seed(0)
    for shape in args.shapes:
        E, H, I, k = SHAPES[shape]
        blocks = {impl: hf_block(shape, impl) for impl in ('eager', 'grouped_mm')}
        randomize_(blocks['eager'], g)
        for p, q in zip(blocks['eager'].parameters(), blocks['grouped_mm'].parameters()): q.data = p.data  # one copy
        layer = layer_sharing(blocks['eager'], shape)
        for T in args.tokens:
            inputs = [torch.randn(T, H, generator=g, device=DEV).bfloat16() for _ in range(INPUT_SETS)]
            with torch.no_grad():
                ids_sets = [layer.route(x)[1] for x in inputs]
                x = inputs[0]
                out = layer(x, backend='triton')
                weights, ids = layer.route(x)
                row = dict(shape=shape, tokens=T)
                row['err_vs_reference'] = M.rel_err(out, reference_f32(x, layer, weights, ids))
                row['err_vs_transformers'] = M.rel_err(out, hf_out(blocks['eager'], x))
                for impl, block in blocks.items():
                    try:
                        row[f'hf_{impl}_ms'] = median_ms(lambda x: hf_out(block, x), inputs, args.iters)
                    except Exception as e:   # grouped_mm needs a torch that has it
                        row[f'hf_{impl}_ms'], row[f'hf_{impl}_error'] = float('inf'), repr(e)[:200]
                row['infer_ms'] = median_ms(lambda x: layer(x, backend='triton'), inputs, args.iters)
                row['infer_graph_ms'] = graph_ms(lambda x: layer(x, backend='triton'), inputs, args.iters)
                row['infer_in_graph_ms'] = kernel_ms(lambda i: layer(inputs[i], backend='triton'), len(inputs))
                row['parts_us'] = parts_us(layer, inputs)
            row['floor_ms'], row['experts_touched'] = roofline_ms(shape, T, ids_sets)
            best_hf = min(row['hf_eager_ms'], row['hf_grouped_mm_ms'])
            row['speedup_eager'] = best_hf / row['infer_ms']
            row['speedup_graph'] = best_hf / row['infer_graph_ms']
            row['roof_eager'] = row['floor_ms'] / row['infer_ms']
            row['roof_graph'] = row['floor_ms'] / row['infer_graph_ms']
            row['roof_in_graph'] = row['floor_ms'] / row['infer_in_graph_ms']
            results['rows'].append(row)
            print(f"{shape:8s} T={T:5d}  hf eager {row['hf_eager_ms']:.3f}  grouped_mm {row['hf_grouped_mm_ms']:.3f}  "
                  f"infer {row['infer_ms']:.3f} (graph {row['infer_graph_ms']:.3f}, in a graph {row['infer_in_graph_ms']:.3f})  "
                  f"floor {row['floor_ms']:.3f}  roof {100 * row['roof_eager']:.0f}%/{100 * row['roof_graph']:.0f}%/"
                  f"{100 * row['roof_in_graph']:.0f}%  "
                  f"err ref {row['err_vs_reference']:.1e} hf {row['err_vs_transformers']:.1e}", flush=True)
            print('          parts (us): ' + ', '.join(f'{k} {v:.1f}' for k, v in row['parts_us'].items()), flush=True)
            save(results, args)
        if args.quantized:
            quantized_rows(results, shape, layer, g, args)
        del blocks, layer
        torch.cuda.empty_cache()
    table(results)
    save(results, args)


def parts_us(layer, inputs) -> dict:
    "Where a call's time goes: each stage timed alone (graph replays over the input sets), in microseconds."
    E, I2, H = layer.w13.shape
    T, k = inputs[0].shape[0], layer.top_k
    up_cfg, down_cfg = M.moe_config(E, H, I2 // 2, T, k)
    logits = [layer.gate(x) for x in inputs]
    routed = [M.route(l, k, renormalize=True) for l in logits]
    aligned = [M.align_triton(ids, E, up_cfg['BLOCK_M']) for _, ids in routed]
    hidden = torch.empty(aligned[0][0].shape[0], I2 // 2, dtype=inputs[0].dtype, device=DEV)   # in sorted order
    rows = torch.empty(T * k, H, dtype=inputs[0].dtype, device=DEV)
    stages = dict(
        router=lambda i: layer.gate(inputs[i]),
        route=lambda i: M.route(logits[i], k, renormalize=True),
        align=lambda i: M.align_triton(routed[i][1], E, up_cfg['BLOCK_M']),
        gate_up=lambda i: M._launch(inputs[i], layer.w13, hidden, None, routed[i][0], aligned[i], I2 // 2, H, T * k, k,
                                    up_cfg, gated=True, activation='silu', weighted=False),
        down=lambda i: M._launch(hidden, layer.w2, rows, None, routed[i][0], aligned[i], H, I2 // 2, T * k, 1, down_cfg,
                                 gated=False, activation='silu', weighted=True),
        combine=lambda i: M.combine_triton(rows, k))
    return {name: 1e3 * kernel_ms(fn, len(inputs)) for name, fn in stages.items()}


@torch.no_grad()
def reference_f32(x, layer, weights, ids):
    "experts_reference in float32 on the bf16 weights, one expert at a time (no float32 copy of all experts)."
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        gate, up = (x[token].float() @ layer.w13[e].float().T).chunk(2, dim=-1)
        out.index_add_(0, token, (torch.nn.functional.silu(gate) * up) @ layer.w2[e].float().T * weights[token, slot, None])
    return out


@torch.no_grad()
def quantized_rows(results, shape, layer, g, args):
    "int8 and fp8 experts: accuracy against the bf16 layer, and speed, at each token count."
    E, H, I, k = SHAPES[shape]
    for dtype in (torch.int8, torch.float8_e4m3fn):
        (q13, s13), (q2, s2) = M.quantize_experts(layer.w13, dtype), M.quantize_experts(layer.w2, dtype)
        for T in args.tokens:
            inputs = [torch.randn(T, H, generator=g, device=DEV).bfloat16() for _ in range(INPUT_SETS)]
            routed = [layer.route(x) for x in inputs]
            x, (weights, ids) = inputs[0], routed[0]
            bf16 = M.fused_experts_triton(x, layer.w13, layer.w2, weights, ids)
            quant = M.fused_experts_triton(x, q13, q2, weights, ids, 'silu', s13, s2)
            ref = M.experts_reference(x, q13, q2, weights, ids, 'silu', s13, s2) if T <= 64 else None
            pairs = list(zip(inputs, routed))
            ms = median_ms(lambda p: M.fused_experts_triton(p[0], q13, q2, *p[1], 'silu', s13, s2), pairs, args.iters)
            ms_bf16 = median_ms(lambda p: M.fused_experts_triton(p[0], layer.w13, layer.w2, *p[1]), pairs, args.iters)
            floor, _ = roofline_ms(shape, T, [r[1] for r in routed], weight_bytes=1.0)
            row = dict(shape=shape, tokens=T, dtype=str(dtype).split('.')[-1], err_vs_bf16=M.rel_err(quant, bf16),
                       err_vs_reference=M.rel_err(quant, ref) if ref is not None else None, ms=ms, bf16_ms=ms_bf16,
                       floor_ms=floor)
            results['quantized'].append(row)
            print(f"{shape:8s} T={T:5d} {row['dtype']:14s} experts only: {ms:.3f} ms (bf16 {ms_bf16:.3f}), "
                  f"floor {floor:.3f}; error vs bf16 {row['err_vs_bf16']:.1e}", flush=True)
        del q13, q2


def table(results):
    print('\n| layer | tokens | transformers eager | transformers grouped_mm | infer | infer (graph) | infer (in a graph) | '
          'floor | % of roofline (eager / graph / in a graph) | speedup vs best transformers (eager / graph) |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for r in results['rows']:
        print(f"| {r['shape']} | {r['tokens']} | {r['hf_eager_ms']:.3f} | {r['hf_grouped_mm_ms']:.3f} | "
              f"{r['infer_ms']:.3f} | {r['infer_graph_ms']:.3f} | {r['infer_in_graph_ms']:.3f} | {r['floor_ms']:.3f} | "
              f"{100 * r['roof_eager']:.0f}% / {100 * r['roof_graph']:.0f}% / {100 * r['roof_in_graph']:.0f}% | "
              f"{r['speedup_eager']:.1f}× / {r['speedup_graph']:.1f}× |")


def save(results, args):
    os.makedirs(OUT, exist_ok=True)
    name = args.json or ('moe_tune_h200.json' if args.tune else 'moe_h200.json')
    with open(os.path.join(OUT, name), 'w') as f: json.dump(results, f, indent=1)


# --- tuning ---------------------------------------------------------------------------------------------------------

def candidates(T: int, k: int, E: int):
    "Tile configs worth trying at T tokens: short tiles and fine column splits when experts get few rows."
    rows = T * k / E
    if rows <= 16:
        grid = itertools.product([16], [32, 64, 128], [64, 128, 256], [1], [4], [3, 4])
    elif rows <= 128:
        grid = itertools.product([16, 32, 64], [64, 128], [64, 128], [8], [4], [3])
    else:
        grid = itertools.chain(itertools.product([128], [64, 128, 256], [64, 128], [8, 32], [8], [3, 4]),
                               itertools.product([64], [128, 256], [64], [8], [4, 8], [3]))
    for bm, bn, bk, gm, w, s in grid:
        yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=w, num_stages=s)


def kernel_ms(launch, n_sets: int, reps: int = 5) -> float:
    "Median per-launch time of `launch(i)` over the input sets, from graphs of n_sets back-to-back launches."
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(n_sets): launch(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_sets): launch(i)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); graph.replay(); end.record(); end.synchronize()
        times.append(start.elapsed_time(end) / n_sets)
    return statistics.median(times)


@torch.no_grad()
def tune(args):
    results = dict(device=torch.cuda.get_device_name(), triton=M.triton.__version__, best={}, trials=[])
    g = torch.Generator(DEV).manual_seed(1)
    experts = {shape: M.random_experts(*SHAPES[shape][:3], torch.bfloat16, DEV, g) for shape in args.shapes}
    for T, shape in itertools.product(args.tokens, args.shapes):   # every shape gets the small counts first
            if time.time() - T0 > args.budget_s: print('budget spent; stopping'); break
            E, H, I, k = SHAPES[shape]
            w13, w2 = experts[shape]
            xs = [torch.randn(T, H, generator=g, device=DEV).bfloat16() for _ in range(INPUT_SETS)]
            routed = [M.route(torch.randn(T, E, generator=g, device=DEV), k, renormalize=True) for _ in xs]
            sorted_rows = M.max_padded_rows(T * k, E, 128)     # the gate-and-up product is in sorted order
            hidden = [torch.randn(sorted_rows, I, generator=g, device=DEV).bfloat16() for _ in xs]
            best = {}
            for cfg in candidates(T, k, E):
                bm = cfg['BLOCK_M']
                aligned = [M.align_triton(ids, E, bm) for _, ids in routed]
                outs = dict(up=torch.empty(sorted_rows, I, dtype=torch.bfloat16, device=DEV),
                            down=torch.empty(T * k, H, dtype=torch.bfloat16, device=DEV))
                trial = dict(shape=shape, tokens=T, **cfg)
                for part in ('up', 'down'):
                    def launch(i, part=part):
                        if part == 'up':
                            M._launch(xs[i], w13, outs['up'], None, routed[i][0], aligned[i], I, H, T * k, k, cfg,
                                      gated=True, activation='silu', weighted=False)
                        else:
                            M._launch(hidden[i], w2, outs['down'], None, routed[i][0], aligned[i], H, I, T * k, 1,
                                      cfg, gated=False, activation='silu', weighted=True)
                    try:
                        trial[part] = kernel_ms(launch, INPUT_SETS)
                    except Exception as e:   # out of shared memory or registers for this tile: not a candidate
                        trial[part] = None; trial[f'{part}_error'] = type(e).__name__
                results['trials'].append(trial)
                for part in ('up', 'down'):
                    if trial[part] is not None and trial[part] < best.get((bm, part), (float('inf'),))[0]:
                        best[(bm, part)] = (trial[part], cfg)
            sums = {bm: best[(bm, 'up')][0] + best[(bm, 'down')][0] for bm in {b for b, _ in best}
                    if (bm, 'up') in best and (bm, 'down') in best}
            bm = min(sums, key=sums.get)
            up, down = best[(bm, 'up')], best[(bm, 'down')]
            default = M._default_configs(T * k / E)
            results['best'].setdefault(shape, {})[T] = dict(up=up[1], down=down[1], up_ms=up[0], down_ms=down[0])
            print(f'{shape:8s} T={T:5d} best BLOCK_M={bm}: up {up[0] * 1e3:.1f} us {up[1]}, down {down[0] * 1e3:.1f} us '
                  f'{down[1]} (default {default})  [{time.time() - T0:.0f} s]', flush=True)
            save(results, args)
    print('\nH200_MOE_CONFIGS = {')
    for shape, by_T in results['best'].items():
        E, H, I, k = SHAPES[shape]
        print(f'    ({E}, {H}, {I}, {k}): {{  # {shape}')
        for T, b in by_T.items():
            print(f"        {T}: ({b['up']}, {b['down']}),")
        print('    },')
    print('}')
    save(results, args)


@torch.no_grad()
def tune_rows(args):
    """The rows path (a few tokens, no alignment) against the tiles path, as whole expert calls (graph replays, router
    left out), at each token count; with a grid of column blocks for each of its two kernels."""
    results = dict(device=torch.cuda.get_device_name(), triton=M.triton.__version__, best={}, trials=[])
    g = torch.Generator(DEV).manual_seed(2)
    # (64-wide and 2-warp blocks left out to keep the run short: before the kernels loaded a step ahead, one 2-warp
    # block won, the down rows at 2 tokens; none 64 wide)
    grid = list(itertools.product([8, 16, 32], [128, 256, 512], [4, 8]))
    for shape in args.shapes:
        E, H, I, k = SHAPES[shape]
        w13, w2 = M.random_experts(E, H, I, torch.bfloat16, DEV, g)
        for T in args.tokens:
            xs = [torch.randn(T, H, generator=g, device=DEV).bfloat16() for _ in range(INPUT_SETS)]
            routed = [M.route(torch.randn(T, E, generator=g, device=DEV), k, renormalize=True) for _ in xs]
            hidden = [torch.randn(T * k, I, generator=g, device=DEV).bfloat16() for _ in xs]
            up_out, down_out = torch.empty(T * k, I, dtype=torch.bfloat16, device=DEV), torch.empty(T, H, dtype=torch.bfloat16, device=DEV)
            best = {}
            for bn, bk, w in grid:
                cfg = M._row_tiles(bn, bk, w)
                launches = dict(up=lambda i: M._launch_gate_up_rows(xs[i], w13, up_out, None, routed[i][1], 'silu', cfg),
                                down=lambda i: M._launch_down_rows(hidden[i], w2, down_out, None, routed[i][1],
                                                                   routed[i][0], cfg))
                for part, launch in launches.items():
                    try: ms = kernel_ms(launch, INPUT_SETS)
                    except Exception: ms = None   # out of registers for this block: not a candidate
                    results['trials'].append(dict(shape=shape, tokens=T, part=part, **cfg, ms=ms))
                    if ms is not None and ms < best.get(part, (float('inf'),))[0]: best[part] = (ms, cfg)
            config = (best['up'][1], best['down'][1])
            rows_ms = kernel_ms(lambda i: M.fused_experts_triton(xs[i], w13, w2, *routed[i], path='rows', config=config), INPUT_SETS)
            tiles_ms = kernel_ms(lambda i: M.fused_experts_triton(xs[i], w13, w2, *routed[i], path='tiles'), INPUT_SETS)
            floor_ms, touched = roofline_ms(shape, T, [ids for _, ids in routed])
            results['best'].setdefault(shape, {})[T] = dict(up=config[0], down=config[1], rows_ms=rows_ms, tiles_ms=tiles_ms,
                                                            floor_ms=floor_ms, up_ms=best['up'][0], down_ms=best['down'][0])
            print(f'{shape:8s} T={T:3d}  rows {rows_ms * 1e3:6.1f} us (up {best["up"][0] * 1e3:.1f} {config[0]}, down '
                  f'{best["down"][0] * 1e3:.1f} {config[1]})  tiles {tiles_ms * 1e3:6.1f} us  floor {floor_ms * 1e3:5.1f} us',
                  flush=True)
            save(results, args)
    save(results, args)


@torch.no_grad()
def launch_ab(args):
    """What the few-token path's launch savings are worth, A/B in one run: the whole layer (router included, graph
    replays over the input sets) with the one-launch router and programmatic dependent launches (the default), with
    the one-launch router alone, and with neither (the router's matrix product, then the top-k kernel)."""
    results = dict(device=torch.cuda.get_device_name(), triton=M.triton.__version__, rows=[])
    g = torch.Generator(DEV).manual_seed(4)
    pdl, max_router = M._pdl, M.MAX_ROUTER_TOKENS
    variants = {'router + pdl': (pdl, max_router), 'router': (lambda t: False, max_router),
                'neither': (lambda t: False, 0)}
    for shape in args.shapes:
        E, H, I, k = SHAPES[shape]
        layer = random_layer(g, E, H, I, k)
        for T in args.tokens:
            inputs = [torch.randn(T, H, generator=g, device=DEV).bfloat16() for _ in range(INPUT_SETS)]
            row = dict(shape=shape, tokens=T)
            outs = {}
            for name, (use_pdl, tokens) in variants.items():
                M._pdl, M.MAX_ROUTER_TOKENS = use_pdl, tokens
                row[f'{name}_ms'] = graph_ms(lambda x: layer(x, backend='triton'), inputs, args.iters)
                outs[name] = layer(inputs[0], backend='triton')
            M._pdl, M.MAX_ROUTER_TOKENS = pdl, max_router
            weights, ids = layer.route(inputs[0])
            row['err_vs_reference'] = M.rel_err(outs['router + pdl'], reference_f32(inputs[0], layer, weights, ids))
            row['same_as_neither'] = M.rel_err(outs['router + pdl'], outs['neither'])
            row['floor_ms'], _ = roofline_ms(shape, T, [layer.route(x)[1] for x in inputs])
            results['rows'].append(row)
            print(f"{shape:8s} T={T:4d}  " + '  '.join(f"{n} {row[f'{n}_ms'] * 1e3:6.1f} us ({100 * row['floor_ms'] / row[f'{n}_ms']:.0f}%)"
                                                    for n in variants) +
                  f"  floor {row['floor_ms'] * 1e3:.1f} us  err {row['err_vs_reference']:.1e}, vs neither {row['same_as_neither']:.1e}",
                  flush=True)
            save(results, args)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tune', action='store_true', help='time a grid of tile configs instead of the benchmark')
    p.add_argument('--tune-rows', action='store_true', help='time the rows path (a grid of its blocks) against the tiles')
    p.add_argument('--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    p.add_argument('--tokens', nargs='+', type=int, default=list(TOKENS))
    p.add_argument('--iters', type=int, default=50)
    p.add_argument('--no-quantized', dest='quantized', action='store_false', help='skip the int8 and fp8 rows')
    p.add_argument('--budget-s', type=float, default=540, help='tuning: stop starting new token counts after this')
    p.add_argument('--json', help='file name under $OUT for the results')
    p.add_argument('--configs', help="a --tune run's JSON: time with its best tiles instead of infer's table")
    p.add_argument('--no-tma', action='store_true', help='read the weights through pointers even on Hopper')
    p.add_argument('--row-configs', help="a --tune-rows run's JSON: the rows path's blocks instead of infer's table")
    p.add_argument('--no-rows', action='store_true', help='the tiles path at every token count')
    p.add_argument('--launch-ab', action='store_true', help='the one-launch router and PDL against neither, whole layers')
    args = p.parse_args()
    if args.no_tma: M._tma_ready = lambda a, b: False
    (launch_ab if args.launch_ab else tune_rows if args.tune_rows else tune if args.tune else bench)(args)
