"""Paged attention on one NVIDIA GPU (written for the H200): full-size parity against the torch reference, and speed.

    python benchmarks/attention.py            # parity (20 cases + the store kernel), copy bandwidth, decode, prefill vs SDPA
    python benchmarks/attention.py smoke      # six parity cases, the copy, decode at 64 x 4096, two prefill timings

The anchors, timed in the same run on the same data: the device's own copy bandwidth (a 2 GiB device-to-device copy),
against which the decode kernel's achieved bandwidth (the K and V of every request read once, plus q and out) is
compared; and torch.nn.functional.scaled_dot_product_attention on the same shapes laid out contiguously
([batch, heads, seq, dim], the faster of enable_gqa and repeated KV heads), against which prefill and mixed steps
are compared. Targets (the issue's): decode at batch 64 x 4,096 at least 70% of the copy bandwidth; a mixed step
within 1.5x of SDPA's time.

Timings: 10 back-to-back calls captured in one CUDA graph (so Python's launch overhead is not timed), replayed after
warm-up; the median of 15 replays. Writes $OUT/attention_h200.json (else benchmarks/results/attention.json) and
prints tables. The tile configs are infer.attention's H200_CONFIGS, as recorded there.
"""
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from infer import attention as A  # noqa: E402

DEV = 'cuda'
OUT = os.environ.get('OUT') or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
T0 = time.time()
BUDGET_S = float(os.environ.get('BUDGET_S', 520))   # stop starting optional work after this many seconds
RESULTS = {'device': torch.cuda.get_device_name(), 'capability': list(torch.cuda.get_device_capability()),
           'torch': torch.__version__, 'triton': A.triton.__version__, 'parity': [], 'bench': {},
           'configs': {f'{k[0]}-{k[1]}': v for k, v in A.H200_CONFIGS.items()}}
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}


def save():
    with open(os.path.join(OUT, 'attention_h200.json' if os.environ.get('OUT') else 'attention.json'), 'w') as f:
        json.dump(RESULTS, f, indent=1, default=str)


def left():
    return BUDGET_S - (time.time() - T0)


# ------------------------------------------------------------------------------------------------ inputs

