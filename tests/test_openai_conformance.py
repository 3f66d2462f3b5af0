"""What OpenAI's and vLLM's own clients expect of `logitlab serve` (issue 11, section 2), through the official
`openai` client and lm-evaluation-harness against a live server (a tiny random model over the real tokenizer).

Expected values come from outside the code under test: logprobs from a plain full forward of the model
(``reference``, no KV cache, no chunking), token boundaries from the `tokenizers` library's own decode, and
lm-eval's loglikelihoods from ``Engine.score``."""

from __future__ import annotations

import codecs
import json
import re

import httpx
import openai
import pytest
import torch
from server_harness import API_KEY, strict_server, tiny_server


@pytest.fixture(scope="module")
def srv(real_tokenizer):
    return tiny_server(real_tokenizer)


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(srv, ids: list[int]) -> torch.Tensor:
    """log P(next token | ids[:t+1]) for every t: [T, V], one plain forward (on the runner thread)."""

    def run():
        with torch.inference_mode():
            logits = srv.engine.model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), logits_at="all")
        return torch.log_softmax(logits[0].float(), -1)

    return srv.runner.call(run).result(timeout=60)


def chars_before(tok, ids: list[int], i: int) -> int:
    """Characters the first ``i`` tokens complete (a trailing partial character decodes as U+FFFD)."""
    return len(tok.decode(ids[:i]).rstrip("\ufffd"))


def raw_bytes(token: str) -> bytes:
    """A token string back to its bytes: ``bytes:`` + \\xNN escapes for the bytes of a partial character."""
    if token.startswith("bytes:"):
        return codecs.escape_decode(token[len("bytes:"):].encode("utf-8"))[0]
    return token.encode("utf-8")


def _complete(client, **kw):
    kw.setdefault("model", "tiny")
    return client.completions.create(**kw)


