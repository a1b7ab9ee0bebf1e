"""Where a whole offline run's time goes, step by step: prefill, mixed and decode steps of the engine.

    python benchmarks/profile_steps.py                         # Qwen2-0.5B shape, bf16, 256 x 128-token prompts, 128 out
    python benchmarks/profile_steps.py --batch 32 --kernels    # and the GPU kernels of the first (prefill) step

Runs the workload of `throughput.py` (fresh random prompts, greedy, ignore_eos) once to warm up, once timed as
`generate` runs it, then once more with the steps run in order and the GPU synchronised after each, so that every step's
wall time can be told apart: each step is classed by its prompt tokens and its decoding rows, and the times are summed
per class. `--timeline` (CUDA): one more run as `generate` runs it (async scheduling on), with a CUDA event recorded
before and after each step's launch: per kind of step, the GPU's time on it, the time the GPU sat idle before it
(waiting for the host to launch it) and the host's time launching it. `--kernels`: the GPU kernels of one prefill
step of `--budget` tokens (eager), summed by name.
"""
import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from infer.engine import BENCH_MODELS, LLM, random_prompts, save_random_model, time_llm
from infer.requests import SamplingParams


def timeline(llm, prompts, wanted):
    "One async run with CUDA events around each step's launch: GPU time, GPU idle time before it, host launch time."
    engine, records = llm.engine, []
    launch = engine._launch
    def timed_launch(out, in_flight):
        decoding = int(((out.num_tokens == 1) & out.samples).sum()) if out.requests else 0
        kind = 'empty' if not out.requests else 'decode' if out.num_batched_tokens == decoding else \
            'prefill' if not decoding else 'mixed'
        start, host = torch.cuda.Event(enable_timing=True), time.perf_counter()
        start.record()
        launched = launch(out, in_flight)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        records.append((kind, start, end, time.perf_counter() - host))
        return launched
    engine._launch = timed_launch
    counters = ('num_alloc_retries', 'num_device_alloc', 'num_device_free', 'num_sync_all_streams')
    before = torch.cuda.memory_stats()
    r = time_llm(llm, prompts, wanted)
    after = torch.cuda.memory_stats()
    engine._launch = launch
    torch.cuda.synchronize()
    print('CUDA allocator during the run (a cudaFree synchronises the device): ' +
          ', '.join(f'{c} +{after.get(c, 0) - before.get(c, 0)}' for c in counters))
    per = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for i, (kind, start, end, host) in enumerate(records):
        row = per[kind]
        row[0] += 1
        row[1] += start.elapsed_time(end)
        row[2] += records[i - 1][2].elapsed_time(start) if i else 0.0
        row[3] += 1e3 * host
    print(f"\nasync run, as generate runs it: {r['seconds'] * 1e3:.1f} ms; per kind of step, summed (ms):")
    print(f"{'kind':8} {'steps':>6} {'GPU':>9} {'GPU idle before':>16} {'host launch':>12}")
    for kind, (n, gpu, idle, host) in per.items():
        print(f'{kind:8} {n:6} {gpu:9.1f} {idle:16.1f} {host:12.1f}')


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--preset', default='qwen2-0.5b', choices=sorted(BENCH_MODELS))
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--input-len', type=int, default=128)
    ap.add_argument('--output-len', type=int, default=128)
    ap.add_argument('--budget', type=int, default=None, help='max_num_batched_tokens (default: the engine\'s)')
    ap.add_argument('--kernels', action='store_true')
    ap.add_argument('--timeline', action='store_true')
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    folder = save_random_model(BENCH_MODELS[args.preset], Path(tempfile.mkdtemp()) / args.preset, dtype=dtype,
                               device='cuda' if cuda else 'cpu')
    llm = LLM(folder, dtype=dtype, device='cuda' if cuda else 'cpu', max_num_seqs=args.batch, max_num_batched_tokens=args.budget)
    engine, vocab = llm.engine, llm.engine.vocab_size
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    wanted = [args.output_len] * args.batch
    time_llm(llm, random_prompts(args.batch, args.input_len, vocab, seed=1), wanted)
    r = time_llm(llm, random_prompts(args.batch, args.input_len, vocab, seed=2), wanted)
    print(f"generate: {r['seconds'] * 1e3:.1f} ms, {r['tokens_per_s']:,.0f} output tokens/s "
          f"(budget {engine.scheduler.config.max_num_batched_tokens} tokens per step)")

    shapes, schedule = [], engine.scheduler.schedule
    def recording_schedule():
        out = schedule()
        decoding = int(((out.num_tokens == 1) & out.samples).sum())
        shapes.append((out.num_batched_tokens - decoding, decoding))
        return out
    engine.scheduler.schedule = recording_schedule
    was_async = engine.async_scheduling
    engine.async_scheduling = engine.scheduler.config.async_scheduling = False
    for i, p in enumerate(random_prompts(args.batch, args.input_len, vocab, seed=3)):
        engine.add_request(f's{i}', p, SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True))
    times = []
    sync()
    while engine.has_unfinished_requests():
        a = time.perf_counter(); engine.step(); sync(); times.append(time.perf_counter() - a)
    engine.scheduler.schedule = schedule
    engine.async_scheduling = engine.scheduler.config.async_scheduling = was_async
    per = defaultdict(list)
    for (prompt, decoding), t in zip(shapes, times):
        kind = 'decode' if not prompt else ('prefill' if not decoding else 'mixed')
        per[kind].append((prompt, decoding, t))
    print(f'\nsteps run in order, synchronised: {sum(times) * 1e3:.1f} ms in {len(times)} steps')
    print(f"{'kind':8} {'steps':>6} {'ms':>9} {'prompt tokens':>14} {'decode rows':>12} {'median ms':>10}")
    for kind, rows in per.items():
        print(f"{kind:8} {len(rows):6} {sum(t for *_, t in rows) * 1e3:9.1f} {sum(p for p, _, _ in rows):14,} "
              f"{sum(d for _, d, _ in rows):12,} {statistics.median(t for *_, t in rows) * 1e3:10.2f}")
    for prompt, decoding, t in [(p, d, t) for kind in ('prefill', 'mixed') for p, d, t in per.get(kind, [])][:12]:
        print(f'  step: {prompt:6} prompt tokens, {decoding:4} decoding rows: {t * 1e3:7.2f} ms')

    if args.timeline and cuda:
        timeline(llm, random_prompts(args.batch, args.input_len, vocab, seed=5), wanted)

    if args.kernels and cuda:
        from torch.profiler import ProfilerActivity, profile
        for i, p in enumerate(random_prompts(args.batch, args.input_len, vocab, seed=4)):
            engine.add_request(f'k{i}', p, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.step(); sync()
        print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=20, max_name_column_width=60))
        while engine.has_unfinished_requests(): engine.step()


if __name__ == '__main__':
    main()
