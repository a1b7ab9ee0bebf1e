"""Where a whole offline run's time goes: its prefill, mixed and decode steps, on the GPU and on the host.

    python benchmarks/profile_steps.py                          # Qwen2-0.5B shape, bf16, 256 x 128-token prompts, 128 out
    python benchmarks/profile_steps.py --timeline --kernels     # and the async timeline, and one prefill step's kernels
    python benchmarks/profile_steps.py --runs 5 --skip-split    # five timed runs in this process, nothing else
    python benchmarks/profile_steps.py --host --cprofile        # the host's time per piece of the prefill steps

The workload is `throughput.py`'s (fresh random prompts for every run, greedy, ignore_eos). After a warm-up run,
`--runs` runs are timed as `generate` runs them (how much a run moves within one process). Then, unless
`--skip-split`, one more run with its steps in order and the device synchronised after each, so that every step's
wall time can be told apart: steps are classed by their prompt tokens and decoding rows, and summed per class.
Options, each one more run:
  --timeline (CUDA)  an async run with a CUDA event before and after each step's launch: per kind of step, the GPU's
                     span of it, the time the GPU sat idle before it (waiting for the host) and the host's time
                     launching it; and the CUDA allocator's counters over the run (a cudaFree synchronises);
  --host             host timers around the engine's pieces (scheduling, inputs, copies, the layers, logits,
                     sampling), summed over the steps that compute prompt tokens, with no synchronisation added;
  --cprofile         cProfile of one whole `generate` call;
  --kernels (CUDA)   the GPU kernels of the first step of a fresh batch (a prefill step, eager), summed by name.
"""
import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import infer.engine as engine_module
from infer.engine import BENCH_MODELS, LLM, random_prompts, save_random_model, time_llm
from infer.requests import SamplingParams


def step_shape(out) -> tuple[str, int, int]:
    "A scheduled step's kind (prefill, mixed, decode or empty), its prompt tokens and its decoding rows."
    decoding = int(((out.num_tokens == 1) & out.samples).sum()) if out.requests else 0
    prompt = out.num_batched_tokens - decoding
    return ('empty' if not out.requests else 'decode' if not prompt else 'prefill' if not decoding else 'mixed'), prompt, decoding


def split_in_order(llm, prompts, output_len):
    "One run with the steps in order and the device synchronised after each; wall time per kind of step."
    engine, shapes, schedule = llm.engine, [], llm.engine.scheduler.schedule
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    def recording_schedule():
        out = schedule()
        shapes.append(step_shape(out))
        return out
    engine.scheduler.schedule = recording_schedule
    was_async = engine.async_scheduling
    engine.async_scheduling = engine.scheduler.config.async_scheduling = False
    for i, p in enumerate(prompts):
        engine.add_request(f's{i}', p, SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True))
    times = []
    sync()
    while engine.has_unfinished_requests():
        a = time.perf_counter(); engine.step(); sync(); times.append(time.perf_counter() - a)
    del engine.scheduler.schedule
    engine.async_scheduling = engine.scheduler.config.async_scheduling = was_async
    per = defaultdict(list)
    for (kind, prompt, decoding), t in zip(shapes, times): per[kind].append((prompt, decoding, t))
    print(f'\nsteps run in order, synchronised: {sum(times) * 1e3:.1f} ms in {len(times)} steps')
    print(f"{'kind':8} {'steps':>6} {'ms':>9} {'prompt tokens':>14} {'decode rows':>12} {'median ms':>10}")
    for kind, rows in per.items():
        print(f"{kind:8} {len(rows):6} {sum(t for *_, t in rows) * 1e3:9.1f} {sum(p for p, _, _ in rows):14,} "
              f"{sum(d for _, d, _ in rows):12,} {statistics.median(t for *_, t in rows) * 1e3:10.2f}")
    for prompt, decoding, t in [(p, d, t) for kind in ('prefill', 'mixed') for p, d, t in per.get(kind, [])][:12]:
        print(f'  step: {prompt:6} prompt tokens, {decoding:4} decoding rows: {t * 1e3:7.2f} ms')


def timeline(llm, prompts, wanted):
    "One async run with CUDA events around each step's launch: GPU span, GPU idle time before it, host launch time."
    engine, records = llm.engine, []
    launch = engine._launch
    def timed_launch(out, in_flight):
        start, host = torch.cuda.Event(enable_timing=True), time.perf_counter()
        start.record()
        launched = launch(out, in_flight)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        records.append((step_shape(out)[0], start, end, time.perf_counter() - host))
        return launched
    engine._launch = timed_launch
    counters = ('num_alloc_retries', 'num_device_alloc', 'num_device_free', 'num_sync_all_streams')
    before = torch.cuda.memory_stats()
    r = time_llm(llm, prompts, wanted)
    after = torch.cuda.memory_stats()
    del engine._launch
    torch.cuda.synchronize()
    print('\nCUDA allocator during the run (a cudaFree synchronises the device): ' +
          ', '.join(f'{c} +{after.get(c, 0) - before.get(c, 0)}' for c in counters))
    per = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for i, (kind, start, end, host) in enumerate(records):
        row = per[kind]
        row[0] += 1
        row[1] += start.elapsed_time(end)
        row[2] += records[i - 1][2].elapsed_time(start) if i else 0.0
        row[3] += 1e3 * host
    print(f"async run, as generate runs it: {r['seconds'] * 1e3:.1f} ms; per kind of step, summed (ms):")
    print(f"{'kind':8} {'steps':>6} {'GPU':>9} {'GPU idle before':>16} {'host launch':>12}")
    for kind, (n, gpu, idle, host) in per.items():
        print(f'{kind:8} {n:6} {gpu:9.1f} {idle:16.1f} {host:12.1f}')


