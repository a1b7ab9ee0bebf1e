"""infer.sampling: the sampler against references (transformers' repetition penalty, literal loops, a plain-Python
filter, torch's log-softmax), its draws against reference probabilities by a χ² test, seeds, mixed batches and bad
input; the incremental detokenizer against `tokenizer.decode` with a real WordPiece tokenizer and a byte-level BPE
trained here; stop strings against a brute-force search. Everything is seeded: no test can fail by chance."""
import math
import random
import re

import pytest
import torch
from transformers import AutoTokenizer
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from infer.encoder import minilm_path
from infer.requests import RequestError, SamplingParams
from infer.sampling import (IncrementalDetokenizer, Sampler, SamplingBatch, SamplingError, apply_penalties, draw,
                            find_stop_string, keep_threshold, seeded_uniform)


# ------------------------------------------------------------------------------------------------- references

def reference_penalised(row: list[float], p: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    "The penalties one token at a time: repetition over prompt and output (HF's rule), then frequency and presence."
    row = list(row)
    for t in set(prompt) | set(output):
        if t < len(row): row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(output):
        row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return row


def reference_kept(scaled: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    "The tokens min-p, then top-k, then top-p keep, from the definitions; ties with the last kept token are kept."
    top = max(scaled)
    probs = [math.exp(s - top) for s in scaled]
    head = [i for i in sorted(range(len(scaled)), key=lambda i: -scaled[i]) if probs[i] >= min_p]
    head = head[:top_k] if top_k else head
    total, mass, kept = sum(probs[i] for i in head), 0.0, []
    for i in head:
        if top_p < 1 and mass >= top_p * total: break
        kept.append(i)
        mass += probs[i]
    return {i for i in range(len(scaled)) if scaled[i] >= scaled[kept[-1]]}


def reference_probs(row: list[float], p: SamplingParams, prompt=(), output=()) -> list[float]:
    "The distribution a row is drawn from, computed plainly in float64."
    row = reference_penalised(row, p, list(prompt), list(output))
    if p.temperature < 1e-5:
        best = max(range(len(row)), key=lambda i: row[i])
        return [float(i == best) for i in range(len(row))]
    scaled = [x / p.temperature for x in row]
    kept, top = reference_kept(scaled, p.top_k, p.top_p, p.min_p), max(scaled)
    weights = [math.exp(s - top) if i in kept else 0.0 for i, s in enumerate(scaled)]
    return [w / sum(weights) for w in weights]


def chi_square_ok(tokens: torch.Tensor, probs: list[float], alpha_z: float = 3.719) -> tuple[bool, str]:
    """Pearson's χ² goodness of fit of the drawn `tokens` to `probs`, at significance 1e-4 (z = 3.719), with bins of
    expected count below 5 pooled; the critical value by Wilson and Hilferty's approximation (within 1% for df >= 3).
    Tokens of probability 0 must never be drawn."""
    n, counts = len(tokens), torch.bincount(tokens, minlength=len(probs)).tolist()
    if any(c and not q for c, q in zip(counts, probs)): return False, 'a token of probability 0 was drawn'
    bins, pooled_o, pooled_e = [], 0, 0.0
    for c, q in zip(counts, probs):
        if q * n >= 5: bins.append((c, q * n))
        elif q: pooled_o, pooled_e = pooled_o + c, pooled_e + q * n
    if pooled_e: bins.append((pooled_o, pooled_e))
    stat, df = sum((o - e) ** 2 / e for o, e in bins), len(bins) - 1
    if df == 0: return True, 'one bin'
    critical = df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3
    return stat < critical, f'chi2={stat:.1f} df={df} critical={critical:.1f}'


def sample(params, logits, positions=None, prompts=None, outputs=None, generator_seed=0):
    positions = positions if positions is not None else [len(o) for o in outputs] if outputs else [0] * len(params)
    batch = SamplingBatch.from_params(params, positions, logits.shape[1], logits.device, prompts, outputs)
    return Sampler(torch.Generator().manual_seed(generator_seed))(logits, batch)


def random_histories(g, n, vocab, longest):
    return [torch.randint(0, vocab, (int(k),), generator=g).tolist() for k in torch.randint(0, longest, (n,), generator=g)]


# ------------------------------------------------------------------------------------------------- penalties

def test_repetition_penalty_matches_transformers():
    g = torch.Generator().manual_seed(0)
    V, n = 80, 24
    params = [SamplingParams(repetition_penalty=float(r)) for r in torch.rand(n, generator=g) * 2 + 0.2]
    prompts = [[t for t in h] + [V + 3] for h in random_histories(g, n, V, 30)]     # an id the head cannot emit: dropped
    outputs = random_histories(g, n, V, 20)
    logits = torch.randn(n, V, generator=g) * 3
    batch = SamplingBatch.from_params(params, [len(o) for o in outputs], V, 'cpu', prompts, outputs)
    got = apply_penalties(logits, batch.penalties)
    for i, p in enumerate(params):
        in_range = prompts[i][:-1] + outputs[i]        # older transformers index out of range with V + 3; newer drop it
        want = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([in_range]), logits[i:i + 1])
        torch.testing.assert_close(got[i], want[0], rtol=1e-6, atol=0)     # x / r against x * (1 / r): an ulp at most


def test_presence_and_frequency_match_a_loop():
    g = torch.Generator().manual_seed(1)
    V, n = 60, 20
    params = [SamplingParams(presence_penalty=float(a), frequency_penalty=float(b))
              for a, b in (torch.rand(n, 2, generator=g) * 4 - 2).tolist()]
    outputs = random_histories(g, n, V, 40)
    logits = torch.randn(n, V, generator=g) * 3
    got = apply_penalties(logits, SamplingBatch.from_params(params, [len(o) for o in outputs], V, 'cpu', [[]] * n, outputs).penalties)
    for i, p in enumerate(params):
        want = logits[i].clone()
        for t in outputs[i]: want[t] -= p.frequency_penalty                 # once per occurrence
        for t in set(outputs[i]): want[t] -= p.presence_penalty             # once per token
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-5)


