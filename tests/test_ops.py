"""infer.ops: each Triton kernel (in Triton's interpreter where there is no GPU: conftest.py sets TRITON_INTERPRET=1)
against its plain-torch reference on fresh random inputs, through the strided views the model passes, with odd sizes,
one token and none; the references against the model's old expressions; bad input; the kernel count of a whole model's
decode step. Where CUDA is, the same run on the GPU, plus CUDA-graph capture of every op.

Tolerances: float32 within 1e-6 of the largest |reference| (the kernels do the reference's operations, but sum a row's
squares in another order, and a GPU may fuse a product and a sum); float16/bfloat16 at most two units in the last place
of the larger value, on at most 1% of the elements (the kernels round at the places torch rounds, but a float32 value
that differs in its last bits, a sum or an exponential, can straddle a rounding boundary: one unit, or two once that
rounded value is multiplied by the norm's weight or by `up`). Measured here: bf16 bit-identical but for about one
element in 50,000, fp16's SiLU one in 5,000."""
import os

import pytest
import torch
import torch.nn.functional as F

from infer import models
from infer.models import load_model, step_context, tiny_model
from infer.attention import store_kv
from infer.ops import (OpError, _cast, apply_rotary_, apply_rotary_and_store_, apply_rotary_reference_,
                       apply_rotary_triton_, argmax_rows_reference, argmax_rows_triton, count_kernels, rms_norm,
                       rms_norm_reference, rms_norm_triton, rotate, silu_and_mul, silu_and_mul_reference,
                       silu_and_mul_triton)
from infer.ops import triton, tl
from infer.paging import KVCache

DEVICE = 'cuda' if torch.cuda.is_available() and os.environ.get('TRITON_INTERPRET', '0') == '0' else 'cpu'
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def randn(*shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype).to(DEVICE)


def ulp(x):
    "The spacing of x's dtype at |x|, in float64."
    mantissa = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[x.dtype]
    return torch.exp2(torch.floor(torch.log2(x.double().abs().clamp_min(torch.finfo(x.dtype).tiny))) - mantissa)


def assert_close(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    assert not out.isnan().any()
    if not out.numel(): return
    diff = (out.double() - ref.double()).abs()
    if out.dtype == torch.float32:
        assert diff.max() <= 1e-6 * ref.abs().max().clamp_min(1e-30), f'max |diff| {diff.max():.2e}'
        return
    assert (diff <= 2 * torch.maximum(ulp(out), ulp(ref))).all(), f'max |diff| {diff.max():.2e}: more than two ulps'
    assert (diff > 0).float().mean() <= 0.01, f'{(diff > 0).float().mean():.2%} of the elements differ'


def qkv_views(qkv, H, KVH, D):
    T = qkv.shape[0]
    return qkv[:, :H * D].view(T, H, D), qkv[:, H * D:(H + KVH) * D].view(T, KVH, D)


def rope_table(max_positions, D, dtype, theta=10000.0):
    freqs = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    angles = torch.arange(max_positions).float()[:, None] * freqs
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype).to(DEVICE)


# ------------------------------------------------------------------------------------------------- RMSNorm

