"""KV cache bookkeeping: what prefix caching costs per allocated token and per decode step, vLLM's v1 KVCacheManager against infer's.

    python benchmarks/kv_cache.py                                 # vLLM from /tmp/vllm_anchor if it is there
    python benchmarks/kv_cache.py --anchor-path ''                # infer alone
    python benchmarks/kv_cache.py --decode-steps 256 --repeats 9

The anchor is vLLM's v1 `KVCacheManager` (vllm/v1/core/kv_cache_manager.py), installed without its
dependencies into a folder of its own, so that it cannot replace this machine's torch:

    pip download vllm==0.33.0 --no-deps -d /tmp/vllm_wheel
    pip install --no-deps --target /tmp/vllm_anchor /tmp/vllm_wheel/vllm-*.whl
    pip install --no-deps --target /tmp/vllm_anchor psutil msgspec cachetools cbor2 pybase64 blake3 aiohttp \\
        multidict yarl propcache aiohappyeyeballs aiosignal frozenlist openai-harmony openai uvloop \\
        prometheus_client xgrammar apache-tvm-ffi fastapi starlette opentelemetry-api opentelemetry-sdk \\
        opentelemetry-semantic-conventions partial_json_parser llguidance einops

That folder goes on `sys.path` only inside this script, and only when it exists (`--anchor-path`).

Both managers run the same workload, with prefix caching off and on, at a 0% hit rate: every prompt
is distinct from its first token. Each manager's pool is first cycled once, so that with caching on
its free blocks all hold cached hashes and every new block evicts one, as in a server's steady state.

* prefill: `get_computed_blocks` (the scheduler's lookup, a miss) and `allocate_slots` for whole prompts
  of varied lengths, then `free`; the cost is per prompt token, allocate and free together (a manager
  may register full blocks in either), and each alone.
* decode: 256 running requests, one `allocate_slots(r, 1)` per request per step, then
  `num_computed_tokens += 1` and the sampled token appended, over `--decode-steps` steps (a multiple of
  the block size: every request crosses block boundaries, allocates blocks and, with caching on,
  registers each block it fills).

What caching costs includes the block hashes. infer hashes lazily, inside the manager; vLLM hashes
in its `Request` (when it is made, and on every appended token), with `--vllm-hash` (vLLM's default,
sha256 of a pickle). So the vLLM timings include that hashing: the prompt's blocks are hashed inside the
timed region, and `append_output_token_ids` hashes each block it fills.

The slowdown is caching on against caching off, in %. vLLM's reported figure (under 1%) is end-to-end
throughput, so the added µs per decode step are also divided by `--gpu-step-ms`, an assumed GPU step
time (default 10 ms: a Llama-3-8B decode step at 256 requests on an H200; and `--gpu-prefill-us-per-token`
for prefill). All four managers (two libraries, caching off and on) run in every round on the same prompts, in
rotating order; in decode, caching off and on alternate step by step. Times are medians (over rounds
for prefill, over all decode steps for decode) of this thread's CPU time by default (`--clock cpu`:
other processes on a small shared machine inflate wall time); slowdowns are medians of paired on/off
ratios (per prefill round, per decode step). The garbage collector is frozen before
timing (vLLM's engine freezes it after start-up) but stays on.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchor import load_anchor_and_report, sig  # noqa: E402
from infer.paging import KVCacheManager  # noqa: E402
from infer.requests import Request, RequestStatus, SamplingParams  # noqa: E402

VOCAB = 32000


def prompts(n: int, lo: int, hi: int, rng: np.random.Generator, first: int) -> list[list[int]]:
    "n prompts of lengths in [lo, hi]; prompt i starts with the token `first + i`, which no other prompt has."
    lengths = rng.integers(lo, hi + 1, size=n)
    return [[first + i] + rng.integers(0, VOCAB, size=int(L) - 1).tolist() for i, L in enumerate(lengths)]


def blocks_for(lengths, bs: int) -> int: return sum(-(-L // bs) for L in lengths)


class InferSide:
    "Drives infer's KVCacheManager."
    name = 'infer'

    def __init__(self, num_blocks, bs, caching, max_model_len):
        self.kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=caching, max_model_len=max_model_len)
        self.n = 0

    def requests(self, token_lists, max_tokens):
        out = []
        for toks in token_lists:
            self.n += 1
            out.append(Request(f'i{self.n}', toks, SamplingParams(max_tokens=max_tokens)))
        return out

    def prefill(self, reqs):
        kv = self.kv
        for r in reqs:
            hit = kv.get_computed_blocks(r)
            if not kv.allocate_slots(r, r.num_tokens - hit.num_tokens, hit): raise RuntimeError('pool too small')

    def free(self, reqs):
        for r in reqs: self.kv.free(r)

    def admit(self, reqs, first_tokens):
        "Prefill, then the first sampled token: each request is ready for its first decode step."
        self.prefill(reqs)
        for r, t in zip(reqs, first_tokens):
            r.num_computed_tokens = r.num_tokens
            r.transition(RequestStatus.RUNNING)
            r.append_output_token(t)

    def decode_step(self, reqs, toks):
        kv = self.kv
        for r, t in zip(reqs, toks):
            if not kv.allocate_slots(r, 1): raise RuntimeError('pool too small')
            r.num_computed_tokens += 1
            r.append_output_token(t)


class VllmSide:
    "Drives vLLM's v1 KVCacheManager as its scheduler and engine do (one full-attention group)."
    name = 'vllm'

    def __init__(self, v, num_blocks, bs, caching, max_model_len, hash_name):
        spec = v.FullAttentionSpec(block_size=bs, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
        cfg = v.KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[v.KVCacheGroupSpec(['layer.0'], spec)])
        self.v, self.caching = v, caching
        self.kv = v.VKVCacheManager(cfg, max_model_len=max_model_len, scheduler_block_size=bs, hash_block_size=bs,
                                    enable_caching=caching)
        hash_fn = hash if hash_name == 'builtin' else v.get_hash_fn_by_name(hash_name)
        v.init_none_hash(hash_fn)
        self.hasher = v.get_request_block_hasher(bs, hash_fn) if caching else None
        self.n = 0

    def requests(self, token_lists, max_tokens):
        out = []
        for toks in token_lists:
            self.n += 1   # made without a hasher: the prompt's hashes are computed in prefill, inside the timing
            out.append(self.v.VRequest(f'v{self.n}', toks, self.v.VSamplingParams(max_tokens=max_tokens), None))
        return out

    def prefill(self, reqs):
        kv, hasher = self.kv, self.hasher
        for r in reqs:
            if hasher is not None:   # what Request.__init__ does in the engine when caching is on
                r._block_hasher = hasher
                r.update_block_hashes()
            blocks, n, _ = kv.get_computed_blocks(r)
            if kv.allocate_slots(r, r.num_tokens - n, n, blocks) is None: raise RuntimeError('pool too small')

    def free(self, reqs):
        for r in reqs: self.kv.free(r)

    def admit(self, reqs, first_tokens):
        self.prefill(reqs)
        for r, t in zip(reqs, first_tokens):
            r.num_computed_tokens = r.num_tokens
            r.status = self.v.VRequestStatus.RUNNING
            r.append_output_token_ids(t)

    def decode_step(self, reqs, toks):
        kv = self.kv
        for r, t in zip(reqs, toks):
            if kv.allocate_slots(r, 1) is None: raise RuntimeError('pool too small')
            r.num_computed_tokens += 1
            r.append_output_token_ids(t)


def rotated(items: list, k: int) -> list:
    "`items` starting at position k: each side is timed first, second, ... in turn."
    k %= len(items)
    return items[k:] + items[:k]


def paired_slowdown(on: list[float], off: list[float]) -> float:
    "Median over paired samples (same round or step, timed back to back) of on/off - 1, in %."
    return 100 * statistics.median(a / b - 1 for a, b in zip(on, off))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--block-size', type=int, default=16)
    ap.add_argument('--prefill-rounds', type=int, default=48, help='timed prefill rounds (after warm-up)')
    ap.add_argument('--prefill-requests', type=int, default=16, help='prompts per prefill round')
    ap.add_argument('--prefill-lengths', default='16,2048', help='prompt lengths, uniform in [lo, hi]')
    ap.add_argument('--decode-requests', type=int, default=256)
    ap.add_argument('--decode-lengths', default='128,1024', help='context lengths when decoding starts, uniform in [lo, hi]')
    ap.add_argument('--decode-steps', type=int, default=None, help='steps per decode round; default 8 × block size, at least 2 ×')
    ap.add_argument('--repeats', type=int, default=5, help='timed decode rounds (after one warm-up round)')
    ap.add_argument('--table-repeats', type=int, default=100, help='block_table / slot_mapping calls timed')
    ap.add_argument('--gpu-step-ms', type=float, default=10.0,
                    help='assumed GPU time of one decode step at 256 requests (Llama-3-8B, H200) for the end-to-end figure')
    ap.add_argument('--gpu-prefill-us-per-token', type=float, default=32.0,
                    help='assumed GPU prefill time per token (Llama-3-8B: 16 GFLOP at 50%% of an H200\'s 989 TFLOPS)')
    ap.add_argument('--clock', default='cpu', choices=['cpu', 'wall'],
                    help="cpu: this thread's CPU time (robust to other processes on the machine); wall: perf_counter")
    ap.add_argument('--anchor-path', default='/tmp/vllm_anchor', help="folder vLLM was pip-installed into with --target; '' for none")
    ap.add_argument('--vllm-hash', default='sha256', choices=['sha256', 'sha256_cbor', 'xxhash', 'xxhash_cbor', 'builtin'],
                    help="vLLM's prefix-caching hash (sha256 is its default; builtin is Python's hash, as in its tests)")
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out', default='benchmarks/results/kv_cache.json')
    args = ap.parse_args()
    bs = args.block_size
    steps = args.decode_steps or 8 * bs
    if steps < 2 * bs: ap.error(f'--decode-steps must be at least 2 × block size = {2 * bs}')
    clock = time.thread_time if args.clock == 'cpu' else time.perf_counter
    p_lo, p_hi = map(int, args.prefill_lengths.split(','))
    d_lo, d_hi = map(int, args.decode_lengths.split(','))
    max_model_len = max(p_hi, d_hi + steps + 1) + bs

    v, vllm_version, why, iv = load_anchor_and_report(args.anchor_path, args.vllm_hash)
    rng = np.random.default_rng(args.seed)
    first = iter(range(VOCAB, 1 << 40, 1 << 16))   # first-token ranges: no prompt shares its first token with another
    libs = ['infer'] + (['vllm'] if v is not None else [])
    keys = [(lib, m) for lib in libs for m in ('off', 'on')]

    def side(lib, num_blocks, caching):
        if lib == 'infer': return InferSide(num_blocks, bs, caching, max_model_len)
        return VllmSide(v, num_blocks, bs, caching, max_model_len, args.vllm_hash)

    # Prefill: each round allocates `--prefill-requests` new prompts and frees them. The pool holds about
    # three rounds; the warm-up rounds go through it twice, so that afterwards, with caching on, every
    # block taken evicts a cached one.
    pre_blocks = 3 * blocks_for([p_hi] * args.prefill_requests, bs) // 2 + 16
    warm = -(-4 * pre_blocks // blocks_for([(p_lo + p_hi) // 2] * args.prefill_requests, bs))
    pre = {k: side(k[0], pre_blocks, k[1] == 'on') for k in keys}
    pt = {(p, k): [] for p in ('cycle', 'alloc', 'free') for k in keys}
    print(f'prefill: {args.prefill_rounds} rounds (+{warm} warm-up) of {args.prefill_requests} prompts of {p_lo}..{p_hi} tokens, '
          f'pool {pre_blocks:,} blocks of {bs}', flush=True)
    gc.collect(); gc.freeze()
    for rnd in range(warm + args.prefill_rounds):
        batch = prompts(args.prefill_requests, p_lo, p_hi, rng, next(first))
        n = sum(map(len, batch))
        for k in rotated(keys, rnd):
            s = pre[k]
            reqs = s.requests(batch, 16)
            a = clock(); s.prefill(reqs); b = clock(); s.free(reqs); c = clock()
            if rnd >= warm:
                pt[('cycle', k)].append((c - a) / n); pt[('alloc', k)].append((b - a) / n); pt[('free', k)].append((c - b) / n)
    del pre

    # Decode: in each round each library in turn admits `--decode-requests` new requests into both its
    # managers (untimed), runs the steps, timing caching off and on alternately, step by step, and frees
    # them. Round 0 warms the pools. Off and on are paired step by step: the same requests, tokens and
    # block boundaries, timed a millisecond apart, so that a busy machine slows both alike.
    dec_len = [prompts(args.decode_requests, d_lo, d_hi, rng, next(first)) for _ in range(args.repeats + 1)]
    dec_blocks = max(blocks_for((len(t) + steps + 2 for t in p), bs) for p in dec_len) + 16
    dec = {k: side(k[0], dec_blocks, k[1] == 'on') for k in keys}
    dt = {k: [] for k in keys}        # every timed step, in step order: on[i] pairs with off[i]
    table_t, slots_t = [], []
    print(f'decode: {args.decode_requests} requests of {d_lo}..{d_hi} tokens, {args.repeats} rounds (+1 warm-up) of {steps} steps, '
          f'pool {dec_blocks:,} blocks', flush=True)
    for rnd, batch in enumerate(dec_len):
        toks = rng.integers(0, VOCAB, size=(steps + 1, args.decode_requests)).tolist()
        for lib in rotated(libs, rnd):
            pair = [(lib, 'off'), (lib, 'on')]
            reqs = {}
            for k in pair:
                reqs[k] = dec[k].requests(batch, steps + 16)
                dec[k].admit(reqs[k], toks[0])
            gc.collect(); gc.freeze()
            for step in range(steps):
                for k in rotated(pair, step):
                    a = clock(); dec[k].decode_step(reqs[k], toks[step + 1]); b = clock()
                    if rnd: dt[k].append(b - a)
            if lib == 'infer':   # the runner's inputs for the next decode step
                s, rs = dec[('infer', 'on')], reqs[('infer', 'on')]
                for r in rs: s.kv.allocate_slots(r, 1)
                ids = [r.request_id for r in rs]
                spans = [(r.request_id, r.num_computed_tokens, 1) for r in rs]
                for _ in range(args.table_repeats if rnd else 2):
                    a = clock(); s.kv.block_table(ids); b = clock(); s.kv.slot_mapping(spans); c = clock()
                    if rnd: table_t.append(b - a); slots_t.append(c - b)
            for k in pair: dec[k].free(reqs[k])
        if rnd: print(f'  decode round {rnd}/{args.repeats} done', flush=True)
    for k, s in dec.items():
        if k[0] == 'infer': s.kv.audit()

    res = {}
    for lib in libs:
        r = res[lib] = {}
        for m in ('off', 'on'):
            r[f'prefill_{m}_ns_per_token'] = 1e9 * statistics.median(pt[('cycle', (lib, m))])
            r[f'prefill_alloc_{m}_ns_per_token'] = 1e9 * statistics.median(pt[('alloc', (lib, m))])
            r[f'prefill_free_{m}_ns_per_token'] = 1e9 * statistics.median(pt[('free', (lib, m))])
            r[f'decode_{m}_us_per_step'] = 1e6 * statistics.median(dt[(lib, m)])
            r[f'decode_{m}_us_per_step_mean'] = 1e6 * statistics.mean(dt[(lib, m)])
            r[f'decode_{m}_us_per_request'] = r[f'decode_{m}_us_per_step'] / args.decode_requests
        r['prefill_slowdown_pct'] = paired_slowdown(pt[('cycle', (lib, 'on'))], pt[('cycle', (lib, 'off'))])
        r['prefill_added_ns_per_token'] = r['prefill_on_ns_per_token'] - r['prefill_off_ns_per_token']
        r['prefill_added_pct_of_gpu_token'] = 100 * r['prefill_added_ns_per_token'] / (1000 * args.gpu_prefill_us_per_token)
        r['decode_slowdown_pct'] = paired_slowdown(dt[(lib, 'on')], dt[(lib, 'off')])
        r['decode_added_us_per_step'] = r['decode_on_us_per_step'] - r['decode_off_us_per_step']
        r['decode_added_pct_of_gpu_step'] = 100 * r['decode_added_us_per_step'] / (1000 * args.gpu_step_ms)
        r['decode_manager_pct_of_gpu_step'] = 100 * r['decode_on_us_per_step'] / (1000 * args.gpu_step_ms)
    res['infer']['block_table_us'] = 1e6 * statistics.median(table_t)
    res['infer']['slot_mapping_us'] = 1e6 * statistics.median(slots_t)
    res['infer']['runner_inputs_pct_of_gpu_step'] = 100 * (res['infer']['block_table_us'] + res['infer']['slot_mapping_us']) / (1000 * args.gpu_step_ms)

    g, gp = f'{args.gpu_step_ms:g} ms', f'{args.gpu_prefill_us_per_token:g} µs'
    rows = [('prefill (allocate + free), caching off', 'ns/token', 'prefill_off_ns_per_token'),
            ('prefill (allocate + free), caching on', 'ns/token', 'prefill_on_ns_per_token'),
            ('  of which allocate, caching on', 'ns/token', 'prefill_alloc_on_ns_per_token'),
            ('  of which free, caching on', 'ns/token', 'prefill_free_on_ns_per_token'),
            ('  slowdown on vs off (manager alone)', '%', 'prefill_slowdown_pct'),
            ('  added by caching', 'ns/token', 'prefill_added_ns_per_token'),
            (f'  added / {gp} GPU prefill per token', '%', 'prefill_added_pct_of_gpu_token'),
            (f'decode {args.decode_requests} reqs, caching off', 'µs/step', 'decode_off_us_per_step'),
            (f'decode {args.decode_requests} reqs, caching on', 'µs/step', 'decode_on_us_per_step'),
            ('  per request, caching on', 'µs', 'decode_on_us_per_request'),
            ('  slowdown on vs off (manager alone)', '%', 'decode_slowdown_pct'),
            ('  added by caching', 'µs/step', 'decode_added_us_per_step'),
            (f'  added / {g} GPU step', '%', 'decode_added_pct_of_gpu_step'),
            (f'  whole manager, caching on / {g} GPU step', '%', 'decode_manager_pct_of_gpu_step'),
            (f'block_table, {args.decode_requests}-request decode step', 'µs', 'block_table_us'),
            (f'slot_mapping, {args.decode_requests}-request decode step', 'µs', 'slot_mapping_us'),
            (f'  both / {g} GPU step', '%', 'runner_inputs_pct_of_gpu_step')]
    vname = f'vLLM {vllm_version}' if v is not None else 'vLLM'
    dash = '\u2014'
    print(f"\n{'':46} {'unit':>8} {'infer':>10} {vname:>12} {'infer/vLLM':>11}")
    for label, unit, key in rows:
        a, b = res['infer'].get(key), res.get('vllm', {}).get(key)
        ratio = f'{a / b:11.2f}' if b and unit != '%' else ''
        print(f"{label:46} {unit:>8} {a:10.2f} {(f'{b:12.2f}' if b is not None else f'{dash:>12}')} {ratio}")
    print(f"\ntimes: medians (over rounds for prefill, over steps for decode) of this thread's "
          f"{'CPU' if args.clock == 'cpu' else 'wall'} time; slowdowns: medians of paired on/off ratios (per prefill round, per decode step). "
          'Prefix caching on at a 0% hit rate, pool full of cached blocks (each new block evicts one).')
    print(f'slowdown target: under 1% (vLLM\'s figure, which is end-to-end throughput). Assumed, not measured here: a {g} GPU '
          f'decode step (Llama-3-8B, 256 requests, H200) and {gp} of GPU prefill per token (16 GFLOP at 50% of 989 TFLOPS).')
    print('infer/vLLM is a ratio of times: under 1, infer is faster.')
    if v is None: print(f'anchor unavailable: {why}')
    else:
        print(f'vLLM timings include its block hashing ({args.vllm_hash}, in Request: the prompt at admission, then each '
              'filled block on append), which its engine does only with caching on; infer hashes inside the manager.')
        print('block_table / slot_mapping: vLLM builds these in its GPU runner (a persistent numpy table updated '
              'incrementally, a Triton slot-mapping kernel): no CPU counterpart to time here.')

    result = dict(block_size=bs, clock=args.clock,
                  prefill=dict(rounds=args.prefill_rounds, warmup_rounds=warm, requests_per_round=args.prefill_requests,
                               lengths=[p_lo, p_hi], pool_blocks=pre_blocks),
                  decode=dict(requests=args.decode_requests, lengths=[d_lo, d_hi], steps_per_round=steps,
                              rounds=args.repeats, pool_blocks=dec_blocks),
                  hit_rate=0.0, slowdown_target_pct=1.0,
                  assumptions=dict(gpu_decode_step_ms=args.gpu_step_ms,
                                   gpu_decode_step='Llama-3-8B decode step at 256 requests on an H200; not measured here',
                                   gpu_prefill_us_per_token=args.gpu_prefill_us_per_token,
                                   gpu_prefill='Llama-3-8B, 16 GFLOP per token at 50% of an H200\'s 989 bf16 TFLOPS; not measured here'),
                  anchor=dict(available=v is not None, version=vllm_version, path=args.anchor_path, why_not=why,
                              hash=args.vllm_hash if v is not None else None,
                              note='vLLM v1 KVCacheManager, one full-attention KV cache group, no tensors'),
                  results=res,
                  ratio_infer_over_vllm={k: res['infer'][k] / res['vllm'][k] for k in res['infer']
                                         if k in res.get('vllm', {}) and 'pct' not in k and res['vllm'][k]},
                  raw_seconds=dict(**{f'prefill_per_token/{p}/{lib}/{m}': sig(x) for (p, (lib, m)), x in pt.items()},
                                   **{f'decode_step/{lib}/{m}': sig(x) for (lib, m), x in dt.items()},
                                   block_table=sig(table_t), slot_mapping=sig(slots_t)),
                  infer_version=iv, load_average=os.getloadavg(),
                  torch=torch.__version__, python=sys.version.split()[0], cpu_count=os.cpu_count())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f'wrote {out}', flush=True)
    if v is not None: os._exit(0)   # skip interpreter teardown: vLLM's triton import prints nanobind leak warnings there


if __name__ == '__main__':
    main()
