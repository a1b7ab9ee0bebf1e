"""The paged KV cache on a GPU: sizing from a fraction of free memory, and swapping a request's blocks to CPU memory and back.

Anchor: a plain contiguous copy of the same number of bytes between the GPU and pinned CPU memory,
the fastest a swap could be. `infer` gathers scattered blocks of every layer in one `index_select`
and moves them in one transfer, so the ratio shows what the gather and the scatter cost on top.

    python benchmarks/kv_cache_gpu.py --out benchmarks/results/kv_cache_gpu.json
"""
import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from infer.paging import KVCacheManager, KVCacheSpec, free_memory


def timed(fn, repeats: int) -> float:
    "Median seconds of `fn()` over `repeats` runs, after one warm-up, with the GPU synchronised."
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def request(rid: str, num_tokens: int):
    return SimpleNamespace(request_id=rid, all_token_ids=[0] * num_tokens, num_tokens=num_tokens,
                           num_computed_tokens=0, is_finished=False, block_hashes=[])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--fraction', type=float, default=0.9, help='fraction of free GPU memory for the cache')
    ap.add_argument('--swap-tokens', default='512,2048,8192', help='request lengths to swap out and in')
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--out', default='benchmarks/results/kv_cache_gpu.json')
    args = ap.parse_args()
    device = torch.device('cuda')
    spec = KVCacheSpec(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)  # Llama-3-8B

    free_before = free_memory(device)
    t = time.perf_counter()
    kv = KVCacheManager.from_budget(spec, args.fraction, max_model_len=32768, device=device, swap_space=32 << 30)
    torch.cuda.synchronize()
    sizing = dict(free_bytes=free_before, fraction=args.fraction, num_blocks=kv.num_blocks,
                  cache_bytes=kv.kv_cache.tensor.numel() * kv.kv_cache.tensor.element_size(),
                  tokens=kv.num_blocks * spec.block_size, seconds=time.perf_counter() - t,
                  arithmetic=spec.explain(int(args.fraction * free_before)))
    print(f"free {free_before / 2**30:.1f} GiB; cache {sizing['cache_bytes'] / 2**30:.1f} GiB = {kv.num_blocks:,} blocks "
          f"= {sizing['tokens']:,} tokens, allocated in {sizing['seconds']:.2f} s\n  {sizing['arithmetic']}")

    rows = []
    print(f"\n{'tokens':>7} {'MiB':>7} {'out GB/s':>9} {'in GB/s':>8} {'copy GB/s':>10} {'out/copy':>9} {'in/copy':>8}  round trip")
    for n in map(int, args.swap_tokens.split(',')):
        # interleave two requests so the swapped one's blocks are scattered through the pool
        a, b = request('a', n), request('b', n)
        for i in range(0, n, spec.block_size):
            for r in (a, b):
                assert kv.allocate_slots(r, spec.block_size)
                r.num_computed_tokens += spec.block_size
        ids = kv.block_ids('a')
        kv.kv_cache.tensor[:, :, ids] = torch.randn_like(kv.kv_cache.tensor[:, :, ids])
        expected = kv.kv_cache.tensor[:, :, ids].clone()
        nbytes = expected.numel() * expected.element_size()

        outs, ins = [], []
        for _ in range(args.repeats + 1):            # the first round is a warm-up
            torch.cuda.synchronize(); t0 = time.perf_counter()
            assert kv.swap_out(a)
            torch.cuda.synchronize(); t1 = time.perf_counter()
            assert kv.swap_in(a)
            torch.cuda.synchronize(); t2 = time.perf_counter()
            outs.append(t1 - t0); ins.append(t2 - t1)
        outs, ins = outs[1:], ins[1:]
        ok = torch.equal(kv.kv_cache.tensor[:, :, kv.block_ids('a')], expected)
        pinned = torch.empty(expected.shape, dtype=expected.dtype, pin_memory=True)
        copy_out = timed(lambda: pinned.copy_(expected, non_blocking=True), args.repeats)
        copy_in = timed(lambda: expected.copy_(pinned, non_blocking=True), args.repeats)
        copy = min(copy_out, copy_in)
        row = dict(tokens=n, bytes=nbytes, swap_out_s=statistics.median(outs), swap_in_s=statistics.median(ins),
                   copy_out_s=copy_out, copy_in_s=copy_in, round_trip_equal=ok)
        rows.append(row)
        print(f"{n:>7} {nbytes / 2**20:>7.0f} {nbytes / row['swap_out_s'] / 1e9:>9.1f} {nbytes / row['swap_in_s'] / 1e9:>8.1f} "
              f"{nbytes / copy / 1e9:>10.1f} {row['swap_out_s'] / copy_out:>9.2f} {row['swap_in_s'] / copy_in:>8.2f}  "
              f"{'equal' if ok else 'DIFFERENT'}")
        kv.free(a); kv.free(b)

    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, spec=repr(spec), sizing=sizing, swap=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f'\nwrote {args.out}')
    if not all(r['round_trip_equal'] for r in rows): raise SystemExit('a swapped request came back different')


if __name__ == '__main__':
    main()