def make_step(q_lens, seq_lens, H, KVH, D, bs, dtype, seed, spare=4):
    """Random step on the GPU: noise everywhere in the cache, blocks in random order, tables padded with 0."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    ql = torch.tensor(q_lens, dtype=torch.int64)
    sl = torch.tensor(seq_lens, dtype=torch.int64)
    need = (sl + bs - 1) // bs
    width = int(need.max()) + 1
    total = int(need.sum())
    nb = total + 1 + spare
    kc = torch.randn(nb, bs, KVH, D, generator=g, device=DEV, dtype=dtype)
    vc = torch.randn(nb, bs, KVH, D, generator=g, device=DEV, dtype=dtype)
    ids = torch.randperm(nb - 1, generator=g, device=DEV)[:total] + 1
    tables = torch.zeros(len(q_lens), width, dtype=torch.int32, device=DEV)
    tables[torch.arange(width, device=DEV)[None] < need.to(DEV)[:, None]] = ids.int()
    T = int(ql.sum())
    q = torch.randn(T, H, D, generator=g, device=DEV, dtype=dtype)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = ql.cumsum(0)
    return q, kc, vc, cu.to(DEV), sl.int().to(DEV), tables


def mixed_lengths(seed, n_dec=40, n_fresh=6, n_prefix=6, n_chunk=6, bs=16, max_ctx=5000):
    "Decodes, fresh prompts, prompts after prefix-cache hits (block-aligned) and chunked-prefill chunks, shuffled."
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    seqs = [(1, r(1, max_ctx)) for _ in range(n_dec)]
    seqs += [(n, n) for n in (r(1, 1500) for _ in range(n_fresh))]
    seqs += [(n, bs * r(1, 3000 // bs) + n) for n in (r(1, 800) for _ in range(n_prefix))]
    seqs += [(n, r(1, 3000) + n) for n in (r(1, 512) for _ in range(n_chunk))]
    order = torch.randperm(len(seqs), generator=g).tolist()
    return [seqs[i][0] for i in order], [seqs[i][1] for i in order]


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# ------------------------------------------------------------------------------------------------ timing

def time_graph(fn, calls=10, replays=15):
    "Median ms per call of `fn`, captured `calls` times into one CUDA graph (falls back to plain launches)."
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        run = graph.replay
    except Exception as e:  # noqa: BLE001
        print('  (graph capture failed, timing plain launches:', repr(e)[:120], ')')
        torch.cuda.synchronize()

        def run():
            for _ in range(calls):
                fn()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def copy_bandwidth():
    n = 1 << 30   # 2 GiB of bf16
    src = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    ms = statistics.median(times)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2 * n / (ms * 1e-3), ms   # bytes read + written


# ------------------------------------------------------------------------------------------------ parity

def parity_case(name, q_lens, seq_lens, H, KVH, D, bs, dtype, seed, **kw):
    q, kc, vc, cu, sl, bt = make_step(q_lens, seq_lens, H, KVH, D, bs, dtype, seed)
    if kw.pop('alibi', False):
        kw['alibi_slopes'] = torch.rand(H, device=DEV) * 0.1
    ref_kw = {k: v for k, v in kw.items() if k in ('scale', 'sliding_window', 'softcap', 'alibi_slopes')}
    row = dict(case=name, dtype=str(dtype).split('.')[-1], block=bs, head_dim=D, heads=f'{H}/{KVH}',
               seqs=len(q_lens), tokens=sum(q_lens), max_ctx=max(seq_lens))
    try:
        ref = A.paged_attention_reference(q.float(), kc.float(), vc.float(), cu, sl, bt, max_elems=1 << 27,
                                          **ref_kw)
        out = torch.full_like(q, float('nan'))
        A.paged_attention_triton(q, kc, vc, cu, sl, bt, out=out, **kw)
        torch.cuda.synchronize()
        nan = bool(out.isnan().any())
        err = rel_err(out, ref)
        row.update(rel_err=err, splits=A.LAST_LAUNCH['num_splits'], tiles=f"{A.LAST_LAUNCH['BLOCK_M']}x"
                   f"{A.LAST_LAUNCH['TILE_N']}", ok=(not nan) and err < TOL[dtype], unwritten=nan)
    except Exception as e:  # noqa: BLE001
        row.update(ok=False, error=repr(e)[:300])
    RESULTS['parity'].append(row)
    print(f"  {'PASS' if row['ok'] else 'FAIL'} {name:34s} {row['dtype']:9s} bs{bs:<3d} d{D:<4d} h{H}/{KVH:<3d} "
          f"seqs {len(q_lens):4d} tok {sum(q_lens):6d} ctx<={max(seq_lens):6d} "
          f"rel_err {row.get('rel_err', float('nan')):.2e} splits {row.get('splits', '-')} "
          f"{row.get('error', '')}", flush=True)
    del q, kc, vc
    torch.cuda.empty_cache()
    return row


def store_parity():
    "store_kv on a poisoned cache at full size: written slots equal k/v, the rest (and -1 slots) untouched."
    T, KVH, D, bs, nb = 20000, 8, 128, 16, 3000
    cache = torch.full((2, 2, nb, bs, KVH, D), float('nan'), device=DEV, dtype=torch.bfloat16)
    kc, vc = cache[1, 0], cache[1, 1]
    k = torch.randn(T, KVH, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(nb * bs, device=DEV)[:T]
    slots[::7] = -1
    A.store_kv_triton(k, v, kc, vc, slots)
    keep = slots >= 0
    ok = torch.equal(kc.flatten(0, 1)[slots[keep]], k[keep]) and torch.equal(vc.flatten(0, 1)[slots[keep]], v[keep])
    written = torch.zeros(nb * bs, dtype=torch.bool, device=DEV)
    written[slots[keep]] = True
    ok = ok and bool(kc.flatten(0, 1)[~written].isnan().all()) and bool(cache[0].isnan().all())
    RESULTS['store_parity'] = ok
    print(f"  {'PASS' if ok else 'FAIL'} store_kv 20000 tokens, 1/7 skipped, bf16, poisoned layered cache")


def parity_full():
    grid = [(torch.float16, 16, 64, 1), (torch.float16, 32, 128, 4), (torch.float16, 16, 128, 8),
            (torch.bfloat16, 32, 64, 8), (torch.bfloat16, 16, 128, 4), (torch.bfloat16, 32, 128, 1),
            (torch.bfloat16, 16, 64, 4), (torch.float16, 32, 64, 4)]
    for i, (dt, bs, D, g) in enumerate(grid):
        kvh = 8 if g <= 4 else 4
        ql, sl = mixed_lengths(100 + i, bs=bs)
        parity_case(f'mixed-g{g}', ql, sl, kvh * g, kvh, D, bs, dt, seed=i)
    ql, sl = [1] * 64, torch.randint(1, 8001, (64,), generator=torch.Generator().manual_seed(7)).tolist()
    parity_case('decode-b64', ql, sl, 32, 8, 128, 16, torch.bfloat16, seed=20)
    ql, sl = [1] * 128, torch.randint(1, 4001, (128,), generator=torch.Generator().manual_seed(8)).tolist()
    parity_case('decode-b128', ql, sl, 32, 8, 128, 32, torch.float16, seed=21)
    parity_case('splitk-auto-b2', [1, 1], [16000, 300], 32, 8, 128, 16, torch.bfloat16, seed=22)
    parity_case('splitk-auto-b4-fp16', [1] * 4, [9000, 12000, 17, 5000], 32, 8, 64, 32, torch.float16, seed=23)
    ql, sl = mixed_lengths(30, n_dec=10, n_fresh=2, n_prefix=2, n_chunk=2)
    parity_case('splitk-forced-mixed', ql, sl, 32, 8, 128, 16, torch.bfloat16, seed=24, num_splits=8)
    ql, sl = mixed_lengths(31, bs=16, max_ctx=6000)
    parity_case('window4096-mixed', ql, sl, 32, 8, 128, 16, torch.bfloat16, seed=25, sliding_window=4096)
    parity_case('window1000-mixed', ql, sl, 16, 8, 64, 16, torch.float16, seed=26, sliding_window=1000)
    ql, sl = mixed_lengths(32, n_dec=20, n_fresh=3, n_prefix=3, n_chunk=3, bs=32)
    parity_case('softcap50-d256-mixed', ql, sl, 16, 8, 256, 32, torch.bfloat16, seed=27, softcap=50.0,
                scale=256 ** -0.5)
    parity_case('alibi-mixed', ql, sl, 32, 8, 128, 32, torch.float16, seed=28, alibi=True)
    parity_case('d80-g3-mixed', ql, sl, 24, 8, 80, 16, torch.bfloat16, seed=29)
    parity_case('fp32-mixed', ql, sl, 16, 4, 128, 16, torch.float32, seed=30)
    parity_case('bench-mixed-4x2048+60x4096', [1] * 60 + [2048] * 4, [4096] * 60 + [2048] * 4, 32, 8, 128, 16,
                torch.bfloat16, seed=31)
    store_parity()
    save()


def bench_decode(B, ctx, H=32, KVH=8, D=128, bs=16, dtype=torch.bfloat16, num_splits=None, copy_bw=None):
    q, kc, vc, cu, sl, bt = make_step([1] * B, [ctx] * B, H, KVH, D, bs, dtype, seed=B * 7 + ctx)
    out = torch.empty_like(q)
    call = lambda: A.paged_attention_triton(q, kc, vc, cu, sl, bt, out=out, max_seqlen_q=1, max_seqlen_k=ctx,  # noqa
                                     num_splits=num_splits, validate=False)
    call()
    launch = dict(A.LAST_LAUNCH)
    ms = time_graph(call)
    nbytes = B * ctx * KVH * D * 2 * dtype.itemsize + 2 * B * H * D * dtype.itemsize
    bw = nbytes / (ms * 1e-3)
    row = dict(batch=B, ctx=ctx, ms=ms, bytes=nbytes, GBps=bw / 1e9, frac_copy_bw=bw / copy_bw if copy_bw else None,
               splits=launch['num_splits'], tiles=[launch['BLOCK_M'], launch['TILE_N'], launch['num_warps'],
                                                    launch['num_stages']])
    del q, kc, vc
    torch.cuda.empty_cache()
    return row


def sdpa_time(q_lens_ctx, H, KVH, D, dtype, causal):
    "Best SDPA time over (enable_gqa, repeated KV heads) for equal-length batches [(batch, q_len, kv_len)]."
    total = 0.0
    for (b, qn, kn) in q_lens_ctx:
        q = torch.randn(b, H, qn, D, device=DEV, dtype=dtype)
        k = torch.randn(b, KVH, kn, D, device=DEV, dtype=dtype)
        v = torch.randn_like(k)
        kr, vr = k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1)
        best = float('inf')
        for name, fn in (('gqa', lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)),
                         ('repeat', lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=causal))):
            try:
                best = min(best, time_graph(fn))
            except Exception as e:  # noqa: BLE001
                print(f'  sdpa {name} failed: {repr(e)[:100]}')
        total += best
        del q, k, v, kr, vr
    torch.cuda.empty_cache()
    return total


def sdpa_time_parts(parts, H, KVH, D, dtype):
    return sum(sdpa_time([(b, qn, kn)], H, KVH, D, dtype, causal=c) for (b, qn, kn, c) in parts)


def bench_prefill(name, ql, sl, parts, H=32, KVH=8, D=128, bs=16, dtype=torch.bfloat16, **kw):
    "Our kernel on one packed step vs SDPA on the same shapes laid out contiguously (`parts`: b, q, kv, causal)."
    q, kc, vc, cu, sl_t, bt = make_step(ql, sl, H, KVH, D, bs, dtype, seed=len(ql))
    out = torch.empty_like(q)
    call = lambda: A.paged_attention_triton(q, kc, vc, cu, sl_t, bt, out=out, max_seqlen_q=max(ql),  # noqa: E731
                                     max_seqlen_k=max(sl), validate=False, **kw)
    call()
    launch = dict(A.LAST_LAUNCH)
    t = time_graph(call)
    del q, kc, vc
    torch.cuda.empty_cache()
    sd = sdpa_time_parts(parts, H, KVH, D, dtype)
    flops = sum(4 * D * H * (qn * (kn - qn) + qn * (qn + 1) / 2) for qn, kn in zip(ql, sl))
    r = dict(case=name, ms=t, sdpa_ms=sd, ratio=t / sd, tflops=flops / (t * 1e-3) / 1e12,
             tiles=[launch['BLOCK_M'], launch['TILE_N'], launch['num_warps'], launch['num_stages']],
             splits=launch['num_splits'])
    print(f"  {name:34s} ours {t:.3f} ms ({r['tflops']:.0f} TFLOP/s)  SDPA {sd:.3f} ms  ratio {t / sd:.2f}",
          flush=True)
    return r


def bench_all(sweep=True):
    bw, ms = copy_bandwidth()
    RESULTS['bench']['copy'] = dict(bytes=4 * (1 << 30), ms=ms, GBps=bw / 1e9)
    print(f'  device-to-device copy: 2 GiB in {ms:.3f} ms = {bw / 1e9:.0f} GB/s (read + write)')
    rows = []
    for splits in (None, 1, 2, 4):
        r = bench_decode(64, 4096, num_splits=splits, copy_bw=bw)
        r['forced_splits'] = splits
        rows.append(r)
        print(f"  decode b64 x 4096 (splits {'auto' if splits is None else splits}->{r['splits']}): "
              f"{r['ms']:.4f} ms  {r['GBps']:.0f} GB/s  {100 * r['frac_copy_bw']:.1f}% of copy bw", flush=True)
    RESULTS['bench']['decode_b64_4096'] = rows
    save()
    mixed = [1] * 60 + [2048] * 4, [4096] * 60 + [2048] * 4
    RESULTS['bench']['prefill'] = []
    for name, (ql, sl), parts, kw in (
            ('mixed 4x2048 new + 60x4096 decode', mixed, [(4, 2048, 2048, True), (60, 1, 4096, False)], {}),
            ('prefill 8x2048', ([2048] * 8, [2048] * 8), [(8, 2048, 2048, True)], {}),
            ('mixed, separate launches', mixed, [(4, 2048, 2048, True), (60, 1, 4096, False)],
             dict(mixed='separate')),
            ('mixed, single launch (large tiles)', mixed, [(4, 2048, 2048, True), (60, 1, 4096, False)],
             dict(mixed='single'))):
        if left() < 60:
            break
        RESULTS['bench']['prefill'].append(bench_prefill(name, ql, sl, parts, **kw))
        save()
    if sweep:
        RESULTS['bench']['decode_sweep'] = []
        for B in (1, 8, 32, 64, 128):
            for ctx in (512, 1024, 4096, 16384):
                if left() < 30:
                    print('  (time budget: sweep cut short)')
                    break
                r = bench_decode(B, ctx, copy_bw=bw)
                RESULTS['bench']['decode_sweep'].append(r)
        save()
    return bw


def print_tables():
    print('\n=== parity (relative error vs fp32 reference; tol fp16 2e-3, bf16 1e-2, fp32 1e-4) ===')
    print(f"{'case':34s} {'dtype':9s} {'bs':>3s} {'d':>4s} {'heads':>6s} {'seqs':>5s} {'tokens':>7s} {'max_ctx':>7s} "
          f"{'splits':>6s} {'rel_err':>9s} ok")
    for r in RESULTS['parity']:
        print(f"{r['case']:34s} {r['dtype']:9s} {r['block']:3d} {r['head_dim']:4d} {r['heads']:>6s} {r['seqs']:5d} "
              f"{r['tokens']:7d} {r['max_ctx']:7d} {str(r.get('splits', '-')):>6s} "
              f"{r.get('rel_err', float('nan')):9.2e} {r['ok']}")
    if 'store_parity' in RESULTS:
        print(f"store_kv parity: {RESULTS['store_parity']}")
    b = RESULTS['bench']
    if 'copy' in b:
        print(f"\n=== bandwidth: copy {b['copy']['GBps']:.0f} GB/s (2 GiB, read+write) ===")
    if 'decode_b64_4096' in b:
        print('decode b64 x ctx 4096, 32/8 heads, d128, bf16, block 16:')
        for r in b['decode_b64_4096']:
            print(f"  splits {str(r['forced_splits'] or 'auto'):>4s}->{r['splits']}: {r['ms'] * 1e3:8.1f} us "
                  f"{r['GBps']:7.0f} GB/s {100 * r['frac_copy_bw']:5.1f}% of copy  tiles {r['tiles']}")
    if b.get('decode_sweep'):
        print('decode sweep (us / GB/s / % copy bw / splits):')
        print('batch \\ ctx ' + ''.join(f'{c:>26d}' for c in (512, 1024, 4096, 16384)))
        for B in (1, 8, 32, 64, 128):
            cells = [r for r in b['decode_sweep'] if r['batch'] == B]
            print(f'{B:11d} ' + ''.join(f"{r['ms'] * 1e3:8.1f} {r['GBps']:6.0f} {100 * r['frac_copy_bw']:5.1f}% "
                                        f"s{r['splits']:<3d}" for r in cells))
    if b.get('prefill'):
        print('prefill vs SDPA (same data, contiguous [b, h, s, d]; best of enable_gqa / repeated KV):')
        for r in b['prefill']:
            print(f"  {r['case']:34s} ours {r['ms']:.3f} ms ({r['tflops']:.0f} TFLOP/s)  SDPA {r['sdpa_ms']:.3f} ms  "
                  f"ours/SDPA {r['ratio']:.2f}  tiles {r['tiles']}")
    print(f'total wall {time.time() - T0:.0f} s')


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else 'full'
    RESULTS['mode'] = mode
    print(f"{RESULTS['device']} cap {RESULTS['capability']} torch {RESULTS['torch']} triton {RESULTS['triton']}")
    if mode == 'smoke':
        ql, sl = mixed_lengths(1, n_dec=10, n_fresh=2, n_prefix=2, n_chunk=2)
        parity_case('smoke-mixed', ql, sl, 32, 8, 128, 16, torch.bfloat16, seed=1)
        parity_case('smoke-mixed-d64-g1', ql, sl, 8, 8, 64, 16, torch.float16, seed=3)
        parity_case('smoke-mixed-d256-softcap', ql, sl, 16, 8, 256, 32, torch.bfloat16, seed=4, softcap=30.0)
        parity_case('smoke-decode-d256', [1] * 40, [3000] * 40, 16, 8, 256, 16, torch.bfloat16, seed=5)
        parity_case('smoke-decode-d64', [1] * 40, [3000] * 40, 32, 8, 64, 16, torch.float16, seed=6)
        parity_case('smoke-splitk', [1, 1], [9000, 40], 32, 8, 128, 16, torch.bfloat16, seed=2)
        bw, ms = copy_bandwidth()
        RESULTS['bench']['copy'] = dict(bytes=4 * (1 << 30), ms=ms, GBps=bw / 1e9)
        r = bench_decode(64, 4096, copy_bw=bw)
        r['forced_splits'] = None
        RESULTS['bench']['decode_b64_4096'] = [r]
        RESULTS['bench']['prefill'] = [
            bench_prefill('mixed 4x2048 new + 60x4096 decode', [1] * 60 + [2048] * 4, [4096] * 60 + [2048] * 4,
                          [(4, 2048, 2048, True), (60, 1, 4096, False)]),
            bench_prefill('prefill 8x2048', [2048] * 8, [2048] * 8, [(8, 2048, 2048, True)])]
    else:
        print('parity:', flush=True)
        parity_full()
        bench_all(sweep=True)
    save()
    print_tables()
    ok = all(r['ok'] for r in RESULTS['parity']) and RESULTS.get('store_parity', True)
    d = RESULTS['bench']['decode_b64_4096'][0]
    mixed = RESULTS['bench']['prefill'][0]
    print(f"\ntargets: parity {'met' if ok else 'NOT met'}; decode 64 x 4096 at {100 * d['frac_copy_bw']:.0f}% of copy "
          f"bandwidth ({'met' if d['frac_copy_bw'] >= 0.7 else 'NOT met'}, target 70%); mixed step {mixed['ratio']:.2f}x "
          f"SDPA ({'met' if mixed['ratio'] <= 1.5 else 'NOT met'}, target 1.5x)")


if __name__ == '__main__':
    main()
