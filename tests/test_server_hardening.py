"""Issue 11, hardening the server: grammar compilation under a time and memory budget (and bounded field sizes
and cache), numeric fields bounded and one row's failure failing that row only, beam / guided_choice work
capped and counted in the queue, prompt disconnect detection, Host and Content-Type checks, chat templates
rendered under a budget with SIGTERM always stopping the server, request strings never read as files,
Retry-After on 429.

In-thread servers use a tiny random model over the real tokenizer. What could take the machine's memory
(a grammar that compiles to gigabytes) only ever runs in a subprocess server under an address-space cap
(RLIMIT_AS), built from a tiny Hugging Face directory whose chat template never ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from server_harness import LiveServer

from logitlab.engine import Engine
from logitlab.sampling import SamplingParams
from logitlab.server.app import create_app
from logitlab.server.guards import HostPolicy, Limits

from tiny import tiny_model


def _engine(tokenizer, max_batch=4, slow_s: float = 0.0) -> Engine:
    model = tiny_model(seed=0, vocab_size=tokenizer.vocab_size, context_length=256)
    if slow_s:  # a model whose every forward takes slow_s: requests that last long enough to leave mid-way
        forward = model.forward

        def slow(*a, **k):
            time.sleep(slow_s)
            return forward(*a, **k)

        model.forward = slow
    return Engine(model, tokenizer, name="tiny", max_batch=max_batch, max_len=256)


def _metric(srv, name: str) -> float:
    for line in httpx.get(srv.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture(scope="module")
def srv(real_tokenizer):
    """Small limits, so that over-limit requests stay cheap to build; a 1.5 s grammar budget."""
    limits = Limits(max_guided_bytes=2048, max_guided_choices=8, max_guided_choice_bytes=64, max_beam_width=2,
                    grammar_timeout_s=1.5)
    s = LiveServer(create_app(_engine(real_tokenizer, max_batch=4), max_queue=4, limits=limits,
                              bind_host="127.0.0.1", allowed_hosts=["myapp.test"]))
    yield s
    s.stop()


def _post(srv, path, body, timeout=30, **kw):
    return httpx.post(srv.url + path, json=body, timeout=timeout, **kw)


def _wait(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---- 1. grammars: field sizes, a compile budget in a worker process, a bounded cache ---------------------

def test_guided_fields_over_the_size_limit_are_refused_before_compiling(srv):
    digits = "[0-9]" * 600  # 3000 bytes, over this server's 2048; cheap to compile were it compiled
    for body, field in (({"guided_regex": digits}, "guided_regex"),
                        ({"guided_grammar": 'root ::= "' + "a" * 3000 + '"'}, "guided_grammar"),
                        ({"guided_json": {"type": "string", "description": "x" * 3000}}, "guided_json")):
        t0 = time.monotonic()
        r = _post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **body})
        assert r.status_code == 400, (field, r.text[:200])
        err = r.json()["error"]
        assert err["param"] == field and "--max-guided-bytes" in err["message"]
        assert time.monotonic() - t0 < 2
    r = _post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                            "response_format": {"type": "json_schema", "json_schema": {
                                                "schema": {"type": "string", "description": "x" * 3000}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_a_slow_grammar_is_cut_off_while_the_server_keeps_serving(srv):
    """(a|b)* x 150 takes xgrammar ~10 s on this vocabulary (measured); the budget here is 1.5 s."""
    warm = _post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "guided_regex": "[ab]+"}, timeout=120)
    assert warm.status_code == 200 and set(warm.json()["choices"][0]["text"]) <= {"a", "b"}
    slow = {"prompt": "hi", "max_tokens": 3, "guided_regex": "(a|b)*" * 150}
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        fut = pool.submit(_post, srv, "/v1/completions", slow)
        time.sleep(0.3)
        h0 = time.monotonic()
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - h0 < 0.5  # the event loop is free
        plain = _post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
        assert plain.status_code == 200
        r = fut.result()
        took = time.monotonic() - t0
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["param"] == "guided_regex" and "--grammar-timeout" in err["message"]
    assert took < 6, took
    t0 = time.monotonic()  # the same grammar again: refused at once (the refusal is remembered)
    again = _post(srv, "/v1/completions", slow)
    assert again.status_code == 400 and time.monotonic() - t0 < 0.5
    ok = _post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "guided_regex": "[0-9]+"}, timeout=120)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"].isdigit()  # a fresh worker took over


def test_grammar_cache_is_bounded_in_bytes_least_recently_used_out():
    from logitlab.decoding.constraints import GrammarCache

    class Fake:
        def __init__(self, n):
            self.nbytes = n

    cache = GrammarCache(max_bytes=100)
    a, b, c = Fake(40), Fake(40), Fake(40)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # "b" is now the least recently used
    cache.put("c", c)
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c
    assert cache.bytes == 80 and len(cache) == 2
    cache.put("huge", Fake(101))  # larger than the whole cache: not kept, nothing evicted for it
    assert cache.get("huge") is None and len(cache) == 2


def test_the_server_caches_compiled_grammars_within_its_budget(srv):
    cache = srv.app.state.sandbox.cache
    body = {"prompt": "hi", "max_tokens": 2, "guided_regex": "[xyz]+"}
    assert _post(srv, "/v1/completions", body, timeout=120).status_code == 200
    before = srv.app.state.sandbox.grammars.started
    n = len(cache)
    assert _post(srv, "/v1/completions", body).status_code == 200
    assert len(cache) == n and 0 < cache.bytes <= cache.max_bytes
    assert srv.app.state.sandbox.grammars.started == before


# ---- 2. numeric fields bounded; one row's failure fails that row only -------------------------------------

def test_huge_integers_are_refused_not_overflowed(srv):
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 2, "top_k": 2**63}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                 "top_k": 2**64}),
                       ("/v1/distribution", {"prompt": "hi", "top_k": 10**30})):
        r = _post(srv, path, body)
        assert r.status_code == 400, (path, r.text[:200])
        assert r.json()["error"]["param"] == "top_k"
    for field, v in (("seed", 2**64), ("max_tokens", 2**63), ("n", 2**63), ("logprobs", 2**63),
                     ("min_tokens", 2**63), ("dry_allowed_length", 2**63), ("no_repeat_ngram_size", -(2**63) - 1)):
        r = _post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: v})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text[:200])


def _greedy(engine, prompt, **kw):
    return engine.make_requests(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, **kw))


def _run(sched, requests):
    sched.add(requests)
    while sched.has_work():
        sched.step()


def test_a_row_the_sampler_cannot_handle_fails_alone(real_tokenizer, monkeypatch):
    """Rows of one batch: two good requests and one whose parameters break the batched sampler (an injected
    failure, then a top_k past int64 that skipped validation). The bad row ends with an internal error; the
    good rows finish exactly as they do alone."""
    import logitlab.decoding.scheduler as scheduler_module

    engine = _engine(real_tokenizer)
    alone = []
    for p in ("The cat", "Once upon"):
        reqs = _greedy(engine, p)
        _run(engine.scheduler, reqs)
        alone.append(reqs[0].output_ids)

    real_sample = scheduler_module.sample

    def poisoned(logits, batch, **kw):
        if bool((batch.top_k == 4242).any()):
            raise RuntimeError("injected sampler failure")
        return real_sample(logits, batch, **kw)

    monkeypatch.setattr(scheduler_module, "sample", poisoned)
    good = [_greedy(engine, "The cat")[0], _greedy(engine, "Once upon")[0]]
    bad = engine.make_requests("Hello", SamplingParams(max_tokens=6, seed=3, top_k=4242))[0]
    _run(engine.scheduler, [good[0], bad, good[1]])
    assert [g.output_ids for g in good] == alone and all(g.finish_reason == "length" for g in good)
    assert bad.finish_reason == "error" and "injected sampler failure" in bad.error
    monkeypatch.undo()

    from logitlab.decoding.scheduler import Request

    raw = Request(list(real_tokenizer.encode("Hello")), SamplingParams(max_tokens=6, top_k=2**63), seed=1)
    good = [_greedy(engine, "The cat")[0], _greedy(engine, "Once upon")[0]]
    _run(engine.scheduler, [good[0], raw, good[1]])
    assert [g.output_ids for g in good] == alone
    assert raw.finish_reason == "error" and raw.error.startswith("internal error")


# ---- 3. bounded work per request, counted in the queue --------------------------------------------------

def test_beam_width_and_guided_choice_are_capped(srv):
    r = _post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "beam_width": 500})
    assert r.status_code == 400 and r.json()["error"]["param"] == "beam_width"
    r = _post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "beam_width": 3})
    assert r.status_code == 400 and "--max-beam-width" in r.json()["error"]["message"]
    assert _post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "beam_width": 2}).status_code == 200
    t0 = time.monotonic()
    r = _post(srv, "/v1/completions", {"prompt": "hi", "guided_choice": [f"option {i}" for i in range(2000)]})
    assert r.status_code == 400 and "--max-guided-choices" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 2
    r = _post(srv, "/v1/completions", {"prompt": "hi", "guided_choice": ["y" * 40, "n" * 40]})
    assert r.status_code == 400 and "--max-guided-choice-bytes" in r.json()["error"]["message"]
    r = _post(srv, "/v1/completions", {"prompt": "hi", "guided_choice": ["yes", "no"]})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("yes", "no")


def test_beam_width_and_choices_count_in_the_queue_and_429_says_when_to_retry(srv):
    """Queue of 4 rows, the engine loop held: a beam search of width 2 takes 2, a second one 2 more, and then
    a plain request is refused (429 with Retry-After), as is a guided_choice of 5 options at any time."""
    _wait(lambda: srv.runner.running == 0 and srv.runner.queued == 0, what="an idle server")
    gate = threading.Event()
    srv.runner.call(lambda: gate.wait(30))
    beam = {"prompt": "hi", "max_tokens": 2, "beam_width": 2}
    try:
        with ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(_post, srv, "/v1/completions", beam)]
            _wait(lambda: srv.runner.queued >= 2, what="the first beam search queued")
            futs.append(pool.submit(_post, srv, "/v1/completions", beam))
            _wait(lambda: srv.runner.queued >= 4, timeout=5, what="two beam searches counted as 4 rows")
            r = _post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, timeout=5)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
            r = _post(srv, "/v1/completions", {"prompt": "hi", "guided_choice": list("abcde")}, timeout=5)
            assert r.status_code == 429 and "retry-after" in r.headers
            gate.set()
            assert [f.result().status_code for f in futs] == [200, 200]
    finally:
        gate.set()


# ---- 5. a client that leaves frees its slot at once ---------------------------------------------------

@pytest.fixture(scope="module")
def slow_srv(real_tokenizer):
    s = LiveServer(create_app(_engine(real_tokenizer, slow_s=0.02)))
    yield s
    s.stop()


def test_a_client_that_disconnects_mid_request_frees_its_slot_within_a_second(slow_srv):
    """A non-streaming request for 200 tokens (~5 s here: tokens keep coming every ~20 ms); its client
    closes the connection once it is running; /metrics shows no running request a moment later."""
    body = json.dumps({"prompt": "hi", "max_tokens": 200, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", slow_srv.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    _wait(lambda: _metric(slow_srv, "logitlab_running_requests") == 1, what="the request running")
    generated = _metric(slow_srv, "logitlab_generation_tokens_total")
    sock.close()
    t0 = time.monotonic()
    _wait(lambda: _metric(slow_srv, "logitlab_running_requests") == 0, timeout=5, what="the slot freed")
    assert time.monotonic() - t0 < 1.5
    assert _metric(slow_srv, "logitlab_aborted_requests_total") >= 1
    assert _metric(slow_srv, "logitlab_generation_tokens_total") - generated < 150  # it did not run to its end


# ---- 6. Host names and JSON bodies ----------------------------------------------------------------------

def test_host_header_is_checked_against_the_bound_address(srv):
    url = srv.url + "/v1/models"
    for host in ("evil.example", f"evil.example:{srv.port}", "127.0.0.1.evil.example", "localhost.evil.example"):
        r = httpx.get(url, headers={"Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_host", host
    assert httpx.get(srv.url + "/", headers={"Host": "evil.example"}).status_code == 403
    for host in (f"localhost:{srv.port}", f"127.0.0.1:{srv.port}", f"[::1]:{srv.port}", "LOCALHOST",
                 "myapp.test", f"myapp.test:{srv.port}"):
        assert httpx.get(url, headers={"Host": host}).status_code == 200, host


def test_host_policy_by_bind_address():
    loop = HostPolicy.for_bind("127.0.0.1")
    assert loop.allows("localhost:8000") and loop.allows("[::1]:1") and not loop.allows("192.168.1.9:8000")
    assert not loop.allows("attacker.example:8000")
    lan = HostPolicy.for_bind("192.168.1.9", ["box.lan"])
    assert lan.allows("192.168.1.9:8000") and lan.allows("box.lan") and not lan.allows("10.0.0.1")
    every = HostPolicy.for_bind("0.0.0.0")
    assert every.allows("10.1.2.3:8000") and every.allows("[fe80::1]:80") and not every.allows("evil.example")
    assert HostPolicy.for_bind("127.0.0.1", ["*"]).allows("anything.example")


def test_serve_flags_allowed_host_and_limits():
    import argparse

    from logitlab.sampling import ParamError
    from logitlab.server.cli import _check, add_serve_command, limits_from_args

    p = argparse.ArgumentParser()
    add_serve_command(p.add_subparsers(dest="command"))
    a = p.parse_args(["serve", "--allowed-host", "a.test", "--allowed-host", "b.test", "--max-guided-choices", "5",
                      "--grammar-timeout", "2.5"])
    _check(a)
    assert a.allowed_host == ["a.test", "b.test"]
    lim = limits_from_args(a)
    assert lim.max_guided_choices == 5 and lim.grammar_timeout_s == 2.5 and lim.max_beam_width == 32
    for bad in (["--grammar-timeout", "0"], ["--max-guided-bytes", "0"], ["--allowed-host", " "],
                ["--template-timeout", "nan"]):
        with pytest.raises(ParamError):
            _check(p.parse_args(["serve", *bad]))


def test_only_json_bodies_are_accepted(srv):
    url = srv.url + "/v1/completions"
    body = json.dumps({"prompt": "hi", "max_tokens": 2})
    for kw in ({"content": body, "headers": {"content-type": "text/plain"}},
               {"content": body},  # no Content-Type at all (a fetch() of a Blob sends none)
               {"data": {"prompt": "hi"}},  # a form
               {"files": {"f": ("x.json", body.encode(), "application/json")}}):  # multipart
        r = httpx.post(url, **kw)
        assert r.status_code == 415, (kw, r.status_code)
        err = r.json()["error"]
        assert err["code"] == "unsupported_media_type" and err["type"] == "invalid_request_error"
    for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        assert httpx.post(url, content=body, headers={"content-type": ctype}).status_code == 200, ctype
    assert httpx.post(srv.url + "/tokenize", content='{"prompt": "hi"}',
                      headers={"content-type": "text/plain"}).status_code == 415


# ---- 11. request strings are never file names; Retry-After -------------------------------------------------

def test_grammar_and_schema_strings_are_never_read_as_files(srv, tmp_path, monkeypatch):
    grammar, schema = tmp_path / "g.ebnf", tmp_path / "s.json"
    grammar.write_text('root ::= "yes"')
    schema.write_text('{"type": "object"}')
    looked = []
    for name in ("exists", "isfile"):
        real = getattr(os.path, name)
        monkeypatch.setattr(os.path, name, lambda p, _r=real: (looked.append(str(p)), _r(p))[1])

    def ask(field, path):
        r = _post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: str(path)}, timeout=120)
        assert r.status_code == 400, r.text[:200]
        assert r.json()["error"]["param"] == field
        return r.json()["error"]["message"].replace(str(path), "PATH")

    assert ask("guided_grammar", grammar) == ask("guided_grammar", tmp_path / "missing.ebnf")
    msg = ask("guided_json", schema)
    assert msg == ask("guided_json", tmp_path / "missing.json") and "not valid JSON" in msg
    assert not [p for p in looked if str(tmp_path) in p]  # the file system was not even asked


# ---- 7. a chat template that never ends, SIGTERM ----------------------------------------------------------

HOSTILE_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
CAP_BYTES = 3 << 30  # the subprocess server's address space (it idles at ~0.9 GB of address space)


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """``logitlab serve`` in a subprocess under RLIMIT_AS: a tiny HF model whose chat template never ends."""
    from test_weights import write_hf_dir

    d = tmp_path_factory.mktemp("hostile")
    write_hf_dir(d, tie=True, sharded=False)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = HOSTILE_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    log = d / "server.log"
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({CAP_BYTES}, {CAP_BYTES})); "
            "from logitlab.cli import main; sys.exit(main())")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(d), "--port", "0",
                                 "--template-timeout", "1", "--grammar-memory-mb", "256", "--grammar-timeout", "60",
                                 "--max-guided-bytes", "300000", "--log-level", "warning"],
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    url = None
    while url is None:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        for line in log.read_text().splitlines():
            if "serving" in line and "http://" in line:
                url = line.split("http://", 1)[1].split()[0]
        time.sleep(0.05)
    yield proc, "http://" + url, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_a_grammar_past_the_memory_budget_is_refused_and_the_server_does_not_grow(capped):
    """(a|b)* x 20,000 (120 KB) drove the old server from 3.3 to 12 GB; here the worker hits its 256 MiB."""
    proc, url, _ = capped
    ok = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "guided_regex": "[ab]+"},
                    timeout=120)
    assert ok.status_code == 200
    before = _rss_mb(proc.pid)
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                  "guided_regex": "(a|b)*" * 20000}, timeout=60)
    assert r.status_code == 400 and "--grammar-memory-mb" in r.json()["error"]["message"], r.text[:300]
    assert time.monotonic() - t0 < 10
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "guided_regex": "(a|b)*" * 60000}, timeout=10)
    assert r.status_code == 400 and "--max-guided-bytes" in r.json()["error"]["message"]
    assert _rss_mb(proc.pid) - before < 200
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_a_hostile_chat_template_is_refused_while_health_answers(capped):
    _, url, _ = capped
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        fut = pool.submit(httpx.post, url + "/v1/chat/completions", json=chat, timeout=30)
        time.sleep(0.2)
        for _ in range(3):
            h0 = time.monotonic()
            assert httpx.get(url + "/health", timeout=2).status_code == 200
            assert time.monotonic() - h0 < 0.5
            time.sleep(0.2)
        r = fut.result()
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "--template-timeout" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 10
    r = httpx.post(url + "/tokenize", json={"messages": chat["messages"]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_sigterm_stops_the_server_within_seconds_whatever_it_is_doing(capped):
    """Last in this file: with a template render and a minute-long grammar compile in flight."""
    proc, url, log = capped
    busy = [("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/completions", {"prompt": "hi", "guided_regex": "(a|b)*" * 2000})]
    pool = ThreadPoolExecutor(2)
    for path, body in busy:
        pool.submit(httpx.post, url + path, json=body, timeout=60)
    time.sleep(1.0)
    import psutil

    workers = psutil.Process(proc.pid).children()
    assert workers  # the template and grammar workers at work
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(8)
    except subprocess.TimeoutExpired:
        pytest.fail("the server did not exit within 8 s of SIGTERM:\n" + log.read_text()[-2000:])
    assert time.monotonic() - t0 < 6
    gone, alive = psutil.wait_procs(workers, timeout=3)
    assert not alive  # no worker left compiling
    pool.shutdown(wait=False, cancel_futures=True)
