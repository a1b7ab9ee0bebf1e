"""Property-based tests of the continuous-batching scheduler (`infer/scheduler.py`, nbs/23_scheduler.ipynb).

Random workloads run through `Scheduler` over a real paged cache (`KVCacheManager.for_spec`) with
`ContextHashModel`, a weightless model whose sampled token is a hash of the context it reads back
through the block table: its output depends only on each request's prompt, and a wrong slot, a
wrong block table, a wrongly shared prefix block or a lost swap changes what it samples (or makes
it raise).

Checked after every step (`check_schedule`, `check_update`): the token budget, the per-request
chunk cap, `max_num_seqs`, one span per request, contiguous spans, head-of-line admission in the
policy's order, the victim choice of a preemption, `kv.audit()` and that exactly the running
requests hold device blocks. At the end: everything finished or aborted, the cache back to full,
and every request's tokens equal to those it gets alone in a big cache.

Aborts come at random points of a step: before `schedule`, between `schedule` and the model step
(the abort is deferred to `update`, so the model still writes the request's blocks), and between the
model step and `update`.

With chunked prefill off the budget must cover `max_model_len` (`SchedulerConfig` refuses less): a
request preempted by recompute reruns its prompt and its output in one step, and a smaller budget
used to leave it at the head of the queue forever (`test_chunked_prefill_off_needs_a_budget_of_max_model_len`).
"""
from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infer.paging import KVCacheManager, cdiv
from infer.requests import Request, RequestError, RequestStatus, SamplingParams
from infer.scheduler import ContextHashModel, Scheduler, SchedulerConfig, context_hash_spec

VOCAB = 8              # ContextHashModel's vocabulary: small, so that end-of-sequence tokens are sampled often
PROMPT_VOCAB = 3       # prompts from a tiny vocabulary, so that they share prefixes and hit the prefix cache
MAX_MODEL_LEN = 48
BIG_CACHE_BLOCKS = cdiv(MAX_MODEL_LEN, 4) + 4   # `alone` runs: one request never runs out of room
FINISHED_OK = {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED}
# derandomize: the same examples on every run, so that the tests' coverage assertions (some runs preempt, swap,
# hit the prefix cache) cannot fail by chance in CI; widen max_examples to search further.
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# Workloads

@dataclass(frozen=True)
class Req:
    "One request of a workload: what it asks, when it is added and (maybe) aborted."
    rid: str
    prompt: tuple[int, ...]
    max_tokens: int
    min_tokens: int = 0
    eos: int | None = None
    priority: int = 0
    arrival: float = 0.0
    add_step: int = 0                 # added just before this step's `schedule`
    abort_step: int | None = None     # aborted at this step (a no-op if it has finished by then)
    abort_when: int = 0               # 0: before `schedule`, 1: between `schedule` and the model, 2: between the model and `update`

    def make(self) -> Request:
        params = SamplingParams(max_tokens=self.max_tokens, min_tokens=self.min_tokens, priority=self.priority)
        return Request(self.rid, list(self.prompt), params, eos_token_id=self.eos, arrival_time=self.arrival)

    def longest(self, max_model_len: int) -> int:
        "The most tokens this request can hold in the cache."
        return min(len(self.prompt) + self.max_tokens, max_model_len)


@dataclass(frozen=True)
class Workload:
    requests: tuple[Req, ...]
    block_size: int = 4
    num_blocks: int = BIG_CACHE_BLOCKS
    num_cpu_blocks: int = 0
    prefix_caching: bool = True
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = MAX_MODEL_LEN
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int | None = None
    policy: str = 'fcfs'
    preemption_mode: str = 'recompute'

    def config(self) -> SchedulerConfig:
        return SchedulerConfig(max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs,
                               max_model_len=self.max_model_len, enable_chunked_prefill=self.enable_chunked_prefill,
                               long_prefill_token_threshold=self.long_prefill_token_threshold, policy=self.policy,
                               preemption_mode=self.preemption_mode)


def blocks_for_longest(requests, block_size: int, max_model_len: int) -> int:
    "Usable blocks that hold the longest request alone: the smallest cache `add_request` accepts."
    return max(cdiv(r.longest(max_model_len), block_size) for r in requests)