def test_penalties_leave_the_logits_and_other_rows_alone():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 30, generator=g)
    before = logits.clone()
    params = [SamplingParams(), SamplingParams(repetition_penalty=2.0, presence_penalty=1.0), SamplingParams()]
    got = apply_penalties(logits, SamplingBatch.from_params(params, [2] * 3, 30, 'cpu', [[1, 2]] * 3, [[3, 4]] * 3).penalties)
    assert torch.equal(logits, before) and torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])
    assert not torch.equal(got[1], logits[1])


# ------------------------------------------------------------------------------------------------- greedy and logprobs

def test_greedy_is_argmax_of_the_penalised_logits():
    g = torch.Generator().manual_seed(3)
    V, n = 500, 32
    logits = torch.randn(n, V, generator=g) * 4
    assert torch.equal(sample([SamplingParams(temperature=0)] * n, logits).token_ids, logits.argmax(-1))
    params = [SamplingParams(temperature=0, repetition_penalty=3.0, frequency_penalty=1.5)] * n
    outputs = [logits[i].topk(3).indices.tolist() for i in range(n)]      # penalise the current favourites
    got = sample(params, logits, prompts=[[]] * n, outputs=outputs).token_ids
    want = [max(range(V), key=reference_penalised(logits[i].tolist(), params[i], [], outputs[i]).__getitem__) for i in range(n)]
    assert got.tolist() == want and not torch.equal(got, logits.argmax(-1))


def test_logprobs_are_the_raw_log_softmax():
    g = torch.Generator().manual_seed(4)
    V, n = 1000, 12
    logits = torch.randn(n, V, generator=g) * 5
    params = [SamplingParams(temperature=t, top_p=0.7, repetition_penalty=1.3, logprobs=k)
              for t, k in zip([0, 0.5, 1.2] * 4, [0, 3, 20, None] * 3)]
    out = sample(params, logits, prompts=[[1, 2, 3]] * n, outputs=[[4, 5]] * n)
    raw = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0], rtol=0, atol=1e-5)
    top = raw.sort(-1, descending=True)
    assert out.top_logprob_ids.shape == (n, 20) and torch.equal(out.top_logprob_ids, top.indices[:, :20])
    torch.testing.assert_close(out.top_logprobs, top.values[:, :20], rtol=0, atol=1e-5)
    only_chosen = sample([SamplingParams(logprobs=0)], logits[:1])
    assert only_chosen.logprobs is not None and only_chosen.top_logprobs is None and only_chosen.top_logprob_ids is None
    none = sample([SamplingParams()], logits[:1])
    assert none.logprobs is None and none.top_logprobs is None


