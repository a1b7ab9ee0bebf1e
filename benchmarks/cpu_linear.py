"""The CPU's ways to multiply a few rows by a weight matrix: `F.linear(x, W)` (x @ Wᵀ) against `(W @ xᵀ)ᵀ`, and
`infer.models.linear`, which uses the second for 1 to 64 rows (one row doubled), same inputs, same run.

    python benchmarks/cpu_linear.py                   # the llama-56m layer set (8 layers) and its output matrix
    python benchmarks/cpu_linear.py --rows 1,16 --repeats 9

Each repeat multiplies `x [rows, in]` by every weight of the set in turn (8 layers of q/k/v, o, gate/up and down,
then the 32,000-row output matrix: 160 MB of float32, more than the CPU caches hold, as in a decode step), once each
way, alternating; each way's median over repeats is printed and, in the JSON, `over_f_linear`: F.linear's median
over that way's. float32, torch's default threads.

    python benchmarks/cpu_linear.py --rows 1,2,16 --others   # also MKL's packed GEMM and oneDNN, and a plain read

`--others` adds two ways torch also has: MKL's packed GEMM (the weights packed once for that many rows, as inductor
does when it freezes a model) and oneDNN's linear (weights and rows as oneDNN tensors), and first times a plain read
(`sum`) of as many bytes as the set holds: the floor for any way that reads every weight once.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.utils.mkldnn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from infer.models import linear  # noqa: E402

SHAPES = [(1024, 512), (512, 512), (2816, 512), (512, 1408)]     # llama-56m: qkv, o, gate_up, down (out, in)


def nn_linear(w: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = w
    return layer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--rows', default='1,2,4,8,16,64,256,1024')
    ap.add_argument('--layers', type=int, default=8)
    ap.add_argument('--vocab', type=int, default=32000)
    ap.add_argument('--repeats', type=int, default=7)
    ap.add_argument('--out', default='benchmarks/results/cpu_linear.json')
    ap.add_argument('--others', action='store_true', help="also MKL's packed GEMM, oneDNN, and a plain read")
    args = ap.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(o, i) for _ in range(args.layers) for o, i in SHAPES] + [torch.randn(args.vocab, 512)]
    result = dict(threads=torch.get_num_threads(), torch=torch.__version__, rows={})
    if args.others:
        flat = torch.randn(sum(w.numel() for w in weights))
        reads = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            flat.sum()
            reads.append(time.perf_counter() - start)
        result['plain_read_ms'] = 1e3 * statistics.median(reads)
        print(f"plain read of the set's {flat.numel() * 4 / 1e6:.0f} MB: {result['plain_read_ms']:.1f} ms "
              f"({flat.numel() * 4 / 1e6 / result['plain_read_ms']:.1f} GB/s)")
    for m in map(int, args.rows.split(',')):
        xs = {i: torch.randn(m, i) for i in {i for _, i in SHAPES}}
        ways = {'x @ W.T (F.linear)': lambda x, w: F.linear(x, w),
                '(W @ x.T).T': lambda x, w: torch.mm(w, x.t()).t().contiguous(),
                'infer.models.linear': linear}
        if args.others:
            packed = {id(w): torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in weights}
            dnn = {id(w): torch.utils.mkldnn.to_mkldnn(nn_linear(w)) for w in weights}
            dnn_rows = {i: x.to_mkldnn() for i, x in xs.items()}
            ways['MKL packed'] = lambda x, w, m=m: torch.ops.mkl._mkl_linear(x, packed[id(w)], w, None, m)
            ways['oneDNN'] = lambda x, w: dnn[id(w)](dnn_rows[x.shape[1]])
        times = {k: [] for k in ways}
        with torch.no_grad():
            for _ in range(args.repeats):
                for k, f in ways.items():
                    start = time.perf_counter()
                    for w in weights: f(xs[w.shape[1]], w)
                    times[k].append(time.perf_counter() - start)
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        result['rows'][m] = dict(ms=med, over_f_linear={k: med['x @ W.T (F.linear)'] / v for k, v in med.items()})
        print(f'{m:6d} rows, ms per set: ' + ', '.join(f'{k} {v:.1f}' for k, v in med.items()), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