def host_pieces(llm, prompts, wanted):
    "One run with host timers around the engine's pieces, summed over the steps that compute prompt tokens."
    engine, runner = llm.engine, llm.engine.runner
    spent, prefill, wrapped = defaultdict(float), [False], []

    def timed(owner, name, label):
        fn = getattr(owner, name)
        def wrapper(*a, **k):
            start = time.perf_counter()
            try: return fn(*a, **k)
            finally:
                if prefill[0]: spent[label] += time.perf_counter() - start
        setattr(owner, name, wrapper)
        wrapped.append((owner, name, fn))

    schedule = engine.scheduler.schedule
    def marking_schedule():
        out = schedule()
        prefill[0] = step_shape(out)[0] in ('prefill', 'mixed')
        return out
    engine.scheduler.schedule = marking_schedule
    wrapped.append((engine.scheduler, 'schedule', schedule))
    timed(engine_module, 'prepare_step', 'prepare_step')
    timed(runner, '_to_device', 'runner._to_device')
    timed(runner, 'execute', 'runner.execute (all)')
    timed(engine.model, 'forward', 'model.forward')
    timed(engine.model, 'compute_logits', 'model.compute_logits')
    for layer in engine.model.model.layers: timed(layer, 'forward', f'model: {len(engine.model.model.layers)} layers')
    timed(engine, '_sample', 'engine._sample')
    timed(engine, '_launch', 'engine._launch (all)')
    r = time_llm(llm, prompts, wanted)
    for owner, name, fn in reversed(wrapped):
        if owner is engine_module: setattr(owner, name, fn)
        else: owner.__dict__.pop(name, None)
    print(f"\nrun with host timers: {r['seconds'] * 1e3:.1f} ms; host ms summed over the steps with prompt tokens:")
    for label, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f'  {label:40} {seconds * 1e3:8.1f}')


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--preset', default='qwen2-0.5b', choices=sorted(BENCH_MODELS))
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--input-len', type=int, default=128)
    ap.add_argument('--output-len', type=int, default=128)
    ap.add_argument('--budget', type=int, default=None, help="max_num_batched_tokens (default: the engine's)")
    ap.add_argument('--runs', type=int, default=1, help='runs timed as generate runs them, after the warm-up')
    ap.add_argument('--skip-split', action='store_true', help='no in-order run split by kind of step')
    for flag in ('timeline', 'host', 'cprofile', 'kernels'): ap.add_argument(f'--{flag}', action='store_true')
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    folder = save_random_model(BENCH_MODELS[args.preset], Path(tempfile.mkdtemp()) / args.preset, dtype=dtype,
                               device='cuda' if cuda else 'cpu')
    llm = LLM(folder, dtype=dtype, device='cuda' if cuda else 'cpu', max_num_seqs=args.batch, max_num_batched_tokens=args.budget)
    vocab, wanted, seeds = llm.engine.vocab_size, [args.output_len] * args.batch, iter(range(1, 1000))
    prompts = lambda: random_prompts(args.batch, args.input_len, vocab, seed=next(seeds))   # fresh for every run
    time_llm(llm, prompts(), wanted)
    print(f'budget {llm.engine.scheduler.config.max_num_batched_tokens} tokens per step')
    for i in range(args.runs):
        r = time_llm(llm, prompts(), wanted)
        print(f"generate, run {i + 1}: {r['seconds'] * 1e3:.1f} ms, {r['tokens_per_s']:,.0f} output tokens/s", flush=True)
    if not args.skip_split: split_in_order(llm, prompts(), args.output_len)
    if args.timeline and cuda: timeline(llm, prompts(), wanted)
    if args.host: host_pieces(llm, prompts(), wanted)
    if args.cprofile:
        profile = cProfile.Profile(); profile.enable()
        r = time_llm(llm, prompts(), wanted)
        profile.disable()
        print(f"\ncProfile of one generate call ({r['seconds'] * 1e3:.1f} ms under the profiler):")
        pstats.Stats(profile).sort_stats('tottime').print_stats(20)
    if args.kernels and cuda:
        from torch.profiler import ProfilerActivity, profile
        engine = llm.engine
        for i, p in enumerate(prompts()):
            engine.add_request(f'k{i}', p, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.step(); torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=20, max_name_column_width=60))
        while engine.has_unfinished_requests(): engine.step()


if __name__ == '__main__':
    main()
