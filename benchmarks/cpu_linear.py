"""The CPU's ways to multiply a few rows by a weight matrix: `F.linear(x, W)` (x @ Wᵀ) against `(W @ xᵀ)ᵀ`, and
`infer.models.linear`, which uses the second for 1 to 64 rows (one row doubled), same inputs, same run.

    python benchmarks/cpu_linear.py                   # the llama-56m layer set (8 layers) and its output matrix
    python benchmarks/cpu_linear.py --rows 1,16 --repeats 9

Each repeat multiplies `x [rows, in]` by every weight of the set in turn (8 layers of q/k/v, o, gate/up and down,
then the 32,000-row output matrix: 160 MB of float32, more than the CPU caches hold, as in a decode step), once each
way, alternating; the medians over repeats are compared (`ratio`: F.linear over the second way; `linear`: F.linear
over infer's). float32, torch's default threads.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from infer.models import linear  # noqa: E402

SHAPES = [(1024, 512), (512, 512), (2816, 512), (512, 1408)]     # llama-56m: qkv, o, gate_up, down (out, in)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--rows', default='1,2,4,8,16,64,256,1024')
    ap.add_argument('--layers', type=int, default=8)
    ap.add_argument('--vocab', type=int, default=32000)
    ap.add_argument('--repeats', type=int, default=7)
    ap.add_argument('--out', default='benchmarks/results/cpu_linear.json')
    args = ap.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(o, i) for _ in range(args.layers) for o, i in SHAPES] + [torch.randn(args.vocab, 512)]
    ways = {'x @ W.T (F.linear)': lambda x, w: F.linear(x, w),
            '(W @ x.T).T': lambda x, w: torch.mm(w, x.t()).t().contiguous(),
            'infer.models.linear': linear}
    print(f"{'rows':>6} " + ' '.join(f'{k:>20}' for k in ways) + f" {'ratio':>7} {'linear':>7}   ({torch.get_num_threads()} threads, ms per set)")
    result = dict(threads=torch.get_num_threads(), torch=torch.__version__, rows={})
    for m in map(int, args.rows.split(',')):
        xs = {i: torch.randn(m, i) for i in {i for _, i in SHAPES}}
        times = {k: [] for k in ways}
        for _ in range(args.repeats):
            for k, f in ways.items():
                start = time.perf_counter()
                for w in weights: f(xs[w.shape[1]], w)
                times[k].append(time.perf_counter() - start)
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        a, b, c = med.values()
        result['rows'][m] = dict(ms=med, ratio=a / b, ratio_linear=a / c)
        print(f'{m:6d} ' + ' '.join(f'{v:20.1f}' for v in med.values()) + f' {a / b:7.2f} {a / c:7.2f}', flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
