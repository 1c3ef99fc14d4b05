"""Speculative decoding's parts (NgramIndex, SpecState, SpecPolicy, verify_coupled, KVCacheManager.trim,
Scheduler._spec_slots, position_seed, GrammarState.valid_prefix) and a seeded property test of the engine's block
bookkeeping under random proposals, accept/reject patterns, preemption and aborts."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from test_spec_decode_sampling import noisy_copy

from conveyor import LLM, SamplingParams
from conveyor.config import SchedulerConfig, SpeculativeConfig
from conveyor.engine.kv_cache_manager import KVCacheManager, cdiv, hash_block
from conveyor.engine.sampler import position_seed
from conveyor.engine.scheduler import Scheduler
from conveyor.engine.sequence import Sequence, SequenceStatus
from conveyor.engine.spec_decode import (ACCEPTANCE_EWMA, DEFAULT_DISABLE_BY_BATCH_SIZE, NgramIndex, SpecPolicy,
                                          SpecState, Speculator, verify_coupled)
from conveyor.engine.structured_output import GrammarCompiler, GrammarState, apply_grammar_masks
from conveyor.model import demo
from conveyor.sampling_params import StructuredOutputsParams

# ---- NgramIndex ----------------------------------------------------------------------------------------------------


def test_ngram_longest_match_wins_within_the_bounds():
    tokens = [1, 2, 3, 10, 11, 2, 3, 20, 21, 1, 2, 3]
    assert NgramIndex(1, 3).propose(tokens, 2) == [10, 11]  # [1, 2, 3] beats the later [2, 3]
    assert NgramIndex(1, 2).propose(tokens, 2) == [20, 21]  # prompt_lookup_max 2: [2, 3], latest
    assert NgramIndex(1, 3).propose(tokens, 5) == [10, 11, 2, 3, 20]
    assert NgramIndex(4, 4).propose(tokens, 2) == []  # no earlier 4-gram


def test_ngram_latest_occurrence_and_min_bound():
    assert NgramIndex(2, 2).propose([4, 5, 6, 4, 5, 7, 4, 5], 2) == [7, 4]
    assert NgramIndex(1, 3).propose([4, 9, 3, 4], 2) == [9, 3]
    assert NgramIndex(2, 3).propose([4, 9, 3, 4], 2) == []  # only a 1-gram matches: below prompt_lookup_min


def test_ngram_never_matches_the_suffix_itself():
    assert NgramIndex(1, 4).propose([7], 3) == []
    assert NgramIndex(1, 4).propose([5, 6, 7], 3) == []
    # a continuation that runs into the suffix repeats with the match's period
    assert NgramIndex(1, 4).propose([7, 7], 3) == [7, 7, 7]
    assert NgramIndex(1, 4).propose([1, 2, 3, 1, 2], 5) == [3, 1, 2, 3, 1]


def test_ngram_index_grows_like_one_built_from_scratch():
    rng = random.Random(5)
    for _ in range(30):
        lo = rng.randint(1, 3)
        hi = rng.randint(lo, 5)
        grown, tokens = NgramIndex(lo, hi), [rng.randrange(4) for _ in range(rng.randint(1, 6))]
        for _ in range(25):
            k = rng.randint(1, 5)
            assert grown.propose(tokens, k) == NgramIndex(lo, hi).propose(tokens, k), (lo, hi, tokens)
            tokens += [rng.randrange(4) for _ in range(rng.randint(1, 4))]  # an accepted run plus one


# ---- SpecState, SpecPolicy, verify_coupled -------------------------------------------------------------------------
def test_spec_state_observe():
    s = SpecState()
    assert s.acceptance == 1.0
    s.observe(3, 0)
    assert s.acceptance == pytest.approx(1 - ACCEPTANCE_EWMA)
    low = s.acceptance
    s.observe(3, 1)  # one success out of two trials: the second proposal was never judged on its own
    assert s.acceptance == pytest.approx(low + ACCEPTANCE_EWMA * (0.5 - low))
    for _ in range(40):
        s.observe(2, 0)
    assert s.acceptance < 0.01
    s.observe(2, 2)  # all accepted: two successes out of two
    assert s.acceptance == pytest.approx(ACCEPTANCE_EWMA, abs=0.01)
    for bad in [(0, 0), (2, 3), (2, -1)]:
        with pytest.raises(AssertionError):
            s.observe(*bad)


def test_spec_policy_falls_with_batch_size_and_acceptance():
    policy = SpecPolicy(SpeculativeConfig(num_speculative_tokens=5, method="ngram", disable_by_batch_size=8), "cpu")
    acceptances = [0.05, 0.3, 0.6, 0.9, 1.0]
    table = [[policy.num_proposals(SpecState(acceptance=a), n) for n in range(1, 11)] for a in acceptances]
    for row in table:
        assert row == sorted(row, reverse=True), row  # never more proposals for a larger batch
        assert row[7:] == [0, 0, 0]  # 8 or more running: none
    for col in zip(*table):
        assert list(col) == sorted(col), col  # never fewer for a better acceptance
    assert table[-1][:7] == [5] * 7  # always accepted: all k while below the limit
    assert table[0][0] == 0  # a 5 % acceptance is not worth a proposal even alone
    assert 0 < table[2][0] < 5
    default = SpeculativeConfig(num_speculative_tokens=2, method="ngram")
    for device in ("cpu", "cuda:0"):
        assert SpecPolicy(default, device).disable_by_batch_size == DEFAULT_DISABLE_BY_BATCH_SIZE[device[:4]]


def test_verify_coupled_keeps_proposals_up_to_the_first_difference():
    assert verify_coupled([], [9]) == 0
    assert verify_coupled([1, 2, 3], [1, 2, 3, 4]) == 3
    assert verify_coupled([1, 2, 3], [1, 5, 3, 4]) == 1  # a later match does not count
    assert verify_coupled([1], [2, 1]) == 0
    with pytest.raises(AssertionError):
        verify_coupled([1, 2], [1, 2])


def test_position_seed_is_distinct_per_seed_and_position():
    seeds = [position_seed(s, p) for s in range(50) for p in range(200)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= x < 2 ** 63 for x in seeds)  # a valid torch.Generator seed
    assert position_seed(3, 17) == position_seed(3, 17)
    g = torch.Generator()
    draws = {torch.empty(4).exponential_(generator=g.manual_seed(position_seed(7, p))).tolist()[0] for p in range(50)}
    assert len(draws) == 50


# ---- KVCacheManager.trim ---------------------------------------------------------------------------------------------
def decoding_seq(kv: KVCacheManager, prompt_len: int) -> Sequence:
    """A sequence whose prompt is computed and whose first output token is not."""
    seq = Sequence("r", 0, list(range(10, 10 + prompt_len)), prompt_len, SamplingParams(max_tokens=50), 50)
    assert kv.allocate_slots(seq, prompt_len)
    seq.num_computed_tokens = prompt_len
    seq.token_ids.append(1)
    return seq


def test_trim_frees_only_the_blocks_past_the_last_token():
    kv = KVCacheManager(8, 4)
    seq = decoding_seq(kv, 5)
    assert kv.allocate_slots(seq, 1 + 6)  # the last token and 6 proposals: positions 5..11, 3 blocks
    head, tail = seq.block_table[:2], seq.block_table[2]
    seq.num_computed_tokens += 1 + 1  # the last token and one accepted proposal
    seq.token_ids += [2, 3]  # the accepted proposal and the target's token: 8 tokens, 2 blocks
    kv.trim(seq)
    assert seq.block_table == head and kv.pool.num_free == 6
    assert list(kv.pool.free_queue)[-1] == tail and kv.pool.ref_counts[tail] == 0
    kv.trim(seq)  # nothing past the last token: nothing changes
    assert seq.block_table == head and kv.pool.num_free == 6
    seq.token_ids.append(4)  # a 9th token needs the third block, which trim must not take
    assert kv.allocate_slots(seq, 2)
    kv.trim(seq)
    assert len(seq.block_table) == 3


@pytest.mark.parametrize("how", ["shared", "cached"])
def test_trim_refuses_a_shared_or_cached_tail(how):
    kv = KVCacheManager(8, 4)
    seq = decoding_seq(kv, 3)
    assert kv.allocate_slots(seq, 1 + 4)
    extra = seq.block_table[1]
    if how == "shared":
        kv.pool.incref(extra)
    else:
        kv.pool.register(extra, b"h", (1, 2, 3, 4))
    with pytest.raises(AssertionError, match="shared or cached"):
        kv.trim(seq)


def test_trim_leaves_a_contiguous_reservation_alone():
    kv = KVCacheManager(16, 4, layout="contiguous")
    seq = Sequence("r", 0, [1, 2, 3], 3, SamplingParams(max_tokens=20), 20)
    assert kv.allocate_slots(seq, 3, reserve=True)
    table = list(seq.block_table)
    kv.trim(seq)
    assert seq.block_table == table


# ---- Scheduler._spec_slots -------------------------------------------------------------------------------------------
def decoding_batch(prompt_lens: list[int], num_blocks: int, block_size: int,
                   budget: int) -> tuple[Scheduler, list[Sequence]]:
    """A scheduler whose running sequences have computed their prompts and each sampled one token."""
    kv = KVCacheManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget), kv)
    seqs = [Sequence(f"r{i}", 0, list(range(20 * i, 20 * i + n)), n, SamplingParams(max_tokens=50), 50,
                     arrival_time=float(i)) for i, n in enumerate(prompt_lens)]
    for s in seqs:
        sched.add(s)
    while any(s.num_uncomputed_tokens != 1 or s.num_output_tokens == 0 for s in seqs):
        for x in sched.schedule().scheduled:
            samples = x.samples
            x.seq.num_computed_tokens += x.num_tokens
            if samples:
                x.seq.token_ids.append(7)
    return sched, seqs


def test_proposals_take_only_the_budget_the_other_decodes_leave():
    sched, seqs = decoding_batch([3, 3, 3], 64, 4, budget=6)
    out = sched.schedule({s.seq_id: 10 for s in seqs})
    assert [(x.seq, x.num_tokens) for x in out.scheduled] == [(s, 1) for s in seqs]
    assert [x.num_spec_slots for x in out.scheduled] == [3, 0, 0]  # 6 - its own token - the 2 decodes after it
    assert out.num_tokens == 6 and not out.preempted


def test_proposals_never_take_a_block_another_decode_needs():
    # r0's next token fits its block; r1's starts a new block, and the pool has one free block
    sched, (r0, r1) = decoding_batch([3, 4], 5, 2, budget=64)
    assert sched.kv.pool.num_free == 1
    out = sched.schedule({r0.seq_id: 1, r1.seq_id: 1})
    assert [(x.seq, x.num_tokens, x.num_spec_slots) for x in out.scheduled] == [(r0, 1, 0), (r1, 1, 0)]
    assert not out.preempted and sched.num_preemptions == 0


def test_proposals_keep_a_block_free_for_every_running_sequence():
    sched, seqs = decoding_batch([3, 3, 3], 12, 2, budget=64)
    assert sched.kv.pool.num_free == 6
    out = sched.schedule({s.seq_id: 2 for s in seqs})
    # each proposal run needs a block (+ 1 held for a copy-on-write): granted while 3 blocks stay free
    assert [x.num_spec_slots for x in out.scheduled] == [2, 2, 0] and not out.preempted
    assert [len(s.block_table) for s in seqs] == [3, 3, 2]


def test_no_proposals_mid_prefill():
    sched, (seq,) = decoding_batch([3], 64, 4, budget=64)
    fresh = Sequence("long", 0, list(range(100, 140)), 40, SamplingParams(max_tokens=5), 5, arrival_time=9.0)
    sched.add(fresh)
    sched.config.max_num_batched_tokens = 10
    out = sched.schedule({seq.seq_id: 2, fresh.seq_id: 3})
    assert [(x.seq, x.num_tokens, x.num_spec_slots) for x in out.scheduled] == [(seq, 1, 2), (fresh, 7, 0)]
    out = sched.schedule({seq.seq_id: 2, fresh.seq_id: 3})  # fresh now runs mid-prefill: still no proposals
    assert [x.num_spec_slots for x in out.scheduled if x.seq is fresh] == [0]


# ---- GrammarState.valid_prefix ---------------------------------------------------------------------------------------
def test_valid_prefix_counts_allowed_proposals_and_leaves_the_matcher_as_it_was():
    gc = GrammarCompiler(demo.demo_tokenizer(), 262, [257, 261])
    state = GrammarState(gc.compile(StructuredOutputsParams(regex="ab+c")))
    a, b, c, eos = ord("a"), ord("b"), ord("c"), 257
    before = state.allowed()
    assert state.valid_prefix([a, b, b, c]) == 4
    assert state.valid_prefix([a, c, b]) == 1
    assert state.valid_prefix([c]) == 0
    assert state.valid_prefix([]) == 0
    assert torch.equal(state.allowed(), before)
    # a proposal that ends the grammar (a stop token) is verified like any other, and nothing follows it
    assert state.valid_prefix([a, b, c, eos, a]) == 4
    # the row after it (never used: the sequence ends at the stop token) allows only the stop tokens
    logits = torch.zeros(2, 262)
    apply_grammar_masks(logits, [0, 1], [state, state], [(a, b, c, eos), (a, b)])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [257, 261]
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [b, c]
    assert torch.equal(state.allowed(), before)
    state.accept(a)
    assert state.valid_prefix([b, c]) == 2 and state.valid_prefix([a]) == 0
    for t in (b, c):  # the matcher still advances as if valid_prefix had never run
        state.accept(t)
    assert state.done and state.valid_prefix([eos, a]) == 1


# ---- engine property test ----------------------------------------------------------------------------------------
CASES = 50


@pytest.fixture(scope="module")
def models(checkpoint, tmp_path_factory) -> dict[str, str]:
    target = checkpoint("llama")
    return {"target": target, "often_right": noisy_copy(target, tmp_path_factory.mktemp("draft"), 0.1)[0],
            "often_wrong": checkpoint("mistral")}


@pytest.fixture(scope="module")
def reference(models) -> LLM:
    """The target without speculation, with room for everything."""
    return LLM(models["target"], device="cpu", max_model_len=256)


def random_spec(rng: random.Random, models: dict[str, str]) -> dict:
    spec = {"num_speculative_tokens": rng.randint(1, 4), "disable_by_batch_size": rng.choice([2, 3, 1000])}
    if rng.random() < 0.5:
        lo = rng.randint(1, 2)
        return spec | {"method": "ngram", "prompt_lookup_min": lo, "prompt_lookup_max": rng.randint(lo, 4)}
    return spec | {"model": models[rng.choice(["often_right", "often_wrong"])]}


def random_params(rng: random.Random, budget: int) -> SamplingParams:
    kind = rng.choice(["greedy", "greedy", "seeded", "random"])
    return SamplingParams(temperature=0.0 if kind == "greedy" else rng.choice([0.5, 1.0]),
                          top_k=rng.choice([0, 4]), seed=rng.randrange(1000) if kind == "seeded" else None,
                          max_tokens=rng.randint(1, budget), n=rng.choice([1, 1, 1, 2]),
                          priority=rng.randint(0, 2), ignore_eos=True)


def check_step(llm: LLM) -> None:
    """After a step: ref counts equal the tables holding each block, the free queue is the unreferenced blocks, a
    table covers the computed tokens and nothing past the last token, cached blocks hold exactly their hash's
    tokens, the draft's K/V never runs ahead of the target's."""
    eng = llm.engine
    kv, sched, bs = eng.kv, eng.scheduler, eng.kv.block_size
    pool = kv.pool
    holders: Counter[int] = Counter()
    for seq in sched.running:
        assert seq.status == SequenceStatus.RUNNING
        assert len(seq.block_table) == len(set(seq.block_table)), "a block twice in one table"
        holders.update(seq.block_table)
        assert seq.num_computed_tokens < seq.num_tokens
        assert cdiv(seq.num_computed_tokens, bs) <= len(seq.block_table) <= cdiv(seq.num_tokens, bs), \
            (seq.num_computed_tokens, seq.num_tokens, len(seq.block_table))
        assert seq.num_draft_computed <= seq.num_computed_tokens
        assert seq.num_cached_blocks * bs <= seq.num_computed_tokens
        parent = None
        for i, b in enumerate(seq.block_table):
            if (i + 1) * bs > seq.num_computed_tokens:
                assert pool.block_hash[b] is None, f"block {b} is cached before it is computed"
                break
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            parent = hash_block(parent, tokens, seq.cache_salt)
            if pool.block_hash[b] is not None:
                assert pool.block_hash[b] == parent and pool.block_tokens[b] == tokens, \
                    f"block {b} is cached under other tokens than seq {seq.seq_id} holds there"
    for b in range(pool.num_blocks):
        assert pool.ref_counts[b] == holders[b], f"block {b}: ref count {pool.ref_counts[b]} != {holders[b]} tables"
        if pool.block_hash[b] is not None:
            assert pool.cached[pool.block_hash[b]] == b and len(pool.block_tokens[b]) == bs
    assert list(pool.free_queue) == list(dict.fromkeys(pool.free_queue))
    assert set(pool.free_queue) == {b for b in range(pool.num_blocks) if pool.ref_counts[b] == 0}
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0 and seq.num_draft_computed == 0
    host = kv.host_pool
    if host is not None:
        held = Counter(b for seq in sched.swapped for b in seq.block_table)
        assert all(host.ref_counts[h] == held[h] for h in range(host.num_blocks))
        for seq in sched.swapped:
            assert cdiv(seq.num_computed_tokens, bs) <= len(seq.block_table) <= cdiv(seq.num_tokens, bs)


def run_case(rng: random.Random, models: dict[str, str], reference: LLM) -> dict[str, int]:
    bs = rng.choice([2, 4, 8])
    num_blocks = rng.randint(8, 20)
    llm = LLM(models["target"], device="cpu", max_model_len=256, block_size=bs, num_kv_blocks=num_blocks,
              max_num_seqs=rng.randint(2, 6), max_num_batched_tokens=rng.choice([16, 32, 64]), watermark=0.0,
              preemption_mode=rng.choice(["recompute", "swap"]), swap_space=0.0005,
              scheduling_policy=rng.choice(["fcfs", "priority"]), long_prefill_token_threshold=rng.choice([0, 3, 5]),
              speculative_config=random_spec(rng, models))
    eng = llm.engine
    alphabet = rng.sample(range(3, 320), rng.randint(3, 12))  # few tokens: n-grams repeat
    longest = min(24, bs * num_blocks // 2)
    shared = [rng.choice(alphabet) for _ in range(longest)]  # a common prefix: prefix-cache hits
    reqs = {}
    for i in range(rng.randint(2, 8)):
        n = rng.randint(1, longest)
        prompt = shared[:rng.randint(0, n)]
        prompt += [rng.choice(alphabet) for _ in range(n - len(prompt))]
        budget = min(40, bs * num_blocks - len(prompt))
        reqs[f"r{i}"] = (prompt, random_params(rng, budget))
    deterministic = {rid for rid, (_, p) in reqs.items() if p.temperature == 0 or p.seed is not None}
    for rid in sorted(deterministic):  # a stop string the output really contains, half the time
        prompt, p = reqs[rid]
        text = reference.generate([prompt], p)[0].outputs[0].text
        if len(text) > 4 and rng.random() < 0.5:
            j = rng.randrange(1, len(text) - 2)
            p.stop = [text[j:j + 2]]
            p.validate()
    want = dict(zip(sorted(deterministic), reference.generate([reqs[r][0] for r in sorted(deterministic)],
                                                              [reqs[r][1] for r in sorted(deterministic)])))
    arrivals = sorted((rng.randint(0, 10), rid) for rid in reqs)
    aborts = {rid: rng.randint(0, 25) for rid in rng.sample(sorted(reqs), rng.randint(0, 2))}
    done: dict[str, object] = {}
    step = 0
    while arrivals or eng.has_unfinished_requests():
        while arrivals and arrivals[0][0] <= step:
            rid = arrivals.pop(0)[1]
            eng.add_request(rid, *reqs[rid])
        for rid, at in aborts.items():
            if at == step and rid in eng.requests:
                eng.abort_request(rid)
                done[rid] = "aborted"
                check_step(llm)
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        check_step(llm)
        step += 1
        assert step < 3000, "the case does not terminate"
    stats = llm.stats()
    assert stats["kv_blocks_in_use"] == 0 and stats["num_swapped_out_blocks"] == 0 and not eng.requests
    assert set(done) == set(reqs)
    for rid, out in done.items():
        if out == "aborted":
            continue
        params = reqs[rid][1]
        for c in out.outputs:
            assert len(c.token_ids) <= params.max_tokens
            assert c.finish_reason == "stop" or len(c.token_ids) == params.max_tokens
        if rid in want:
            got = [(c.token_ids, c.text, c.finish_reason) for c in out.outputs]
            assert got == [(c.token_ids, c.text, c.finish_reason) for c in want[rid].outputs], rid
    return stats


def test_block_bookkeeping_under_speculation_preemption_and_aborts(models, reference):
    rng = random.Random(2026)
    totals = Counter()
    for _ in range(CASES):
        stats = run_case(rng, models, reference)
        totals.update({k: stats[k] for k in ("spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens",
                                             "num_preemptions_recompute", "num_preemptions_swap",
                                             "prefix_cache_hits", "num_cow_copies")})
    # the cases covered what they were meant to: proposals both accepted and rejected, both kinds of preemption,
    # prefix-cache hits and copies-on-write of forked samples' shared tails
    assert 0 < totals["spec_decode_num_accepted_tokens"] < totals["spec_decode_num_draft_tokens"] // 2, totals
    assert all(totals[k] > 0 for k in ("num_preemptions_recompute", "num_preemptions_swap", "prefix_cache_hits",
                                       "num_cow_copies")), totals


def test_samples_forked_where_a_chunked_prefill_ends_with_proposals():
    """The last of 5 prompt tokens is computed alone (prefill chunks of 4) while the n-gram method could propose
    [66, 65]; blocks of 2 would put the proposals' slots in a block of their own, which the sample forked after
    that step would share (trim then asserted: fixed in 1978fe0, no proposals while samples wait to fork)."""
    params = SamplingParams(temperature=0.0, max_tokens=8, n=2, ignore_eos=True)
    prompt = [65, 66, 65, 66, 65]
    llm = LLM("demo", device="cpu", block_size=2, long_prefill_token_threshold=4,
              speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    got = llm.generate([prompt], params)[0]
    want = LLM("demo", device="cpu").generate([prompt], params)[0]
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
    stats = llm.stats()
    assert stats["kv_blocks_in_use"] == 0 and stats["spec_decode_num_drafts"] > 0


def test_new_sequences_start_from_the_engine_wide_acceptance():
    """Sequences that mostly reject pull the prior down, so a new sequence does not verify k losing proposals."""
    spec = Speculator(SpeculativeConfig(num_speculative_tokens=4, method="ngram"), "cpu", None)
    old = Sequence("a", 0, [1, 2, 3], 3, SamplingParams(), 16)
    old.spec = SpecState()
    for _ in range(200):
        spec.record(old, 4, [9])  # every first proposal rejected
    assert spec.prior < 0.1 and old.spec.acceptance < 0.1
    new = Sequence("b", 0, [5, 6, 5, 6, 5], 5, SamplingParams(), 16)
    new.num_computed_tokens = 4
    assert spec.lookahead([new] * 16) == {}  # 16 running: not worth a proposal at that acceptance
    assert new.spec.acceptance == spec.prior
    assert spec.lookahead([new]) == {} and new.spec.shadow == 6  # not even alone; a shadow trial instead
    fresh = Speculator(SpeculativeConfig(num_speculative_tokens=4, method="ngram"), "cpu", None)
    assert fresh.lookahead([Sequence("c", 0, [5, 6, 5, 6, 5], 5, SamplingParams(), 16)]) == {}  # not decoding
    seq = Sequence("d", 0, [5, 6, 5, 6, 5], 5, SamplingParams(), 16)
    seq.num_computed_tokens = 4
    assert fresh.lookahead([seq]) == {seq.seq_id: 4}  # a fresh engine starts optimistic