def norm_inputs(layout, T, D, dtype, seed):
    "x, residual and weight: x [T, D] dense, rows of a wider matrix, or the heads of a QKV output [T, 3, D]."
    if layout == 'dense':
        x, res = randn(T, D, seed=seed, dtype=dtype), randn(T, D, seed=seed + 1, dtype=dtype)
    elif layout == 'rows':          # every other row of a matrix twice as wide
        x = randn(2 * T, D + 8, seed=seed, dtype=dtype)[::2, 3:3 + D]
        res = randn(T, 2 * D, seed=seed + 1, dtype=dtype)[:, D:]
    else:                           # heads: [T, 3, D] inside rows of (3 + 2) * D, as Qwen3's QK-norm reads them
        x = randn(T, 5 * D, seed=seed, dtype=dtype)[:, :3 * D].view(T, 3, D)
        res = randn(T, 4 * D, seed=seed + 1, dtype=dtype)[:, D:].view(T, 3, D)
    w = randn(D, seed=seed + 2, dtype=dtype, scale=0.1) + 1
    return x, res, w


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('layout', ['dense', 'rows', 'heads'])
@pytest.mark.parametrize('T, D', [(7, 24), (1, 80), (3, 128), (2, 896), (0, 64)])
def test_rms_norm(T, D, layout, dtype):
    x, res, w = norm_inputs(layout, T, D, dtype, seed=D + T)
    x_before, res_before = x.clone(), res.clone()
    assert_close(rms_norm_triton(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    out, new_res = rms_norm_triton(x, w, 1e-5, res)
    want, want_res = rms_norm_reference(x, w, 1e-5, res)
    assert_close(out, want)
    assert torch.equal(new_res, want_res)                    # one rounded add: exact
    assert torch.equal(x, x_before) and torch.equal(res, res_before)


def test_rms_norm_many_rows_per_program():
    "Short rows are packed many to a program (here 32 of 128); a row count that is not a multiple of that."
    x, w = randn(45, 128, seed=1), randn(128, seed=2)
    assert_close(rms_norm_triton(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


def test_rms_norm_reference_is_the_old_model_code():
    "The reference is, operation for operation, what infer.models (and transformers) computed: bit-exact in bf16."
    x, res = (randn(6, 64, seed=s, dtype=torch.bfloat16) for s in range(2))
    w = randn(64, seed=2, dtype=torch.bfloat16)
    h = (x + res).float()
    want = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    out, new_res = rms_norm(x, w, 1e-6, res, backend='torch')
    assert torch.equal(out, want) and torch.equal(new_res, x + res)


# ------------------------------------------------------------------------------------------------- rotary

@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('T, H, KVH, D', [(5, 4, 2, 24), (1, 14, 2, 64), (3, 5, 1, 80), (2, 8, 8, 128), (0, 4, 2, 64)])
def test_apply_rotary(T, H, KVH, D, dtype):
    qkv = randn(T, (H + 2 * KVH) * D, seed=T + H + D, dtype=dtype)
    original, mine = qkv.clone(), qkv.clone()
    positions = torch.randint(0, 300, (T,), generator=torch.Generator().manual_seed(D)).to(DEVICE)
    table = rope_table(300, D, dtype)
    apply_rotary_reference_(*qkv_views(qkv, H, KVH, D), table, positions)
    q, k = apply_rotary_triton_(*qkv_views(mine, H, KVH, D), table, positions)
    assert q.data_ptr() == mine.data_ptr() and k.data_ptr() == mine[:, H * D:].data_ptr()     # in place
    assert_close(mine, qkv)
    assert torch.equal(mine[:, (H + KVH) * D:], original[:, (H + KVH) * D:])                 # values untouched


@pytest.mark.parametrize('q_dtype, table_dtype', [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
                         ids=str)
def test_apply_rotary_mixed_dtypes(q_dtype, table_dtype):
    "A float32 table with bf16 heads: torch computes in float32 and rounds once, and so does the kernel."
    qkv = randn(4, 8 * 32, seed=3, dtype=q_dtype)
    mine, positions, table = qkv.clone(), torch.tensor([0, 7, 99, 3], device=DEVICE, dtype=torch.int32), \
        rope_table(100, 32, table_dtype)
    apply_rotary_reference_(*qkv_views(qkv, 4, 2, 32), table, positions)
    apply_rotary_triton_(*qkv_views(mine, 4, 2, 32), table, positions)
    assert_close(mine, qkv)


def test_apply_rotary_reference_is_the_old_model_code():
    q, k = randn(5, 4, 32, seed=1, dtype=torch.bfloat16), randn(5, 2, 32, seed=2, dtype=torch.bfloat16)
    positions, table = torch.tensor([0, 1, 5, 2, 9], device=DEVICE), rope_table(10, 32, torch.bfloat16)
    cos, sin = table[positions].unsqueeze(1).chunk(2, dim=-1)
    x1, x2 = q.chunk(2, dim=-1)
    want_q = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    want_k = rotate(k, cos, sin)
    q, k = apply_rotary_(q, k, table, positions, backend='torch')
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_apply_rotary_at_position_zero_is_the_identity():
    q, k = randn(3, 2, 16, seed=1), randn(3, 1, 16, seed=2)
    q0, k0 = q.clone(), k.clone()
    apply_rotary_triton_(q, k, rope_table(4, 16, torch.float32), torch.zeros(3, dtype=torch.int64, device=DEVICE))
    assert torch.equal(q, q0) and torch.equal(k, k0)


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('T, H, KVH, D, bs', [(5, 4, 2, 24, 4), (1, 14, 2, 64, 16), (3, 5, 1, 80, 8), (0, 4, 2, 64, 16)])
def test_apply_rotary_and_store(T, H, KVH, D, bs, dtype):
    """One kernel gives the bits of the two Triton kernels one after the other, and what the references give: q and
    k rotated in place, the rotated keys and the values in the cache at their slots (-1: nowhere)."""
    qkv = randn(T, (H + 2 * KVH) * D, seed=T + H + D + 1, dtype=dtype)
    positions = torch.randint(0, 300, (T,), generator=torch.Generator().manual_seed(D)).to(DEVICE)
    slots = torch.randperm(4 * bs, generator=torch.Generator().manual_seed(T))[:T].to(DEVICE)
    if T > 1: slots[1] = -1
    table, results = rope_table(300, D, dtype), []
    for how in ('fused', 'two kernels', 'references'):
        x, cache = qkv.clone(), torch.zeros(2, 5, bs, KVH, D, dtype=dtype, device=DEVICE)
        (q, k), v = qkv_views(x, H, KVH, D), x[:, (H + KVH) * D:].view(T, KVH, D)
        if how == 'fused': apply_rotary_and_store_(q, k, v, table, positions, cache[0], cache[1], slots, backend='triton')
        elif how == 'two kernels':
            apply_rotary_triton_(q, k, table, positions)
            store_kv(k, v, cache[0], cache[1], slots, backend='triton')
        else: apply_rotary_and_store_(q, k, v, table, positions, cache[0], cache[1], slots, backend='torch')
        results.append((x, cache))
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))
    for a, b in zip(results[0], results[2]): assert_close(a, b)
    filled = results[0][1].flatten(1, 2).abs().sum((-2, -1)) != 0               # [K/V, slot]
    assert filled.sum() == 2 * (T - 1 if T > 1 else T)                          # every token but slot -1's


def test_apply_rotary_and_store_with_fewer_slots_than_tokens():
    "Padding tokens past the slots are rotated but stored nowhere, as store_kv leaves them."
    qkv = randn(4, 8 * 16, seed=5)
    table, positions, slots = rope_table(20, 16, torch.float32), torch.tensor([1, 2, 3, 4], device=DEVICE), \
        torch.tensor([5, 6], device=DEVICE)
    results = []
    for backend in ('triton', 'torch'):
        x, cache = qkv.clone(), torch.zeros(2, 3, 4, 2, 16, device=DEVICE)
        (q, k), v = qkv_views(x, 4, 2, 16), x[:, 6 * 16:].view(4, 2, 16)
        apply_rotary_and_store_(q, k, v, table, positions, cache[0], cache[1], slots, backend=backend)
        results.append((x, cache))
    for a, b in zip(*results): assert_close(a, b)
    assert results[0][1].flatten(1, 2)[:, 7:].abs().sum() == 0


# ------------------------------------------------------------------------------------------------- SiLU-and-mul

@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('T, I', [(3, 24), (1, 80), (2, 896), (2, 1500), (0, 64)])
@pytest.mark.parametrize('strided', [False, True], ids=['dense', 'rows'])
def test_silu_and_mul(T, I, strided, dtype):
    x = randn(T, 2 * I + (16 if strided else 0), seed=T + I, dtype=dtype, scale=3.0)[:, :2 * I]
    before = x.clone()
    assert_close(silu_and_mul_triton(x), silu_and_mul_reference(x))
    assert torch.equal(x, before)


def test_silu_and_mul_reference_is_the_old_model_code():
    x = randn(4, 64, seed=1, dtype=torch.bfloat16)
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(silu_and_mul(x, backend='torch'), F.silu(gate) * up)


# ------------------------------------------------------------------------------------------------- rounding

if triton is not None:
    @triton.jit
    def _cast_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, BY_HAND: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out_ptr + i, _cast(tl.load(x_ptr + i, mask=i < n), out_ptr.dtype.element_ty, BY_HAND), mask=i < n)


@pytest.mark.skipif(triton is None, reason='needs triton')
def test_cast_rounds_to_nearest_even():
    """The kernels' float32 -> bf16 rounding matches torch's: to nearest, ties to even (the interpreter alone would
    truncate), on random values and on exact ties."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80C000, 0xBF808000, 0x3F807FFF, 0x7F7FFFFF, 0x00808000],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([bits, torch.randn(500, generator=torch.Generator().manual_seed(0)) * 100]).to(DEVICE)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _cast_kernel[(1,)](x, out, x.numel(), BLOCK=1024, BY_HAND=DEVICE == 'cpu')
    assert torch.equal(out, x.to(torch.bfloat16))


# ------------------------------------------------------------------------------------------------- dispatch and errors

def test_backend_choice():
    x, w = randn(3, 32, seed=1), randn(32, seed=2)
    assert torch.equal(rms_norm(x, w, 1e-6, backend='torch'), rms_norm_reference(x, w, 1e-6))
    assert_close(rms_norm(x, w, 1e-6, backend='triton'), rms_norm_reference(x, w, 1e-6))
    with pytest.raises(ValueError, match="backend must be 'triton' or 'torch'"):
        silu_and_mul(x, backend='cuda')


def test_float64_only_in_the_reference():
    x, w = randn(3, 32, seed=1, dtype=torch.float64), randn(32, seed=2, dtype=torch.float64)
    assert rms_norm(x, w, 1e-6, backend='torch').dtype == torch.float64
    with pytest.raises(OpError, match='float64 only with backend="torch"'):
        rms_norm(x, w, 1e-6, backend='triton')


def bad_input_cases() -> dict:
    "Each case: (op, its arguments, the error it must give, or None for a control case that is accepted)."
    X, W = torch.randn(3, 64, device=DEVICE), torch.ones(64, device=DEVICE)
    QKV = torch.randn(3, 4 * 64, device=DEVICE)
    Q, K = QKV[:, :128].view(3, 2, 64), QKV[:, 128:192].view(3, 1, 64)
    TABLE, POS = torch.randn(8, 64, device=DEVICE), torch.arange(3, device=DEVICE)
    return {
        'norm 1-d': (rms_norm, (X[0], W, 1e-6), r'x must be \[rows, D\] or \[tokens, heads, D\], got torch.float32 \[64\]'),
        'norm weight size': (rms_norm, (X, torch.ones(32, device=DEVICE), 1e-6), r'weight must be \[D=64\]'),
        'norm weight dtype': (rms_norm, (X, W.half(), 1e-6), 'weight is torch.float16 but x is torch.float32; cast the model'),
        'norm eps': (rms_norm, (X, W, -1.0), 'eps must be a number >= 0'),
        'norm residual shape': (rms_norm, (X, W, 1e-6, X[:2]), r'residual \[2, 64\] and x \[3, 64\] must have the same shape'),
        'norm residual dtype': (rms_norm, (X, W, 1e-6, X.half()), 'residual is torch.float16; use one of torch.float32'),
        'norm strided last dim': (rms_norm, (X.t(), torch.ones(3, device=DEVICE), 1e-6), "x's last dim must be contiguous"),
        'norm int': (rms_norm, (X.int(), W.int(), 1e-6), 'x is torch.int32; use one of'),
        'rope tokens': (apply_rotary_, (Q, K[:2], TABLE, POS), 'must have the same tokens and head_dim'),
        'rope k dtype': (apply_rotary_, (Q, K.half(), TABLE, POS), 'k is torch.float16; use one of torch.float32'),
        'rope strided last dim': (apply_rotary_, (Q.transpose(1, 2), K.transpose(1, 2), TABLE[:, :2], POS),
                                  "q's last dim must be contiguous"),
        'rope narrower head (valid)': (apply_rotary_, (Q[..., :62], K[..., :62], TABLE[:, :62], POS), None),
        'rope odd head_dim': (apply_rotary_, (QKV[:, :126].view(3, 2, 63), QKV[:, 126:189].view(3, 1, 63),
                                              TABLE[:, :63], POS), 'head_dim must be even'),
        'rope table': (apply_rotary_, (Q, K, TABLE[:, :32], POS), r'cos_sin is \[max_positions, 32\] but head_dim is 64'),
        'rope float positions': (apply_rotary_, (Q, K, TABLE, POS.float()), r'positions must be an int64 tensor \[tokens=3\]'),
        'rope positions count': (apply_rotary_, (Q, K, TABLE, POS[:2]), r'positions must be an int64 tensor \[tokens=3\]'),
        'rope 2-d q': (apply_rotary_, (Q[0], K, TABLE, POS), r'q must be \[tokens, heads, head_dim\]'),
        'silu odd': (silu_and_mul, (torch.randn(3, 7, device=DEVICE),), 'last dim must be even'),
        'silu 3-d': (silu_and_mul, (torch.randn(3, 2, 8, device=DEVICE),), r'x must be \[tokens, 2 \* intermediate\]'),
    }


@pytest.mark.parametrize('backend', ['torch', 'triton'])
@pytest.mark.parametrize('case', list(bad_input_cases()))
def test_bad_input(case, backend):
    "Both backends refuse the same inputs with the same message, before writing anything."
    fn, args, message = bad_input_cases()[case]
    if message is None:                     # the control case: accepted
        fn(*args, backend=backend)
        return
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    before = [a.clone() for a in tensors]
    with pytest.raises(OpError, match=message):
        fn(*args, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))


@cuda
def test_device_mismatch():
    with pytest.raises(OpError, match='is on cpu but the other inputs are on cuda'):
        rms_norm(torch.randn(3, 8, device='cuda'), torch.ones(8, device='cuda'), 1e-6, torch.randn(3, 8))


# ------------------------------------------------------------------------------------------------- greedy argmax

@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('rows, vocab', [(1, 300), (4, 4096), (3, 2 * 4096 + 5), (2, 17), (0, 50)])
def test_argmax_rows(rows, vocab, dtype):
    "Fresh random logits with a tie planted at each row's top (across chunks where there are two): the first index wins."
    x = randn(rows, vocab, seed=rows + vocab, dtype=dtype)
    if rows:
        top = x.max() + 1
        x[0, [vocab // 2, vocab - 1]] = top                # a tie: the earlier index
        if rows > 1: x[-1, [3, min(vocab - 1, 4096 + 3)]] = top     # in two chunks when there are two
    out = argmax_rows_triton(x)
    assert out.dtype == torch.int64 and torch.equal(out, argmax_rows_reference(x))
    if rows: assert out[0] == vocab // 2 and (rows == 1 or out[-1] == 3)


def test_argmax_rows_all_minus_infinity_and_strided():
    "A row of -inf gives index 0, as torch.argmax does; a row-strided view (every other row) reads only its rows."
    x = torch.full((2, 5000), float('-inf'), device=DEVICE)
    assert argmax_rows_triton(x).tolist() == [0, 0]
    y = randn(6, 700, seed=3)[::2]
    assert torch.equal(argmax_rows_triton(y), y.argmax(-1))


# ------------------------------------------------------------------------------------------------- kernels per step

@pytest.mark.parametrize('arch, per_layer', [('Qwen2ForCausalLM', 9), ('Qwen3ForCausalLM', 11)])
def test_decode_step_kernel_count(arch, per_layer, tmp_path, monkeypatch):
    """A decode step of a dense model launches, per layer: two norms (each with the residual add), four GEMMs, the
    rotation with the cache store, attention and SiLU-and-mul, plus Qwen3's two QK-norms; around them the embedding and
    the final norm. Every launch counted: torch operations that compute, and Triton kernels. The projections are
    counted as a GPU runs them, one `F.linear` each: on the CPU, `linear` wraps MKL's product in a copy or two."""
    monkeypatch.setattr(models, 'linear', torch.nn.functional.linear)
    model = load_model(tiny_model(arch, tmp_path, tokenizer=False, num_hidden_layers=3), device=DEVICE)
    cache = KVCache(model.kv_cache_spec(4), 8, DEVICE)
    caches = [(cache.key(i), cache.value(i)) for i in range(3)]
    ctx = step_context([1], [6], torch.tensor([[1, 2]], dtype=torch.int32), torch.tensor([9]), caches, backend='triton')
    ids, positions = torch.tensor([5], device=DEVICE), torch.tensor([5], device=DEVICE)
    with torch.no_grad(), count_kernels() as counter:
        model(ids, positions, ctx)
    assert counter.total == 2 + per_layer * 3, (counter.torch_ops, counter.triton_launches)


# ------------------------------------------------------------------------------------------------- CUDA graphs

@cuda
def test_ops_are_cuda_graph_capturable():
    "Capture the three ops in one graph, replay on new inputs written into the same tensors, compare with eager."
    x, res = (randn(4, 896, seed=s, dtype=torch.bfloat16) for s in range(2))
    w = randn(896, seed=2, dtype=torch.bfloat16)
    qkv, table = randn(4, 18 * 64, seed=4, dtype=torch.bfloat16), rope_table(64, 64, torch.bfloat16)
    positions, gate_up = torch.tensor([1, 5, 9, 63], device='cuda'), randn(4, 2 * 4864, seed=5, dtype=torch.bfloat16)

    def step():
        out, new_res = rms_norm(x, w, 1e-6, res)
        apply_rotary_(*qkv_views(qkv, 14, 2, 64), table, positions)
        return out, new_res, silu_and_mul(gate_up)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream): step()                        # compile
    torch.cuda.current_stream().wait_stream(stream)
    start = qkv.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph): captured = step()
    for seed in (10, 20):
        for t, s in ((x, seed), (res, seed + 1), (gate_up, seed + 2)):
            t.copy_(randn(*t.shape, seed=s, dtype=torch.bfloat16))
        qkv.copy_(start)
        positions.copy_(torch.randint(0, 64, (4,), device='cuda'))
        graph.replay()
        replayed = [t.clone() for t in captured] + [qkv.clone()]
        qkv.copy_(start)
        eager = list(step()) + [qkv]
        assert all(torch.equal(a, b) for a, b in zip(replayed, eager))