def test_a_draw_on_a_boundary_never_picks_a_token_without_weight():
    "u × Σw landing exactly on a cumulative weight picks the token that ends there, not the cut one after it."
    scaled = torch.tensor([[0.0, -math.inf, 0.0], [0.0, 5.0, 0.0]])
    threshold = torch.tensor([[-1.0], [5.0]])
    got = draw(scaled, threshold, torch.tensor([0.5, 2.0 ** -53], dtype=torch.float64))
    assert got.tolist() == [0, 1]


# ------------------------------------------------------------------------------------------------- filters

FILTERS = [(1.0, 5, 1.0, 0.0), (0.7, 0, 0.9, 0.0), (1.3, 0, 1.0, 0.1), (0.5, 20, 0.6, 0.05), (1.0, 3, 0.95, 0.3),
           (2.0, 40, 0.3, 0.0), (0.9, 0, 0.5, 0.2), (1.0, 1, 1.0, 0.0), (1.0, 0, 0.01, 0.0), (1.0, 0, 1.0, 1.0)]


@pytest.mark.parametrize('only', [None, 'top_k', 'top_p', 'min_p'])
def test_filters_keep_exactly_what_the_reference_keeps(only):
    "Each filter alone and all mixed in one batch: the kept set of every row equals the plain reference's."
    g = torch.Generator().manual_seed(5)
    V = 64
    configs = [(t, k if only in (None, 'top_k') else 0, p if only in (None, 'top_p') else 1.0,
                m if only in (None, 'min_p') else 0.0) for t, k, p, m in FILTERS]
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in configs for _ in range(30)]
    logits = torch.randn(len(params), V, generator=g) * 2.5
    b = SamplingBatch.from_params(params, [0] * len(params), V, 'cpu')
    scaled = logits / b.temperature
    kept = scaled >= keep_threshold(scaled, b.top_k, b.max_top_k, b.top_p, b.min_p)
    for i, p in enumerate(params):
        want = reference_kept(scaled[i].tolist(), p.top_k, p.top_p, p.min_p)
        assert set(kept[i].nonzero().flatten().tolist()) == want, (i, p)


def test_filter_edges():
    V = 10
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.5, -80.0, -90.0, 0.0, 2.0, 1.0, -1.0]])
    def kept(**kw):
        b = SamplingBatch.from_params([SamplingParams(**kw)], [0], V, 'cpu')
        t = keep_threshold(logits, b.top_k, b.max_top_k, b.top_p, b.min_p)
        return None if t is None else set((logits[0] >= t[0]).nonzero().flatten().tolist())
    assert kept(top_k=V) is None and kept(top_k=V + 5) is None          # k >= vocab: no filter at all
    assert kept(top_k=3) == {0, 7, 1, 2, 8}                              # tokens tied with the 3rd are kept too
    assert kept(min_p=1.0) == {0}
    assert kept(top_k=V - 1) == set(range(V)) - {5}
    assert kept(top_p=0.999999, top_k=V - 1) == set(range(V)) - {4, 5}   # token 4's 1e-36 is past the nucleus
    b = SamplingBatch.from_params([SamplingParams(top_p=0.5), SamplingParams(top_p=1.0)], [0, 0], V, 'cpu')
    t = keep_threshold(logits.expand(2, -1), None, 0, b.top_p, None)
    assert (logits[0] >= t[1]).all()            # top_p = 1 keeps tokens whose probability (1e-36) a float sum ignores


# ------------------------------------------------------------------------------------------------- distributions

DISTRIBUTION_CASES = {
    'temperature 1': SamplingParams(),
    'temperature 0.6': SamplingParams(temperature=0.6),
    'temperature 1.8': SamplingParams(temperature=1.8),
    'top-k 4': SamplingParams(top_k=4),
    'top-p 0.7': SamplingParams(temperature=0.8, top_p=0.7),
    'min-p 0.15': SamplingParams(min_p=0.15),
    'all filters': SamplingParams(temperature=1.3, top_k=8, top_p=0.85, min_p=0.05),
    'penalties': SamplingParams(temperature=0.9, repetition_penalty=1.6, presence_penalty=0.5, frequency_penalty=0.3),
}
V_SMALL, N_DRAWS = 12, 40_000