@st.composite
def workloads(draw, *, policy=None, tiny_cache=False, aborts=True, max_requests=7, chunked=None,
              monotone_arrivals=False, late_adds=True):
    "A random workload and configuration."
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    tokens = st.integers(0, PROMPT_VOCAB - 1)
    prefixes = draw(st.lists(st.lists(tokens, min_size=2, max_size=12), min_size=1, max_size=3))
    n = draw(st.integers(2, max_requests))
    max_model_len = draw(st.sampled_from([MAX_MODEL_LEN, MAX_MODEL_LEN, MAX_MODEL_LEN, 20]))
    requests = []
    for i in range(n):
        base = draw(st.sampled_from(prefixes))
        prompt = base[:draw(st.integers(0, len(base)))] + draw(st.lists(tokens, max_size=6))
        if not prompt: prompt = [draw(tokens)]
        prompt = prompt[:max_model_len - 1]
        max_tokens = draw(st.integers(1, 8))
        min_tokens = draw(st.integers(0, max_tokens)) if draw(st.integers(0, 3)) == 0 else 0
        eos = draw(st.none() | st.integers(0, VOCAB - 1))
        add_step = draw(st.integers(0, 5)) if late_adds else 0
        abort_step, abort_when = None, 0
        if aborts and draw(st.integers(0, 4)) == 0:
            abort_step, abort_when = add_step + draw(st.integers(0, 12)), draw(st.integers(0, 2))
        arrival = float(add_step) if monotone_arrivals else float(draw(st.integers(0, 6)))
        requests.append(Req(f'r{i}', tuple(prompt), max_tokens, min_tokens, eos, draw(st.integers(0, 3)), arrival,
                            add_step, abort_step, abort_when))
    if monotone_arrivals:   # added in arrival order: arrival order is add order
        requests.sort(key=lambda r: r.add_step)

    need = blocks_for_longest(requests, block_size, max_model_len)
    extra = 0 if tiny_cache else draw(st.integers(0, need // 2 + 1))
    chunked = draw(st.booleans()) if chunked is None else chunked
    budget = draw(st.integers(1, 24)) if chunked else draw(st.integers(max_model_len, max_model_len + 8))
    return Workload(
        tuple(requests), block_size=block_size, num_blocks=need + 1 + extra,
        num_cpu_blocks=draw(st.sampled_from([0, 1, need, 2 * need, 4 * need])),   # none, too few to swap much, some, plenty
        prefix_caching=draw(st.sampled_from([True, True, False])), max_num_batched_tokens=budget,
        max_num_seqs=draw(st.sampled_from([1, 2, 3, 4, 6, 256])), max_model_len=max_model_len, enable_chunked_prefill=chunked,
        long_prefill_token_threshold=draw(st.none() | st.integers(1, 24)),
        policy=draw(st.sampled_from(['fcfs', 'priority'])) if policy is None else policy,
        preemption_mode=draw(st.sampled_from(['recompute', 'swap'])))


# ---------------------------------------------------------------------------------------------
# Driving the scheduler, with checks after every step

@dataclass
class Run:
    workload: Workload
    requests: dict[str, Request] = field(default_factory=dict)     # every request added, by id
    aborted: set[str] = field(default_factory=set)                   # aborted while unfinished
    admissions: list[str] = field(default_factory=list)             # first admissions, in order
    keys: dict[str, tuple] = field(default_factory=dict)            # the policy's order, computed here
    streamed: dict[str, list[int]] = field(default_factory=dict)    # new_token_ids of every RequestUpdate
    finish_reasons: dict[str, str] = field(default_factory=dict)    # from the RequestUpdate that finished it
    dropped: list[str] = field(default_factory=list)                # SchedulerOutput.finished_request_ids
    stats: Counter = field(default_factory=Counter)
    steps: int = 0


def step_bound(w: Workload) -> int:
    "Steps any run must finish in: generous (a livelock fails the test instead of hanging it)."
    total = sum(r.longest(w.max_model_len) for r in w.requests)
    return max(r.add_step for r in w.requests) + 1 + 4 * total * (len(w.requests) + 1)


def drive(w: Workload) -> Run:
    "Run `w` to the end through a scheduler, a real paged cache and `ContextHashModel`, checking every step."
    kv = KVCacheManager.for_spec(context_hash_spec(w.block_size), w.num_blocks, num_cpu_blocks=w.num_cpu_blocks,
                                 enable_prefix_caching=w.prefix_caching)
    sched = Scheduler(w.config(), kv)
    model = ContextHashModel(kv, vocab_size=VOCAB)
    run = Run(w)
    bound, last_add = step_bound(w), max(r.add_step for r in w.requests)

    deferred = set()     # aborted while their step was in flight: finished by that step's `update`

    def abort_due(step, when):
        for spec in w.requests:
            if spec.abort_step == step and spec.abort_when == when and spec.rid in run.requests:
                live = spec.rid in sched.requests and spec.rid not in deferred
                in_flight_running = when > 0 and live and run.requests[spec.rid].status is RequestStatus.RUNNING
                outputs = sched.abort(spec.rid)
                assert [(o.request_id, o.new_token_ids, o.finished, o.finish_reason) for o in outputs] == \
                       ([(spec.rid, [], True, 'abort')] if live else [])
                if live: run.aborted.add(spec.rid)
                if in_flight_running: deferred.add(spec.rid)
                else: assert run.requests[spec.rid].is_finished and spec.rid not in sched.requests

    step = 0
    while step <= last_add or sched.has_unfinished():
        assert step < bound, f'no end after {bound} steps: livelock ({len(sched.waiting)} waiting, {len(sched.running)} running)'
        for spec in w.requests:
            if spec.add_step == step:
                request = spec.make()
                sched.add_request(request)
                run.requests[spec.rid] = request
                run.keys[spec.rid] = ((spec.priority,) if w.policy == 'priority' else ()) + (spec.arrival, len(run.keys))
                run.streamed[spec.rid] = []
        abort_due(step, 0)

        before = {rid: (r.status, r.num_computed_tokens, r.num_tokens) for rid, r in sched.requests.items()}
        swapped_before = set(kv.swapped)
        out = sched.schedule()
        run.dropped += out.finished_request_ids
        check_schedule(run, sched, out, before, swapped_before)

        abort_due(step, 1)
        sampled = model(out)
        samplers = [s.request.request_id for s in out.scheduled if s.samples]
        assert sorted(sampled) == sorted(samplers), 'the model samples exactly the requests that reached their last token'
        abort_due(step, 2)
        # a runner hands back a tensor of tokens in batch order; the dict form is the same tokens by id: use both
        results = sched.update(out, sampled if step % 2 else torch.tensor([sampled[rid] for rid in samplers]))
        for rid in deferred:
            assert run.requests[rid].status is RequestStatus.FINISHED_ABORTED and rid not in sched.requests
        deferred.clear()
        check_update(run, sched, out, sampled, results)
        step += 1

    run.steps = step
    # The finished ids of the last step are handed over by the next `schedule`, which has nothing to do.
    out = sched.schedule()
    assert not out.scheduled and not out.preempted_request_ids and out.num_batched_tokens == 0
    run.dropped += out.finished_request_ids
    check_end(run, sched, kv)
    return run


def check_schedule(run: Run, sched: Scheduler, out, before: dict, swapped_before: set):
    w, cfg, kv = run.workload, sched.config, sched.kv
    cap = cfg.long_prefill_token_threshold
    ids = [s.request.request_id for s in out.scheduled]
    assert len(set(ids)) == len(ids), f'a request is scheduled twice in one step: {ids}'
    assert out.num_batched_tokens == sum(s.num_tokens for s in out.scheduled), 'num_batched_tokens is not the sum of the spans'
    assert out.num_batched_tokens <= w.max_num_batched_tokens, 'over the token budget'
    assert len(sched.running) <= w.max_num_seqs, 'more running requests than max_num_seqs'
    assert set(ids) <= {r.request_id for r in sched.running}, 'a scheduled request is not running'
    if sched.has_unfinished():
        assert out.scheduled, 'a step with unfinished requests scheduled nothing: the scheduler is stuck'

    admitted = []
    for s in out.scheduled:
        r, rid = s.request, s.request.request_id
        status, computed, num_tokens = before[rid]
        assert r.status is RequestStatus.RUNNING
        assert s.num_tokens >= 1 and s.start + s.num_tokens == r.num_computed_tokens <= r.num_tokens == num_tokens
        if status is RequestStatus.RUNNING or rid in swapped_before:
            assert s.start == computed, f'{rid}: the span does not continue where the request left off'
        else:                                  # new, or preempted by recompute: starts at its prefix-cache hit
            assert computed == 0 and s.start % w.block_size == 0 and s.start < r.num_tokens
            if not w.prefix_caching: assert s.start == 0
            if s.start: run.stats['prefix_hits'] += 1
        if status is not RequestStatus.RUNNING:
            admitted.append(rid)
            if rid not in run.admissions:
                run.admissions.append(rid)
                if rid not in swapped_before: assert r.num_cached_tokens == s.start
        whole_unchunked_prefill = (not w.enable_chunked_prefill and status is not RequestStatus.RUNNING
                                   and rid not in swapped_before)
        if whole_unchunked_prefill:            # with chunked prefill off a prefill is never split
            assert s.start + s.num_tokens == r.num_tokens, f'{rid}: a prefill was chunked with chunked prefill off'
            if s.num_tokens > cap: run.stats['unchunked_over_threshold'] += 1
        else:
            assert s.num_tokens <= cap, f'{rid} got {s.num_tokens} tokens in one step, over long_prefill_token_threshold={cap}'
        if s.start + s.num_tokens < r.num_tokens: run.stats['chunks'] += 1

    # Work conservation: budget left over means every running request got its tokens.
    if out.num_batched_tokens < w.max_num_batched_tokens:
        assert {r.request_id for r in sched.running} == set(ids), 'budget left, yet a running request was not scheduled'

    # Strict head-of-line admission in the policy's order: every admission comes before whatever is still waiting.
    still_waiting = [rid for rid, r in sched.requests.items() if r.status is not RequestStatus.RUNNING]
    for rid in admitted:
        for other in still_waiting:
            assert run.keys[other] > run.keys[rid], f'{rid} overtook {other}, which is ahead of it in the queue'
    assert [run.keys[rid] for rid in admitted] == sorted(run.keys[rid] for rid in admitted)

    # Preemption: victims were running, are waiting again, come last in the policy's order; nobody is admitted.
    preempted = out.preempted_request_ids
    assert len(set(preempted)) == len(preempted) and not set(preempted) & set(ids)
    if preempted:
        run.stats['preemptions'] += len(preempted)
        assert not admitted, 'a request was admitted in a step that had to preempt'
        first_victim = min(run.keys[rid] for rid in preempted)
        assert all(run.keys[r.request_id] < first_victim for r in sched.running), 'a victim was not the last running'
    for rid in preempted:
        r = run.requests[rid]
        assert before[rid][0] is RequestStatus.RUNNING and r.status is RequestStatus.PREEMPTED and rid in sched.requests
        if rid in kv.swapped:
            run.stats['swaps'] += 1
            assert w.preemption_mode == 'swap' and r.num_computed_tokens == before[rid][1]
        else:
            assert r.num_computed_tokens == 0
    kv.audit()


def check_update(run: Run, sched: Scheduler, out, sampled: dict, results: list):
    kv = sched.kv
    expected = [s.request.request_id for s in out.scheduled if s.request.request_id in sampled
                and s.request.request_id not in run.aborted]
    assert [o.request_id for o in results] == expected, 'one output per request that sampled, in batch order'
    for o in results:
        r = run.requests[o.request_id]
        assert o.new_token_ids == [sampled[o.request_id]] and r.output_token_ids[-1] == sampled[o.request_id]
        run.streamed[o.request_id] += o.new_token_ids
        assert o.finished == r.is_finished and o.request_id not in run.finish_reasons
        if o.finished:
            assert r.status in FINISHED_OK and o.finish_reason == r.status.finish_reason
            run.finish_reasons[o.request_id] = o.finish_reason
    kv.audit()
    # Exactly the running requests hold device blocks; only preempted waiting requests are swapped out.
    running = {r.request_id for r in sched.running}
    waiting = {r.request_id for _, r in sched.waiting}
    assert not running & waiting and running | waiting == set(sched.requests)
    assert set(kv.held) == running, 'the requests holding blocks are not the running ones'
    assert set(kv.swapped) <= waiting
    for rid in waiting:
        r = sched.requests[rid]
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert (r.num_computed_tokens > 0) == (rid in kv.swapped), f'{rid} waits with computed tokens it does not hold'
    if sched.config.preemption_mode == 'recompute': assert not kv.swapped


def check_end(run: Run, sched: Scheduler, kv: KVCacheManager):
    w = run.workload
    assert not sched.has_unfinished() and not sched.requests and not sched.waiting and not sched.running
    assert set(run.requests) == {r.rid for r in w.requests}
    assert sorted(run.dropped) == sorted(run.requests), 'each request is reported finished exactly once to the runner'
    for rid, r in run.requests.items():
        if rid in run.aborted:
            assert r.status is RequestStatus.FINISHED_ABORTED
            run.stats['aborted'] += 1
        else:
            assert r.status in FINISHED_OK, f'{rid} ended {r.status}'
            assert run.finish_reasons[rid] == r.status.finish_reason
            run.stats['stopped' if r.status is RequestStatus.FINISHED_STOPPED else 'length'] += 1
        assert run.streamed[rid] == r.output_token_ids, f'{rid}: the streamed tokens are not its output'
        run.stats['preempted_requests'] += r.num_preemptions > 0
    kv.audit()
    s = kv.stats()
    assert (s.blocks_in_use, s.num_requests, s.num_swapped) == (0, 0, 0), f'the cache is not back to full: {s}'
    assert s.blocks_cached + s.blocks_free == s.num_blocks == w.num_blocks - 1
    assert kv.num_free_cpu_blocks == kv.num_cpu_blocks


def drive_async(w: Workload) -> Run:
    """Run `w` with `async_scheduling`, as an engine that overlaps its host work with the GPU does: each step is
    scheduled (and its slot mapping and block table taken) before the previous step's `update`; the model runs the
    step after that update, once the token it continues from is known. Aborts come just before `schedule`, while
    the previous step is in flight."""
    kv = KVCacheManager.for_spec(context_hash_spec(w.block_size), w.num_blocks, num_cpu_blocks=w.num_cpu_blocks,
                                 enable_prefix_caching=w.prefix_caching)
    sched = Scheduler(dataclasses.replace(w.config(), async_scheduling=True), kv)
    model = ContextHashModel(kv, vocab_size=VOCAB)
    run = Run(w)
    bound, last_add = step_bound(w), max(r.add_step for r in w.requests)
    step, previous = 0, None

    def apply(out, sampled):
        rows = [s.request.request_id for s in out.scheduled if s.samples]
        run.stats['late_tokens'] += sum(run.requests[rid].status is RequestStatus.PREEMPTED for rid in rows)
        results = sched.update(out, torch.tensor([sampled[rid] for rid in rows], dtype=torch.int64))
        if results.rows is not None: run.stats['rows_dropped_or_late'] += 1
        for o in results:
            run.streamed[o.request_id] += o.new_token_ids
            if o.finished: run.finish_reasons[o.request_id] = o.finish_reason
        kv.audit()

    while step <= last_add or sched.has_unfinished() or previous is not None:
        assert step < bound, f'no end after {bound} steps: livelock ({len(sched.waiting)} waiting, {len(sched.running)} running)'
        for spec in w.requests:
            if spec.add_step == step:
                sched.add_request(request := spec.make())
                run.requests[spec.rid], run.streamed[spec.rid] = request, []
            if spec.abort_step == step and spec.rid in sched.requests:
                sched.abort(spec.rid)
                run.aborted.add(spec.rid)
        out = sched.schedule()
        run.dropped += out.finished_request_ids
        run.stats['preemptions'] += len(out.preempted_request_ids)
        assert out.num_batched_tokens <= w.max_num_batched_tokens and len(sched.running) <= w.max_num_seqs
        inputs = model.inputs(out) if out.scheduled else None
        if previous is not None: apply(*previous)
        previous = (out, model(out, inputs)) if out.scheduled else None
        if not out.scheduled: apply(out, {})
        step += 1
    run.dropped += sched.schedule().finished_request_ids
    sched.update(sched._in_flight[0], [])
    check_end(run, sched, kv)
    return run


# ---------------------------------------------------------------------------------------------
# The reference: each request alone in a big cache

@functools.lru_cache(maxsize=None)
def alone(prompt: tuple, max_tokens: int, min_tokens: int, eos: int | None, max_model_len: int):
    "The tokens and finish status of one request run alone in a cache far bigger than it needs."
    spec = Req('alone', prompt, max_tokens, min_tokens, eos)
    run = drive(Workload((spec,), max_model_len=max_model_len))
    assert run.stats['preemptions'] == 0
    r = run.requests['alone']
    return tuple(r.output_token_ids), r.status


def context_hash_oracle(prompt, max_tokens, min_tokens, eos, max_model_len):
    "What `ContextHashModel` samples, computed without any cache, and the stop rules of `check_stop`."
    out = []
    while True:
        out.append(hash(tuple(prompt) + tuple(out)) % VOCAB)
        if len(out) >= max(min_tokens, 1) and out[-1] == eos: return tuple(out), RequestStatus.FINISHED_STOPPED
        if len(out) >= max_tokens or len(prompt) + len(out) >= max_model_len:
            return tuple(out), RequestStatus.FINISHED_LENGTH_CAPPED


def assert_matches_alone(run: Run):
    "Every request that was not aborted got exactly its tokens alone; an aborted one got a prefix of them."
    for spec in run.workload.requests:
        r = run.requests[spec.rid]
        tokens, status = alone(spec.prompt, spec.max_tokens, spec.min_tokens, spec.eos, run.workload.max_model_len)
        if spec.rid in run.aborted:
            assert tuple(r.output_token_ids) == tokens[:r.num_output_tokens], f'{spec.rid}: aborted with wrong tokens'
        else:
            assert (tuple(r.output_token_ids), r.status) == (tokens, status), \
                f'{spec.rid}: {r.output_token_ids} ({r.status.name}), alone {list(tokens)} ({status.name})'


# ---------------------------------------------------------------------------------------------
# The tests

@settings(max_examples=40, **SETTINGS)
@given(prompt=st.lists(st.integers(0, PROMPT_VOCAB - 1), min_size=1, max_size=20), max_tokens=st.integers(1, 10),
       min_tokens=st.integers(0, 10), eos=st.none() | st.integers(0, VOCAB - 1), max_model_len=st.sampled_from([21, 48]))
def test_alone_reference_is_the_context_hash(prompt, max_tokens, min_tokens, eos, max_model_len):
    "The reference itself: one request alone samples the hash of its context and stops by `check_stop`'s rules."
    min_tokens = min(min_tokens, max_tokens)
    args = (tuple(prompt), max_tokens, min_tokens, eos, max_model_len)
    assert alone(*args) == context_hash_oracle(*args)


def test_random_workloads():
    """Property 1: random workloads and configurations, requests added and aborted at random steps.
    Every step keeps the budget, the chunk cap, max_num_seqs and the cache's invariants; every request
    finishes (or is aborted), the cache ends empty, and every request's tokens are those it gets alone."""
    seen = Counter()

    @settings(max_examples=200, **SETTINGS)
    @given(workloads())
    def check(w):
        run = drive(w)
        assert_matches_alone(run)
        seen.update(run.stats)
        seen['examples'] += 1

    check()
    # The generator does reach what the properties are about (else they would hold vacuously).
    for what in ('preemptions', 'swaps', 'prefix_hits', 'chunks', 'aborted', 'stopped', 'length'):
        assert seen[what] > 0, f'no generated workload had any {what}: {dict(seen)}'


def test_fcfs_no_overtaking_and_bounded_waiting():
    """Property 2, bounded waiting under FCFS: requests (random priorities, which FCFS ignores) are first
    admitted in arrival order with no overtaking at all, so a request waits only for those that arrived
    before it (a finite set, each of which finishes), and every request finishes within the step bound."""
    seen = Counter()

    @settings(max_examples=100, **SETTINGS)
    @given(workloads(policy='fcfs', monotone_arrivals=True))
    def check(w):
        run = drive(w)     # asserts every request finishes within step_bound(w)
        arrival_order = [r.rid for r in w.requests]      # added in arrival order (ties: in add order)
        never_admitted = {rid for rid in run.aborted if rid not in run.admissions}
        assert run.admissions == [rid for rid in arrival_order if rid not in never_admitted], \
            'requests were not first admitted in arrival order'
        for i, rid in enumerate(run.admissions):          # the same, stated as "nobody overtakes anybody"
            later = {r for r in run.admissions[:i] if run.keys[r] > run.keys[rid]}
            assert not later, f'{rid} was overtaken by {later}'
        assert_matches_alone(run)
        seen['preemptions'] += run.stats['preemptions']

    check()
    assert seen['preemptions'] > 0


def test_tokens_do_not_depend_on_load():
    """Property 3, determinism: no aborts, and each request's tokens are those it gets alone in a big cache,
    whatever the arrival order, budget, chunk cap, chunked prefill on/off, cache size, prefix caching,
    block size and preemption mode. Runs that preempt (by recompute and by swap) are among the examples."""
    seen = Counter()

    @settings(max_examples=150, **SETTINGS)
    @given(workloads(aborts=False))
    def check(w):
        run = drive(w)
        assert_matches_alone(run)
        seen.update(run.stats)
        if run.stats['preemptions']: seen[f'preempting {w.preemption_mode} runs'] += 1
        if run.stats['preemptions'] and not w.enable_chunked_prefill: seen['preempting unchunked runs'] += 1

    check()
    for what in ('preempting recompute runs', 'preempting swap runs', 'prefix_hits', 'preempting unchunked runs'):
        assert seen[what] > 0, f'no example had {what}: {dict(seen)}'


def test_tiny_cache_finishes_everything():
    """Property 4: a cache with just enough blocks for the single longest request preempts often and still
    finishes every request, with the tokens it gets alone."""
    seen = Counter()

    @settings(max_examples=100, **SETTINGS)
    @given(workloads(tiny_cache=True, max_requests=6))
    def check(w):
        assert w.num_blocks - 1 == blocks_for_longest(w.requests, w.block_size, w.max_model_len)
        run = drive(w)
        assert_matches_alone(run)
        seen.update(run.stats)

    check()
    assert seen['preemptions'] > 0 and seen['swaps'] > 0


def test_tiny_cache_preempts_and_keeps_tokens():
    "Deterministic: four requests that each fill the whole cache preempt each other, by recompute and by swap."
    specs = tuple(Req(f'r{i}', tuple([i % 3, 1, 2, 0, i % 2] * 2)[:6 + i], 16 - (6 + i), arrival=i, add_step=i // 2)
                  for i in range(4))
    for mode, cpu in [('recompute', 0), ('swap', 0), ('swap', 64)]:
        w = Workload(specs, block_size=4, num_blocks=4 + 1, num_cpu_blocks=cpu, max_num_batched_tokens=8,
                     preemption_mode=mode)
        run = drive(w)
        assert run.stats['preemptions'] > 0, mode
        assert (run.stats['swaps'] > 0) == (mode == 'swap' and cpu > 0), (mode, cpu)
        assert all(r.status is RequestStatus.FINISHED_LENGTH_CAPPED for r in run.requests.values())
        assert_matches_alone(run)


# With chunked prefill off, a request preempted by recompute must compute its prompt *and* its output tokens
# again in one step. A budget that only covered the longest prompt left such a request at the head of the
# queue forever (found by these tests); `SchedulerConfig` now requires a budget of max_model_len.
LIVELOCK = Workload((Req('a', (1,), 15, arrival=0), Req('b', (2,) * 7, 9, arrival=1)), block_size=4, num_blocks=5,
                    prefix_caching=False, max_num_batched_tokens=8, max_model_len=32, enable_chunked_prefill=False)


def test_chunked_prefill_off_needs_a_budget_of_max_model_len():
    with pytest.raises(RequestError, match='must be at least max_model_len'): LIVELOCK.config()
    run = drive(dataclasses.replace(LIVELOCK, max_num_batched_tokens=32))
    assert run.stats['preemptions'] > 0
    assert_matches_alone(run)


def test_async_scheduling_gives_the_same_tokens():
    """Property 5: scheduling each step before the previous step's tokens are known (one step in flight, as the engine
    does on a GPU) changes no request's tokens, preempted (by recompute or swap) while a token of theirs was being
    sampled or not, aborted while in flight or not; every request finishes and the cache ends full."""
    seen = Counter()

    @settings(max_examples=150, **SETTINGS)
    @given(workloads())
    def check(w):
        run = drive_async(w)
        assert_matches_alone(run)
        seen.update(run.stats)

    check()
    for what in ('preemptions', 'late_tokens', 'rows_dropped_or_late', 'aborted', 'stopped', 'length'):
        assert seen[what] > 0, f'no generated workload had any {what}: {dict(seen)}'
