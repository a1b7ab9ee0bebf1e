"""Peak GPU memory of one training step: CachedMultipleNegativesRankingLoss at a large batch against plain
MultipleNegativesRankingLoss at a small one, on the same model, and the two losses' gradients on the same batch.

    python benchmarks/cached_mnrl_memory.py --tokenizer .bench/tokenizer          # on a CUDA machine

The model is all-MiniLM-L6-v2's shape (random weights; memory does not depend on them), float32, texts of 128
tokens (real texts joined until they fill 128). A step is the loss of a batch of (anchor, positive) pairs and its
backward. The figure is `torch.cuda.max_memory_allocated` during the step, over what was allocated before it (the
model, its gradients from a warm-up step, the inputs): the memory the step itself needs, in training mode (dropout
on). Gradients: cached and plain on the same 64 pairs with dropout off, relative error of each parameter's gradient (of at least 1e-3 of the
largest, so that gradients that are zero in exact arithmetic do not divide rounding noise by rounding noise). Writes JSON to `--out`.
"""
import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchor import infer_version  # noqa: E402
from encode import random_model_folder  # noqa: E402

from infer.encoder import SentenceEncoder, batch_features, minilm_path  # noqa: E402
from infer.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss  # noqa: E402
from infer.texts import sample_texts  # noqa: E402


def texts_of(model, n: int, tokens: int, seed: int) -> list[str]:
    "n real texts, each joined from several until it is at least `tokens` long (the model then cuts it to `tokens`)."
    pool, out, i = sample_texts(seed=seed), [], 0
    while len(out) < n:
        text = pool[i % len(pool)]
        while len(model.tokenize([text]).ids[0]) < tokens:
            i += 1
            text += ' ' + pool[i % len(pool)]
        out.append(text)
        i += 1
    return out


def step_memory(model, loss, pairs) -> int:
    "Bytes the step (loss and backward) allocates at its peak, over what was allocated before it."
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss(pairs).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--tokenizer', help='tokenizer folder (default: the packaged MiniLM)')
    ap.add_argument('--tokens', type=int, default=128)
    ap.add_argument('--plain-batch', type=int, default=64)
    ap.add_argument('--cached-batch', type=int, default=1024)
    ap.add_argument('--mini-batch', type=int, default=32)
    ap.add_argument('--out', default=str(Path(__file__).resolve().parent / 'results' / 'cached_mnrl_memory.json'))
    args = ap.parse_args()
    warnings.simplefilter('ignore')
    folder = random_model_folder('dense', 'minilm', Path(args.tokenizer) if args.tokenizer else minilm_path(),
                                 Path(tempfile.mkdtemp()) / 'minilm')
    model = SentenceEncoder(folder, device='cuda')
    model.max_seq_length = args.tokens
    model.train()
    texts = texts_of(model, 2 * args.cached_batch, args.tokens, seed=0)
    pairs = lambda n: [batch_features(model, texts[i:2 * n:2]) for i in (0, 1)]
    plain, cached = MultipleNegativesRankingLoss(model), CachedMultipleNegativesRankingLoss(model, mini_batch_size=args.mini_batch)

    plain(pairs(8)).backward()  # warm-up: kernels, and the gradients' own memory allocated once
    memory = {}
    for name, loss, batch in (('plain', plain, args.plain_batch), ('cached', cached, args.cached_batch),
                              ('cached_at_plain_batch', cached, args.plain_batch)):
        model.zero_grad(set_to_none=False)
        memory[name] = step_memory(model, loss, pairs(batch))
        print(f'{name:<22} batch {batch:>5}: the step peaks at {memory[name] / 2**20:8.1f} MiB', flush=True)

    grads = {}
    model.eval()  # dropout off: plain and cached draw their dropout masks in different orders
    for name, loss in (('plain', plain), ('cached', cached)):
        model.zero_grad()
        loss(pairs(args.plain_batch)).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # a gradient that is zero in exact arithmetic (attention's key bias: softmax ignores a constant per query) is
    # rounding noise in both; those are compared to the largest gradient instead of to themselves
    largest = max(g.norm() for g in grads['plain'].values())
    errors = {n: ((grads['cached'][n] - g).norm() / max(g.norm(), 1e-3 * largest)).item() for n, g in grads['plain'].items()}
    worst = max(errors.values())
    print(f'gradients of cached and plain on the same {args.plain_batch} pairs: worst relative difference {worst:.2e} '
          f'({max(errors, key=errors.get)}); the three worst: ' +
          ', '.join(f'{n} {e:.1e} (norm {grads["plain"][n].norm():.1e})' for n, e in sorted(errors.items(), key=lambda x: -x[1])[:3]))
    ok = memory['cached'] <= memory['plain'] and worst < 1e-4
    print('cached at batch', args.cached_batch, '<= plain at batch', args.plain_batch, ':', memory['cached'] <= memory['plain'])
    result = dict(device=torch.cuda.get_device_name(), model='all-MiniLM-L6-v2 shape, float32', tokens=args.tokens,
                  plain_batch=args.plain_batch, cached_batch=args.cached_batch, mini_batch=args.mini_batch,
                  step_peak_mib={k: v / 2**20 for k, v in memory.items()}, worst_gradient_rel_diff=worst, holds=ok,
                  infer=infer_version(), torch=torch.__version__)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()
