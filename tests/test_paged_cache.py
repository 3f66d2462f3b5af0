"""The paged KV cache: blocks, sharing, copy-on-write, prefix caching, and the scheduler on top of it."""

from __future__ import annotations

import contextlib

import pytest
import torch

from logitlab.engine import Engine
from logitlab.model import native
from logitlab.model.cache import KVCache
from logitlab.model.paged_cache import SCRATCH, PagedKVCache, PoolExhausted
from logitlab.sampling import ParamError, SamplingParams

from tiny import tiny_config, tiny_model


def _pool(capacity=9, bs=4, initial=2):
    return PagedKVCache(tiny_config(), capacity=capacity, block_size=bs, initial_blocks=initial)


def test_blocks_are_handed_out_lowest_first_and_the_pool_grows_only_when_used():
    c = _pool(capacity=9, initial=2)
    assert c.allocated_blocks == 2 and c.num_free() == 8
    table: list[int] = []
    for p in range(10):  # 10 positions of 4 per block: 3 blocks
        c.ensure_writable(table, p)
    assert table == [1, 2, 3] and c.allocated_blocks >= 4 and c.used_blocks() == 3
    c.release(table)
    assert table == [] and c.num_free() == 8 and c.used_blocks() == 0


def test_fork_shares_blocks_and_copies_only_the_written_partial_block():
    c = _pool()
    a: list[int] = []
    for p in range(6):
        c.ensure_writable(a, p)
    for t in c.k + c.v:
        t[a[1]] = 7.0  # recognisable contents of the partial block
    b = c.share(a)
    assert b == a and c.refs[a[0]] == 2 and c.refs[a[1]] == 2 and c.used_blocks() == 2  # nothing copied
    c.ensure_writable(b, 6)  # b writes into the shared partial block: it gets its own copy
    assert b[0] == a[0] and b[1] != a[1] and c.refs[a[1]] == 1
    assert all(torch.equal(t[b[1]], t[a[1]]) for t in c.k + c.v)  # the copy carries the contents
    c.ensure_writable(a, 6)  # a is now its only holder: in place
    assert c.used_blocks() == 3
    c.release(a)
    c.release(b)
    assert c.used_blocks() == 0


def test_prefix_cache_reuses_whole_blocks_and_evicts_least_recently_used():
    c = _pool(capacity=5, bs=4)  # 4 usable blocks
    seq = list(range(100, 110))  # 10 tokens: 2 full blocks + 2
    t: list[int] = []
    for p in range(len(seq)):
        c.ensure_writable(t, p)
    c.register_prefix(seq, t, len(seq))
    kept = t[:2]
    c.release(t)
    assert c.cached_blocks() == 2 and c.num_free() == 4  # cached blocks count as free
    again = c.match_prefix(seq + [1, 2], limit=11)
    assert again == kept and c.hits == 2  # both full blocks found
    assert c.match_prefix([100, 101, 102, 999, 5, 5, 5, 5], limit=8) == []  # differs in block 0
    c.release(again)
    other: list[int] = []
    for p in range(4 * 3):  # needs 3 blocks: 2 free + the least recently used cached one
        c.ensure_writable(other, p)
    assert c.cached_blocks() == 1
    assert c.match_prefix(seq, limit=10) == []  # block 0 was evicted, so the chain is broken
    with pytest.raises(PoolExhausted):
        for p in range(12, 40):
            c.ensure_writable(other, p)


@pytest.mark.parametrize("use_native", [True, False])
def test_paged_forward_equals_the_contiguous_cache(use_native):
    """A ragged prefill and then decode steps through block tables give the logits of the slot cache."""
    m = tiny_model(seed=3)
    lens = [7, 19, 12]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 101, (n + 5,), generator=g).tolist() for n in lens]
    W = max(lens)
    tokens = torch.zeros(3, W, dtype=torch.long)
    valid = torch.arange(W) < torch.tensor(lens)[:, None]
    for i, n in enumerate(lens):
        tokens[i, :n] = torch.tensor(seqs[i][:n])
    pos = torch.arange(W).expand(3, W)
    ctx = contextlib.nullcontext() if use_native else native.switched_off()
    with torch.inference_mode(), ctx:
        slot = KVCache(m.config, 3, 64)
        ref = [m(tokens, pos, slot, valid=valid)]
        paged = PagedKVCache(m.config, capacity=40, block_size=4, initial_blocks=2)
        tables: list[list[int]] = [[] for _ in lens]
        for t, n in zip(tables, lens, strict=True):
            for p in range(n):
                paged.ensure_writable(t, p)
        got = [m(tokens, pos, paged, valid=valid, block_tables=PagedKVCache.table_tensor(tables))]
        for s in range(5):
            step_pos = torch.tensor([[n + s] for n in lens])
            step_tok = torch.tensor([[seqs[i][n + s]] for i, n in enumerate(lens)])
            ref.append(m(step_tok, step_pos, slot))
            for t, n in zip(tables, lens, strict=True):
                paged.ensure_writable(t, n + s)
            got.append(m(step_tok, step_pos, paged, block_tables=PagedKVCache.table_tensor(tables)))
    assert (torch.stack(got) - torch.stack(ref)).abs().max() < 1e-5
    assert SCRATCH not in {b for t in tables for b in t}