def small_row(seed=6):
    return torch.randn(V_SMALL, generator=torch.Generator().manual_seed(seed)) * 1.5


@pytest.mark.parametrize('case', list(DISTRIBUTION_CASES))
def test_draws_follow_the_reference_distribution(case):
    p, row = DISTRIBUTION_CASES[case], small_row()
    prompt, output = [0, 1, 2], [2, 3, 3, 5]
    tokens = sample([p] * N_DRAWS, row.expand(N_DRAWS, -1).contiguous(), prompts=[prompt] * N_DRAWS,
                    outputs=[output] * N_DRAWS).token_ids
    ok, why = chi_square_ok(tokens, reference_probs(row.tolist(), p, prompt, output))
    assert ok, f'{case}: {why}'


@pytest.mark.parametrize('vary', ['seed', 'position'])
def test_seeded_draws_follow_the_reference_distribution(vary):
    "Draws over many seeds at one position, or over many positions of one seed, are distributed as they should be."
    p, row = SamplingParams(temperature=0.8, top_p=0.9), small_row(7)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=s if vary == 'seed' else 99) for s in range(N_DRAWS)]
    positions = [5] * N_DRAWS if vary == 'seed' else list(range(N_DRAWS))
    tokens = sample(params, row.expand(N_DRAWS, -1).contiguous(), positions=positions).token_ids
    ok, why = chi_square_ok(tokens, reference_probs(row.tolist(), p))
    assert ok, why


def test_seeded_uniform_is_a_pure_uniform_function():
    u = torch.tensor([seeded_uniform(s, 3) for s in range(50_000)], dtype=torch.float64)
    assert 0 < u.min() and u.max() < 1 and seeded_uniform(12, 3) == u[12].item()
    assert seeded_uniform(-1, 0) == seeded_uniform(2 ** 64 - 1, 0) and seeded_uniform(1, 0) != seeded_uniform(1, 1)
    ks = (u.sort().values - torch.arange(1, len(u) + 1) / len(u)).abs().max().item()
    assert ks < 1.95 / math.sqrt(len(u))               # Kolmogorov-Smirnov at significance 0.001


# ------------------------------------------------------------------------------------------------- seeds and batches

def test_a_seeded_row_draws_the_same_token_in_any_batch():
    g = torch.Generator().manual_seed(8)
    V = 300
    row, p, position = torch.randn(1, V, generator=g) * 2, SamplingParams(temperature=1.1, top_k=50, min_p=0.01, seed=42), 9
    alone = sample([p], row, positions=[position]).token_ids.item()
    kinds = [SamplingParams(temperature=0), SamplingParams(top_p=0.5), SamplingParams(seed=1, top_k=2),
             SamplingParams(temperature=0.3, min_p=0.2), SamplingParams()]
    for trial in range(20):
        size = int(torch.randint(1, 40, (), generator=g))
        where = int(torch.randint(0, size, (), generator=g))
        params = [kinds[int(i)] for i in torch.randint(0, len(kinds), (size,), generator=g)]
        params[where] = p
        logits = torch.randn(size, V, generator=g) * 2
        logits[where] = row[0]
        positions = torch.randint(0, 50, (size,), generator=g).tolist()
        positions[where] = position
        assert sample(params, logits, positions=positions, generator_seed=trial).token_ids[where].item() == alone
    tokens = {sample([p], row, positions=[q]).token_ids.item() for q in range(30)}
    assert len(tokens) > 5          # the position matters: its draws differ from token to token


def test_same_seeds_same_tokens_unseeded_rows_vary():
    g = torch.Generator().manual_seed(9)
    V, n = 1000, 64
    logits = torch.randn(n, V, generator=g)
    seeded = [SamplingParams(seed=s) for s in range(n)]
    first = Sampler()(logits, SamplingBatch.from_params(seeded, list(range(n)), V, 'cpu')).token_ids
    again = Sampler()(logits, SamplingBatch.from_params(seeded, list(range(n)), V, 'cpu')).token_ids
    assert torch.equal(first, again)
    torch.manual_seed(0)                        # unseeded rows draw from torch's generator: different calls differ
    unseeded = SamplingBatch.from_params([SamplingParams()] * n, [0] * n, V, 'cpu')
    a, b = Sampler()(logits, unseeded).token_ids, Sampler()(logits, unseeded).token_ids
    assert (a != b).sum() > n // 2


