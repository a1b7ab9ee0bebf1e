"""The host's time in the pieces of the engine's prefill steps, with no synchronisation added: where a step that
launches about 300 eager kernels spends its 20 ms on the host.

    python benchmarks/profile_prefill_host.py          # Qwen2-0.5B shape, bf16, 256 x 128-token prompts, 8 out

Wraps the engine's pieces (scheduling, input preparation, the copies to the device, the model's forward, its
layers, the logits, sampling) with host timers and runs the workload twice (warm-up, then timed). Prints, per
piece, the host milliseconds summed over the steps that computed prompt tokens, and the cProfile of one such step.
"""
import cProfile
import pstats
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import infer.engine as E
from infer.engine import BENCH_MODELS, LLM, random_prompts, save_random_model, time_llm


def main():
    folder = save_random_model(BENCH_MODELS['qwen2-0.5b'], Path(tempfile.mkdtemp()) / 'q', dtype=torch.bfloat16, device='cuda')
    llm = LLM(folder, dtype=torch.bfloat16, device='cuda', max_num_seqs=256)
    engine, runner = llm.engine, llm.engine.runner
    spent, current = defaultdict(float), {'prefill': False}

    def timed(owner, name, label):
        fn = getattr(owner, name)
        def wrapper(*a, **k):
            start = time.perf_counter()
            try: return fn(*a, **k)
            finally:
                if current['prefill']: spent[label] += time.perf_counter() - start
        setattr(owner, name, wrapper)

    schedule = engine.scheduler.schedule
    def marking_schedule():
        out = schedule()
        current['prefill'] = bool(out.requests) and out.num_batched_tokens > len(out.requests)
        return out
    engine.scheduler.schedule = marking_schedule
    timed(E, 'prepare_step', 'prepare_step')
    timed(runner, '_to_device', 'runner._to_device')
    timed(runner, 'execute', 'runner.execute (all)')
    timed(engine.model, 'forward', 'model.forward')
    timed(engine.model, 'compute_logits', 'model.compute_logits')
    for i, layer in enumerate(engine.model.model.layers):
        timed(layer, 'forward', 'model: 24 layers')
    timed(engine, '_sample', 'engine._sample')
    timed(engine, '_launch', 'engine._launch (all)')
    timed(engine, '_complete', 'engine._complete (waits for the GPU)')
    wanted = [8] * 256
    time_llm(llm, random_prompts(256, 128, engine.vocab_size, seed=1), wanted)
    spent.clear()
    r = time_llm(llm, random_prompts(256, 128, engine.vocab_size, seed=2), wanted)
    print(f"run: {r['seconds'] * 1e3:.1f} ms; host ms summed over the steps with prompt tokens:")
    for label, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f'  {label:40} {seconds * 1e3:8.1f}')
    profile, prompts = cProfile.Profile(), random_prompts(256, 128, engine.vocab_size, seed=3)
    for i, p in enumerate(prompts): engine.add_request(f'c{i}', p, E.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    profile.enable(); engine.step(); profile.disable()
    while engine.has_unfinished_requests(): engine.step()
    pstats.Stats(profile).sort_stats('tottime').print_stats(18)


if __name__ == '__main__':
    main()
