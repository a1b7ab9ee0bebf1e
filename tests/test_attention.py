"""infer.attention: the reference against a per-token loop, the Triton kernels (in Triton's interpreter where there is
no GPU: conftest.py sets TRITON_INTERPRET=1) against the reference on fresh random inputs, and the input checks.
Tiny shapes: the interpreter is slow. The same kernels at full size on an H200: benchmarks/attention.py."""
import math
import os

import pytest
import torch

from infer.attention import (AttentionError, attention_backend, attention_config, num_kv_splits,
                             paged_attention_reference, store_kv_reference)
from infer.attention import paged_attention_triton as paged_attention
from infer.attention import store_kv_triton as store_kv

DEVICE = 'cuda' if torch.cuda.is_available() and os.environ.get('TRITON_INTERPRET', '0') == '0' else 'cpu'
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}


# ------------------------------------------------------------------------------------------------- inputs

def make_step(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed, layered=False,
              spare_blocks=3):
    """A random step: cache filled with noise everywhere (the null block too), blocks handed out in random order,
    block tables padded with 0 and one extra column."""
    g = torch.Generator().manual_seed(seed)
    S = len(q_lens)
    need = [-(-s // block_size) for s in seq_lens]
    width = max(need) + 1
    num_blocks = 1 + sum(need) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if layered:  # per-layer views of one [layers, 2, ...] tensor, as in infer.paging.KVCache
        full = torch.randn((3, 2) + shape, generator=g).to(dtype)
        kc, vc = full[1, 0], full[1, 1]
    else:
        kc, vc = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = torch.zeros(S, width, dtype=torch.int32)
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
    T = sum(q_lens)
    q = torch.randn(T, num_heads, head_dim, generator=g).to(dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    return (dev(q), dev(kc), dev(vc), dev(cu), dev(torch.tensor(seq_lens, dtype=torch.int32)), dev(tables))


def naive_attention(q, kc, vc, cu, seq_lens, tables, scale=None, sliding_window=None, softcap=None, alibi=None):
    "Dead simple: loop over sequences, query tokens and heads, in float64."
    T, H, D = q.shape
    bs, kvh = kc.shape[1], kc.shape[2]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(T, H, D, dtype=torch.float64)
    for i in range(len(seq_lens)):
        L, a, b = int(seq_lens[i]), int(cu[i]), int(cu[i + 1])
        keys = torch.stack([kc[tables[i, p // bs], p % bs] for p in range(L)]).double()    # [L, kvh, D]
        vals = torch.stack([vc[tables[i, p // bs], p % bs] for p in range(L)]).double()
        for t in range(a, b):
            pos = L - (b - a) + (t - a)
            for h in range(H):
                kh = h // (H // kvh)
                scores = []
                for j in range(pos + 1):
                    if sliding_window is not None and j <= pos - sliding_window:
                        scores.append(-math.inf)
                        continue
                    s = scale * float(q[t, h].double() @ keys[j, kh])
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    if alibi is not None:
                        s += float(alibi[h]) * (j - pos)
                    scores.append(s)
                p = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
                out[t, h] = p @ vals[:pos + 1, kh]
    return out


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ------------------------------------------------------------------------------------------------- reference

@pytest.mark.parametrize('opts', [
    dict(),
    dict(sliding_window=5),
    dict(softcap=3.0, scale=0.5),
    dict(alibi=True),
    dict(sliding_window=9, softcap=4.0, alibi=True),
], ids=['plain', 'window', 'softcap', 'alibi', 'all'])
def test_reference_matches_naive_loop(opts):
    q, kc, vc, cu, sl, bt = make_step([1, 6, 1, 3, 4], [13, 6, 1, 20, 9], 4, 2, 16, 4, torch.float32, seed=11)
    opts = dict(opts)
    if opts.pop('alibi', False):
        opts['alibi_slopes'] = torch.rand(4, generator=torch.Generator().manual_seed(1)).to(q.device)
    ref = paged_attention_reference(q, kc, vc, cu, sl, bt, **opts)
    naive_opts = {('alibi' if k == 'alibi_slopes' else k): v for k, v in opts.items()}
    naive = naive_attention(q.cpu(), kc.cpu(), vc.cpu(), cu.cpu(), sl.cpu(), bt.cpu(),
                            **{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in naive_opts.items()})
    assert rel_err(ref.cpu(), naive) < 1e-6
    # the chunking knob must not change the answer
    small = paged_attention_reference(q, kc, vc, cu, sl, bt, max_elems=64, **opts)
    assert rel_err(small, ref) < 1e-6


def test_store_kv_reference_roundtrip():
    _, kc, vc, _, _, _ = make_step([1], [8], 2, 2, 16, 4, torch.float32, seed=3)
    k, v = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    slots = torch.tensor([9, -1, 4, 20, 0])
    store_kv_reference(k, v, kc, vc, slots)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(kc[s // 4, s % 4], k[t]) and torch.equal(vc[s // 4, s % 4], v[t])


# ------------------------------------------------------------------------------------------------- store kernel

@pytest.mark.parametrize('dtype,block_size,kvh,d', [(torch.float16, 16, 2, 64), (torch.bfloat16, 32, 1, 128)])
def test_store_kv_kernel(dtype, block_size, kvh, d):
    g = torch.Generator().manual_seed(block_size)
    nb, T = 5, 12
    full = torch.full((2, 2, nb, block_size, kvh, d), float('nan'), dtype=dtype)   # poisoned, layered cache
    kc, vc = full[1, 0], full[1, 1]
    k, v = torch.randn(T, kvh, d, generator=g).to(dtype), torch.randn(T, kvh, d, generator=g).to(dtype)
    slots = torch.randperm(nb * block_size, generator=g)[:T]
    slots[[2, 7]] = -1
    k_, v_, kc_, vc_, s_ = (x.to(DEVICE) for x in (k, v, kc, vc, slots))
    full = full.to(DEVICE)
    kc_, vc_ = full[1, 0], full[1, 1]
    store_kv(k_, v_, kc_, vc_, s_)
    kc_, vc_, full = kc_.cpu(), vc_.cpu(), full.cpu()
    written = torch.zeros(nb * block_size, dtype=torch.bool)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(kc_[s // block_size, s % block_size], k[t])
            assert torch.equal(vc_[s // block_size, s % block_size], v[t])
            written[s] = True
    untouched = ~written.view(nb, block_size)
    assert kc_[untouched].isnan().all() and vc_[untouched].isnan().all()
    assert full[0].isnan().all()   # other layers untouched
    # a slot mapping shorter than the tokens (padding tokens at the end) only stores its prefix
    kc2 = torch.full_like(kc_, float('nan')).to(DEVICE)
    vc2 = torch.full_like(vc_, float('nan')).to(DEVICE)
    store_kv(k_, v_, kc2, vc2, s_[:3])
    assert (~kc2.isnan().any(-1).any(-1)).sum().item() == 2   # slots[0], slots[1]; slots[2] is -1


# ------------------------------------------------------------------------------------------------- attention kernel

CASES = {
    # name: (q_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, kwargs)
    # mixed step: decodes, a fresh prompt, a prompt after 4 cached prefix blocks, a 1-token context; GQA 4
    'mixed-fp16-g4-bs16-d64': ([1, 1, 37, 1, 5], [300, 17, 37, 1, 133], 4, 1, 64, 16, torch.float16, {}),
    # GQA 8, bf16, head_dim 128, block 32, layered cache view
    'mixed-bf16-g8-bs32-d128': ([1, 20, 1], [250, 84, 2], 8, 1, 128, 32, torch.bfloat16, dict(layered=True)),
    # GQA 1 (MHA), chunked prefill: a 70-token chunk starting mid-block at position 130
    'chunked-fp16-g1-bs32-d128': ([70, 1], [200, 45], 2, 2, 128, 32, torch.float16, {}),
    'window-fp16-g2-bs16-d64': ([1, 30, 1], [150, 90, 7], 4, 2, 64, 16, torch.float16, dict(sliding_window=24)),
    'softcap-bf16-g4-bs16-d64': ([1, 17], [120, 60], 4, 1, 64, 16, torch.bfloat16, dict(softcap=5.0, scale=0.4)),
    'alibi-fp16-g4-bs32-d64': ([1, 12, 1], [100, 80, 33], 4, 1, 64, 32, torch.float16, dict(alibi=True)),
    # decode-only steps take the small-tile decode config: GQA 8 (2 tokens a tile) and GQA 1 (16 tokens a tile)
    'decode-bf16-g8-bs16-d128': ([1] * 5, [1, 16, 17, 260, 64], 8, 1, 128, 16, torch.bfloat16, {}),
    'decode-fp16-g1-bs32-d64': ([1] * 4, [33, 400, 2, 31], 2, 2, 64, 32, torch.float16, {}),
    # ragged mix up to a few hundred positions
    'ragged-bf16-g4-bs16-d128': ([1, 64, 1, 130, 2, 1], [390, 64, 12, 200, 3, 77], 8, 2, 128, 16, torch.bfloat16,
                                 {}),
    # flash decoding: decode-only step forced to 4 splits (some splits of the short contexts are empty)
    'splitk-decode-fp16-g4-bs16-d128': ([1, 1, 1], [300, 5, 129], 4, 1, 128, 16, torch.float16,
                                        dict(num_splits=4)),
    # split decode rows next to a prefill, with a window, bf16
    'splitk-mixed-bf16-g2-bs16-d64': ([1, 9], [210, 70], 4, 2, 64, 16, torch.bfloat16,
                                      dict(num_splits=3, sliding_window=50)),
    # decode and prefill programs as two launches
    'separate-fp16-g4-bs16-d64': ([1, 9, 1], [150, 70, 40], 4, 1, 64, 16, torch.float16,
                                  dict(mixed='separate', softcap=7.0)),
    # one launch for every row (prefill tiles), split over tokens, ALiBi
    'single-launch-split-fp16-g4-bs16-d64': ([1, 9, 1], [150, 70, 40], 4, 1, 64, 16, torch.float16,
                                             dict(num_splits=2, mixed='single', alibi=True)),
    'single-launch-bf16-g2-bs32-d128': ([1, 33, 1], [99, 120, 1], 4, 2, 128, 32, torch.bfloat16,
                                        dict(mixed='single', sliding_window=40)),
    # odd sizes: head_dim 80 (masked to 128), GQA 3 (padded to 4), block 64 with tiles smaller than a block
    'odd-fp16-g3-bs64-d80': ([1, 6], [140, 70], 3, 1, 80, 64, torch.float16, dict(config=dict(TILE_N=32))),
    # tiny blocks (block 2: a tile spans 32 blocks) and fp32
    'fp32-g2-bs2-d32': ([1, 4], [45, 20], 2, 1, 32, 2, torch.float32, {}),
}


@pytest.mark.parametrize('name', list(CASES))
def test_paged_attention_matches_reference(name):
    q_lens, seq_lens, H, KVH, D, bs, dtype, kw = CASES[name]
    kw = dict(kw)
    seed = sum(map(ord, name))
    q, kc, vc, cu, sl, bt = make_step(q_lens, seq_lens, H, KVH, D, bs, dtype, seed, layered=kw.pop('layered', False))
    if kw.pop('alibi', False):
        kw['alibi_slopes'] = (torch.rand(H, generator=torch.Generator().manual_seed(seed)) * 0.5).to(DEVICE)
    ref_kw = {k: v for k, v in kw.items() if k in ('scale', 'sliding_window', 'softcap', 'alibi_slopes')}
    ref = paged_attention_reference(q.float(), kc.float(), vc.float(), cu, sl, bt, **ref_kw)
    out = torch.full_like(q, float('nan'))   # poisoned: an unwritten element fails
    res = paged_attention(q, kc, vc, cu, sl, bt, out=out, **kw)
    assert res is out and res.dtype == dtype
    assert not out.isnan().any(), 'kernel left elements unwritten'
    err = rel_err(out, ref)
    assert err < TOL[dtype], f'{name}: relative error {err:.2e} >= {TOL[dtype]:.0e}'


def test_decode_config_and_auto_split_heuristic():
    assert attention_config(128, torch.bfloat16, (9, 0), decode_only=True)['BLOCK_M'] == 16
    assert attention_config(128, torch.bfloat16, (9, 0), decode_only=False)['BLOCK_M'] >= 64
    assert num_kv_splits(8, 16384, 132) > 1            # batch 1: split
    assert num_kv_splits(8, 300, 132) == 1             # short context: not worth it
    assert num_kv_splits(64 * 8, 4096, 132) == 1       # enough programs already


# ------------------------------------------------------------------------------------------------- bad inputs

def _good(dtype=torch.float16):
    return make_step([1, 3], [20, 3], 4, 2, 16, 4, dtype, seed=5)


def _swap(args, i, x):
    args = list(args)
    args[i] = x
    return args


def _bad_attention_inputs():
    q, kc, vc, cu, sl, bt = _good()
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731
    nb = kc.shape[0]
    bt_far = bt.clone()
    bt_far[0, 1] = nb
    bt_neg = bt.clone()
    bt_neg[1, 0] = -3
    return {
        'heads-not-multiple': ((torch.randn(4, 3, 16, dtype=torch.float16, device=DEVICE), kc, vc, cu, sl, bt),
                               'not a multiple of num_kv_heads'),
        'head-dim-mismatch': ((torch.randn(4, 4, 32, dtype=torch.float16, device=DEVICE), kc, vc, cu, sl, bt),
                              'head_dim'),
        'block-past-cache': ((q, kc, vc, cu, sl, bt_far), r'block_tables has entries .* cache has'),
        'block-negative': ((q, kc, vc, cu, sl, bt_neg), r'block_tables has entries'),
        'seq-shorter-than-query': ((q, kc, vc, cu, i32(20, 2), bt), 'shorter than their query lengths'),
        'cu-not-ending-at-tokens': ((q, kc, vc, i32(0, 1, 3), sl, bt), 'ends at 3 but q has 4 tokens'),
        'cu-int64': ((q, kc, vc, cu.long(), sl, bt), 'int32'),
        'int-dtype': ((q.to(torch.int32), kc.to(torch.int32), vc.to(torch.int32), cu, sl, bt), 'not supported'),
        'q-cache-dtype-differ': ((q.bfloat16(), kc, vc, cu, sl, bt), 'cast q'),
        'table-too-narrow': ((q, kc, vc, cu, i32(40, 3), bt), 'widen the block table'),
    }


BAD = _bad_attention_inputs()


@pytest.mark.parametrize('fn', [paged_attention, paged_attention_reference], ids=['triton', 'reference'])
@pytest.mark.parametrize('case', list(BAD))
def test_attention_rejects_bad_inputs(fn, case):
    args, msg = BAD[case]
    with pytest.raises(ValueError, match=msg):
        fn(*args)


def test_attention_rejects_bad_options_and_float64():
    q, kc, vc, cu, sl, bt = _good()
    with pytest.raises(ValueError, match='float64'):
        paged_attention(q.double(), kc.double(), vc.double(), cu, sl, bt)
    paged_attention_reference(q.double(), kc.double(), vc.double(), cu, sl, bt)   # fine in the reference
    with pytest.raises(ValueError, match='sliding_window'):
        paged_attention(q, kc, vc, cu, sl, bt, sliding_window=0)
    with pytest.raises(ValueError, match='softcap'):
        paged_attention(q, kc, vc, cu, sl, bt, softcap=-1.0)
    with pytest.raises(ValueError, match='alibi_slopes'):
        paged_attention(q, kc, vc, cu, sl, bt, alibi_slopes=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match='out must be'):
        paged_attention(q, kc, vc, cu, sl, bt, out=torch.empty(4, 4, 16, device=DEVICE))


def test_store_rejects_bad_inputs():
    _, kc, vc, _, _, _ = _good()
    k = torch.randn(4, 2, 16, dtype=torch.float16, device=DEVICE)
    slots = torch.tensor([0, 1, 2, 3], device=DEVICE)
    for fn in (store_kv, store_kv_reference):
        with pytest.raises(ValueError, match='KV heads but the cache has 2'):
            fn(torch.randn(4, 3, 16, dtype=torch.float16, device=DEVICE), k, kc, vc, slots)
        with pytest.raises(ValueError, match='head_dim 8 but the cache has head_dim 16'):
            kk = torch.randn(4, 2, 8, dtype=torch.float16, device=DEVICE)
            fn(kk, kk, kc, vc, slots)
        with pytest.raises(ValueError, match='slot_mapping has 5 entries but k/v have only 4'):
            fn(k, k, kc, vc, torch.arange(5, device=DEVICE))
        with pytest.raises(ValueError, match='slot_mapping has values'):
            fn(k, k, kc, vc, torch.tensor([0, 1, 2, kc.shape[0] * kc.shape[1]], device=DEVICE))
        with pytest.raises(ValueError, match='slot_mapping has values'):
            fn(k, k, kc, vc, torch.tensor([0, -2, 1, 2], device=DEVICE))
        with pytest.raises(ValueError, match='not supported'):
            fn(k.int(), k.int(), kc, vc, slots)
    with pytest.raises(ValueError, match='float64'):
        store_kv(k.double(), k.double(), kc.double(), vc.double(), slots)


def test_backend_choice():
    assert attention_backend(DEVICE, 'torch') == 'torch'
    assert attention_backend(DEVICE, 'triton') == 'triton'      # the interpreter on CPU, compiled on a GPU
    with pytest.raises(AttentionError, match="backend must be 'triton' or 'torch'"):
        attention_backend(DEVICE, 'flash')