def _chat(client, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("messages", [{"role": "user", "content": "Tell me something"}])
    return client.chat.completions.create(**kw)


def _chat_stream(srv, body: dict) -> tuple[list[int], list[dict]]:
    """A streamed chat completion's token ids and logprobs.content (the streamed chunks carry the ids)."""
    ids, content = [], []
    for ch in _sse(srv, "/v1/chat/completions", {**body, "stream": True}):
        for c in ch["choices"]:
            ids += c.get("token_ids") or []
            content += (c["logprobs"] or {}).get("content") or []
    return ids, content


def _sse(srv, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", srv.url + path, json={"model": "tiny", **body}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


# ---- logprobs: the sampled token, top k, offsets, partial characters ------------------------------------

def test_logprobs_zero_returns_the_sampled_tokens_entry(srv, client):
    tok = srv.engine.tokenizer
    prompt = "The weather today"
    r = _complete(client, prompt=prompt, max_tokens=6, temperature=1.0, seed=3, logprobs=0,
                  extra_body={"ignore_eos": True})
    lp, ids = r.choices[0].logprobs, r.choices[0].model_extra["token_ids"]
    assert len(lp.tokens) == len(lp.top_logprobs) == 6
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top == {token: chosen}
    p = tok.encode(prompt)
    ref = reference(srv, p + ids)
    for i, t in enumerate(ids):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[len(p) - 1 + i, t]), abs=1e-3)
    # chat: logprobs=true alone gives each token's entry with no alternatives
    msgs = [{"role": "user", "content": "Hi"}]
    c = _chat(client, messages=msgs, max_tokens=4, temperature=1.0, seed=3, logprobs=True,
              extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(e.top_logprobs == [] for e in content)
    assert "".join(e.token for e in content) == c.choices[0].message.content
    out, streamed = _chat_stream(srv, {"messages": msgs, "max_tokens": 4, "temperature": 1.0, "seed": 3,
                                       "logprobs": True, "ignore_eos": True})
    assert [e["logprob"] for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    cp = srv.engine.chat_prompt_ids(msgs)
    ref = reference(srv, cp + out)
    for i, e in enumerate(content):
        assert e.logprob == pytest.approx(float(ref[len(cp) - 1 + i, out[i]]), abs=1e-3)


def test_top_logprobs_add_the_sampled_token_when_it_is_not_among_them(srv, client):
    tok = srv.engine.tokenizer
    prompt = "Once upon a time"
    p = tok.encode(prompt)
    outside = 0
    for temperature in (1.5, 0.0):
        r = _complete(client, prompt=prompt, max_tokens=10, temperature=temperature, seed=5, logprobs=2,
                      extra_body={"ignore_eos": True})
        lp, ids = r.choices[0].logprobs, r.choices[0].model_extra["token_ids"]
        ref = reference(srv, p + ids)
        for i, t in enumerate(ids):
            row = ref[len(p) - 1 + i]
            vals, top_ids = row.topk(2)
            expected = vals.tolist() + ([] if t in top_ids.tolist() else [float(row[t])])
            outside += t not in top_ids.tolist()
            assert sorted(lp.top_logprobs[i].values()) == pytest.approx(sorted(expected), abs=1e-3)
            assert lp.top_logprobs[i][lp.tokens[i]] == pytest.approx(lp.token_logprobs[i], abs=1e-6)
            if temperature == 0:
                assert len(lp.top_logprobs[i]) == 2
    assert outside >= 3  # T=1.5 on a near-flat random model samples outside the top 2 most of the time
    # chat: top_logprobs=2 -> 2 alternatives, or 3 when the sampled token is not among them
    msgs = [{"role": "user", "content": "Go on"}]
    c = _chat(client, messages=msgs, max_tokens=8, temperature=1.5, seed=2, logprobs=True, top_logprobs=2,
              extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    out, streamed = _chat_stream(srv, {"messages": msgs, "max_tokens": 8, "temperature": 1.5, "seed": 2,
                                       "logprobs": True, "top_logprobs": 2, "ignore_eos": True})
    assert [e["token"] for e in streamed] == [e.token for e in content]
    cp = srv.engine.chat_prompt_ids(msgs)
    ref = reference(srv, cp + out)
    grew = 0
    for i, e in enumerate(content):
        row = ref[len(cp) - 1 + i]
        top2 = row.topk(2).values.tolist()
        alts = sorted(a.logprob for a in e.top_logprobs)
        inside = e.logprob >= min(top2) - 1e-4
        assert alts == pytest.approx(sorted(top2 + ([] if inside else [e.logprob])), abs=1e-3)
        grew += not inside
        if not inside:
            assert e.top_logprobs[-1].token == e.token and e.top_logprobs[-1].bytes == e.bytes
    assert grew >= 1


def test_streamed_text_offset_with_a_stop_string_equals_the_non_streamed(srv, client):
    tok = srv.engine.tokenizer
    kw = dict(prompt="Tell me a story", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    text = _complete(client, **kw).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3
    for echo in (False, True):
        body = {"prompt": kw["prompt"], "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": [stop],
                "logprobs": 1, "echo": echo}
        full = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
        assert full["finish_reason"] == "stop" and stop not in full["text"]
        chunks = _sse(srv, "/v1/completions", {**body, "stream": True})
        streamed = {"tokens": [], "text_offset": [], "token_logprobs": []}
        for ch in chunks:
            for c in ch["choices"]:
                for k in streamed:
                    streamed[k] += (c["logprobs"] or {}).get(k, [])
        assert "".join(c["text"] for ch in chunks for c in ch["choices"]) == full["text"]
        assert streamed["tokens"] == full["logprobs"]["tokens"]
        assert streamed["text_offset"] == full["logprobs"]["text_offset"]
        assert streamed["token_logprobs"] == pytest.approx(full["logprobs"]["token_logprobs"], abs=1e-6)
        # every token before the cut starts where the tokens before it end in the returned text
        ids = (tok.encode(kw["prompt"]) if echo else []) + full["token_ids"]
        offsets = full["logprobs"]["text_offset"]
        for i in range(len(ids)):
            expected = chars_before(tok, ids, i)
            if expected < len(full["text"]):
                assert offsets[i] == expected, (i, offsets, full["text"])
        assert offsets == sorted(offsets)


def test_echo_logprobs_on_emoji_and_cjk_show_partial_tokens_as_bytes(srv, client):
    tok = srv.engine.tokenizer
    prompt = "Smile 😀, 中文 and 🦜!"
    ids = tok.encode(prompt)
    partial = [i for i, t in enumerate(ids) if "\ufffd" in tok.decode([t])]
    assert partial, "the prompt has tokens that split a character (the test needs some)"
    r = _complete(client, prompt=prompt, max_tokens=2, temperature=0, logprobs=1, echo=True,
                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    lp = c.logprobs
    n = len(ids)
    for i in partial:
        assert lp.tokens[i].startswith("bytes:") and "\\x" in lp.tokens[i]
    assert not any(lp.tokens[i].startswith("bytes:") for i in range(n) if i not in partial)
    assert b"".join(raw_bytes(t) for t in lp.tokens[:n]) == prompt.encode("utf-8")
    for i in range(n):  # offsets stay in the text: a token inside a character starts where it starts
        assert lp.text_offset[i] == chars_before(tok, ids, i) <= len(prompt)
    assert c.text.startswith(prompt) and all(o <= len(c.text) for o in lp.text_offset)
    # chat: the bytes field carries each token's real bytes; a constraint forces partial tokens out
    target = "😀中文"
    ch = _chat(client, max_tokens=12, temperature=0, logprobs=True, extra_body={"guided_regex": target})
    content = ch.choices[0].logprobs.content
    assert ch.choices[0].message.content == target
    if content[-1].token in ("<|endoftext|>", "<|im_end|>"):  # the grammar's end: the EOS token it allowed
        content = content[:-1]
    assert b"".join(bytes(e.bytes) for e in content) == target.encode("utf-8")
    assert any(e.token.startswith("bytes:") for e in content) or all(len(e.bytes) >= 3 for e in content)
    for e in content:
        assert raw_bytes(e.token) == bytes(e.bytes)


# ---- request rules -----------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("guided_regex", ""), ("guided_grammar", "  "), ("guided_json", ""),
                                         ("guided_choice", []), ("guided_choice", ["yes", ""])])
def test_empty_guided_fields_are_400_not_unconstrained(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, prompt="x", max_tokens=2, extra_body={field: value})
    assert e.value.body["param"] == field
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, max_tokens=2, extra_body={field: value})
    assert e.value.body["param"] == field


def test_stream_options_need_stream_and_prompt_logprobs_range(client):
    for kw in ({}, {"stream": False}):
        for so in ({"include_usage": True}, {"continuous_usage_stats": True}):
            with pytest.raises(openai.BadRequestError) as e:
                _complete(client, prompt="x", max_tokens=2, stream_options=so, **kw)
            assert e.value.body["param"] == "stream_options"
            with pytest.raises(openai.BadRequestError) as e:
                _chat(client, max_tokens=2, stream_options=so, **kw)
            assert e.value.body["param"] == "stream_options"
    for k in (-1, 21):
        with pytest.raises(openai.BadRequestError) as e:
            _complete(client, prompt="x", max_tokens=2, extra_body={"prompt_logprobs": k})
        assert e.value.body["param"] == "prompt_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, prompt="x", max_tokens=2, extra_body={"stream_options": {"nope": True}, "stream": True})


def test_top_logprobs_with_guided_choice_are_the_same_on_both_endpoints(srv, client):
    msgs = [{"role": "user", "content": "Is the sky blue?"}]
    ids = srv.engine.chat_prompt_ids(msgs)
    choices = ["yes", "no", "maybe"]
    comp = _complete(client, prompt=ids, max_tokens=4, temperature=0, logprobs=2,
                     extra_body={"guided_choice": choices})
    chat = _chat(client, messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                 extra_body={"guided_choice": choices})
    text = comp.choices[0].text
    assert text in choices and chat.choices[0].message.content == text
    lp, content = comp.choices[0].logprobs, chat.choices[0].logprobs.content
    assert [e.token for e in content] == lp.tokens
    assert [e.logprob for e in content] == pytest.approx(lp.token_logprobs, abs=1e-5)
    for e, d in zip(content, lp.top_logprobs, strict=True):
        assert sorted(a.logprob for a in e.top_logprobs) == pytest.approx(sorted(d.values()), abs=1e-5)
    out = comp.choices[0].model_extra["token_ids"]
    ref = reference(srv, ids + out)
    for i, t in enumerate(out):
        row = ref[len(ids) - 1 + i]
        assert lp.token_logprobs[i] == pytest.approx(float(row[t]), abs=1e-3)
        expected = row.topk(2).values.tolist() + ([] if t in row.topk(2).indices.tolist() else [float(row[t])])
        assert sorted(lp.top_logprobs[i].values()) == pytest.approx(sorted(expected), abs=1e-3)
    # echo with a driver: the prompt's logprobs too
    e = _complete(client, prompt=ids, max_tokens=4, temperature=0, logprobs=1, echo=True,
                  extra_body={"guided_choice": choices})
    elp = e.choices[0].logprobs
    assert elp.token_logprobs[0] is None and len(elp.tokens) == len(ids) + len(out)
    for i in range(1, len(ids)):
        assert elp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-3)


SQL_LARK = """
start: select_statement
select_statement: "SELECT " column " from " table " where " condition
column: "col_1" | "col_2"
table: "table_1" | "table_2"
condition: column " = " number
number: "1" | "2"
"""


def test_guided_grammar_reads_lark_and_ebnf(client):
    sql = re.compile(r"SELECT (col_1|col_2) from (table_1|table_2) where (col_1|col_2) = (1|2)")
    for seed in range(3):
        r = _complete(client, prompt="SQL:", max_tokens=40, temperature=1.0, seed=seed,
                      extra_body={"guided_grammar": SQL_LARK})
        assert r.choices[0].finish_reason == "stop" and sql.fullmatch(r.choices[0].text), r.choices[0].text
    lark_ws = 'start: "[" ITEM ("," ITEM)* "]"\nITEM: /[a-c]/\n%import common.WS_INLINE\n%ignore WS_INLINE\n'
    r = _complete(client, prompt="List:", max_tokens=30, temperature=1.0, seed=1,
                  extra_body={"guided_grammar": lark_ws})
    if r.choices[0].finish_reason == "stop":
        assert re.fullmatch(r"[ \t]*\[[ \t]*[a-c]([ \t]*,[ \t]*[a-c])*[ \t]*\][ \t]*", r.choices[0].text)
    ebnf = 'root ::= "x" [0-9] [0-9]'
    r = _chat(client, max_tokens=10, temperature=1.0, seed=1, extra_body={"guided_grammar": ebnf})
    assert re.fullmatch(r"x[0-9][0-9]", r.choices[0].message.content)
    for bad in ('start: undefined_rule', 'rule: "a"', 'start: /a/i'):
        with pytest.raises(openai.BadRequestError) as e:
            _complete(client, prompt="x", max_tokens=2, extra_body={"guided_grammar": bad})
        assert e.value.body["param"] == "guided_grammar" and "Lark" in e.value.body["message"]


# ---- vLLM's extensions: prompt_logprobs, continuous usage, /tokenizer_info, token-id batches -------------

def _check_prompt_logprobs(srv, ids: list[int], plp: list, k: int) -> None:
    assert len(plp) == len(ids) and plp[0] is None
    ref = reference(srv, ids)
    for i in range(1, len(ids)):
        row, d = ref[i - 1], plp[i]
        own = d[str(ids[i])]
        assert own["logprob"] == pytest.approx(float(row[ids[i]]), abs=1e-3)
        assert own["rank"] == 1 + int((row > row[ids[i]]).sum())
        vals, top = row.topk(k) if k else (torch.tensor([]), torch.tensor([], dtype=torch.long))
        for rank, (v, t) in enumerate(zip(vals.tolist(), top.tolist(), strict=True), start=1):
            assert d[str(t)]["logprob"] == pytest.approx(v, abs=1e-3)
            if t != ids[i]:
                assert d[str(t)]["rank"] == rank
        assert len(d) == k + (ids[i] not in top.tolist())


def test_sequence_logprobs_in_chunks_equal_one_forward(srv, monkeypatch):
    """The KV-cached, chunked forward behind prompt_logprobs and the drivers' logprobs (long prompts are run
    CHUNK positions at a time) gives what one plain forward gives."""
    from logitlab.server import conformance

    monkeypatch.setattr(conformance, "CHUNK", 5)
    ids = srv.engine.tokenizer.encode("A longer prompt that spans several chunks of five positions, to be sure 😀.")
    assert len(ids) > 12
    rows = srv.runner.call(lambda: conformance.sequence_logprobs(srv.engine, ids, 3, 4)).result(60)
    ref = reference(srv, ids)
    assert len(rows) == len(ids) - 3
    for p, (lp, rank, top) in zip(range(3, len(ids)), rows, strict=True):
        row = ref[p - 1]
        assert lp == pytest.approx(float(row[ids[p]]), abs=1e-4)
        assert rank == 1 + int((row > row[ids[p]]).sum())
        vals, idx = row.topk(4)
        assert [i for i, _ in top] == idx.tolist() and [v for _, v in top] == pytest.approx(vals.tolist(), abs=1e-4)


def test_prompt_logprobs(srv, client):
    tok = srv.engine.tokenizer
    a, b = tok.encode("The quick brown fox"), tok.encode("Hello there, world")
    r = _complete(client, prompt=[a, b], n=2, max_tokens=2, seed=1, extra_body={"prompt_logprobs": 3})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    lists = [c.model_extra["prompt_logprobs"] for c in r.choices]
    assert lists[0] == lists[1] and lists[2] == lists[3]
    _check_prompt_logprobs(srv, a, lists[0], 3)
    _check_prompt_logprobs(srv, b, lists[2], 3)
    zero = _complete(client, prompt=a, max_tokens=1, extra_body={"prompt_logprobs": 0})
    _check_prompt_logprobs(srv, a, zero.choices[0].model_extra["prompt_logprobs"], 0)
    # streamed: in each choice's first chunk
    chunks = _sse(srv, "/v1/completions", {"prompt": [a, b], "max_tokens": 2, "stream": True, "prompt_logprobs": 3})
    firsts = {}
    for ch in chunks:
        for c in ch["choices"]:
            if "prompt_logprobs" in c:
                assert c["index"] not in firsts
                firsts[c["index"]] = c["prompt_logprobs"]
    assert firsts == {0: lists[0], 1: lists[2]}
    # chat: at the top level
    msgs = [{"role": "user", "content": "Hi"}]
    c = _chat(client, messages=msgs, max_tokens=2, extra_body={"prompt_logprobs": 2})
    _check_prompt_logprobs(srv, srv.engine.chat_prompt_ids(msgs), c.model_extra["prompt_logprobs"], 2)


def test_continuous_usage_stats(srv):
    prompt_tokens = len(srv.engine.tokenizer.encode("Count the tokens"))
    for include_usage in (True, False):
        so = {"include_usage": include_usage, "continuous_usage_stats": True}
        chunks = _sse(srv, "/v1/completions", {"prompt": "Count the tokens", "max_tokens": 4, "n": 2, "seed": 1,
                                               "ignore_eos": True, "stream": True, "stream_options": so})
        seen = {0: 0, 1: 0}
        for ch in chunks:
            if not ch["choices"]:
                continue
            (c,) = ch["choices"]
            seen[c["index"]] += len(c.get("token_ids") or [])
            assert ch["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": seen[c["index"]],
                                   "total_tokens": prompt_tokens + seen[c["index"]]}
        assert seen == {0: 4, 1: 4}
        tail = [ch for ch in chunks if not ch["choices"]]
        if include_usage:
            assert tail[-1]["usage"]["completion_tokens"] == 8
        else:
            assert not tail
    msgs = [{"role": "user", "content": "Hi"}]
    chunks = _sse(srv, "/v1/chat/completions", {"messages": msgs, "max_tokens": 3, "ignore_eos": True, "stream": True,
                                                "stream_options": {"continuous_usage_stats": True}})
    pt = len(srv.engine.chat_prompt_ids(msgs))
    counts = [ch["usage"]["completion_tokens"] for ch in chunks]
    assert all(ch["usage"]["prompt_tokens"] == pt for ch in chunks)
    assert counts[0] == 0 and counts[-1] == 3 and counts == sorted(counts)


def test_tokenizer_info_lets_a_client_tokenize_as_the_server(srv, real_tokenizer):
    from tokenizers import Tokenizer as HFTokenizer

    info = httpx.get(srv.url + "/tokenizer_info", timeout=60).json()
    tok = srv.engine.tokenizer
    assert info["vocab_size"] == tok.vocab_size and info["model_max_length"] == 256
    assert info["chat_template"] == tok.chat_template and info["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in info["special_tokens"]
    local = HFTokenizer.from_str(json.dumps(info["tokenizer_json"]))
    for text in ("Hello world 😀 中文", "  spaces\tand\nlines"):
        served = httpx.post(srv.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
        assert local.encode(text, add_special_tokens=False).ids == served["tokens"]
    eos = httpx.post(srv.url + "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False})
    assert eos.json()["tokens"] == [info["eos_token_id"]] and info["eos_token_id"] in info["eos_token_ids"]
    strict = strict_server(real_tokenizer)
    assert httpx.get(strict.url + "/tokenizer_info").status_code == 401
    ok = httpx.get(strict.url + "/tokenizer_info", headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.json()["eos_token"] == info["eos_token"]


def test_disconnect_with_conformance_options_frees_the_slot(srv):
    """The conformance wrapper around a stream still lets a client's disconnect free its slot."""
    import time

    runner = srv.runner
    deadline = time.monotonic() + 10
    while runner.running or runner.queued:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    body = {"model": "tiny", "prompt": "long", "max_tokens": 240, "stream": True, "ignore_eos": True,
            "prompt_logprobs": 1, "stream_options": {"continuous_usage_stats": True}}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", srv.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                assert "usage" in json.loads(next(lines)[len("data: "):])
                next(lines)  # the blank line between events
            assert runner.running == 1
    deadline = time.monotonic() + 10
    while runner.running:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.005)


def _lm_eval_loglikelihoods(srv, pairs: list[tuple[str, str]], max_tokens: int) -> list[tuple[float, bool]]:
    """What lm-eval's local-completions does for loglikelihood requests: token-id prompts in one batch,
    echo=True, logprobs=1, temperature 0, and parse_logprobs' arithmetic."""
    tok = srv.engine.tokenizer
    prompts, ctxlens = [], []
    for ctx, cont in pairs:
        c = tok.encode(ctx, add_special_tokens=False)
        prompts.append(c + tok.encode(cont, add_special_tokens=False))
        ctxlens.append(len(c))
    body = {"model": "tiny", "prompt": prompts, "temperature": 0, "max_tokens": max_tokens, "logprobs": 1,
            "seed": 1234, "echo": True}
    out = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()
    res = []
    for choice, ctxlen, p in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens, prompts, strict=True):
        end = len(p)  # lm-eval drops the generated token with [ctxlen:-1]; with max_tokens=0 there is none
        lps = choice["logprobs"]["token_logprobs"][ctxlen:end]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:end]
        assert len(choice["logprobs"]["token_logprobs"]) == len(p) + max_tokens
        res.append((sum(lps), all(lp == max(t.values()) for lp, t in zip(lps, tops, strict=True))))
    return res


def _greedy_continuation(srv, ctx: str, k: int = 2) -> str:
    from logitlab import SamplingParams

    tok = srv.engine.tokenizer
    ids = tok.encode(ctx, add_special_tokens=False)
    logits = srv.runner.call(lambda: srv.engine.generate(ids, SamplingParams(max_tokens=k, temperature=0,
                                                                              ignore_eos=True))).result(60)
    text = logits[0].choices[0].text
    # only a continuation that tokenizes back to the same tokens is "greedy" for lm-eval too
    assert tok.encode(ctx + text, add_special_tokens=False) == ids + logits[0].choices[0].token_ids
    return text


def test_lm_eval_style_scoring_requests_match_engine_score(srv):
    greedy = _greedy_continuation(srv, "Once upon a time")
    pairs = [("The capital of France is", " Paris"), ("Two plus two is", " four 😀"),
             ("Once upon a time", greedy), ("中文", " 字")]
    for max_tokens in (1, 0):
        got = _lm_eval_loglikelihoods(srv, pairs, max_tokens)
        for (ctx, cont), (ll, _) in zip(pairs, got, strict=True):
            want = srv.runner.call(lambda c=ctx, t=cont: srv.engine.score(t, context=c).total_logprob).result(60)
            assert ll == pytest.approx(want, abs=1e-3)
        assert [g for _, g in got] == [False, False, True, False]


def test_lm_eval_local_completions_matches_engine_score(srv, tmp_path, monkeypatch):
    """lm-evaluation-harness itself (`local-completions`, its remote tokenizer found through /tokenizer_info)
    on a small multiple-choice task: its loglikelihoods are Engine.score's."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    greedy = _greedy_continuation(srv, "Once upon a time")
    docs = [{"question": "The capital of France is", "choices": [" Paris", " Berlin", " Rome"], "answer": 0},
            {"question": "Once upon a time", "choices": [greedy, " zebra"], "answer": 0},
            {"question": "The sky is", "choices": [" blue", " green 😀", " 中文"], "answer": 0}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs))
    (tmp_path / "tinymc.yaml").write_text(
        "task: tinymc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ntarget_delimiter: ''\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    res = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": srv.url + "/v1/completions", "model": "tiny", "num_concurrent": 1,
                    "max_retries": 1, "batch_size": 4, "max_length": 256},
        tasks=["tinymc"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True)
    samples = sorted(res["samples"]["tinymc"], key=lambda s: s["doc_id"])
    assert len(samples) == 3
    correct = []
    for s in samples:
        doc = docs[s["doc_id"]]
        lls = []
        for (ctx, cont), (ll, is_greedy) in zip(s["arguments"], [r[0] for r in s["resps"]], strict=True):
            assert ctx == doc["question"] and cont in doc["choices"]
            want = srv.runner.call(lambda c=ctx, t=cont: srv.engine.score(t, context=c).total_logprob).result(60)
            assert ll == pytest.approx(want, abs=1e-3)
            lls.append(want)
            if s["doc_id"] == 1 and cont == greedy:
                assert is_greedy
        correct.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["answer"]))
    assert res["results"]["tinymc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
