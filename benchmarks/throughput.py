"""Offline generation throughput: transformers' `generate` against infer's `LLM.generate`, same weights, same prompts, same run.

    python benchmarks/throughput.py --preset qwen2-0.5b                  # the H200 figures of the engine issue
    python benchmarks/throughput.py --preset llama-56m --device cpu      # the CPU figures
    python benchmarks/throughput.py --preset llama-56m --device cpu --batches 1 --repeats 1   # a quick look

The model is a `transformers` model built from the preset's config with random weights (seeded) and saved to a
temporary folder in safetensors; both sides load that folder, so they run the same weights. Every prompt is random
token ids and generates exactly its `max_tokens` (greedy, ignore_eos / min_new_tokens), so both sides produce the
same number of tokens.

Workloads, each timed `--repeats` times (median; infer's first run of a shape is a warm-up, as is transformers').
Every run draws fresh random prompts (the same for both sides), so infer's prefix cache never finds a run's prompts
from an earlier run: both sides compute every prefill.
  * fixed: for each batch size B in `--batches`, B prompts of `--input-len` tokens generating `--output-len` tokens,
    submitted together (transformers gets them as one batch of B);
  * varied (`--varied`): `--varied-prompts` prompts of lengths uniform in `--varied-input`, each generating a number
    of tokens uniform in `--varied-output`; transformers gets static batches of `--varied-batch` (left-padded, run
    until the batch's longest output) and is credited only with the tokens asked for;
  * nano-vllm's workload (`--nano`): 256 requests, input and output lengths uniform in 100..1024, infer alone
    (transformers' static batching would pad every batch to 2,048 tokens; nano-vllm reports its own figure only).
Decode-step time (`--decode-step`): median time of an engine step when all B requests are decoding, against the
roofline max(bytes of weights + KV read / copy bandwidth, FLOPs / peak), with the H200's measured 4.1 TB/s and
720 TFLOP/s (GPU only).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from infer.engine import LLM, BENCH_MODELS, output_lengths, random_prompts, save_random_model, time_hf_generate, time_llm  # noqa: E402
from infer.requests import SamplingParams  # noqa: E402

H200_COPY_BYTES_PER_S, H200_BF16_FLOPS = 4.1e12, 720e12


def decode_step_ms(llm, prompts, output_len):
    """Median time between the ends of consecutive engine steps while every request decodes (after the prefill steps,
    before the last two). No sync per step: with async scheduling a step's end is the next one's launch, so the
    interval between step ends is the steady-state step time, which is what throughput sees."""
    engine, marks = llm.engine, []
    for i, p in enumerate(prompts):
        engine.add_request(f'decode-{i}', p, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
    prefill_steps = -(-sum(map(len, prompts)) // engine.config.max_num_batched_tokens) + 2
    device = engine.runner.device
    if device.type == 'cuda': torch.cuda.synchronize(device)
    marks.append(time.perf_counter())
    while engine.has_unfinished_requests():
        engine.step()
        marks.append(time.perf_counter())
    times = np.diff(marks)[prefill_steps:-2]
    return 1e3 * statistics.median(times), len(times)


def roofline_ms(llm, batch, context):
    "max(bytes / copy bandwidth, FLOPs / peak) of a decode step of `batch` requests with `context` tokens each."
    model = llm.engine.model
    params = sum(p.numel() for p in model.parameters())
    embed = model.config.vocab_size * model.config.hidden_size
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - (0 if model.config.tie_word_embeddings else embed * 2)
    kv_bytes = llm.engine.kv_cache.spec.bytes_per_token * batch * context
    flops = 2 * (params - (0 if model.config.tie_word_embeddings else embed)) * batch
    return 1e3 * max((weight_bytes + kv_bytes) / H200_COPY_BYTES_PER_S, flops / H200_BF16_FLOPS)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--preset', default='qwen2-0.5b', choices=sorted(BENCH_MODELS))
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--dtype', default=None, help='default: bfloat16 on CUDA, float32 on CPU')
    ap.add_argument('--batches', default=None, help='comma-separated batch sizes (default: 1,32,256 on CUDA, 1,16 on CPU)')
    ap.add_argument('--input-len', type=int, default=128)
    ap.add_argument('--output-len', type=int, default=None, help='default: 128 on CUDA, 64 on CPU')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--varied', action='store_true', help='also the varied-length workload')
    ap.add_argument('--varied-prompts', type=int, default=32)
    ap.add_argument('--varied-input', default='32,256')
    ap.add_argument('--varied-output', default='16,128')
    ap.add_argument('--varied-batch', type=int, default=16)
    ap.add_argument('--nano', action='store_true', help="also nano-vllm's workload (infer alone)")
    ap.add_argument('--decode-step', action='store_true', help='also the decode step time against the roofline')
    ap.add_argument('--no-hf', action='store_true', help='infer alone')
    ap.add_argument('--enforce-eager', action='store_true', help='no CUDA graphs')
    ap.add_argument('--out', default='benchmarks/results/throughput.json')
    ap.add_argument('--in-order-too', action='store_true',
                    help="also time infer's fixed-batch workloads with async scheduling off (steps in order)")
    args = ap.parse_args()
    cuda = args.device.startswith('cuda')
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    batches = [int(b) for b in (args.batches or ('1,32,256' if cuda else '1,16')).split(',')]
    output_len = args.output_len or (128 if cuda else 64)
    torch.set_grad_enabled(False)

    folder = save_random_model(BENCH_MODELS[args.preset], Path(tempfile.mkdtemp()) / args.preset, dtype=dtype, device=args.device)
    config = json.loads((folder / 'config.json').read_text())
    vocab = config['vocab_size']
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    llm = LLM(folder, dtype=dtype, device=args.device, max_num_seqs=max(batches + [256 if args.nano else 1]),
              enforce_eager=args.enforce_eager)
    print(f'{args.preset}: {sum(p.numel() for p in llm.engine.model.parameters()) / 1e6:,.1f}M parameters, {dtype}, '
          f'{args.device} ({torch.cuda.get_device_name() if cuda else os.cpu_count()} {"" if cuda else "CPU cores"}); '
          f'KV cache {llm.engine.kv.num_blocks:,} blocks of {llm.engine.kv.block_size}', flush=True)

    rows, result = [], dict(preset=args.preset, config=BENCH_MODELS[args.preset], dtype=str(dtype), device=args.device,
                            torch=torch.__version__, repeats=args.repeats, workloads={})

    def in_order(on: bool):
        "Switch the engine between async scheduling (its CUDA default) and steps run in order (nothing is in flight here)."
        llm.engine.async_scheduling = llm.engine.scheduler.config.async_scheduling = not on

    def measure(name, prompts_of_run, max_tokens, hf_batch):
        "Each run (the first a warm-up) gets fresh prompts, `prompts_of_run(i)`, the same for both sides: no prefix-cache hits."
        infer_runs = [time_llm(llm, prompts_of_run(i), max_tokens) for i in range(args.repeats + 1)][1:]
        r = dict(prompts=len(max_tokens), output_tokens=sum(max_tokens),
                 infer_tokens_per_s=statistics.median(x['tokens_per_s'] for x in infer_runs),
                 infer_runs=[x['tokens_per_s'] for x in infer_runs])
        if args.in_order_too and llm.engine.async_scheduling:
            in_order(True)
            runs = [time_llm(llm, prompts_of_run(args.repeats + 1 + i), max_tokens) for i in range(args.repeats)]
            in_order(False)
            r['infer_in_order_tokens_per_s'] = statistics.median(x['tokens_per_s'] for x in runs)
        if hf is not None:
            hf_runs = [time_hf_generate(hf, prompts_of_run(i), max_tokens, hf_batch) for i in range(args.repeats + 1)][1:]
            r['hf_tokens_per_s'] = statistics.median(x['tokens_per_s'] for x in hf_runs)
            r['hf_runs'] = [x['tokens_per_s'] for x in hf_runs]
            r['speedup'] = r['infer_tokens_per_s'] / r['hf_tokens_per_s']
        result['workloads'][name] = r
        print(f"{name:34} {r['infer_tokens_per_s']:12,.0f} {r.get('hf_tokens_per_s', float('nan')):12,.0f} "
              f"{r.get('speedup', float('nan')):8.2f}x" + (f"   (in order: {r['infer_in_order_tokens_per_s']:,.0f})"
                                                          if 'infer_in_order_tokens_per_s' in r else ''), flush=True)

    print(f"\n{'workload (output tokens/s)':34} {'infer':>12} {'transformers':>12} {'ratio':>9}")
    for b in batches:
        measure(f'batch {b}: {args.input_len} in, {output_len} out',
                lambda i: random_prompts(b, args.input_len, vocab, seed=1000 * i + b), [output_len] * b, b)
    if args.varied:
        lo_hi_in = tuple(map(int, args.varied_input.split(',')))
        lo_hi_out = tuple(map(int, args.varied_output.split(',')))
        measure(f'varied: {args.varied_prompts} prompts {lo_hi_in} in, {lo_hi_out} out, HF batch {args.varied_batch}',
                lambda i: random_prompts(args.varied_prompts, lo_hi_in, vocab, seed=1000 * i + 7),
                output_lengths(args.varied_prompts, lo_hi_out, seed=8), args.varied_batch)
    if args.nano:
        outs = output_lengths(256, (100, 1024), seed=12)
        runs = [time_llm(llm, random_prompts(256, (100, 1024), vocab, seed=1000 * i + 11), outs) for i in range(args.repeats + 1)][1:]
        r = result['workloads']['nano-vllm'] = dict(infer_tokens_per_s=statistics.median(x['tokens_per_s'] for x in runs),
                                                   seconds=statistics.median(x['seconds'] for x in runs), output_tokens=sum(outs))
        print(f"{'nano-vllm: 256 x 100..1024 in/out':34} {r['infer_tokens_per_s']:12,.0f} {'-':>12}", flush=True)
    if args.decode_step:
        print(f"\n{'decode step':34} {'infer ms':>12} {'roofline ms':>12} {'% of roof':>9}")
        for b in batches:
            prompts = random_prompts(b, args.input_len, vocab, seed=100 + b)
            ms, n = decode_step_ms(llm, prompts, output_len)
            roof = roofline_ms(llm, b, args.input_len + output_len // 2) if cuda else float('nan')
            result['workloads'][f'decode_step_batch_{b}'] = dict(step_ms=ms, steps=n, roofline_ms=roof)
            print(f"{f'batch {b}, context ~{args.input_len + output_len // 2}':34} {ms:12.3f} {roof:12.3f} {100 * roof / ms:8.0f}%",
                  flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
