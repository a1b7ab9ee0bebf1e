"""The projections of a decode step on the GPU: cuBLAS (torch's default), cuBLASLt, and a plain Triton GEMM over a grid of
tiles, at Qwen2-0.5B's four projection shapes and a few batch sizes.

    python benchmarks/decode_gemm.py --out results.json

Each op is timed as a decode step runs it: 24 calls in a CUDA graph, one per layer, each on its own weights (so the
weights come from HBM, not from the 50 MB L2), replayed 20 times; time per call, median over replays. Every Triton
result is checked against `F.linear` (bf16, relative Frobenius error under 1e-2) before it is timed.
"""
import argparse
import itertools
import json
import statistics

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SHAPES = {'qkv_proj': (1152, 896, True), 'o_proj': (896, 896, False), 'gate_up_proj': (9728, 896, False),
          'down_proj': (896, 4864, False)}
LAYERS = 24


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, STAGES: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in tl.range(0, K, BK, num_stages=STAGES):
        a = tl.load(x_ptr + rm[:, None] * stride_xm + (k + rk)[None, :], mask=(rm[:, None] < M) & ((k + rk)[None, :] < K), other=0.0)
        b = tl.load(w_ptr + rn[None, :] * stride_wn + (k + rk)[:, None], mask=(rn[None, :] < N) & ((k + rk)[:, None] < K), other=0.0)
        acc = tl.dot(a, b, acc)
    if HAS_BIAS: acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def triton_linear(x, w, b, cfg):
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    BM, BN, BK, warps, stages = cfg
    _gemm_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](x, w, b if b is not None else w, out, M, N, K, x.stride(0),
                                                          w.stride(0), out.stride(0), BM=BM, BN=BN, BK=BK,
                                                          HAS_BIAS=b is not None, STAGES=stages, num_warps=warps)
    return out


def time_per_call(fn, xs, ws, bs, replays=20):
    "Microseconds per call: LAYERS calls (one per weight copy) in one CUDA graph, median over replays."
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(LAYERS): fn(xs, ws[i], bs[i])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(LAYERS): fn(xs, ws[i], bs[i])
    start, end, times = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), []
    for _ in range(replays):
        start.record(); graph.replay(); end.record(); end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / LAYERS)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--rows', default='256')
    p.add_argument('--out')
    args = p.parse_args()
    torch.manual_seed(0)
    results = {}
    for name, (N, K, has_bias) in SHAPES.items():
        ws = [torch.randn(N, K, device='cuda', dtype=torch.bfloat16) / K ** 0.5 for _ in range(LAYERS)]
        bs = [torch.randn(N, device='cuda', dtype=torch.bfloat16) if has_bias else None for _ in range(LAYERS)]
        for M in map(int, args.rows.split(',')):
            x = torch.randn(M, K, device='cuda', dtype=torch.bfloat16)
            row = {'cublas': time_per_call(lambda x, w, b: F.linear(x, w, b), x, ws, bs)}
            torch.backends.cuda.preferred_blas_library('cublaslt')
            row['cublaslt'] = time_per_call(lambda x, w, b: F.linear(x, w, b), x, ws, bs)
            torch.backends.cuda.preferred_blas_library('cublas')
            ref = F.linear(x, ws[0], bs[0]).float()
            tiles = {}
            for BM, BN, BK, stages in itertools.product((16, 32, 64, 128) if M <= 32 else (64, 128), (32, 64, 128),
                                                        (64, 128), (3, 4)):
                if BM > max(16, triton.next_power_of_2(M)): continue
                cfg = (BM, BN, BK, 8 if BM * BN >= 128 * 128 else 4, stages)
                try:
                    out = triton_linear(x, ws[0], bs[0], cfg).float()
                    err = ((out - ref).norm() / ref.norm()).item()
                    if err > 1e-2: raise RuntimeError(f'error {err:.2e}')
                    tiles[str(cfg)] = time_per_call(lambda x, w, b: triton_linear(x, w, b, cfg), x, ws, bs)
                except Exception as e:                      # out of shared memory, and the like
                    tiles[str(cfg)] = repr(e)[:80]
            ok = {c: t for c, t in tiles.items() if isinstance(t, float)}
            best = min(ok, key=ok.get)
            row.update(triton_best=ok[best], triton_best_config=best, triton=tiles)
            results[f'{name} M={M}'] = row
            print(f'{name:13} M={M:4}  cublas {row["cublas"]:7.2f} us  cublaslt {row["cublaslt"]:7.2f}  '
                  f'triton {ok[best]:7.2f} {best}', flush=True)
    if args.out:
        with open(args.out, 'w') as f: json.dump(dict(torch=torch.__version__, triton=triton.__version__,
                                                      device=torch.cuda.get_device_name(), results=results), f, indent=1)


if __name__ == '__main__':
    main()
