"""infer.moe: routing against transformers' routers (and the softmax-top-k kernel against the torch routing), the
device-side alignment against its plain-torch reference, the fused-experts Triton kernels (in Triton's interpreter
where there is no GPU: conftest.py sets TRITON_INTERPRET=1) against the reference computed in float64, int8 experts,
whole `SparseMoE` layers against transformers' sparse-MoE blocks on the same random weights (built from configs:
nothing is downloaded), and bad input, refused with a MoEError before any kernel starts.

Tolerances: routing does the routers' own operations, so ids are equal and weights within float32 rounding
(`torch.testing.assert_close`'s float32 defaults; DeepSeek's unsorted top-k compared as sets). The kernels: relative
error `||out - ref|| / ||ref||` against the float64 reference below 1e-5 in float32 and below 1e-2 in bf16/fp16 (the
intermediate activations are rounded to the input dtype, as a half-precision layer does); whole layers below 1e-5 in
float32; an int8-quantized layer within 3e-2 of the float32 one (the format's own error: 8e-3 measured). Shapes are
tiny: Triton's interpreter runs every program in Python."""
import os
import re

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE, DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock, Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock, Qwen3MoeTopKRouter

from infer import moe
from infer.models import MLP
from infer.moe import (ACTIVATIONS, MoEError, SparseMoE, activate, align_reference, align_triton, experts_reference,
                       fused_experts, fused_experts_triton, max_padded_rows, moe_config, quantize_experts,
                       quantize_layer_, random_experts, rel_err, route, softmax_topk_triton)

DEVICE = 'cuda' if torch.cuda.is_available() and os.environ.get('TRITON_INTERPRET', '0') == '0' else 'cpu'
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen(seed))).to(dtype).to(DEVICE)


def experts(E, H, I, dtype, seed=0):
    "Fresh expert weights, scaled like a trained layer's (random_experts), so that activations stay near unit size."
    return tuple(w.to(DEVICE) for w in random_experts(E, H, I, dtype, generator=gen(seed)))


def random_routing(T, E, k, mode='softmax', seed=0):
    "Fresh routing: 'softmax' (renormalized, Mixtral/Qwen) or 'sigmoid' (DeepSeek-V3: 2 groups, bias, scaling 2.5)."
    g = gen(seed)
    logits = torch.randn(T, E, generator=g).to(DEVICE)
    if mode == 'sigmoid':
        return route(logits, k, scoring='sigmoid', renormalize=True, num_groups=2, topk_groups=1, scaling=2.5,
                     correction_bias=torch.randn(E, generator=g).to(DEVICE))
    return route(logits, k, renormalize=True)


def reference64(x, w13, w2, weights, ids, activation='silu', w13_scale=None, w2_scale=None):
    "experts_reference in float64 (quantized experts stay quantized: their scales bring them to float64)."
    if w13_scale is None: w13, w2 = w13.double(), w2.double()
    return experts_reference(x.double(), w13, w2, weights, ids, activation, w13_scale, w2_scale)


# ------------------------------------------------------------------------------------------------- routing

def assert_same_routing(w, ids, want_w, want_ids):
    "Equal ids and float32-close weights, token by token in the same order."
    assert w.dtype == torch.float32 and ids.dtype == torch.int64, (w.dtype, ids.dtype)
    assert torch.equal(ids, want_ids.to(ids.device)), (ids, want_ids)
    torch.testing.assert_close(w, want_w.float())


def assert_same_routing_as_sets(w, ids, want_w, want_ids):
    "DeepSeek's top-k is unsorted: per token, the same set of experts with the same weight each."
    assert w.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids.sort(-1).values, want_ids.sort(-1).values)
    torch.testing.assert_close(w.gather(1, ids.argsort(-1)), want_w.float().gather(1, want_ids.argsort(-1)))


BACKENDS = ('torch', 'triton')     # with 'triton', softmax routing is one kernel (softmax_topk_triton)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('T, H, E, k', [(37, 64, 8, 2), (5, 16, 4, 4), (64, 32, 32, 8), (1, 48, 16, 1)])
def test_route_matches_mixtral_router(T, H, E, k, seed, backend):
    torch.manual_seed(seed)
    router = MixtralTopKRouter(transformers.MixtralConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=k))
    nn.init.normal_(router.weight)
    router, x = router.to(DEVICE), torch.randn(T, H).to(DEVICE)
    _, want_w, want_ids = router(x)
    w, ids = route(F.linear(x, router.weight), k, renormalize=True, backend=backend)
    assert w.shape == ids.shape == (T, k)
    assert_same_routing(w, ids, want_w, want_ids)
    torch.testing.assert_close(w.sum(-1), torch.ones(T, device=DEVICE))          # renormalized


@pytest.mark.parametrize('cls, config_cls', [(Qwen3MoeTopKRouter, transformers.Qwen3MoeConfig),
                                              (Qwen2MoeTopKRouter, transformers.Qwen2MoeConfig)],
                         ids=['qwen3_moe', 'qwen2_moe'])
