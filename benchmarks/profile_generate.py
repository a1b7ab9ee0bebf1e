"""The host side of one whole `generate` call (cProfile), after warm-up runs: where a run's time goes besides the GPU.

    python benchmarks/profile_generate.py                  # Qwen2-0.5B shape, bf16, 256 x 128-token prompts, 128 out
"""
import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

import torch

from infer.engine import BENCH_MODELS, LLM, random_prompts, save_random_model, time_llm


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--preset', default='qwen2-0.5b', choices=sorted(BENCH_MODELS))
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--input-len', type=int, default=128)
    ap.add_argument('--output-len', type=int, default=128)
    ap.add_argument('--runs', type=int, default=4, help='timed runs before the profiled one')
    ap.add_argument('--no-grad', action='store_true', help='torch.set_grad_enabled(False) first, as throughput.py does')
    ap.add_argument('--no-profile', action='store_true')
    args = ap.parse_args()
    if args.no_grad: torch.set_grad_enabled(False)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    folder = save_random_model(BENCH_MODELS[args.preset], Path(tempfile.mkdtemp()) / args.preset, dtype=dtype,
                               device='cuda' if cuda else 'cpu')
    llm = LLM(folder, dtype=dtype, device='cuda' if cuda else 'cpu', max_num_seqs=args.batch)
    vocab, wanted = llm.engine.vocab_size, [args.output_len] * args.batch
    for i in range(args.runs):
        r = time_llm(llm, random_prompts(args.batch, args.input_len, vocab, seed=i), wanted)
        print(f"run {i}: {r['seconds'] * 1e3:.1f} ms, {r['tokens_per_s']:,.0f} output tokens/s", flush=True)
    if args.no_profile: return
    profile = cProfile.Profile(); profile.enable()
    r = time_llm(llm, random_prompts(args.batch, args.input_len, vocab, seed=args.runs), wanted)
    profile.disable()
    print(f"profiled run: {r['seconds'] * 1e3:.1f} ms")
    pstats.Stats(profile).sort_stats('tottime').print_stats(25)
    pstats.Stats(profile).sort_stats('cumulative').print_stats(30)


if __name__ == '__main__':
    main()
