"""`logitlab bench --spec` on a tiny random model: every draft gives plain decode's text, the result carries
its ratios, and the same-text check does catch a difference. Also `logitlab bench`'s byte count of a decode
step (what its bandwidth fraction reads against) and its --dtype choices. No timing is asserted."""

from __future__ import annotations

import pytest

from logitlab import bench, bench_spec
from logitlab.engine import Engine

from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = "The keeper climbed the steps, lit the lamp and wrote the weather in the logbook. " * 2


@pytest.fixture(scope="module")
def tiny_engine(real_tokenizer):
    model = tiny_model(seed=3, vocab_size=real_tokenizer.vocab_size, context_length=256)
    return Engine(model, real_tokenizer, name="tiny", max_batch=2, max_len=256)


def test_spec_bench_same_text_and_ratios(tiny_engine):
    ids = bench_spec.prompt_ids(tiny_engine, "repeat", SHORT)
    assert ids[-3:] == tiny_engine.chat_prompt_ids([{"role": "user", "content": "x"}])[-3:]  # the chat template
    drafts = ("ngram", "ngram:1", "int8", "early-exit:1")
    res = bench_spec.run_spec_bench(tiny_engine, ids, drafts, max_tokens=24, gamma=4, repeats=2)
    assert res["tokens"] == 24 and res["plain_tok_s"] > 0 and res["plain_same_text_each_run"]
    assert set(res["drafts"]) == set(drafts)
    for name, d in res["drafts"].items():
        assert d["same_text"], name
        assert d["speedup"] == pytest.approx(d["spec_tok_s"] / res["plain_tok_s"])
        assert len(d["speedups_each_run"]) == 2
        assert 0.0 <= d["acceptance_rate"] <= 1.0
        # every round commits the accepted drafts plus one token of the target's own
        assert d["tokens_per_round"] == pytest.approx(24 / d["rounds"])
        assert d["accepted"] == round(d["acceptance_rate"] * d["drafted"])
        assert d["tokens_per_round"] >= 1.0
    assert res["drafts"]["int8"]["acceptance_rate"] > 0.5  # a quantized copy mostly agrees with its target
    text = bench_spec.report(res)
    assert "speculative ngram vs plain decode" in text and "ratios (same run):" in text


def test_spec_bench_same_text_check_catches_a_difference(tiny_engine, monkeypatch):
    real = bench_spec._spec

    def off_by_one(*args, **kwargs):
        out = real(*args, **kwargs)
        out["ids"][-1] = (out["ids"][-1] + 1) % tiny_engine.vocab_size
        return out

    monkeypatch.setattr(bench_spec, "_spec", off_by_one)
    ids = bench_spec.prompt_ids(tiny_engine, "quote", SHORT)
    res = bench_spec.run_spec_bench(tiny_engine, ids, ("ngram",), max_tokens=8, gamma=2, repeats=1)
    assert res["drafts"]["ngram"]["same_text"] is False


def test_spec_bench_cli_refuses_bad_options():
    from logitlab.cli import main

    assert main(["bench", "--spec", "--gamma", "0"]) == 2
    assert main(["bench", "--spec", "--tokens", "0"]) == 2


def test_bench_accepts_gguf_dtype():
    assert bench.parser().parse_args(["--dtype", "gguf"]).dtype == "gguf"
    with pytest.raises(SystemExit):
        bench.parser().parse_args(["--dtype", "int4"])


def test_weight_bytes_per_token():
    from logitlab.model.quant import quantize_int8

    m = tiny_model(seed=0, vocab_size=101)
    c = m.config
    layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim  # qkv
             + c.num_heads * c.head_dim * c.hidden_size  # o
             + 3 * c.hidden_size * c.intermediate_size  # gate, up, down
             + 2 * c.hidden_size)  # two norms
    head = c.vocab_size * c.hidden_size  # tied: the embedding table, read whole by the LM head
    assert bench.weight_bytes_per_token(m) == 4 * (c.num_layers * layer + c.hidden_size + head)
    q = quantize_int8(m)  # int8 matrices + bfloat16 scales; the bfloat16 GEMM copy and the lookup table excluded
    rows = c.num_layers * ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.hidden_size + 2 * c.intermediate_size
                           + c.hidden_size) + c.vocab_size
    matrices = c.num_layers * (layer - 2 * c.hidden_size) + head
    norms = 4 * (c.num_layers * 2 * c.hidden_size + c.hidden_size)
    assert bench.weight_bytes_per_token(q) == matrices + 2 * rows + norms


