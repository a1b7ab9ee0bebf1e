"""The engine against transformers: greedy tokens and logprobs for every supported architecture, however the work is cut up.

For each architecture a tiny random model (`infer.models.tiny_model`, fixed seed) is saved as a safetensors folder;
transformers' `generate` runs each prompt alone (no padding), greedy, 32 new tokens, in float32 on the CPU, and
infer's `LLM.generate` runs all prompts together with prefix caching on and off, with chunked prefill (a budget of
16 tokens a step) and with a cache so small that requests are preempted. Tokens must be equal; the logprob of each
chosen token within 1e-4 of transformers' log-softmax (float32 sums in another order).
"""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from infer.engine import LLM, EngineError, graph_token_counts
from infer.models import SUPPORTED_ARCHITECTURES, tiny_model
from infer.requests import SamplingParams

NEW_TOKENS = 32


@pytest.fixture(scope='module', params=sorted(SUPPORTED_ARCHITECTURES))
def case(request, tmp_path_factory):
    folder = tiny_model(request.param, tmp_path_factory.mktemp(request.param), seed=0)
    vocab = json.loads((folder / 'config.json').read_text())['vocab_size']
    rng = np.random.default_rng(1)
    base = rng.integers(3, vocab, size=40).tolist()
    prompts = [base[:7], base + rng.integers(3, vocab, size=9).tolist(), rng.integers(3, vocab, size=23).tolist(), base[:33]]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference = []
    with torch.inference_mode():
        for p in prompts:
            g = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
            tokens = g.sequences[0, len(p):].tolist()
            lp = torch.stack(g.logits)[:, 0].float().log_softmax(-1)
            reference.append((tokens, [lp[i, t].item() for i, t in enumerate(tokens)]))
    return folder, prompts, reference


SETUPS = {
    'prefix-caching': dict(),
    'no-prefix-caching': dict(enable_prefix_caching=False),
    'chunked-prefill': dict(max_num_batched_tokens=16),
    'preemption': dict(block_size=4, num_blocks=24, max_num_batched_tokens=32, max_model_len=92),
    # one step ahead, as on a GPU: each step is launched before the previous one's tokens reach the host
    'async-chunked-prefill': dict(max_num_batched_tokens=16, async_scheduling=True),
    'async-preemption': dict(block_size=4, num_blocks=24, max_num_batched_tokens=32, max_model_len=92, async_scheduling=True),
}


@pytest.mark.parametrize('setup', sorted(SETUPS))
def test_same_tokens_as_transformers(case, setup):
    folder, prompts, reference = case
    llm = LLM(folder, dtype='float32', device='cpu', **SETUPS[setup])
    preempted = []
    if 'preemption' in setup:
        inner = llm.engine.scheduler._preempt
        llm.engine.scheduler._preempt = lambda r: (preempted.append(r.request_id), inner(r))
    for _ in range(2):                     # the second round finds the prompts in the prefix cache
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=0), use_tqdm=False)
        for out, (tokens, logprobs) in zip(outs, reference):
            assert out.outputs[0].token_ids == tokens
            got = [next(iter(d.values())) for d in out.outputs[0].logprobs]
            np.testing.assert_allclose(got, logprobs, atol=1e-4)
    if 'preemption' in setup: assert preempted, 'the small cache should force preemption'
    if setup == 'prefix-caching': assert outs[1].num_cached_tokens >= 32      # its first blocks, from the first round
    llm.engine.kv.audit()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_usable


