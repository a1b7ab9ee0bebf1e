"""Where a decode step's time goes: the engine's host work (cProfile) and its GPU kernels (torch.profiler).

    python benchmarks/profile_decode.py                 # Qwen2-0.5B shape, bf16, on the GPU: both profiles
    python benchmarks/profile_decode.py --batches 1     # the host profile at batch 1 only

Host profile: for each batch size, that many 128-token prompts decode; after 10 steps, 20 steps are timed (wall,
mean) and 20 more run under cProfile. The `tolist` entry is the wait for the sampled tokens, i.e. the GPU's part of
the step. GPU profile (`--kernels`): 5 decode steps of 256 requests with CUDA graphs off (the same kernels as the
replayed graph), kernel times summed by name.
"""
import argparse
import cProfile
import gc
import pstats
import tempfile
import time
from pathlib import Path

import torch

from infer.engine import BENCH_MODELS, LLM, random_prompts, save_random_model
from infer.requests import SamplingParams


def decode(llm, batch, steps_before=10):
    engine = llm.engine
    for i, p in enumerate(random_prompts(batch, 128, engine.vocab_size, seed=batch)):
        engine.add_request(f'p{batch}-{i}', p, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    for _ in range(steps_before): engine.step()
    return engine


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--batches', default='1,256')
    ap.add_argument('--kernels', action='store_true', help='also the GPU kernel profile at 256 requests (eager)')
    args = ap.parse_args()
    folder = save_random_model(BENCH_MODELS['qwen2-0.5b'], Path(tempfile.mkdtemp()) / 'q', dtype=torch.bfloat16, device='cuda')
    llm = LLM(folder, dtype=torch.bfloat16, device='cuda', max_num_seqs=256)
    for b in map(int, args.batches.split(',')):
        engine = decode(llm, b)
        torch.cuda.synchronize(); start = time.perf_counter()
        for _ in range(20): engine.step()
        torch.cuda.synchronize(); print(f'batch {b}: {(time.perf_counter() - start) / 20 * 1e3:.2f} ms per decode step')
        profile = cProfile.Profile(); profile.enable()
        for _ in range(20): engine.step()
        profile.disable(); pstats.Stats(profile).sort_stats('tottime').print_stats(14)
        while engine.has_unfinished_requests(): engine.step()
    if args.kernels:
        from torch.profiler import ProfilerActivity, profile
        del llm, engine                          # one engine holds most of the GPU for its cache: free it first
        gc.collect(); torch.cuda.empty_cache()
        engine = decode(LLM(folder, dtype=torch.bfloat16, device='cuda', max_num_seqs=256, enforce_eager=True), 256, 12)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5): engine.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=22, max_name_column_width=60))


if __name__ == '__main__':
    main()