def test_a_mixed_batch_samples_each_row_as_alone():
    g = torch.Generator().manual_seed(10)
    V = 200
    rows = [SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=2),
            SamplingParams(seed=1), SamplingParams(temperature=0.5, seed=2, logprobs=0),
            SamplingParams(top_k=10, seed=3), SamplingParams(top_p=0.8, seed=4, logprobs=5),
            SamplingParams(min_p=0.1, seed=5), SamplingParams(temperature=1.4, top_k=30, top_p=0.9, min_p=0.02, seed=6),
            SamplingParams(repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.2, seed=7, top_p=0.95)]
    logits = torch.randn(len(rows), V, generator=g) * 2
    prompts, outputs = random_histories(g, len(rows), V, 20), random_histories(g, len(rows), V, 10)
    positions = [len(o) for o in outputs]
    together = sample(rows, logits, positions, prompts, outputs)
    for i, p in enumerate(rows):
        alone = sample([p], logits[i:i + 1], positions[i:i + 1], prompts[i:i + 1], outputs[i:i + 1])
        assert together.token_ids[i] == alone.token_ids[0], (i, p)
        if p.logprobs is not None: torch.testing.assert_close(together.logprobs[i], alone.logprobs[0], rtol=0, atol=1e-6)
    assert together.top_logprobs.shape == (len(rows), 5)


