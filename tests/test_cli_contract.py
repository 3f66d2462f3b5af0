"""The CLI's bad-input contract: every bad argument ends in exit status 2 and exactly one stderr line
``error: <field>: <reason>`` -- no traceback, no other exit code, no value silently accepted -- and whatever
can be checked without the model is refused before the model is loaded (or a cache allocated).

Run in-process through ``logitlab.cli.main``: cases in BEFORE_LOAD run with ``Engine.load`` replaced by a
function that fails the test; cases in NEEDS_MODEL (token ids past the vocabulary, a prompt past the
context, ...) with a tiny random model over the real tokenizer; MODEL_PATHS with the real loader on paths
that are not models. A few run in a real process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest

from logitlab import cli
from logitlab.engine import Engine
from logitlab.sampling.params import MAX_N

X = "x"

BEFORE_LOAD = [
    # -- generate: sampling flags
    (["generate", X, "--n", str(MAX_N + 1)], "n"),
    (["generate", X, "--n", "0"], "n"),
    (["generate", X, "--max-tokens", "0"], "max_tokens"),
    (["generate", X, "--max-tokens", "-5"], "max_tokens"),
    (["generate", X, "--temperature", "-1"], "temperature"),
    (["generate", X, "--temperature", "nan"], "temperature"),
    (["generate", X, "--temperature", "inf"], "temperature"),
    (["generate", X, "--top-p", "1.5"], "top_p"),
    (["generate", X, "--top-p", "0"], "top_p"),
    (["generate", X, "--top-k", "-1"], "top_k"),
    (["generate", X, "--min-p", "2"], "min_p"),
    (["generate", X, "--typical-p", "0"], "typical_p"),
    (["generate", X, "--epsilon", "1"], "epsilon"),
    (["generate", X, "--eta", "-0.1"], "eta"),
    (["generate", X, "--frequency-penalty", "3"], "frequency_penalty"),
    (["generate", X, "--presence-penalty", "-2.5"], "presence_penalty"),
    (["generate", X, "--repetition-penalty", "0"], "repetition_penalty"),
    (["generate", X, "--temperature-frequency-penalty", "-1"], "temperature_frequency_penalty"),
    (["generate", X, "--logit-bias", "12=3"], "logit_bias"),
    (["generate", X, "--logit-bias", "1_000:5"], "logit_bias"),
    (["generate", X, "--logit-bias", "+5:1"], "logit_bias"),
    (["generate", X, "--logit-bias", "007:1"], "logit_bias"),
    (["generate", X, "--logit-bias", "5:1000"], "logit_bias"),
    (["generate", X, "--logit-bias", "5:nan"], "logit_bias"),
    (["generate", X, "--allowed-token-id", "-1"], "allowed_token_ids"),
    (["generate", X, "--min-tokens", "100", "--max-tokens", "10"], "min_tokens"),
    (["generate", X, "--stop", ""], "stop"),
    (["generate", X, *["--stop", "s"] * 17], "stop"),
    (["generate", X, "--seed", str(2**64)], "seed"),
    (["generate", X, "--logprobs", "21"], "logprobs"),
    (["generate", X, "--logprobs", "-1"], "logprobs"),
    # -- generate: decoding drivers
    (["generate", X, "--beam-width", "0"], "beam_width"),
    (["generate", X, "--beam-width", str(2**63)], "beam_width"),
    (["generate", X, "--beam-width", "2", "--n", "3"], "n"),
    (["generate", X, "--beam-width", "2", "--length-penalty", "1e308"], "length_penalty"),
    (["generate", X, "--beam-width", "2", "--length-penalty=-inf"], "length_penalty"),
    (["generate", X, "--regex", "("], "regex"),
    (["generate", X, "--json-schema", '{"type": "nope"}'], "json_schema"),
    (["generate", X, "--beam-width", "2", "--length-penalty", "nan"], "length_penalty"),
    (["generate", X, "--contrastive-amateur", "early-exit:1", "--contrastive-alpha", "0"], "contrastive_alpha"),
    (["generate", X, "--speculative", "ngram", "--num-speculative-tokens", "0"], "num_speculative_tokens"),
    (["generate", X, "--speculative", "ngram", "--num-speculative-tokens", "100000"], "num_speculative_tokens"),
    (["generate", X, "--speculative", "ngram", "--beam-width", "2"], "speculative"),
    (["generate", X, "--json-schema", "{not json"], "json_schema"),
    (["generate", X, "--json-schema", "/no/such/schema.json"], "json_schema"),
    (["generate", X, "--grammar", "/no/such/grammar.ebnf"], "grammar"),
    (["generate", X, "--choice", ""], "choice"),
    # -- generate: text and argv
    (["generate", ""], "prompt"),
    (["generate", "caf\udce9"], "prompt"),  # argv bytes b"caf\xe9" (Latin-1), as Python passes them on
    (["generate", X, "--stop", "\udcfe"], "stop"),
    (["generate", X, "--top-k", "abc"], "arguments"),
    (["generate", X, "--no-such-flag"], "arguments"),
    (["generate"], "arguments"),
    (["generate", X, "--dtype", "float16"], "arguments"),
    (["generate", X, "--logprobs-mode", "cooked"], "arguments"),
    (["no-such-command"], "arguments"),
    ([], "arguments"),
    # -- chat
    (["chat", "--temperature", "-1"], "temperature"),
    (["chat", "--n", str(MAX_N + 1)], "n"),
    (["chat", "--system", "\udcff"], "system"),
    # -- score
    (["score"], "text"),
    (["score", X, "--file", "f.txt"], "text"),
    (["score", "--file", "/no/such/file.txt"], "file"),
    (["score", "--file", "@dir"], "file"),
    (["score", "--file", "@latin1"], "file"),
    (["score", ""], "text"),
    (["score", X, "--context", "\udcff"], "context"),
    # -- dist
    (["dist", X, "--top", "-5"], "top"),
    (["dist", X, "--top", "0"], "top"),
    (["dist", X, "--top-p", "2"], "top_p"),
    (["dist", ""], "prompt"),
    (["dist", X, "--plot", "/no/such/dir/x.png"], "plot"),
    # -- classify, demo
    (["classify", X], "example"),
    (["classify", X, "--example", "noequals"], "example"),
    (["classify", X, "--example", "a=pos"], "labels"),
    (["classify", X, "--example", "a=pos", "--example", "b=neg", "--labels", "pos,,neg"], "labels"),
    (["classify", "\udcff", "--example", "a=pos", "--example", "b=neg"], "inputs"),
    (["demo", "nope"], "arguments"),
    # -- serve
    (["serve", "--max-batch", "0"], "max-batch"),
    (["serve", "--kv-memory", "0"], "kv-memory"),
    (["serve", "--kv-memory", "nan"], "kv-memory"),
    (["generate", X, "--kv-memory", "-1"], "kv_memory"),
    (["score", X, "--kv-memory", "inf"], "kv_memory"),
    (["serve", "--max-batch", "100000"], "max-batch"),
    (["serve", "--max-len", str(10**9)], "max-len"),
    (["serve", "--max-len", "0"], "max-len"),
    (["serve", "--port", "70000"], "port"),
    (["serve", "--port", "-1"], "port"),
    (["serve", "--max-queue", "0"], "max-queue"),
    (["serve", "--max-queue", str(10**12)], "max-queue"),
    (["serve", "--max-body-bytes", "0"], "max-body-bytes"),
    (["serve", "--port", "@busy"], "port"),
    (["serve", "--host", "no such host"], "host"),
    (["serve", "--served-model-name", ""], "served-model-name"),
    (["serve", "--log-level", "loud"], "arguments"),
    (["generate", X, "--dtype", "gguf", "--activations", "int4"], "arguments"),
]

NEEDS_MODEL = [
    (["generate", X, "--banned-token-id", "99999999"], "banned_token_ids"),
    (["generate", X, "--logit-bias", "99999999:1"], "logit_bias"),
    (["generate", X, "--max-tokens", "100000"], "max_tokens"),
    (["generate", X, "--speculative", "early-exit:99"], "speculative"),
    (["generate", X, "--contrastive-amateur", "early-exit:99"], "contrastive_amateur"),
    (["dist", X, "--allowed-token-id", "99999999"], "allowed_token_ids"),
    (["chat", "--banned-token-id", "99999999"], "banned_token_ids"),
]

MODEL_PATHS = [
    (["generate", X, "--model", "no-such-model"], "model"),
    (["generate", X, "--model", "@txt"], "model"),
    (["generate", X, "--model", "@empty_gguf"], "model"),
    (["score", X, "--model", "@dir"], "model"),
    (["classify", X, "--example", "a=p", "--example", "b=n", "--model", "no-such-model"], "model"),
    (["serve", "--model", "no-such-model", "--port", "0"], "model"),
    (["generate", X, "--model", "@bad_tokenizer_dir"], "tokenizer"),
    (["generate", X, "--activations", "int8x2"], "activations"),  # gguf only: refused before loading
    (["serve", "--activations", "int8x2", "--port", "0"], "activations"),
]


def test_the_table_is_large():
    assert len(BEFORE_LOAD) + len(NEEDS_MODEL) + len(MODEL_PATHS) >= 60


@pytest.fixture
def files(tmp_path):
    """Placeholders in the argv tables -> paths (and a port that is in use while the test runs)."""
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "d").mkdir()
    from test_weights import write_hf_dir

    (tmp_path / "hf").mkdir()
    write_hf_dir(tmp_path / "hf", tie=True, sharded=False)
    (tmp_path / "hf" / "tokenizer.json").write_text('{"version": "1.0", "model": 17}')
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    yield {"dir": str(tmp_path / "d"), "latin1": str(tmp_path / "latin1.txt"), "txt": str(tmp_path / "notes.txt"),
           "empty_gguf": str(tmp_path / "empty.gguf"), "busy": str(busy.getsockname()[1]),
           "bad_tokenizer_dir": str(tmp_path / "hf")}
    busy.close()


def run(capsys, argv, files):
    argv = [files[a[1:]] if a.startswith("@") else a for a in argv]
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(code, out, err, field):
    lines = err.splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: "), err
    assert out == "", out


@pytest.fixture
def no_load(monkeypatch, tmp_path):
    def load(cls, *a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(Engine, "load", classmethod(load))
    monkeypatch.setenv("LOGITLAB_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("argv, field", BEFORE_LOAD, ids=[" ".join(a)[:60] for a, _ in BEFORE_LOAD])
def test_refused_before_the_model_is_loaded(capsys, no_load, files, argv, field):
    assert_refused(*run(capsys, argv, files), field)


@pytest.fixture(scope="module")
def tiny_model_(real_tokenizer):
    from tiny import tiny_model

    return tiny_model(seed=0, vocab_size=real_tokenizer.vocab_size, context_length=256)


@pytest.fixture
def tiny_load(monkeypatch, tiny_model_, real_tokenizer):
    def load(cls, model=None, dtype="float32", **kw):
        kw.setdefault("max_len", 256)
        return Engine(tiny_model_, real_tokenizer, name="tiny", **kw)

    monkeypatch.setattr(Engine, "load", classmethod(load))


@pytest.mark.parametrize("argv, field", NEEDS_MODEL, ids=[" ".join(a)[:60] for a, _ in NEEDS_MODEL])
def test_refused_once_the_model_says_so(capsys, tiny_load, files, monkeypatch, argv, field):
    monkeypatch.setattr("builtins.input", lambda prompt="": "hi")  # chat: one turn
    assert_refused(*run(capsys, argv, files), field)


@pytest.mark.parametrize("argv, field", MODEL_PATHS, ids=[" ".join(a)[:60] for a, _ in MODEL_PATHS])
def test_paths_that_are_not_models(capsys, files, tmp_path, monkeypatch, argv, field):
    monkeypatch.setenv("LOGITLAB_HOME", str(tmp_path / "home"))
    assert_refused(*run(capsys, argv, files), field)


def test_a_valid_command_still_runs(capsys, tiny_load, files):
    """The checks refuse only what is wrong: the same flags with good values run (exit 0)."""
    code, out, err = run(capsys, ["generate", "Hi", "--max-tokens", "3", "--temperature", "0", "--n", "2",
                                  "--logit-bias", "5:-100", "--beam-width", "2", "--length-penalty", "-2"], files)
    assert code == 0 and out.count("--- choice") == 2, err
    code, out, err = run(capsys, ["dist", "Hi", "--top", "7", "--top-p", "0.9"], files)
    assert code == 0, err


def test_tiny_temperatures_are_greedy(capsys, tiny_load, files):
    """Below 1e-5 (where float32 rounded T to 0 and the row was sampled at T = 1) T is greedy."""
    greedy = run(capsys, ["generate", "Hi", "--max-tokens", "8", "--temperature", "0"], files)
    for t in ("1e-50", "1e-46", "9e-6"):
        got = run(capsys, ["generate", "Hi", "--max-tokens", "8", "--temperature", t, "--seed", "1"], files)
        assert got[:2] == greedy[:2] and got[0] == 0, t


# ---- in a real process -----------------------------------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import sys
    import logitlab.engine as e
    def load(*a, **k):
        raise SystemExit("the model was loaded")
    e.Engine.load = classmethod(load)
    from logitlab.cli import main
    sys.exit(main())
""")