def test_bad_requests_leave_the_rest_alone(case):
    folder, prompts, reference = case
    llm = LLM(folder, dtype='float32', device='cpu')
    vocab = llm.engine.vocab_size
    bad = [[], [vocab], [-1, 3], [4] * (llm.engine.config.max_model_len + 1), 'text' if llm.tokenizer is None else 12]
    outs = llm.generate([prompts[0]] + bad + [prompts[1]], SamplingParams(max_tokens=NEW_TOKENS, temperature=0), use_tqdm=False)
    assert outs[0].outputs[0].token_ids == reference[0][0] and outs[-1].outputs[0].token_ids == reference[1][0]
    for out in outs[1:-1]: assert out.finished and out.error and not out.outputs
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_usable
    with pytest.raises(EngineError, match='in use'):
        llm.engine.add_request('x', prompts[0])
        llm.engine.add_request('x', prompts[1])
    llm.engine.abort_request('x')
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a CUDA GPU (the notebook records the H200 run)')
def test_cuda_graphs_give_the_tokens_of_eager_and_transformers(case):
    """On a GPU, float32: steps replayed from CUDA graphs, decode steps and steps with prompts (dense and MoE models),
    give eager's tokens and transformers', also with chunked prefill, preemption and prefix-cache hits."""
    folder, prompts, reference = case
    memory = dict(kv_cache_memory=64 << 20)       # several engines share the GPU in this process
    graphs = LLM(folder, dtype='float32', device='cuda', max_num_seqs=8, **memory)
    eager = LLM(folder, dtype='float32', device='cuda', max_num_seqs=8, enforce_eager=True, **memory)
    assert not eager.engine.runner.graphs and not eager.engine.runner.prefill_graphs
    assert sorted(graphs.engine.runner.graphs) == [1, 2, 4, 8]
    assert sorted(graphs.engine.runner.prefill_graphs) == graph_token_counts(8192)
    replayed = count_prefill_replays(graphs)
    for batch in (1, 3, 4):
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
        a = [o.outputs[0].token_ids for o in graphs.generate(prompts[:batch], params, use_tqdm=False)]
        b = [o.outputs[0].token_ids for o in eager.generate(prompts[:batch], params, use_tqdm=False)]
        assert a == b == [t for t, _ in reference[:batch]]
    assert replayed and graphs.engine.kv.num_free_blocks == graphs.engine.kv.pool.num_usable
    for setup in ('chunked-prefill', 'preemption'):
        llm = LLM(folder, dtype='float32', device='cuda', max_num_seqs=8,
                  **({} if 'num_blocks' in SETUPS[setup] else memory), **SETUPS[setup])
        replayed = count_prefill_replays(llm)
        for _ in range(2):                 # the second round finds the prompts in the prefix cache
            outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0), use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == [t for t, _ in reference]
        assert replayed and llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_usable


def count_prefill_replays(llm) -> list:
    "A list that grows by one at each replay of a graph of a step with prompts."
    runner, calls = llm.engine.runner, []
    replay = runner._replay_prefill
    runner._replay_prefill = lambda *a, **k: (calls.append(1), replay(*a, **k))[1]
    return calls


def test_repetition_penalty_and_top_logprobs_match_transformers(case):
    "Greedy with a repetition penalty gives transformers' tokens; top-5 logprobs are its log-softmax's top 5 (1e-4)."
    folder, prompts, _ = case
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    llm = LLM(folder, dtype='float32', device='cpu')
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.8, logprobs=5),
                        use_tqdm=False)
    with torch.inference_mode():
        for p, out in zip(prompts, outs):
            g = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, repetition_penalty=1.8,
                               output_logits=True, return_dict_in_generate=True)
            assert out.outputs[0].token_ids == g.sequences[0, len(p):].tolist()
            for step, entry in zip(torch.stack(g.logits)[:, 0].float().log_softmax(-1), out.outputs[0].logprobs):
                top = step.topk(5)
                got = sorted(((v, t) for t, v in entry.items()), reverse=True)[:5]
                np.testing.assert_allclose([v for v, _ in got], top.values.tolist(), atol=1e-4)
                assert set(top.indices.tolist()) <= set(entry)