def test_unseeded_rows_in_a_mixed_batch_keep_their_distribution():
    "Rows of one unseeded configuration interleaved with greedy, seeded and other rows are still distributed right."
    row, p = small_row(11), SamplingParams(temperature=0.7, top_k=6, top_p=0.9)
    others = [SamplingParams(temperature=0), SamplingParams(seed=3, min_p=0.3), SamplingParams(top_p=0.2)]
    params = [p if i % 2 else others[i // 2 % 3] for i in range(2 * N_DRAWS)]
    logits = torch.randn(len(params), V_SMALL, generator=torch.Generator().manual_seed(12))
    logits[1::2] = row
    tokens = sample(params, logits).token_ids[1::2]
    ok, why = chi_square_ok(tokens, reference_probs(row.tolist(), p))
    assert ok, why


def test_fast_paths_build_only_what_is_used():
    class Untouchable(list):
        def __getitem__(self, i): raise AssertionError('a history was read for a row without a penalty')
    n = 256
    b = SamplingBatch.from_params([SamplingParams(temperature=0)] * n, [0] * n, 32_000, 'cpu', Untouchable(), Untouchable())
    assert b.all_greedy and b.temperature is None and b.penalties is None and not b.needs_logprobs
    b = SamplingBatch.from_params([SamplingParams(temperature=0.7)] * n, [0] * n, 32_000, 'cpu')
    assert b.all_random and b.random_rows is None and (b.top_k, b.top_p, b.min_p, b.seeded_rows) == (None,) * 4
    b = SamplingBatch.from_params([SamplingParams(min_p=0.1)] + [SamplingParams(temperature=0)] * 3, [0] * 4, 100, 'cpu')
    assert b.random_rows.tolist() == [0] and b.top_p is None and b.top_k is None and b.min_p is not None


def test_an_empty_step_samples_nothing():
    out = Sampler()(torch.empty(0, 10), SamplingBatch.from_params([], [], 10, 'cpu'))
    assert out.token_ids.shape == (0,) and out.logprobs is None


# ------------------------------------------------------------------------------------------------- bad input

def test_bad_input_gets_a_clear_error():
    b = SamplingBatch.from_params([SamplingParams()] * 2, [0, 0], 10, 'cpu')
    for logits, message in [(torch.randn(3, 10), 'built for 2 rows'), (torch.randn(2, 11), 'vocab_size=logits.shape[1]'),
                            (torch.randn(2, 10, dtype=torch.bfloat16), 'logits.float()'), (torch.randn(10), '2-d'),
                            ([[0.0] * 10] * 2, '2-d')]:
        with pytest.raises(SamplingError, match=re.escape(message)):
            Sampler()(logits, b)
    with pytest.raises(SamplingError, match='output_positions'):
        SamplingBatch.from_params([SamplingParams()], [], 10, 'cpu')
    with pytest.raises(SamplingError, match='pass output_token_ids'):
        SamplingBatch.from_params([SamplingParams(frequency_penalty=0.5)], [0], 10, 'cpu')
    with pytest.raises(SamplingError, match='pass prompt_token_ids'):
        SamplingBatch.from_params([SamplingParams(repetition_penalty=1.1)], [0], 10, 'cpu', None, [[1]])
    with pytest.raises(SamplingError, match='one per row'):
        SamplingBatch.from_params([SamplingParams(presence_penalty=0.5)] * 2, [0, 0], 10, 'cpu', None, [[1]])
    with pytest.raises(SamplingError, match='vocab_size'):
        SamplingBatch.from_params([SamplingParams()], [0], 0, 'cpu')


@pytest.mark.parametrize('bad, message', [
    (dict(repetition_penalty=0), 'repetition_penalty'), (dict(repetition_penalty=-1.0), 'repetition_penalty'),
    (dict(repetition_penalty=float('inf')), 'repetition_penalty'), (dict(presence_penalty=2.1), 'presence_penalty'),
    (dict(frequency_penalty=float('nan')), 'frequency_penalty'), (dict(frequency_penalty='0.5'), 'frequency_penalty'),
    (dict(temperature=float('inf')), 'temperature'), (dict(n=3, temperature=0), 'copies of one text'),
    (dict(top_p=0), 'top_p'), (dict(min_p=1.5), 'min_p'), (dict(top_k=-1), 'top_k'), (dict(logprobs=21), 'logprobs')])
def test_invalid_sampling_params_are_refused(bad, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**bad)


# ------------------------------------------------------------------------------------------------- detokenizer

BPE_TEXT = ("The quick brown fox jumps over the lazy dog. Voilà, déjà vu: ça coûte 5 €, naïve café! "
            "Größe, Übermaß und Fußgänger. Ελληνικά γράμματα και λέξεις. Русский текст для проверки. "
            "中文字符和汉字测试。日本語のテキストとひらがな、カタカナ。한국어 문장입니다. "
            "Emoji: 😀🎉🚀👍🏽 and math ∑∫√∞≈≠. ") * 3


@pytest.fixture(scope='module')
def bpe():
    "A byte-level BPE of 300 tokens trained on text in eight scripts: most non-ASCII characters span several tokens."
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([BPE_TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=['<s>', '</s>'],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope='module')
def wordpiece():
    return AutoTokenizer.from_pretrained(minilm_path())


def pushed_text(tokenizer, ids, rng, prompt=(), skip_special_tokens=True):
    "The detokenizer's pushes, in random chunks of 1 to 3 tokens, then its finish, concatenated; checks `text`."
    d, pieces, i = IncrementalDetokenizer(tokenizer, list(prompt), skip_special_tokens), [], 0
    while i < len(ids):
        step = rng.randint(1, 3)
        pieces.append(d.push(ids[i:i + step]))
        i += step
    pieces.append(d.finish())
    assert d.text == ''.join(pieces)
    return pieces


@pytest.mark.parametrize('skip', [True, False])
def test_detokenizer_matches_decode_on_random_wordpiece_sequences(wordpiece, skip):
    rng = random.Random(13)
    for _ in range(150):
        ids = [rng.randrange(wordpiece.vocab_size) for _ in range(rng.randint(1, 25))]
        ids += [rng.choice(wordpiece.all_special_ids)] if rng.random() < 0.5 else []
        rng.shuffle(ids)
        assert ''.join(pushed_text(wordpiece, ids, rng, skip_special_tokens=skip)) == wordpiece.decode(ids, skip_special_tokens=skip)


def test_detokenizer_matches_decode_on_random_byte_level_sequences(bpe):
    rng = random.Random(14)
    split = 0
    for _ in range(300):
        ids = [rng.randrange(bpe.get_vocab_size()) for _ in range(rng.randint(1, 30))]
        pieces = pushed_text(bpe, ids, rng)
        assert ''.join(pieces) == bpe.decode(ids)
        split += any(len(bpe.decode([t]).encode()) != len(bpe.id_to_token(t)) for t in ids)
    assert split > 100          # the sequences were full of byte tokens, not only whole characters


def test_detokenizer_never_shows_half_a_character(bpe):
    "On real text whose characters span tokens, no push holds a replacement character, and the pushes are the text."
    rng = random.Random(15)
    ids = bpe.encode(BPE_TEXT[:400]).ids
    assert any('\ufffd' in bpe.decode([t]) for t in ids)           # some tokens are halves of characters
    pieces = pushed_text(bpe, ids, rng)
    assert not any('\ufffd' in piece for piece in pieces) and ''.join(pieces) == BPE_TEXT[:400]


@pytest.mark.parametrize('which', ['bpe', 'wordpiece'])
def test_detokenizer_continues_the_prompt(which, request):
    "With the prompt as context, the prompt's text and the output's text make the text of both decoded together."
    tok = request.getfixturevalue(which)
    encode = (lambda s: tok.encode(s).ids) if which == 'bpe' else (lambda s: tok.encode(s, add_special_tokens=False))
    rng = random.Random(16)
    sentences = [s for s in BPE_TEXT[:700].split(' ') if s]
    for _ in range(40):
        a, b = rng.randrange(len(sentences) - 8), rng.randint(1, 6)
        prompt, output = encode(' '.join(sentences[a:a + 3])), encode(' ' + ' '.join(sentences[a + 3:a + 3 + b]))
        whole = tok.decode(prompt + output, skip_special_tokens=True)
        assert tok.decode(prompt, skip_special_tokens=True) + ''.join(pushed_text(tok, output, rng, prompt)) == whole


# ------------------------------------------------------------------------------------------------- stop strings

def test_stop_strings_are_found_where_they_first_appear():
    "Text arrives in random pieces; the first piece that completes a stop string reports it, cut at its earliest start."
    rng = random.Random(17)
    for _ in range(500):
        text = ''.join(rng.choice('ab.c') for _ in range(rng.randint(1, 40)))
        stops = tuple({''.join(rng.choice('ab.c') for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))})
        seen, found = '', None
        while len(seen) < len(text) and found is None:
            piece = text[len(seen):len(seen) + rng.randint(1, 5)]
            seen += piece
            found = find_stop_string(seen, stops, len(piece))
        hits = [(seen.find(s), s) for s in stops if s in seen]
        if found is None: assert not hits
        else:
            assert found[1] == min(h[0] for h in hits) and seen[found[1]:].startswith(found[0])


# ------------------------------------------------------------------------------------------------- on a GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_on_cuda_nothing_waits_for_the_device_and_tokens_agree_with_the_cpu():
    "Building the batch and sampling never copies from the device to the host; greedy and seeded rows draw as on the CPU."
    g = torch.Generator().manual_seed(18)
    V, n = 32_000, 64
    logits = torch.randn(n, V, generator=g) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.9, seed=1, logprobs=5),
              SamplingParams(top_k=40, min_p=0.05, seed=2), SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5, seed=3),
              SamplingParams(temperature=1.2)] * (n // 5) + [SamplingParams(seed=4)] * (n % 5)
    prompts, outputs = random_histories(g, n, V, 300), random_histories(g, n, V, 100)
    positions = [len(o) for o in outputs]
    cpu = Sampler()(logits, SamplingBatch.from_params(params, positions, V, 'cpu', prompts, outputs))
    on_gpu = logits.cuda()
    torch.cuda.set_sync_debug_mode('error')
    try:
        batch = SamplingBatch.from_params(params, positions, V, 'cuda', prompts, outputs)
        gpu = Sampler()(on_gpu, batch)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    deterministic = torch.tensor([p.temperature == 0 or p.seed is not None for p in params])
    same = (gpu.token_ids.cpu() == cpu.token_ids)[deterministic]
    assert same.float().mean() > 0.95, same.float().mean()      # a draw on the edge of a token may round the other way
    torch.testing.assert_close(gpu.top_logprobs.cpu(), cpu.top_logprobs, rtol=0, atol=1e-4)