def run_process(args, tmp_path, timeout=120):
    env = {"PATH": "/usr/bin:/bin", "LOGITLAB_HOME": str(tmp_path / "home"), "LC_ALL": "C.UTF-8"}
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, env=env, timeout=timeout)


@pytest.mark.parametrize("args, field", [
    ([b"generate", b"caf\xe9 au lait"], "prompt"),
    ([b"generate", b"x", b"--stop", b"\xff"], "stop"),
    ([b"generate", b"x", b"--n", str(MAX_N + 1).encode()], "n"),
    ([b"generate", b"x", b"--beam-width", str(2**63).encode()], "beam_width"),
    ([b"serve", b"--max-batch", b"100000"], "max-batch"),
])
def test_in_a_process(tmp_path, args, field):
    r = run_process(args, tmp_path)
    err = r.stderr.decode("utf-8", "replace").splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith(f"error: {field}: "), (r.returncode, err)


def test_port_in_use_in_a_process(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run_process([b"serve", b"--port", str(busy.getsockname()[1]).encode()], tmp_path)
    err = r.stderr.decode().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: port: "), (r.returncode, err)


# ---- the same limits through the HTTP API ----------------------------------------------------------------

@pytest.fixture(scope="module")
def srv(real_tokenizer):
    from server_harness import tiny_server

    return tiny_server(real_tokenizer)


def post(srv, body):
    import httpx

    return httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, **body}, timeout=60)