@pytest.mark.parametrize('norm', [True, False], ids=['norm', 'no_norm'])
@pytest.mark.parametrize('seed, T, H, E, k', [(0, 29, 64, 16, 4), (1, 8, 32, 8, 8), (2, 50, 16, 32, 6)])
@pytest.mark.parametrize('backend', BACKENDS)
def test_route_matches_qwen_routers(cls, config_cls, norm, seed, T, H, E, k, backend):
    torch.manual_seed(seed)
    router = cls(config_cls(hidden_size=H, num_experts=E, num_experts_per_tok=k, norm_topk_prob=norm))
    nn.init.normal_(router.weight)
    router, x = router.to(DEVICE), torch.randn(T, H).to(DEVICE)
    _, want_w, want_ids = router(x)
    logits = F.linear(x, router.weight)
    w, ids = route(logits, k, renormalize=norm, backend=backend)
    assert_same_routing(w, ids, want_w, want_ids)
    if not norm: torch.testing.assert_close(w, logits.softmax(-1).gather(1, ids))   # the probabilities themselves


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('norm', [True, False], ids=['norm', 'no_norm'])
def test_route_matches_qwen3_router_in_bf16(norm, backend):
    """In bf16 the router rounds its float32 weights to the logits' dtype at the end; route keeps float32: the same
    ids, and weights within bf16's rounding of transformers' (with backend='torch', whose softmax is the router's own,
    rounding route's weights the same way gives transformers' exactly)."""
    torch.manual_seed(3)
    router = Qwen3MoeTopKRouter(transformers.Qwen3MoeConfig(hidden_size=32, num_experts=16, num_experts_per_tok=4,
                                                             norm_topk_prob=norm))
    nn.init.normal_(router.weight)
    router.to(DEVICE, torch.bfloat16)
    x = torch.randn(21, 32).to(DEVICE, torch.bfloat16)
    logits, want_w, want_ids = router(x)
    assert want_w.dtype == torch.bfloat16
    w, ids = route(logits, 4, renormalize=norm, backend=backend)
    assert w.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    if backend == 'torch': assert torch.equal(w.to(torch.bfloat16), want_w)
    torch.testing.assert_close(w, want_w.float(), rtol=2 ** -8, atol=0)


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('E, k, n_group, topk_group, scaling, norm', [
    (32, 6, 4, 2, 2.5, True),       # DeepSeek-V3's shape, small
    (16, 4, 1, 1, 1.0, False),      # no groups, no renormalization
    (16, 3, 8, 3, 1.8, False),      # groups of two
    (8, 8, 2, 2, 1.5, True),        # top_k == number of experts
    (24, 5, 3, 1, 2.0, True),       # one group kept: top_k from its 8 experts
])
def test_route_matches_deepseek_v3_router(E, k, n_group, topk_group, scaling, norm, seed):
    "Sigmoid routing (the same on both backends)."
    torch.manual_seed(seed)
    router = DeepseekV3TopkRouter(transformers.DeepseekV3Config(
        hidden_size=32, n_routed_experts=E, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=scaling, norm_topk_prob=norm))
    nn.init.normal_(router.weight)
    router.e_score_correction_bias.normal_()
    router, x = router.to(DEVICE), torch.randn(33, 32).to(DEVICE)
    _, want_w, want_ids = router(x)
    w, ids = route(F.linear(x, router.weight), k, scoring='sigmoid', renormalize=norm, num_groups=n_group,
                   topk_groups=topk_group, correction_bias=router.e_score_correction_bias, scaling=scaling)
    assert_same_routing_as_sets(w, ids, want_w, want_ids)
    w_triton, ids_triton = route(F.linear(x, router.weight), k, scoring='sigmoid', renormalize=norm,
                                 num_groups=n_group, topk_groups=topk_group,
                                 correction_bias=router.e_score_correction_bias, scaling=scaling, backend='triton')
    assert torch.equal(w_triton, w) and torch.equal(ids_triton, ids)
    if norm: torch.testing.assert_close(w.sum(-1), torch.full((33,), scaling, device=DEVICE))
    # the chosen experts lie in at most topk_group groups
    assert ((ids // (E // n_group)).sort(-1).values.diff(dim=-1) != 0).sum(-1).max() < topk_group


def distinct_logits(rows, cols, seed, dtype):
    "Logits with no ties in a row (each row a permutation of multiples of 1/16, exact in every dtype)."
    return (torch.rand(rows, cols, generator=gen(seed)).argsort(-1).float() / 16 - cols / 32).to(dtype).to(DEVICE)


@pytest.mark.parametrize('T, E, k, layout, renormalize, dtype', [
    (1, 4, 1, 'dense', True, torch.float32),
    (17, 24, 5, 'columns', False, torch.bfloat16),
    (100, 8, 8, 'dense', True, torch.float16),          # top_k == experts; 100 rows in programs of 16
    (45, 60, 3, 'rows', True, torch.bfloat16),
    (33, 128, 8, 'columns', False, torch.float32),
    (70, 32, 4, 'rows', False, torch.float16),
], ids=str)
def test_softmax_topk_triton(T, E, k, layout, renormalize, dtype):
    """The softmax-top-k kernel against the torch routing: non-power-of-two experts, top_k == experts, a token count
    that no program's row count divides, logits as a column slice or every other row of a bigger matrix. Ties (common
    in half precision) may be broken either way, so the ids are compared on logits without ties, and on random
    logits the weights, and that each id's weight is its own probability."""
    def view(make):
        if layout == 'columns': return make(T, E + 7)[:, 2:2 + E]
        if layout == 'rows': return make(2 * T, E)[1::2]
        return make(T, E)
    logits = view(lambda r, c: distinct_logits(r, c, seed=T + E, dtype=dtype))
    before = logits.clone()
    w, ids = softmax_topk_triton(logits, k, renormalize)
    want_w, want_ids = route(logits, k, renormalize=renormalize, backend='torch')
    assert w.shape == ids.shape == (T, k) and w.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w)
    assert torch.equal(logits, before)
    w2, ids2 = route(logits, k, renormalize=renormalize, scaling=2.5, backend='triton')
    assert torch.equal(ids2, ids)
    torch.testing.assert_close(w2, 2.5 * want_w)

    logits = view(lambda r, c: randn(r, c, seed=T + E + 1, dtype=dtype, scale=3.0))
    w, ids = softmax_topk_triton(logits, k, renormalize)
    want_w, _ = route(logits, k, renormalize=renormalize, backend='torch')
    torch.testing.assert_close(w, want_w)
    assert ((ids >= 0) & (ids < E)).all() and (ids.sort(-1).values.diff(dim=-1) > 0).all()    # k distinct experts
    mine = F.softmax(logits.float(), dim=-1).gather(1, ids)
    torch.testing.assert_close(w, mine / mine.sum(-1, keepdim=True) if renormalize else mine)


def test_softmax_topk_triton_no_tokens():
    w, ids = route(torch.empty(0, 8, device=DEVICE), 2, backend='triton')
    assert w.shape == ids.shape == (0, 2) and w.dtype == torch.float32 and ids.dtype == torch.int64


def test_route_correction_bias_picks_but_does_not_weigh():
    "The bias decides which experts; the weights stay the experts' own sigmoid scores."
    logits = randn(10, 8, seed=1)
    bias = torch.zeros(8, device=DEVICE)
    bias[5] = 100.0
    w, ids = route(logits, 2, scoring='sigmoid', correction_bias=bias)
    assert (ids == 5).any(-1).all()
    torch.testing.assert_close(w, logits.sigmoid().gather(1, ids))


# ------------------------------------------------------------------------------------------------- alignment

def make_ids(kind, T, k, E, seed):
    g = gen(seed)
    if kind == 'none':                                    # every pair routed to another device
        return torch.full((T, k), -1, dtype=torch.int64)
    if kind == 'same':                                    # every token to the same k experts
        return torch.arange(k).repeat(T, 1)
    if kind == 'even':                                    # odd experts left empty, between full ones
        return torch.rand(T, E // 2, generator=g).topk(k, dim=-1).indices * 2
    ids = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    if kind == 'elsewhere': ids[torch.rand(T, k, generator=g) < 0.3] = -1
    if kind == 'int32': ids = ids.int()
    return ids


def naive_alignment(ids, E, block_m):
    "align_reference's layout by hand: runs per expert (then −1), in pair order, each padded with T·k."
    flat, n = ids.flatten().tolist(), ids.numel()
    rows, tiles = [], []
    for group in list(range(E)) + [-1]:
        run = [p for p, e in enumerate(flat) if (e if e >= 0 else -1) == group]
        run += [n] * (-len(run) % block_m)
        rows += run
        tiles += [group] * (len(run) // block_m)
    return rows, tiles


def check_alignment(ids, E, block_m):
    n = ids.numel()
    sorted_ids, block_experts, num_padded = align_triton(ids, E, block_m)
    ref_sorted, ref_experts, ref_padded = align_reference(ids, E, block_m)
    size = max_padded_rows(n, E, block_m)
    assert sorted_ids.shape == ref_sorted.shape == (size,) and block_experts.shape == ref_experts.shape
    assert sorted_ids.dtype == block_experts.dtype == num_padded.dtype == torch.int32
    P = int(ref_padded)
    assert int(num_padded) == P and P % block_m == 0 and P <= size, (int(num_padded), P, size)
    tiles = P // block_m
    assert torch.equal(block_experts[:tiles], ref_experts[:tiles])
    rows, ref_rows = sorted_ids[:P].long().cpu(), ref_sorted[:P].long().cpu()
    assert ((rows >= 0) & (rows <= n)).all()
    assert torch.equal(rows == n, ref_rows == n)                          # padding: the sentinel, at the same rows
    real = rows[rows < n]
    assert torch.equal(real.sort().values, torch.arange(n))               # each pair exactly once
    tile_expert = block_experts[:tiles].long().cpu().repeat_interleave(block_m)
    flat = ids.flatten().long().cpu()
    assert torch.equal(tile_expert[rows < n], torch.where(flat < 0, -1, flat)[real])   # in a tile of its own expert
    # the reference itself: the layout built by hand, pairs in order within each expert
    want_rows, want_tiles = naive_alignment(ids.cpu(), E, block_m)
    assert ref_rows.tolist() == want_rows and ref_experts[:tiles].tolist() == want_tiles
    assert (ref_experts[tiles:] == -1).all()


@pytest.mark.parametrize('kind, T, k, E, block_m', [
    ('random', 5, 2, 8, 16),
    ('random', 1, 1, 4, 16),
    ('random', 600, 2, 8, 16),          # 1200 pairs: more than one chunk of 1024
    ('random', 700, 4, 32, 64),         # 2800 pairs: three chunks
    ('random', 1100, 1, 4, 32),
    ('random', 256, 4, 16, 32),         # exactly 1024 pairs
    ('even', 300, 2, 16, 32),           # experts left empty
    ('even', 520, 4, 8, 64),
    ('elsewhere', 400, 4, 16, 16),      # some pairs routed to −1
    ('elsewhere', 90, 3, 6, 64),
    ('none', 37, 2, 8, 16),             # all −1
    ('none', 300, 4, 8, 64),
    ('same', 500, 3, 32, 16),           # three experts get every token, the other 29 none
    ('int32', 260, 4, 8, 32),
])
def test_align_triton_matches_reference(kind, T, k, E, block_m):
    ids = make_ids(kind, T, k, E, seed=T + k + E).to(DEVICE)
    before = ids.clone()
    check_alignment(ids, E, block_m)
    assert torch.equal(ids, before)


@pytest.mark.parametrize('block_m', [16, 32, 64])
@pytest.mark.parametrize('seed', range(3))
def test_align_triton_fresh_routings(block_m, seed):
    g = gen(100 + seed)
    T, E = int(torch.randint(1, 700, (1,), generator=g)), int(torch.randint(4, 33, (1,), generator=g))
    k = int(torch.randint(1, min(E, 8) + 1, (1,), generator=g))
    ids = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    ids[torch.rand(T, k, generator=g) < 0.1] = -1
    check_alignment(ids.to(DEVICE), E, block_m)


# ------------------------------------------------------------------------------------------------- fused experts

def test_reference_is_the_sum_over_experts():
    "experts_reference, token by token from its definition, in float64; −1 adds nothing."
    E, H, I, k = 6, 16, 24, 3
    x = randn(9, H, seed=1, dtype=torch.float64)
    w13, w2 = experts(E, H, I, torch.float64, seed=2)
    weights, ids = random_routing(9, E, k, seed=3)
    ids[2, 1] = ids[5] = -1
    for activation in ACTIVATIONS:
        want = torch.zeros(9, H, dtype=torch.float64, device=DEVICE)
        for t in range(9):
            for j in range(k):
                e = int(ids[t, j])
                if e < 0: continue
                h = w13[e] @ x[t]
                want[t] += float(weights[t, j]) * (w2[e] @ (activate(h[:I], activation) * h[I:]))
        out = experts_reference(x, w13, w2, weights, ids, activation)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        assert (out[5] == 0).all()


@pytest.mark.parametrize('T, E, H, I, k, activation, mode, dtype', [
    (1, 8, 32, 48, 2, 'silu', 'softmax', torch.float32),
    (1, 8, 32, 48, 2, 'gelu', 'softmax', torch.bfloat16),
    (2, 4, 16, 16, 4, 'gelu', 'softmax', torch.float16),          # top_k == number of experts
    (2, 4, 16, 16, 4, 'gelu_tanh', 'softmax', torch.float32),
    (7, 8, 64, 40, 2, 'gelu_tanh', 'sigmoid', torch.bfloat16),
    (7, 8, 64, 40, 2, 'silu', 'sigmoid', torch.float16),
    (16, 16, 32, 24, 4, 'silu', 'sigmoid', torch.float32),
    (65, 8, 48, 96, 1, 'gelu', 'softmax', torch.float16),
    (300, 8, 32, 48, 2, 'gelu_tanh', 'sigmoid', torch.float32),
], ids=str)
def test_fused_experts_matches_reference(T, E, H, I, k, activation, mode, dtype):
    x = randn(T, H, seed=T + H, dtype=dtype)
    w13, w2 = experts(E, H, I, dtype, seed=E + I)
    weights, ids = random_routing(T, E, k, mode, seed=T)
    out = fused_experts_triton(x, w13, w2, weights, ids, activation)
    assert out.shape == (T, H) and out.dtype == dtype
    assert not out.isnan().any(), f'{int(out.isnan().sum())} of {out.numel()} outputs are NaN'
    err = rel_err(out, reference64(x, w13, w2, weights, ids, activation))
    assert err < TOL[dtype], f'relative error {err:.2e}'


@pytest.mark.parametrize('T, k, elsewhere, dtype', [(7, 2, 0.3, torch.float32), (33, 4, 0.5, torch.bfloat16),
                                                   (40, 2, 0.2, torch.float16)], ids=str)
def test_fused_experts_with_pairs_elsewhere(T, k, elsewhere, dtype):
    "Expert parallelism: pairs routed to −1 add nothing; a token with every pair elsewhere gets an exact zero row."
    E, H, I = 8, 32, 40
    x = randn(T, H, seed=T, dtype=dtype)
    w13, w2 = experts(E, H, I, dtype, seed=1)
    weights, ids = random_routing(T, E, k, seed=T + 1)
    ids[torch.rand(T, k, generator=gen(T + 2)).to(DEVICE) < elsewhere] = -1
    ids[T // 2] = -1
    out = fused_experts_triton(x, w13, w2, weights, ids)
    assert (out[T // 2] == 0).all()
    assert not out.isnan().any()
    err = rel_err(out, reference64(x, w13, w2, weights, ids))
    assert err < TOL[dtype], f'relative error {err:.2e}'
    # the same as dropping those pairs' weights to zero on a full routing
    kept = torch.where(ids < 0, 0.0, weights)
    err = rel_err(out, reference64(x, w13, w2, kept, ids.clamp(min=0)))
    assert err < TOL[dtype], f'relative error {err:.2e}'


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_fused_experts_all_pairs_elsewhere(dtype):
    x = randn(20, 32, seed=1, dtype=dtype)
    w13, w2 = experts(4, 32, 16, dtype)
    weights, ids = random_routing(20, 4, 2)
    out = fused_experts_triton(x, w13, w2, weights, torch.full_like(ids, -1))
    assert out.shape == (20, 32) and (out == 0).all()


def cfg(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps=4, num_stages=2):
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, num_warps=num_warps,
                num_stages=num_stages)


# H = 40, I = 36: no BLOCK_N below divides I (gate-up) or H (down), no BLOCK_K divides H (gate-up) or I (down)
CONFIGS = {
    'm16': (cfg(16, 32, 16, 4), cfg(16, 32, 32, 3)),
    'm32': (cfg(32, 16, 32, 2), cfg(32, 64, 16, 8)),          # BLOCK_N above N for the down projection
    'm64': (cfg(64, 64, 32, 8, 8, 3), cfg(64, 32, 64, 5)),    # BLOCK_K above K for the down projection
}


@pytest.mark.parametrize('name, T, dtype', [('m16', 33, torch.float32), ('m16', 7, torch.bfloat16),
                                            ('m32', 70, torch.float32), ('m64', 40, torch.bfloat16)], ids=str)
def test_fused_experts_explicit_configs(name, T, dtype):
    E, H, I, k = 8, 40, 36, 2
    x = randn(T, H, seed=T, dtype=dtype)
    w13, w2 = experts(E, H, I, dtype, seed=2)
    weights, ids = random_routing(T, E, k, 'sigmoid', seed=T + 3)
    ids[0, 0] = -1
    out = fused_experts_triton(x, w13, w2, weights, ids, 'gelu_tanh', config=CONFIGS[name])
    err = rel_err(out, reference64(x, w13, w2, weights, ids, 'gelu_tanh'))
    assert err < TOL[dtype], f'relative error {err:.2e}'


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_half_tiles(dtype, monkeypatch):
    """Tiles of 64 rows whose second half is padding run as 32-row tiles: experts with 70, 100, 64 and 20 pairs give
    tiles that are full, half-run (tails of 6 and 20 rows) and whole with a tail past the middle (36 rows)."""
    E, H, I, k, counts = 8, 40, 36, 2, (70, 100, 64, 20)
    flat = torch.cat([torch.full((n,), e) for e, n in enumerate(counts)])
    ids = flat[torch.randperm(flat.numel(), generator=gen(3))].view(-1, k).to(DEVICE)
    weights = torch.rand(ids.shape, generator=gen(4)).to(DEVICE)
    x = randn(ids.shape[0], H, seed=5, dtype=dtype)
    w13, w2 = experts(E, H, I, dtype, seed=6)
    ref = reference64(x, w13, w2, weights, ids, 'silu')
    outs = {}
    for halves in (True, False):
        monkeypatch.setattr(moe, 'HALF_TILES', halves)
        outs[halves] = fused_experts_triton(x, w13, w2, weights, ids, 'silu', config=CONFIGS['m64'])
        assert rel_err(outs[halves], ref) < TOL[dtype], (halves, rel_err(outs[halves], ref))
    assert rel_err(outs[True], outs[False]) < TOL[dtype]


@pytest.mark.parametrize('layout, dtype', [('columns', torch.float32), ('rows', torch.bfloat16),
                                           ('transposed', torch.float16), ('strided_weights', torch.float32)], ids=str)
def test_fused_experts_strided_inputs(layout, dtype):
    "x as a column slice or every other row of a bigger matrix, or transposed; experts and routing as views."
    T, E, H, I, k = 23, 8, 32, 24, 2
    w13, w2 = experts(E, H, I, dtype, seed=5)
    weights, ids = random_routing(T, E, k, seed=6)
    if layout == 'columns': x = randn(T, H + 24, seed=1, dtype=dtype)[:, 5:5 + H]
    elif layout == 'rows': x = randn(2 * T, H, seed=1, dtype=dtype)[::2]
    elif layout == 'transposed': x = randn(H, T, seed=1, dtype=dtype).t()
    else:
        x = randn(T, H, seed=1, dtype=dtype)
        w13 = torch.cat([w13[:, :3], w13, w13[:, :5]], dim=1)[:, 3:3 + 2 * I]         # rows of a bigger stack
        w2 = torch.cat([w2, w2[..., :8]], dim=2)[..., :I]                             # columns of one
        weights, ids = torch.stack([weights, weights], -1)[..., 1], torch.stack([ids, ids], -1)[..., 0]
    assert not x.is_contiguous() or layout == 'strided_weights'
    out = fused_experts_triton(x, w13, w2, weights, ids)
    err = rel_err(out, reference64(x, w13, w2, weights, ids))
    assert err < TOL[dtype], f'relative error {err:.2e}'


def test_fused_experts_transposed_expert_storage():
    "Experts whose last dimension is not contiguous (the kernel copies them)."
    T, E, H, I, k = 11, 4, 32, 16, 2
    x = randn(T, H, seed=1)
    w13, w2 = experts(E, H, I, torch.float32, seed=2)
    w13_t, w2_t = w13.transpose(1, 2).contiguous().transpose(1, 2), w2.transpose(1, 2).contiguous().transpose(1, 2)
    assert w13_t.stride(-1) != 1 and torch.equal(w13_t, w13)
    weights, ids = random_routing(T, E, k, seed=3)
    assert torch.equal(fused_experts_triton(x, w13_t, w2_t, weights, ids), fused_experts_triton(x, w13, w2, weights, ids))


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_fused_experts_no_tokens(dtype):
    w13, w2 = experts(8, 32, 24, dtype)
    x, weights = torch.empty(0, 32, dtype=dtype, device=DEVICE), torch.empty(0, 2, device=DEVICE)
    ids = torch.empty(0, 2, dtype=torch.int64, device=DEVICE)
    out = fused_experts_triton(x, w13, w2, weights, ids)
    assert out.shape == (0, 32) and out.dtype == dtype
    assert fused_experts(x, w13, w2, weights, ids, backend='torch').shape == (0, 32)
    assert fused_experts(x, w13, w2, weights, ids, backend='triton').shape == (0, 32)


def test_fused_experts_deterministic_and_leaves_inputs():
    "Two runs give the same bits (pairs land in a tile in any order, but each row is computed alone); inputs unchanged."
    T, E, H, I, k, dtype = 40, 8, 32, 48, 3, torch.bfloat16
    x = randn(T, H, seed=1, dtype=dtype)
    w13, w2 = experts(E, H, I, dtype, seed=2)
    weights, ids = random_routing(T, E, k, 'sigmoid', seed=3)
    ids[3, 2] = -1
    before = [t.clone() for t in (x, w13, w2, weights, ids)]
    first = fused_experts_triton(x, w13, w2, weights, ids, 'gelu')
    second = fused_experts_triton(x, w13, w2, weights, ids, 'gelu')
    assert torch.equal(first, second)
    for t, b in zip((x, w13, w2, weights, ids), before): assert torch.equal(t, b)


def test_fused_experts_backends():
    "backend='torch' is the reference, backend='triton' the kernels, bit for bit (with int32 ids, the same bits)."
    T, E, H, I, k = 12, 8, 32, 24, 2
    x = randn(T, H, seed=1)
    w13, w2 = experts(E, H, I, torch.float32, seed=2)
    weights, ids = random_routing(T, E, k, seed=3)
    assert torch.equal(fused_experts(x, w13, w2, weights, ids, 'gelu', backend='torch'),
                       experts_reference(x, w13, w2, weights, ids, 'gelu'))
    assert torch.equal(fused_experts(x, w13, w2, weights, ids.int(), 'gelu', backend='triton'),
                       fused_experts_triton(x, w13, w2, weights, ids, 'gelu'))


def test_moe_config(monkeypatch):
    "The default configs share BLOCK_M and grow with the rows per expert; a tuned table is read by token count."
    for tokens in (1, 16, 64, 256, 4096):
        up, down = moe_config(8, 64, 96, tokens, 2)
        assert up['BLOCK_M'] == down['BLOCK_M']
        assert set(up) == {'BLOCK_M', 'BLOCK_N', 'BLOCK_K', 'GROUP_M', 'num_warps', 'num_stages'}
    assert moe_config(8, 64, 96, 1, 2)[0]['BLOCK_M'] <= moe_config(8, 64, 96, 4096, 2)[0]['BLOCK_M']
    small, big = (cfg(16, 32, 32, 1),) * 2, (cfg(32, 64, 32, 4),) * 2
    monkeypatch.setitem(moe.H200_MOE_CONFIGS, (8, 40, 36, 2), {4: small, 64: big})
    assert moe_config(8, 40, 36, 1, 2) == small                    # below the table: its smallest entry
    assert moe_config(8, 40, 36, 63, 2) == small
    assert moe_config(8, 40, 36, 64, 2) == big and moe_config(8, 40, 36, 10_000, 2) == big
    x = randn(64, 40, seed=1)
    w13, w2 = experts(8, 40, 36, torch.float32)
    weights, ids = random_routing(64, 8, 2)
    assert rel_err(fused_experts_triton(x, w13, w2, weights, ids), reference64(x, w13, w2, weights, ids)) < 1e-5



# ------------------------------------------------------------------------------------------------- the rows path

@pytest.mark.parametrize('T, E, H, I, k, activation, dtype, elsewhere', [
    (1, 8, 32, 48, 2, 'silu', torch.float32, 0.0),
    (1, 16, 64, 40, 8, 'silu', torch.bfloat16, 0.0),
    (2, 8, 40, 36, 3, 'gelu', torch.float32, 0.0),             # k not a power of two; sizes no block divides
    (3, 4, 16, 16, 4, 'gelu_tanh', torch.float16, 0.0),        # top_k == number of experts
    (4, 8, 32, 48, 2, 'silu', torch.float32, 0.4),             # pairs routed elsewhere
    (9, 8, 64, 40, 4, 'gelu', torch.bfloat16, 0.2),
], ids=str)
def test_rows_path_matches_reference(T, E, H, I, k, activation, dtype, elsewhere):
    x = randn(T, H, seed=T + H, dtype=dtype)
    w13, w2 = experts(E, H, I, dtype, seed=E + I)
    weights, ids = random_routing(T, E, k, 'sigmoid' if 2 * k <= E else 'softmax', seed=T)   # grouped: half the experts
    ids[torch.rand(T, k, generator=gen(T)).to(DEVICE) < elsewhere] = -1
    ref = reference64(x, w13, w2, weights, ids, activation)
    rows = fused_experts_triton(x, w13, w2, weights, ids, activation, path='rows')
    assert rows.shape == (T, H) and rows.dtype == dtype and not rows.isnan().any()
    assert rel_err(rows, ref) < TOL[dtype], f'relative error {rel_err(rows, ref):.2e}'
    for blocks in ((moe._row_tiles(8, 16, 2), moe._row_tiles(16, 32, 4)), (moe._row_tiles(64, 64, 4), moe._row_tiles(4, 128, 1))):
        out = fused_experts_triton(x, w13, w2, weights, ids, activation, config=blocks, path='rows')
        assert rel_err(out, ref) < TOL[dtype], (blocks, rel_err(out, ref))


def test_rows_path_int8_experts_and_a_token_routed_away():
    T, E, H, I, k = 3, 8, 32, 48, 2
    x = randn(T, H, seed=5)
    w13, w2 = experts(E, H, I, torch.float32, seed=6)
    (q13, s13), (q2, s2) = quantize_experts(w13), quantize_experts(w2)
    weights, ids = random_routing(T, E, k, seed=7)
    ids[1] = -1
    ids[2, 0] = E                                             # an id past the layer: another rank's expert
    out = fused_experts_triton(x, q13, q2, weights, ids, 'silu', s13, s2, path='rows')
    assert (out[1] == 0).all()
    assert rel_err(out, experts_reference(x, q13, q2, weights, ids.masked_fill(ids >= E, -1), 'silu', s13, s2)) < 1e-5


def test_row_config_picks_the_rows_path_where_tuned(monkeypatch):
    "A shape in the table takes rows up to its largest token count and tiles beyond; other shapes take tiles."
    blocks = (moe._row_tiles(16, 32, 2), moe._row_tiles(8, 32, 2))
    monkeypatch.setitem(moe.H200_ROW_CONFIGS, (8, 32, 48, 2), {1: blocks, 4: blocks})
    assert moe.row_config(8, 32, 48, 3, 2) == blocks and moe.row_config(8, 32, 48, 5, 2) is None
    assert moe.row_config(8, 64, 48, 1, 2) is None
    x, (w13, w2) = randn(4, 32, seed=1), experts(8, 32, 48, torch.float32)
    weights, ids = random_routing(4, 8, 2)
    calls = []
    monkeypatch.setattr(moe, 'fused_experts_rows', lambda *a: calls.append(a[-1]) or torch.zeros(4, 32))
    fused_experts_triton(x, w13, w2, weights, ids)
    assert calls == [blocks]
    fused_experts_triton(x, w13, w2, weights, ids, path='tiles')
    assert len(calls) == 1
    tiles = (cfg(16, 32, 32, 1), cfg(16, 32, 32, 1))           # a config without a path is the tiles'
    monkeypatch.undo()
    monkeypatch.setitem(moe.H200_ROW_CONFIGS, (8, 32, 48, 2), {4: blocks})
    out = fused_experts_triton(x, w13, w2, weights, ids, config=tiles)
    assert rel_err(out, reference64(x, w13, w2, weights, ids)) < 1e-5
    with pytest.raises(MoEError, match="path is 'tiles', 'rows' or None"):
        fused_experts_triton(x, w13, w2, weights, ids, path='columns')

# ------------------------------------------------------------------------------------------------- a few tokens: one-launch router, PDL

def assert_valid_top_k(x, gate, weights, ids, k, renormalize):
    """Half precision: scores that round to one value tie, and which of them a top-k takes is arbitrary. So check that
    `ids` are a top-k of the rounded scores (each chosen probability at least every unchosen one, within 1e-3) and
    that `weights` are their probabilities (renormalized if asked) within 1e-2."""
    p = F.softmax(F.linear(x.float(), gate.float()).to(x.dtype).float(), dim=-1)
    chosen = p.gather(1, ids)
    assert (chosen.min(1).values >= p.scatter(1, ids, -1.0).max(1).values - 1e-3).all(), chosen
    torch.testing.assert_close(weights, chosen / chosen.sum(1, keepdim=True) if renormalize else chosen, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize('T, E, H, k, renormalize, dtype', [
    (1, 16, 64, 4, True, torch.float32), (3, 8, 40, 2, False, torch.float32), (16, 12, 32, 3, True, torch.float32),
    (4, 128, 64, 8, True, torch.bfloat16), (2, 6, 24, 6, False, torch.float16)], ids=str)
def test_router_topk_triton_matches_route(T, E, H, k, renormalize, dtype):
    x, gate = randn(T, H, seed=T, dtype=dtype), randn(E, H, seed=E, dtype=dtype, scale=H ** -0.5)
    weights, ids = moe.router_topk_triton(x, gate, k, renormalize)
    if dtype == torch.float32:
        assert_same_routing(weights, ids, *route(F.linear(x, gate), k, renormalize=renormalize, backend='torch'))
    else: assert_valid_top_k(x, gate, weights, ids, k, renormalize)
    assert int(moe._arrivals(x.device)) == 0                       # the last program set the counter back


@pytest.mark.parametrize('tokens, experts, top_k, message', [
    (17, 8, 2, 'takes 1 to 16 tokens, got 17'), (2, 8, 9, 'top_k must be an int from 1 to the number of experts (8)'),
    (2, 8, 0, 'top_k must be an int from 1'), (2, 'narrow', 2, 'gate must be [experts, 32] in torch.float32')])
def test_router_topk_triton_bad_input(tokens, experts, top_k, message):
    gate = randn(8, 16, seed=0) if experts == 'narrow' else randn(experts, 32, seed=0)
    with pytest.raises(MoEError, match=re.escape(message)):
        moe.router_topk_triton(randn(tokens, 32, seed=1), gate, top_k)


def test_sparse_moe_routes_a_few_tokens_in_one_launch(monkeypatch):
    "Where the experts take the rows path (here up to 4 tokens), Triton routes in one launch; elsewhere, or with torch, unfused."
    monkeypatch.setitem(moe.H200_ROW_CONFIGS, (8, 32, 24, 2), {4: moe.DEFAULT_ROW_CONFIG})
    layer = SparseMoE(8, 32, 24, 2, renormalize=True).to(DEVICE)
    for p in layer.parameters(): nn.init.normal_(p, std=0.2)
    calls = []
    real = moe.router_topk_triton
    monkeypatch.setattr(moe, 'router_topk_triton', lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    for T, backend in ((3, 'triton'), (5, 'triton'), (3, 'torch')):
        x = randn(T, 32, seed=T)
        assert rel_err(layer(x, backend=backend), reference64(x, layer.w13, layer.w2, *route(
            F.linear(x, layer.gate.weight), 2, renormalize=True, backend='torch'))) < 1e-5
    assert calls == [3]


@pytest.mark.skipif(DEVICE != 'cuda', reason='programmatic dependent launch needs a GPU (Hopper or newer)')
def test_rows_path_with_pdl_replays_in_a_graph(monkeypatch):
    "The one-launch router and the rows kernels chained by PDL, captured in a graph: the bits of the same layer without PDL."
    E, H, I, k = 128, 256, 96, 8
    blocks = (moe._row_tiles(16, 128, 4), moe._row_tiles(8, 128, 4))
    monkeypatch.setitem(moe.H200_ROW_CONFIGS, (E, H, I, k), {4: blocks})
    layer = SparseMoE(E, H, I, k, renormalize=True).to(DEVICE, torch.bfloat16)
    for p in layer.parameters(): nn.init.normal_(p, std=0.05)
    x = randn(2, H, seed=3, dtype=torch.bfloat16)
    assert moe._pdl(x)
    eager = layer(x, backend='triton')
    with monkeypatch.context() as m:
        m.setattr(moe, '_pdl', lambda t: False)
        assert torch.equal(layer(x, backend='triton'), eager)
    assert rel_err(eager, reference64(x, layer.w13, layer.w2, *layer.route(x))) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph): replayed = layer(x, backend='triton')
    for _ in range(50): graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, eager)

# ------------------------------------------------------------------------------------------------- int8 experts

def test_quantize_experts_within_half_a_step():
    w = randn(4, 24, 32, seed=1, scale=0.3)
    w[1, 5] = 0.0                                             # an all-zero channel
    q, scale = quantize_experts(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (4, 24)
    assert (q.abs() <= 127).all()
    nonzero = w.abs().amax(-1) > 0
    assert (q.abs().amax(-1)[nonzero] == 127).all()           # each channel's largest weight uses the full range
    assert (q[1, 5] == 0).all() and torch.isfinite(scale).all()
    step = scale.double()[..., None]
    assert ((q.double() * step - w.double()).abs() <= step * (0.5 + 1e-5)).all()
    # bf16 weights quantize from their own values
    qb, sb = quantize_experts(w.bfloat16())
    assert ((qb.double() * sb.double()[..., None] - w.bfloat16().double()).abs() <= sb.double()[..., None] * (0.5 + 1e-5)).all()


@pytest.mark.parametrize('T, E, H, I, k, activation, dtype', [
    (1, 4, 32, 16, 2, 'silu', torch.float32),
    (30, 8, 32, 48, 2, 'gelu', torch.float32),
    (90, 8, 40, 36, 3, 'gelu_tanh', torch.float32),
    (30, 8, 64, 96, 2, 'silu', torch.float16),
    (30, 8, 64, 96, 2, 'silu', torch.bfloat16),
], ids=str)
def test_fused_int8_experts_match_reference(T, E, H, I, k, activation, dtype):
    x = randn(T, H, seed=T, dtype=dtype)
    w13, w2 = experts(E, H, I, torch.float32, seed=E + H)
    (q13, s13), (q2, s2) = quantize_experts(w13), quantize_experts(w2)
    weights, ids = random_routing(T, E, k, 'sigmoid', seed=T + 1)
    ids[0, -1] = -1
    out = fused_experts_triton(x, q13, q2, weights, ids, activation, s13, s2)
    assert out.dtype == dtype
    assert not out.isnan().any(), f'{int(out.isnan().sum())} of {out.numel()} outputs are NaN'
    ref = reference64(x, q13, q2, weights, ids, activation, s13, s2)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f'relative error {err:.2e}'
    if dtype == torch.float32:                                # the same weights through the float32 reference
        assert rel_err(out, experts_reference(x, q13, q2, weights, ids, activation, s13, s2)) < 1e-5
        exact = reference64(x, w13, w2, weights, ids, activation)
        assert rel_err(ref, exact) < 3e-2                     # the format's own error


@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_quantize_layer(backend):
    torch.manual_seed(0)
    E, H, I = 8, 32, 48
    layer = SparseMoE(E, H, I, 2, renormalize=True, shared_expert=MLP(H, 24), shared_gate=True).to(DEVICE)
    for p in layer.parameters(): nn.init.normal_(p, std=0.2)
    x = randn(40, H, seed=1)
    with torch.no_grad():
        want = layer(x, backend=backend)
        gate = layer.gate.weight.clone()
        assert quantize_layer_(layer) is layer
        out = layer(x, backend=backend)
    assert layer.w13.dtype == layer.w2.dtype == torch.int8
    assert layer.w13_scale.shape == (E, 2 * I) and layer.w2_scale.shape == (E, H)
    assert torch.equal(layer.gate.weight, gate)               # the router is not quantized
    err = rel_err(out, want)
    assert 0 < err < 3e-2, f'relative error {err:.2e}'


# ------------------------------------------------------------------------------------------------- whole layers

def init_(block, seed):
    torch.manual_seed(seed)
    for p in block.parameters(): nn.init.normal_(p, std=0.2)
    return block.to(DEVICE).eval()


def layer_from(block, top_k, shared=None, shared_gate=False, **routing) -> SparseMoE:
    "A SparseMoE holding a transformers block's weights."
    E, I2, H = block.experts.gate_up_proj.shape
    layer = SparseMoE(E, H, I2 // 2, top_k, shared_expert=shared, shared_gate=shared_gate, **routing)
    with torch.no_grad():
        layer.gate.weight.copy_(block.gate.weight)
        layer.w13.copy_(block.experts.gate_up_proj)
        layer.w2.copy_(block.experts.down_proj)
        if layer.correction_bias is not None: layer.correction_bias.copy_(block.gate.e_score_correction_bias)
    return layer.to(DEVICE).eval()


def mlp_from(hf_mlp) -> MLP:
    "infer's MLP holding a transformers MLP's weights: gate_up_proj is [gate; up]."
    I, H = hf_mlp.gate_proj.weight.shape
    mlp = MLP(H, I)
    with torch.no_grad():
        mlp.gate_up_proj.weight.copy_(torch.cat([hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight]))
        mlp.down_proj.weight.copy_(hf_mlp.down_proj.weight)
    return mlp.to(DEVICE)


def check_layer(layer, block, T, H, seed):
    x = randn(1, T, H, seed=seed)
    with torch.no_grad():
        want = block(x)[0]
        for backend in ('torch', 'triton'):
            out = layer(x[0], backend=backend)
            assert out.shape == (T, H)
            err = rel_err(out, want)
            assert err < 1e-5, f'{backend}: relative error {err:.2e}'


@pytest.mark.parametrize('T, H, I, E, k, seed', [(20, 32, 48, 8, 2, 0), (1, 16, 24, 4, 4, 1)])
def test_sparse_moe_matches_mixtral(T, H, I, E, k, seed):
    config = transformers.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
    config._experts_implementation = 'eager'
    block = init_(MixtralSparseMoeBlock(config), seed)
    check_layer(layer_from(block, k, renormalize=True), block, T, H, seed)


@pytest.mark.parametrize('T, H, I, E, k, seed, norm', [(20, 32, 24, 8, 4, 0, True), (5, 48, 16, 8, 8, 1, False)])
def test_sparse_moe_matches_qwen3_moe(T, H, I, E, k, seed, norm):
    config = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k,
                                         norm_topk_prob=norm)
    config._experts_implementation = 'eager'
    block = init_(Qwen3MoeSparseMoeBlock(config), seed)
    check_layer(layer_from(block, k, renormalize=norm), block, T, H, seed)


@pytest.mark.parametrize('T, H, I, S, E, k, seed, norm', [(23, 32, 24, 40, 8, 2, 0, False),
                                                          (3, 16, 16, 64, 4, 4, 1, True)])
def test_sparse_moe_matches_qwen2_moe(T, H, I, S, E, k, seed, norm):
    "The shared expert, behind its sigmoid gate."
    config = transformers.Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=S,
                                         num_experts=E, num_experts_per_tok=k, norm_topk_prob=norm)
    config._experts_implementation = 'eager'
    block = init_(Qwen2MoeSparseMoeBlock(config), seed)
    layer = layer_from(block, k, shared=mlp_from(block.shared_expert), shared_gate=True, renormalize=norm)
    with torch.no_grad(): layer.shared_expert_gate.weight.copy_(block.shared_expert_gate.weight)
    check_layer(layer, block, T, H, seed)


@pytest.mark.parametrize('T, H, I, E, k, n_group, topk_group, n_shared, scaling, norm, seed', [
    (31, 32, 24, 16, 4, 4, 2, 1, 2.5, True, 0),
    (8, 32, 16, 16, 6, 8, 3, 2, 1.5, True, 1),      # groups of two; two shared experts
    (17, 16, 32, 8, 2, 1, 1, 1, 1.0, False, 2),     # no groups, no renormalization
])
def test_sparse_moe_matches_deepseek_v3(T, H, I, E, k, n_group, topk_group, n_shared, scaling, norm, seed):
    "Sigmoid grouped routing with the correction bias and scaling, plus plain shared experts (no gate)."
    config = transformers.DeepseekV3Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
                                           num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
                                           n_shared_experts=n_shared, routed_scaling_factor=scaling,
                                           norm_topk_prob=norm)
    config._experts_implementation = 'eager'
    block = init_(DeepseekV3MoE(config), seed)
    block.gate.e_score_correction_bias.normal_(std=0.5)
    layer = layer_from(block, k, shared=mlp_from(block.shared_experts), scoring='sigmoid', renormalize=norm,
                       num_groups=n_group, topk_groups=topk_group, correction_bias=True, scaling=scaling)
    assert torch.equal(layer.correction_bias, block.gate.e_score_correction_bias)
    check_layer(layer, block, T, H, seed)


def test_sparse_moe_route_is_route():
    layer = SparseMoE(16, 32, 24, 4, scoring='sigmoid', renormalize=True, num_groups=4, topk_groups=2,
                      correction_bias=True, scaling=2.0).to(DEVICE)
    nn.init.normal_(layer.gate.weight)
    layer.correction_bias.normal_()
    x = randn(9, 32, seed=1)
    w, ids = layer.route(x)
    want_w, want_ids = route(layer.gate(x), 4, scoring='sigmoid', renormalize=True, num_groups=4, topk_groups=2,
                             correction_bias=layer.correction_bias, scaling=2.0)
    assert torch.equal(w, want_w) and torch.equal(ids, want_ids)


# ------------------------------------------------------------------------------------------------- bad input

@pytest.fixture
def nothing_runs(monkeypatch):
    "Bad input must be refused before any kernel starts."
    def ran(*args, **kwargs): raise AssertionError('a kernel ran before the input was checked')
    for name in ('align_triton', '_launch'): monkeypatch.setattr(moe, name, ran)


def expert_inputs(T=4, E=8, H=32, I=48, k=2, dtype=torch.float32):
    x = randn(T, H, seed=1, dtype=dtype)
    w13, w2 = experts(E, H, I, dtype)
    weights, ids = random_routing(T, E, k)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize('logits, top_k, kwargs, message', [
    (torch.randn(8), 2, {}, r'logits must be a float tensor \[tokens, experts\], got torch.float32 \[8\]'),
    (torch.randn(2, 3, 8), 2, {}, r'logits must be a float tensor \[tokens, experts\]'),
    (torch.randint(0, 5, (3, 8)), 2, {}, r'logits must be a float tensor'),
    (torch.randn(5, 8), 9, {}, r'top_k must be an int from 1 to the number of experts \(8\), got 9'),
    (torch.randn(5, 8), 0, {}, r'top_k must be an int from 1 to the number of experts'),
    (torch.randn(5, 8), 2, dict(scoring='relu'), r'scoring must be one of'),
    (torch.randn(5, 8), 2, dict(scoring='sigmoid', num_groups=3), r'num_groups \(3\) must divide'),
    (torch.randn(5, 8), 2, dict(num_groups=2), r'pass scoring="sigmoid"'),
    (torch.randn(5, 8), 2, dict(scoring='sigmoid', num_groups=8), r'groups need at least 2 experts'),
    (torch.randn(5, 8), 5, dict(scoring='sigmoid', num_groups=4, topk_groups=2), r'keep at least top_k \(5\)'),
    (torch.randn(5, 8), 2, dict(scoring='sigmoid', correction_bias=torch.zeros(7)),
     r'correction_bias must be a tensor \[8\]'),
], ids=['1d', '3d', 'int', 'top_k_too_big', 'top_k_zero', 'scoring', 'groups_divide', 'groups_softmax',
        'groups_of_one', 'topk_groups', 'bias_shape'])
def test_route_bad_input(logits, top_k, kwargs, message):
    with pytest.raises(MoEError, match=message):
        route(logits, top_k, **kwargs)


def bad(x, w13, w2, weights, ids):
    "Each bad call of fused_experts_triton with the message it must give."
    q13, s13 = quantize_experts(w13)
    q2, s2 = quantize_experts(w2)
    return {
        'x_1d': ((x[0], w13, w2, weights, ids), r'x must be a float tensor \[tokens, hidden\]'),
        'x_float64': ((x.double(), w13.double(), w2.double(), weights, ids), r'the kernel takes'),
        'w13_hidden': ((x, w13[:, :, :16], w2, weights, ids), r'w13 must be \[experts, 2 \* intermediate, hidden=32\]'),
        'w13_odd': ((x, w13[:, :-1], w2, weights, ids), r'w13 must be \[experts, 2 \* intermediate'),
        'w2_intermediate': ((x, w13, w2[:, :, :10], weights, ids),
                            r'w2 must be \[experts=8, hidden=32, intermediate=48\] to match w13'),
        'w2_experts': ((x, w13, w2[:6], weights, ids), r'w2 must be \[experts=8'),
        'x_vs_experts': ((x, w13.bfloat16(), w2.bfloat16(), weights, ids),
                         r'the experts are torch.bfloat16 but x is torch.float32'),
        'w13_vs_w2': ((x, w13, w2.half(), weights, ids), r'w13 is torch.float32 but w2 is torch.float16'),
        'int8_no_scales': ((x, q13, q2, weights, ids), r'experts need w13_scale \[8, 96\]'),
        'int8_w2_scale_shape': ((x, q13, q2, weights, ids, 'silu', s13, s2[:, :5]), r'experts need w2_scale \[8, 32\]'),
        'int8_w13_scale_shape': ((x, q13, q2, weights, ids, 'silu', s13.t(), s2), r'experts need w13_scale \[8, 96\]'),
        'int8_mixed': ((x, q13, w2, weights, ids, 'silu', s13, s2), r'w13 is torch.int8 but w2 is torch.float32'),
        'scales_on_float': ((x, w13, w2, weights, ids, 'silu', s13, s2), r'w13_scale is only for int8 or fp8 experts'),
        'weights_tokens': ((x, w13, w2, weights[:3], ids[:3]), r'weights must be \[tokens=4, top_k\]'),
        'ids_tokens': ((x, w13, w2, weights, ids[:3]), r'ids must be \[tokens=4, top_k\]'),
        'weights_vs_ids': ((x, w13, w2, weights, ids[:, :1]), r'weights \[4, 2\] and ids \[4, 1\] differ'),
        'ids_float': ((x, w13, w2, weights, ids.float()), r'ids must be int32 or int64'),
        'weights_int': ((x, w13, w2, ids, ids), r'weights must be floats'),
        'top_k_too_big': ((x, w13, w2, weights.repeat(1, 5), ids.repeat(1, 5)),
                          r'top_k \(10\) is larger than the number of experts \(8\)'),
        'activation': ((x, w13, w2, weights, ids, 'relu'), r"activation must be one of .*got 'relu'"),
    }


BAD = list(bad(*expert_inputs()))


@pytest.mark.parametrize('case', BAD)
def test_fused_experts_bad_input(case, nothing_runs):
    inputs = expert_inputs()
    args, message = bad(*inputs)[case]
    with pytest.raises(MoEError, match=message):
        fused_experts_triton(*args)
    with pytest.raises(MoEError, match=message):
        fused_experts(*args, backend='triton')


def test_reference_bad_input():
    "The reference checks the same things (but takes float64)."
    x, w13, w2, weights, ids = expert_inputs()
    for case, (args, message) in bad(x, w13, w2, weights, ids).items():
        if case == 'x_float64':
            experts_reference(*args)
            continue
        with pytest.raises(MoEError, match=message):
            experts_reference(*args)


def test_configs_must_share_block_m(nothing_runs):
    x, w13, w2, weights, ids = expert_inputs()
    with pytest.raises(MoEError, match=r'both configs must share BLOCK_M \(one alignment\), got 16 and 32'):
        fused_experts_triton(x, w13, w2, weights, ids, config=(cfg(16, 32, 32, 1), cfg(32, 32, 32, 1)))
    with pytest.raises(MoEError, match=r'both configs must share BLOCK_M'):                  # even with no tokens
        fused_experts_triton(x[:0], w13, w2, weights[:0], ids[:0], config=(cfg(64, 32, 32, 1), cfg(16, 32, 32, 1)))


def test_sparse_moe_bad_construction():
    with pytest.raises(MoEError, match=r'top_k must be an int from 1 to the number of experts \(8\), got 9'):
        SparseMoE(8, 32, 24, 9)
    with pytest.raises(MoEError, match=r"activation must be one of .*got 'relu'"):
        SparseMoE(8, 32, 24, 2, activation='relu')
    with pytest.raises(MoEError, match=r'pass scoring="sigmoid"'):
        SparseMoE(8, 32, 24, 2, num_groups=2)


@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_sparse_moe_router_of_another_size(backend, nothing_runs):
    """A router giving logits for 12 experts to a layer of 8 (a gate swapped or loaded from another layer): refused,
    naming the experts count, before any expert runs, rather than indexing experts that are not there."""
    layer = SparseMoE(8, 32, 24, 2, renormalize=True).to(DEVICE)
    for p in layer.parameters(): nn.init.normal_(p, std=0.2)
    layer.gate = nn.Linear(32, 12, bias=False).to(DEVICE)
    with torch.no_grad(): layer.gate.weight[8:] += 1.0         # the extra experts are chosen
    with pytest.raises(MoEError, match=r'(?s)(?=.*\b12\b)(?=.*\b8\b).*expert'):        # names both counts
        layer(randn(5, 32, seed=1), backend=backend)


def test_quantize_bad_input():
    with pytest.raises(MoEError, match=r'dtype must be one of'):
        quantize_experts(randn(2, 4, 8, seed=1), torch.float16)
    with pytest.raises(MoEError, match=r'w must be float experts \[experts, out, in\], got torch.float32 \[4, 8\]'):
        quantize_experts(randn(4, 8, seed=1))
    with pytest.raises(MoEError, match=r'w must be float experts'):
        quantize_experts(torch.zeros(2, 4, 8, dtype=torch.int8))


def test_align_bad_input():
    with pytest.raises(MoEError, match=r'ids must be int32 or int64 \[tokens, top_k\], got torch.int64 \[6\]'):
        align_triton(torch.zeros(6, dtype=torch.int64), 4, 16)
    with pytest.raises(MoEError, match=r'ids must be int32 or int64'):
        align_triton(torch.zeros(3, 2), 4, 16)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_ids_outside_the_layer_contribute_nothing(dtype):
    "Ids past the last expert are treated like -1 by both the kernel and the reference (nothing read out of bounds)."
    x, (w13, w2) = randn(9, 32, seed=3, dtype=dtype), experts(6, 32, 40, dtype, seed=3)
    weights, ids = random_routing(9, 6, 2, seed=3)
    ids[::2, 1] = 6 + torch.arange(0, 9, 2, device=ids.device) % 3
    kept = ids.clone()
    kept[::2, 1] = -1
    out = fused_experts_triton(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, fused_experts_triton(x, w13, w2, weights, kept), rtol=0, atol=0)
    assert rel_err(out, reference64(x, w13, w2, weights, ids)) < TOL[dtype]


# ------------------------------------------------------------------------------------------------- full size (GPU)

FULL_SHAPES = {'mixtral': (8, 4096, 14336, 2), 'qwen3': (128, 2048, 768, 8)}   # experts, hidden, intermediate, top_k
FULL_ROUTINGS = {'softmax, renormalized': dict(renormalize=True), 'softmax': dict(),
                 'sigmoid, grouped, bias': dict(scoring='sigmoid', renormalize=True, num_groups=4, topk_groups=2,
                                                correction_bias=True, scaling=2.5)}


@pytest.fixture(scope='module')
def full_layers():
    "Each full-size shape's random bf16 experts (and their float32 copies) and a router scaled like a trained one's."
    g = torch.Generator('cuda').manual_seed(11)
    made = {}
    for name, (E, H, I, k) in FULL_SHAPES.items():
        w13, w2 = random_experts(E, H, I, torch.bfloat16, 'cuda', g)
        made[name] = w13, w2, (torch.randn(E, H, generator=g, device='cuda') / H ** 0.5).bfloat16(), w13.float(), w2.float()
    return made


@pytest.mark.skipif(DEVICE != 'cuda', reason='full-size layers run on the GPU only')
@pytest.mark.parametrize('routing', list(FULL_ROUTINGS))
@pytest.mark.parametrize('shape', list(FULL_SHAPES))
def test_full_size_layers_match_reference(shape, routing, full_layers):
    """The Mixtral-8x7B and Qwen3-30B-A3B layers in bf16, every routing mode, 1 to 4,096 tokens (few tokens leave most
    experts empty; 1 to 4 take Qwen3's rows path, 1,024 and 4,096 its half tiles), some pairs routed elsewhere:
    the layer against the float32 reference on the same routing, ‖out − ref‖/‖ref‖ < 1e-2."""
    E, H, I, k = FULL_SHAPES[shape]
    w13, w2, gate, w13_f32, w2_f32 = full_layers[shape]
    with torch.device('cuda'): layer = SparseMoE(E, H, I, k, **FULL_ROUTINGS[routing])
    layer.w13.data, layer.w2.data, layer.gate.weight.data = w13, w2, gate
    if layer.correction_bias is not None: layer.correction_bias.data = torch.randn(E, device='cuda') * 0.1
    g = torch.Generator('cuda').manual_seed(E)
    with torch.no_grad():
        for T in (1, 2, 4, 16, 64, 256, 1024, 4096):
            x = torch.randn(T, H, generator=g, device='cuda').bfloat16()
            weights, ids = layer.route(x)
            out = layer(x)
            want = experts_reference(x.float(), w13_f32, w2_f32, weights, ids)
            assert out.dtype == torch.bfloat16 and rel_err(out, want) < 1e-2, (T, rel_err(out, want))
            ids[torch.rand(ids.shape, generator=g, device='cuda') < 0.2] = -1               # routed elsewhere
            out = fused_experts(x, w13, w2, weights, ids)
            want = experts_reference(x.float(), w13_f32, w2_f32, weights, ids)
            assert rel_err(out, want) < 1e-2, ('elsewhere', T, rel_err(out, want))
