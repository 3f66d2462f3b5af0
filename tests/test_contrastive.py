"""Contrastive decoding: the score against a hand computation, the pipeline over it, and the cached driver
against a from-scratch loop (expert and amateur each with its own cache; amateur = early exit or another
model)."""

from __future__ import annotations

import math

import pytest
import torch

from logitlab.decoding.constraints import PipelineRows
from logitlab.decoding.contrastive import contrastive_generate, contrastive_scores
from logitlab.sampling import ParamError, SamplingParams

from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

P_EXP = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
P_AMA = torch.tensor([[0.6, 0.1, 0.2, 0.1]])


def test_scores_match_a_hand_computation():
    s = contrastive_scores(P_EXP.log(), P_AMA.log(), alpha=0.2)[0]
    # head: p_exp >= 0.2 * 0.5 = 0.1 -> tokens 0, 1, 2
    assert s[0].item() == pytest.approx(math.log(0.5 / 0.6), abs=1e-6)
    assert s[1].item() == pytest.approx(math.log(0.3 / 0.1), abs=1e-6)
    assert s[2].item() == pytest.approx(math.log(0.15 / 0.2), abs=1e-6)
    assert s[3].item() == float("-inf")
    assert int(s.argmax()) == 1 and int(P_EXP.argmax()) == 0  # the amateur moves greedy off token 0
    # larger alpha shrinks the head: 0.7 * 0.5 = 0.35 keeps token 0 only
    s = contrastive_scores(P_EXP.log(), P_AMA.log(), alpha=0.7)[0]
    assert torch.isfinite(s).tolist() == [True, False, False, False]
    # amateur temperature 2: log p_ama -> log softmax(log p_ama / 2)
    s = contrastive_scores(P_EXP.log(), P_AMA.log(), alpha=0.2, amateur_temperature=2.0)[0]
    soft = P_AMA[0].sqrt() / P_AMA[0].sqrt().sum()
    assert s[1].item() == pytest.approx(math.log(0.3 / soft[1].item()), abs=1e-6)


def test_the_pipeline_samples_from_softmax_of_the_scores():
    s = contrastive_scores(P_EXP.log(), P_AMA.log(), alpha=0.2)
    lp = PipelineRows(SamplingParams(temperature=1.0), [0], 4, [], 1).logprobs(s)[0]
    ratio = torch.tensor([0.5 / 0.6, 0.3 / 0.1, 0.15 / 0.2])
    assert torch.allclose(lp[:3].exp(), ratio / ratio.sum(), atol=1e-6)
    assert lp[3].item() == float("-inf")
    greedy = PipelineRows(SamplingParams(temperature=0.0), [0], 4, [], 1).logprobs(s)[0]
    assert int(greedy.argmax()) == 1


@torch.inference_mode()
def naive_contrastive(expert, amateur, layers, prompt, steps, alpha):
    ids = list(prompt)
    for _ in range(steps):
        t = torch.tensor([ids])
        pos = torch.arange(len(ids)).unsqueeze(0)
        s = contrastive_scores(expert(t, pos), amateur(t, pos, num_layers=layers), alpha)
        ids.append(int(s[0].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("amateur", ["early-exit:1", "other"])
def test_cached_driver_matches_a_from_scratch_loop(amateur):
    expert = tiny_model(1, vocab_size=61)
    other = tiny_model(2, vocab_size=61)
    model, layers = (expert, 1) if amateur == "early-exit:1" else (other, None)
    spec = amateur if amateur == "early-exit:1" else other
    for prompt in ([3, 14, 15], [9]):
        ref = naive_contrastive(expert, model, layers, prompt, 12, alpha=0.1)
        out = contrastive_generate(expert, spec, prompt, alpha=0.1, params=SamplingParams(temperature=0.0),
                                   max_tokens=12)
        assert out.token_ids[0] == ref


def test_alpha_one_is_plain_greedy_and_sampling_is_seeded():
    expert = tiny_model(1, vocab_size=61)
    out = contrastive_generate(expert, "early-exit:2", [4, 2], alpha=1.0, max_tokens=8)
    ids = [4, 2]
    with torch.inference_mode():
        for _ in range(8):
            ids.append(int(expert(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0))[0].argmax()))
    assert out.token_ids[0] == ids[2:]
    p = SamplingParams(temperature=5.0, seed=7)
    a = contrastive_generate(expert, "early-exit:1", [4, 2], alpha=0.01, params=p, max_tokens=8, n=4)
    b = contrastive_generate(expert, "early-exit:1", [4, 2], alpha=0.01, params=p, max_tokens=8, n=4)
    assert a.token_ids == b.token_ids and len({tuple(x) for x in a.token_ids}) > 1


def test_bad_settings_are_named():
    expert = tiny_model(1, vocab_size=61)
    with pytest.raises(ParamError, match="contrastive_alpha"):
        contrastive_generate(expert, "early-exit:1", [1], alpha=0.0)
    with pytest.raises(ParamError, match="contrastive_amateur"):
        contrastive_generate(expert, "early-exit:9", [1])
    with pytest.raises(ParamError, match="contrastive_amateur"):
        contrastive_generate(expert, tiny_model(2, vocab_size=60), [1])


def test_a_separate_amateur_runs_as_scheduler_rows_beside_other_requests(real_tokenizer):
    """A separate amateur model (its own paged cache, caught up lazily) inside an engine's batch: the
    rows give the from-scratch loop's tokens, share the prompt's amateur blocks across the n samples,
    and free them all when they finish."""
    from logitlab.decoding.contrastive import Amateur
    from logitlab.engine import Engine

    V = real_tokenizer.vocab_size
    expert, other = tiny_model(1, vocab_size=V), tiny_model(2, vocab_size=V)
    engine = Engine(expert, real_tokenizer, max_batch=8, max_len=64)
    amateur = Amateur(other, 1024, block_size=4)
    prompt = [3, 14, 15, 9, 2, 6, 5]
    ref = naive_contrastive(expert, other, None, prompt, 10, alpha=0.1)
    plain = engine.make_requests([7, 8], SamplingParams(max_tokens=10, temperature=0.7, seed=1))
    engine.scheduler.add(plain)
    got = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0, n=3, ignore_eos=True),
                          contrastive=(amateur, 0.1, 1.0))[0]
    assert [c.token_ids for c in got.choices] == [ref] * 3
    while engine.scheduler.has_work():
        engine.scheduler.step()
    assert not amateur.tables and amateur.cache.used_blocks() == 0
    assert amateur.cache.hits > 0  # the samples reused the prompt's blocks