@pytest.mark.parametrize("key", ["1_000", " 12", "12 ", "+5", "007", "-0", "\u0663", "1e3", "", "9" * 5000])
def test_http_logit_bias_keys_must_be_plain_integers(srv, key):
    r = post(srv, {"logit_bias": {key: 1.0}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text


def test_http_plain_logit_bias_keys_still_work(srv):
    assert post(srv, {"logit_bias": {"12": 1.0, "0": -1.0}}).status_code == 200


@pytest.mark.parametrize("lp", [1e308, -1e308, 10.5])
def test_http_length_penalty_out_of_range_is_400(srv, lp):
    r = post(srv, {"beam_width": 2, "length_penalty": lp})
    assert r.status_code == 400 and r.json()["error"]["param"] == "length_penalty", r.text


def test_http_beam_width_is_bounded(srv):
    r = post(srv, {"beam_width": 2**62})
    assert r.status_code == 400 and r.json()["error"]["param"] == "beam_width", r.text


def test_http_tiny_temperature_is_greedy(srv):
    greedy = post(srv, {"temperature": 0, "max_tokens": 8}).json()["choices"][0]["text"]
    for t in (1e-50, 1e-46, 5e-6):
        assert post(srv, {"temperature": t, "max_tokens": 8, "seed": 3}).json()["choices"][0]["text"] == greedy, t