@pytest.fixture(scope="module")
def engine(real_tokenizer):
    return Engine(tiny_model(seed=1, vocab_size=real_tokenizer.vocab_size, context_length=512), real_tokenizer,
                  max_batch=8, max_len=512)


def _no_cache_engine(engine):
    return Engine(engine.model, engine.tokenizer, max_batch=8, max_len=512, use_cache=False)


def test_greedy_and_seeded_output_equal_the_no_cache_engine(engine):
    prompts = ["Hello there, how are", "The capital of France is a city that", "1 2 3"]
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.9, seed=4, ignore_eos=True, n=3),
              SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)]
    ref = _no_cache_engine(engine).generate(prompts, params)
    got = engine.generate(prompts, params)
    for a, b in zip(got, ref, strict=True):
        assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    assert engine.scheduler.cache.used_blocks() == 0  # everything released


def test_a_repeated_prefix_is_not_recomputed(engine):
    cache = engine.scheduler.cache
    prefix = "You are a helpful assistant who answers in one word. " * 6
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    first = engine.generate(prefix + "Question one?", p)[0]
    hits = cache.hits
    second = engine.generate(prefix + "Question two?", p)[0]
    shared = len(engine.tokenizer.encode(prefix)) // cache.block_size - 1  # whole blocks (BPE may merge at the seam)
    assert cache.hits - hits >= shared > 0
    alone = _no_cache_engine(engine).generate(prefix + "Question two?", p)[0]
    assert second.choices[0].token_ids == alone.choices[0].token_ids
    assert first.choices[0].token_ids  # the first request ran too


def test_n_samples_hold_about_one_prompt_of_blocks(engine):
    sched, cache = engine.scheduler, engine.scheduler.cache
    prompt = " ".join(["word"] * 500)
    ids = engine.tokenizer.encode(prompt)
    reqs = engine.make_requests(ids, SamplingParams(max_tokens=3, temperature=1.0, seed=0, n=8, ignore_eos=True))
    sched.add(reqs)
    peak = 0
    while sched.has_work():
        sched.step()
        peak = max(peak, cache.used_blocks())
    prompt_blocks = cache.blocks_for(len(ids))
    assert prompt_blocks <= peak <= prompt_blocks + 8 * 2  # one prompt, plus each sample's own last block(s)


def test_an_exhausted_pool_makes_requests_wait_and_one_too_big_is_refused(real_tokenizer):
    model = tiny_model(seed=2, vocab_size=real_tokenizer.vocab_size, context_length=512)
    per_token = PagedKVCache.bytes_per_token(model.config)
    small = Engine(model, real_tokenizer, max_batch=8, max_len=512, kv_memory=100 * per_token / 1e9)
    cap = small.scheduler.cache.capacity - 1
    prompts = [f"request number {i} says" for i in range(8)]
    p = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    out = small.generate(prompts, p)  # 8 x ~26 positions > 100: they take turns
    assert all(len(r.choices[0].token_ids) == 20 for r in out)
    ref = _no_cache_engine(small).generate(prompts, p)
    assert [r.choices[0].token_ids for r in out] == [r.choices[0].token_ids for r in ref]
    with pytest.raises(ParamError, match="max_tokens"):
        small.generate("too long", SamplingParams(max_tokens=cap * 16, temperature=0))


def test_kv_memory_is_validated():
    with pytest.raises(ParamError, match="kv_memory"):
        Engine(tiny_model(), None, kv_memory=-1)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(engine):
    sched = engine.scheduler
    sched.prefill_chunk = 32
    try:
        short = engine.make_requests("go", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        sched.add(short)
        sched.step()
        long_ids = engine.tokenizer.encode(" ".join(f"w{i}" for i in range(150)))
        assert len(long_ids) > 4 * 32
        long = engine.make_requests(long_ids, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        sched.add(long)
        steps = 0
        while not long[0].output_ids:
            before = len(short[0].output_ids)
            sched.step()
            steps += 1
            assert len(short[0].output_ids) == before + 1  # the decoding request never waits a whole prompt
        assert steps >= len(long_ids) // 32  # the prompt went in chunks of at most 32 tokens
        while sched.has_work():
            sched.step()
    finally:
        sched.prefill_chunk = 256
    ref = _no_cache_engine(engine).generate(long_ids, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert long[0].output_ids == ref[0].choices[0].token_ids  # chunked prefill computes the same thing