@pytest.mark.parametrize("draft_q", ["deterministic", "one-hot", "spread"])
def test_greedy_acceptance_shortcut_equals_the_general_rule(draft_q):
    """accept_round's greedy shortcut (speculative._accept_greedy) against the general rule it replaces:
    same accepted counts, same next tokens, over drafts that match, miss and hit an all -inf position."""
    import torch

    from logitlab.decoding.constraints import PipelineRows
    from logitlab.decoding.speculative import _accept_general, _accept_greedy, accept_round
    from logitlab.sampling import SamplingParams

    V, g = 37, 4
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for trial in range(40):
        B = 3
        params = SamplingParams(temperature=0.0, max_tokens=50, repetition_penalty=1.3 if trial % 2 else 1.0)
        rows = PipelineRows(params, [1, 2, 3, 5], V, [0], B, seeds=[7, 8, 9])
        logits = torch.randn(B, g + 1, V, generator=gen)
        if trial % 5 == 0:
            logits[1, trial % (g + 1)] = float("-inf")  # nothing allowed at one position of one row
        best = rows.logprobs_ahead(logits, torch.zeros(B, g, dtype=torch.long)).argmax(-1)
        drafted = torch.randint(0, V, (B, g), generator=gen)
        keep = torch.rand(B, g, generator=gen) < 0.7
        drafted = torch.where(keep, best[:, :g], drafted)  # mostly right, so long accepted runs occur
        if trial % 5 == 0:
            drafted[1] = 0
        logq = None
        if draft_q != "deterministic":
            scale = 50.0 if draft_q == "one-hot" else 1.0
            logq = torch.log_softmax(torch.randn(B, g, V, generator=gen) * scale, -1)
            logq = logq.scatter(2, drafted.unsqueeze(-1), 0.0 if draft_q == "one-hot" else -0.5)
        counters = torch.full((B,), trial, dtype=torch.long)
        logp = rows.logprobs_ahead(logits, drafted)
        lp_d = logp[:, :g].gather(2, drafted.unsqueeze(-1)).squeeze(-1).double()
        fast = _accept_greedy(logp, lp_d)
        ref = _accept_general(logp, lp_d, drafted, logq, rows, counters)
        assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1]), trial
        assert all(torch.equal(a, b) for a, b in zip(accept_round(logits, drafted, logq, rows, counters), fast,
                                                     strict=True))
        seen.update(fast[0].tolist())
    assert {0, g} <= seen and len(seen) >= 3  # rejections at the first draft, full accepts, and in between


def test_spec_bench_several_gammas(tiny_engine):
    ids = bench_spec.prompt_ids(tiny_engine, "repeat", SHORT)
    res = bench_spec.run_spec_bench(tiny_engine, ids, ("ngram",), max_tokens=12, gamma=[2, 6], repeats=1)
    assert set(res["drafts"]) == {"ngram gamma=2", "ngram gamma=6"} and res["gamma"] == [2, 6]
    assert all(d["same_text"] for d in res["drafts"].values())
    assert res["drafts"]["ngram gamma=2"]["drafted"] <= 2 * res["drafts"]["ngram gamma=2"]["rounds"]
    assert "speculative ngram gamma=6 vs plain decode" in bench_spec.report(res)


def test_draft_greedy_shortcut_is_the_draw():
    """ModelDraft draws greedy rows' tokens by argmax: the inverse-CDF draw of a one-hot row is its hot
    column, and of a row with nothing allowed (all -inf) column 0."""
    import torch

    from logitlab.decoding.speculative import _draw

    lp = torch.full((6, 50), float("-inf"))
    hot = torch.tensor([0, 7, 49, 13, 25, 0])
    lp[torch.arange(5), hot[:5]] = 0.0  # the last row: nothing allowed
    for u in (0.0, 0.3, 0.999999):
        assert torch.equal(_draw(lp, torch.full((6,), u, dtype=torch.float64)), lp.argmax(-1))
    assert torch.equal(lp.argmax(-1), hot)


def test_flat_verification_matches_the_t_token_forward(tiny_engine):
    """The scheduler verifies B x T drafted positions as B * T one-token rows of its decode step
    (``speculative.rides_decode``): the same logits as the T-token forward it replaces, drafted positions
    seeing the ones before them."""
    import torch

    from logitlab.decoding.speculative import _native_decode, rides_decode

    model, cache = tiny_engine.model, tiny_engine.scheduler.cache
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (2, 20), generator=gen)
    tables = [[], []]
    with torch.inference_mode():
        assert _native_decode(model, cache)  # (else the one-token rows would take the PyTorch path)
        assert rides_decode(tiny_engine.scheduler)
        for t in tables:
            for pos in range(40):
                cache.ensure_writable(t, pos)
        bt = cache.table_tensor(tables)
        model(prompt, torch.arange(20).expand(2, 20), cache, block_tables=bt)
        tokens = torch.randint(0, model.config.vocab_size, (2, 5), generator=gen)
        positions = torch.tensor([[19], [15]]) + torch.arange(5)  # rows at different lengths
        valid = torch.ones(2, 5, dtype=torch.bool)
        flat = model(tokens.reshape(10, 1), positions.reshape(10, 1), cache, valid=valid.reshape(10, 1),
                     block_tables=bt.repeat_interleave(5, 0)).view(2, 5, -1)  # as _decode_logits lays them out
        ref = model(tokens, positions, cache, valid=valid, logits_at="all", block_tables=bt)
    for t in tables:
        cache.release(t)
    assert flat.shape == ref.shape == (2, 5, model.config.vocab_size)
    torch.testing.assert_close(flat, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("top_p", [False, True])
def test_sampling_overhead_times_the_step_around_the_forward_and_sampler(tiny_engine, top_p):
    sched = tiny_engine.scheduler
    model = sched.model
    o = bench.sampling_overhead(tiny_engine, 6, top_p)
    assert sched.model is model and "_sample" not in vars(sched)  # put back as they were
    assert 0 < o["forward_ms"] and 0 < o["sample_ms"]
    assert o["forward_ms"] + o["sample_ms"] <= o["step_ms"] * 1.0001  # both are inside the step
    assert 0 < o["overhead"] < 1 and 0 < o["sample_fraction"] < o["overhead"]


def test_read_bandwidth_probe_runs():
    assert 0.1 < bench.read_bandwidth_gb_s(1, gib=0.02, reps=1) < 1e4