def test_async_scheduling_gives_the_outputs_of_in_order_steps(case):
    """One step ahead (each step launched before the previous step's tokens are applied) changes no output: stop token
    ids, stop strings, seeded sampling with n=2 and top logprobs, min-p/top-p; streaming gives the same tokens; an abort
    mid-stream leaves the others alone and the cache full."""
    folder, prompts, reference = case
    options = dict(dtype='float32', device='cpu', max_num_batched_tokens=24)
    in_order, ahead = LLM(folder, **options), LLM(folder, async_scheduling=True, **options)
    assert not in_order.engine.async_scheduling and ahead.engine.async_scheduling
    tokens = [t for t, _ in reference]
    params = [SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[tokens[0][5]]),
              SamplingParams(max_tokens=20, temperature=0.8, top_k=20, seed=7, n=2, logprobs=3),
              SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, min_p=0.05, seed=3),
              SamplingParams(max_tokens=20, temperature=0)]
    if in_order.tokenizer is not None:
        text = in_order.tokenizer.decode(tokens[3][:10], skip_special_tokens=True)
        if text.strip(): params[3] = SamplingParams(max_tokens=20, temperature=0, stop=[text.strip()[-2:]])

    def outputs(llm):
        return [(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs)
                for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]

    expected, got = outputs(in_order), outputs(ahead)
    assert expected[0][2] == 'stop' and len(expected[0][0]) <= 6
    assert [g[:4] for g in got] == [e[:4] for e in expected]
    for g, e in zip(got, expected):        # the batches differ (a finished request runs one step more), so float sums may
        assert (g[4] is None) == (e[4] is None)                                          # differ in the last bits
        for a, b in zip(g[4] or [], e[4] or []):
            assert list(a) == list(b) and np.allclose(list(a.values()), list(b.values()), atol=1e-5)

    engine, streamed = ahead.engine, {}
    for i, p in enumerate(prompts): engine.add_request(f's{i}', p, SamplingParams(max_tokens=16, temperature=0), stream=True)
    steps = 0
    while engine.has_unfinished_requests():
        for o in engine.step(): streamed[o.request_id] = (list(o.outputs[0].token_ids), o.outputs[0].finish_reason)
        steps += 1
        if steps == 5: assert engine.abort_request('s1')[0].outputs[0].finish_reason == 'abort'
    for i, t in enumerate(tokens):
        if i != 1: assert streamed[f's{i}'] == (t[:16], 'length')
    assert tokens[1][:len(streamed['s1'][0])] == streamed['s1'][0]
    engine.kv.audit()
    assert engine.kv.num_free_blocks == engine.kv.pool.num_usable and not engine.scheduler.requests


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (the H200 run is recorded in benchmarks/recorded)')
def test_async_scheduling_on_cuda_matches_in_order_steps(case):
    """On a GPU, float32, CUDA graphs on: one step ahead (the default there) gives the outputs of steps in order for
    seeded sampling with n=2 and logprobs, stop token ids, and a cache small enough to preempt."""
    folder, prompts, reference = case
    tokens = [t for t, _ in reference]
    params = [SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[tokens[0][5]]),
              SamplingParams(max_tokens=20, temperature=0.8, top_k=20, seed=7, n=2, logprobs=3),
              SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, min_p=0.05, seed=3),
              SamplingParams(max_tokens=NEW_TOKENS, temperature=0)]
    results = []
    for async_scheduling in (False, True):
        llm = LLM(folder, dtype='float32', device='cuda', max_num_seqs=8, block_size=4, num_blocks=24,
                  max_num_batched_tokens=32, max_model_len=92, async_scheduling=async_scheduling)
        assert llm.engine.async_scheduling == async_scheduling
        outs = llm.generate(prompts, params, use_tqdm=False)
        results.append([(c.token_ids, c.finish_reason, [sorted(d) for d in c.logprobs or []]) for o in outs for c in o.outputs])
        assert outs[3].outputs[0].token_ids == tokens[3]
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_usable
        del llm
        torch.cuda.empty_cache()
    assert results[0] == results[1]
