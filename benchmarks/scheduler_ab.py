"""The scheduler of an older commit against this checkout's, in one process, taking turns: a paired A/B that the
machine's slow spells cannot bias.

    python benchmarks/scheduler_ab.py f80c86d                 # schedule, update and deferred registration, old vs new
    python benchmarks/scheduler_ab.py f80c86d --segments 64

The old commit's `infer/` is extracted with `git archive` into a temporary folder as a package named `infer_old`
(its imports are relative), so both versions load side by side. The workload is `scheduler.py`'s: 256 requests
decoding, 1,024 waiting, prompts of 64..512 tokens, prefix caching on. The two schedulers take turns, 32 decode
steps at a time (the garbage collector run and frozen, untimed, before each turn); medians of this thread's CPU
time per step. At the end each does what `free` does with the blocks its running requests filled while decoding (the
deferred work of `KVCacheManager.grow`: registering them, or, from session 10 on, filing them as a pending tail),
timed per block and counted per step at one block per 16 requests.
"""
import argparse
import gc
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32000


def build(package: str, running: int, waiting: int, steps: int, bs: int = 16):
    paging, requests, scheduler = (importlib.import_module(f'{package}.{m}') for m in ('paging', 'requests', 'scheduler'))
    max_model_len = 512 + steps + 64 + bs
    kv = paging.KVCacheManager(running * paging.cdiv(max_model_len, bs) + 1024, bs, enable_prefix_caching=True,
                               max_model_len=max_model_len)
    s = scheduler.Scheduler(scheduler.SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=running,
                                                      max_model_len=max_model_len), kv)
    rng = np.random.default_rng(0)
    for i, n in enumerate(rng.integers(64, 513, size=running + waiting)):
        s.add_request(requests.Request(f'r{i}', [VOCAB + i] + rng.integers(0, VOCAB, size=int(n) - 1).tolist(),
                                       requests.SamplingParams(max_tokens=steps + 64, ignore_eos=True)))
    while True:                                   # prefill, untimed, until every step decodes all running requests
        out = s.schedule()
        s.update(out, rng.integers(0, VOCAB, size=int(out.samples.sum())).tolist())
        if len(out.requests) == running and out.num_batched_tokens == running: return s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('old', help='the commit to compare against')
    ap.add_argument('--segments', type=int, default=32, help='turns each scheduler takes, of --segment steps')
    ap.add_argument('--segment', type=int, default=32)
    ap.add_argument('--running', type=int, default=256)
    ap.add_argument('--waiting', type=int, default=1024)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp())
    archive = subprocess.run(['git', '-C', str(ROOT), 'archive', args.old, 'infer'], check=True, capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', str(folder)], input=archive, check=True)
    (folder / 'infer').rename(folder / 'infer_old')
    sys.path[:0] = [str(ROOT), str(folder)]
    steps = args.segments * args.segment
    sides = {'old': build('infer_old', args.running, args.waiting, steps), 'new': build('infer', args.running, args.waiting, steps)}
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(steps, args.running))   # an int64 array, as the engine hands over
    clock, times, done = time.thread_time, {k: ([], []) for k in sides}, 0
    for turn in range(args.segments):
        for name in ('old', 'new') if turn % 2 else ('new', 'old'):
            s = sides[name]
            gc.collect(); gc.freeze()
            for k in range(done, done + args.segment):
                a = clock(); out = s.schedule(); b = clock(); s.update(out, tokens[k]); c = clock()
                times[name][0].append(b - a); times[name][1].append(c - b)
        done += args.segment
    print(f'{args.running} running, {args.waiting} waiting; medians over {steps} decode steps each, CPU time, µs per step')
    print(f"{'':5} {'schedule':>9} {'update':>9} {'deferred':>9} {'all':>9}")
    for name, s in sides.items():
        kv, spent, blocks = s.kv, 0.0, 0
        register = getattr(kv, '_defer_full_blocks', None) or kv._cache_full_blocks    # what `free` does in that version
        gc.collect(); gc.freeze()
        for r in list(s.running):
            held, n = kv.held[r.request_id], min(r.num_computed_tokens, r.num_tokens)
            blocks += n // 16 - held.num_cached
            a = clock(); register(r, held, n); spent += clock() - a
        deferred = 1e6 * spent / blocks * args.running / 16
        sched, upd = (1e6 * statistics.median(t) for t in times[name])
        print(f'{name:5} {sched:9.1f} {upd:9.1f} {deferred:9.1f} {sched + upd + deferred:9.1f}')


if __name__ == '__main__':
    main()
