"""The ``logitlab`` command line: generate | chat | score | dist | game | classify | demo | serve | bench.

Bad input never prints a traceback: one line ``error: <field>: <reason>`` on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from .cli_drivers import (
    add_driver_commands,
    add_driver_flags,
    check_driver_args,
    driver_requested,
    run_driver_generate,
)
from .sampling import ParamError, SamplingParams
from .server.cli import add_serve_command
from .train.aot import add_aot_command
from .train.cli import add_train_command

MAX_DIST_ROWS = 10_000  # `dist --top`


class CLIError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        raise CLIError(f"arguments: {message}")


# ---- flags shared by generate / chat / dist ------------------------------------------------------

def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="alias, .gguf path or Hugging Face directory "
                   "(default: smollm2-135m-instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8", "gguf", "float16"],
                   help="weight precision (int8 = weight-only int8; gguf = compute on the GGUF file's own "
                        "4-bit/8-bit blocks, activations rounded to int8 per block as in llama.cpp; float16: "
                        "with --device cuda only)")
    p.add_argument("--exact-head", action="store_true",
                   help="with --dtype gguf: a float32 LM head (logits without activation rounding in the head)")
    p.add_argument("--activations", default=None, choices=["int8", "int8x2"],
                   help="with --dtype gguf: int8 (default, as llama.cpp) or int8x2 (two int8 levels, about 16 "
                        "bits: greedy text equal to float32's; prefill and large batches about half as fast)")
    p.add_argument("--kv-memory", type=float, default=None, metavar="GB",
                   help="KV-cache budget in GB (default: enough for the batch, at most half the free memory)")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="cpu (default), cuda or cuda:N: the model, its KV cache and the sampler run there")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (applied in the order of the README's pipeline)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--typical-p", type=float, default=1.0)
    g.add_argument("--epsilon", type=float, default=0.0)
    g.add_argument("--eta", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--temperature-frequency-penalty", type=float, default=0.0,
                   help="seed-000 per-token temperature k = 1 + f*count + p*[count>0]")
    g.add_argument("--temperature-presence-penalty", type=float, default=0.0)
    g.add_argument("--penalize-prompt", action="store_true", help="count prompt tokens in the penalties")
    g.add_argument("--logit-bias", action="append", default=[], metavar="ID:BIAS")
    g.add_argument("--allowed-token-id", action="append", type=int, default=None, metavar="ID")
    g.add_argument("--banned-token-id", action="append", type=int, default=None, metavar="ID")
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], metavar="STRING")
    g.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--n", type=int, default=1)
    # llama.cpp's samplers (llama.cpp's own spelling of a flag is accepted as an alias)
    g.add_argument("--top-n-sigma", "--top-nsigma", type=float, default=0.0, dest="top_n_sigma",
                   help="keep logits >= max - N*std (0 = off)")
    g.add_argument("--xtc-probability", type=float, default=0.0, help="XTC: chance per token (0 = off)")
    g.add_argument("--xtc-threshold", type=float, default=0.1, help="XTC: p at which a token is a top choice")
    g.add_argument("--dry-multiplier", type=float, default=0.0, help="DRY repetition penalty (0 = off)")
    g.add_argument("--dry-base", type=float, default=1.75)
    g.add_argument("--dry-allowed-length", type=int, default=2)
    g.add_argument("--dry-penalty-last-n", type=int, default=-1, help="-1 = whole context, 0 = off")
    g.add_argument("--dry-sequence-breaker", action="append", default=None, metavar="STRING",
                   dest="dry_sequence_breaker", help='repeatable; replaces the default \\n : " * ("none": no breakers)')
    g.add_argument("--mirostat", type=int, default=0, help="0 = off, 1 or 2 (replaces top-k/top-p/... truncation)")
    g.add_argument("--mirostat-tau", "--mirostat-ent", type=float, default=5.0, dest="mirostat_tau",
                   help="target surprise (bits)")
    g.add_argument("--mirostat-eta", "--mirostat-lr", type=float, default=0.1, dest="mirostat_eta",
                   help="learning rate")
    g.add_argument("--dynatemp-range", type=float, default=0.0, help="dynamic temperature T +- range (0 = off)")
    g.add_argument("--dynatemp-exponent", "--dynatemp-exp", type=float, default=1.0, dest="dynatemp_exponent")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, help="ban repeating any n-gram (0 = off)")


def _parse_logit_bias(items: list[str]) -> dict[int, float] | None:
    if not items:
        return None
    bias = {}
    for item in items:
        try:
            tok, val = item.split(":")
            if not re.fullmatch(r"0|-?[1-9][0-9]{0,18}", tok):  # int() also takes "1_000", "+5", "007"
                raise ValueError
            bias[int(tok)] = float(val)
        except ValueError:
            raise ParamError("logit_bias", f"expected ID:BIAS with ID a plain integer, got {item[:40]!r}") from None
    return bias


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


def _dry_breakers(items: list[str] | None) -> list[str]:
    """--dry-sequence-breaker values, escapes (\\n, \\t, ...) read as llama.cpp reads them: none given =
    the default breakers; "none" alone = no breakers."""
    if items is None:
        return SamplingParams().dry_sequence_breakers
    if items == ["none"]:
        return []
    return [re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), s) for s in items]


def _params(a: argparse.Namespace, **extra) -> SamplingParams:
    return SamplingParams(
        max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
        typical_p=a.typical_p, epsilon=a.epsilon, eta=a.eta, frequency_penalty=a.frequency_penalty,
        presence_penalty=a.presence_penalty, repetition_penalty=a.repetition_penalty,
        temperature_frequency_penalty=a.temperature_frequency_penalty,
        temperature_presence_penalty=a.temperature_presence_penalty, penalize_prompt=a.penalize_prompt,
        logit_bias=_parse_logit_bias(a.logit_bias), allowed_token_ids=a.allowed_token_id,
        banned_token_ids=a.banned_token_id, min_tokens=a.min_tokens, stop=list(a.stop),
        stop_token_ids=list(a.stop_token_id), ignore_eos=a.ignore_eos, seed=a.seed, n=a.n,
        top_n_sigma=a.top_n_sigma, xtc_probability=a.xtc_probability, xtc_threshold=a.xtc_threshold,
        dry_multiplier=a.dry_multiplier, dry_base=a.dry_base, dry_allowed_length=a.dry_allowed_length,
        dry_penalty_last_n=a.dry_penalty_last_n, dry_sequence_breakers=_dry_breakers(a.dry_sequence_breaker),
        mirostat=a.mirostat, mirostat_tau=a.mirostat_tau, mirostat_eta=a.mirostat_eta,
        dynatemp_range=a.dynatemp_range, dynatemp_exponent=a.dynatemp_exponent,
        no_repeat_ngram_size=a.no_repeat_ngram_size, **extra,
    )


# Checked before the model is loaded: any id below this passes here, and the real vocabulary (and context
# length) are checked again, by the engine, once the model is there.
_ANY_VOCAB = 1 << 31


def _checked_params(a: argparse.Namespace, **extra) -> SamplingParams:
    """The sampling flags, validated before any model is loaded or cache allocated (``--n 129`` must not
    build a 129-row KV cache first)."""
    params = _params(a, **extra)
    params.validate(_ANY_VOCAB)
    return params


def _check_text(field: str, text: str | None) -> None:
    if text is not None and not text:
        raise ParamError(field, "must not be empty")


def _check_utf8(a: argparse.Namespace) -> None:
    """Every text argument must be valid UTF-8: argv bytes that are not arrive as lone surrogates
    (``b"caf\xe9"`` -> ``"caf\udce9"``), which no tokenizer can encode."""
    for name, value in vars(a).items():
        for s in value if isinstance(value, list) else [value]:
            if isinstance(s, str):
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError as e:
                    ch = ord(s[e.start])
                    what = f"byte {ch - 0xDC00:#04x}" if 0xDC80 <= ch <= 0xDCFF else f"U+{ch:04X}"
                    raise ParamError(name, f"is not valid UTF-8 ({what} at position {e.start})") from None


def _engine(a: argparse.Namespace, **kw):
    from .engine import Engine
    from .weights import DEFAULT_MODEL

    kv = getattr(a, "kv_memory", None)
    if kv is not None and not 0 < kv < 1e6:  # before the model is loaded
        raise ParamError("kv_memory", f"must be a positive number of GB, got {kv}")
    if getattr(a, "exact_head", False):
        kw["exact_head"] = True
    if getattr(a, "activations", None) is not None:
        kw["activations"] = a.activations
    device = getattr(a, "device", "cpu")
    if a.dtype == "float16" and device == "cpu":
        raise CLIError("arguments: --dtype float16 runs on a GPU only (add --device cuda)")
    if device != "cpu":  # (checked again by Engine.load, before it loads anything)
        from .engine import resolve_device

        resolve_device(device)
        kw["device"] = device
    return Engine.load(a.model or DEFAULT_MODEL, dtype=a.dtype, kv_memory=kv, **kw)


# ---- commands ----------------------------------------------------------------------------------

def cmd_generate(a: argparse.Namespace) -> int:
    _check_text("prompt", a.prompt)
    params = _checked_params(a, logprobs=a.logprobs, logprobs_mode=a.logprobs_mode, echo=a.echo,
                             explain=a.explain)
    check_driver_args(a, params)
    # n samples share the prompt's KV blocks; beyond 64 rows at once they queue (memory stays flat)
    engine = _engine(a, use_cache=not a.no_kv_cache,
                     max_batch=min(max(a.n, getattr(a, "beam_width", None) or 1), 64))
    prompt = engine.chat_prompt_ids([{"role": "user", "content": a.prompt}]) if a.chat else a.prompt
    if driver_requested(a):  # beam / contrastive / speculative / constrained decoding
        return run_driver_generate(a, engine, prompt, params)
    if a.json:
        from .openai_format import completion_response

        results = engine.generate(prompt, params)
        resp = completion_response(engine.tokenizer, engine.name, results, echo=a.echo,
                                   logprobs=a.logprobs is not None)
        print(json.dumps(resp, ensure_ascii=False, indent=2))
        return 0
    if a.n == 1:  # stream to the terminal
        if a.echo:
            sys.stdout.write(a.prompt)
        finish = None
        for ev in engine.stream(prompt, params):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            finish = ev.finish_reason or finish
        sys.stdout.write("\n")
        request = ev.request
        _print_extras(engine, request.output_ids, request.token_logprobs, request.top_logprobs, request.trace, a)
        print(f"[finish_reason: {finish}]", file=sys.stderr)
        return 0
    results = engine.generate(prompt, params)
    for c in results[0].choices:
        print(f"--- choice {c.index} (finish_reason: {c.finish_reason})")
        print((a.prompt if a.echo else "") + c.text)
        _print_extras(engine, c.token_ids, c.token_logprobs, c.top_logprobs, c.trace, a)
    return 0


def _print_extras(engine, ids, lps, tops, trace, a) -> None:
    if a.logprobs is not None:
        print(f"{'token':>16} {'logprob':>9}  top alternatives", file=sys.stderr)
        for i, tid in enumerate(ids):
            alts = ", ".join(f"{engine.tokenizer.decode([t])!r}:{lp:.2f}" for t, lp in (tops[i] or []))
            print(f"{engine.tokenizer.decode([tid])!r:>16} {lps[i]:9.3f}  {alts}", file=sys.stderr)
    if a.explain and trace:
        from .explain import format_trace

        print(format_trace(trace, engine.tokenizer), file=sys.stderr)


def cmd_chat(a: argparse.Namespace) -> int:
    params = _checked_params(a)
    engine = _engine(a)
    params.validate(engine.vocab_size, eos_token_ids=sorted(engine.tokenizer.eos_token_ids))
    messages = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    print("chat with", engine.name, "— empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = ""
        for ev in engine.stream(engine.chat_prompt_ids(messages), params):
            reply += ev.text
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_score(a: argparse.Namespace) -> int:
    if (a.text is None) == (a.file is None):
        raise ParamError("text", "give TEXT or --file F (exactly one)")
    if a.file is not None:
        try:
            with open(a.file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ParamError("file", f"cannot read {a.file!r}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ParamError("file", f"{a.file!r} is not UTF-8 text (byte {e.start})") from None
    else:
        text = a.text
    _check_text("text", text)
    engine = _engine(a)
    res = engine.score(text, context=a.context, progress=a.file is not None)
    tok = engine.tokenizer
    if a.json:
        print(json.dumps({
            "total_logprob": res.total_logprob, "num_tokens": len(res.tokens), "perplexity": res.perplexity,
            "conditioned_on": res.conditioned_on,
            "tokens": [tok.decode([t]) for t in res.tokens], "token_ids": res.tokens,
            "token_logprobs": res.token_logprobs,
        }, ensure_ascii=False, indent=2))
        return 0
    c = res.conditioned_on or {}
    if c.get("kind") == "context":
        print(f"conditioned on the context ({c['num_tokens']} tokens)")
    elif c.get("kind") in ("bos", "eos"):
        print(f"first token conditioned on {c['token']!r} ({c['kind'].upper()}, id {c['id']})")
    elif c.get("kind") == "first_token":
        print(f"the model has no BOS or EOS token: the first token {c['token']!r} is context, not scored")
    if a.file is None:
        for t, lp in zip(res.tokens, res.token_logprobs, strict=True):
            print(f"{tok.decode([t])!r:>20} {lp:9.3f}")
    print(f"tokens: {len(res.tokens)}  total logprob: {res.total_logprob:.3f}  "
          f"cross-entropy: {-res.total_logprob / len(res.tokens):.3f} nats/token  "
          f"perplexity: {res.perplexity:.3f}")
    return 0


def cmd_dist(a: argparse.Namespace) -> int:
    from .explain import knob_report

    _check_text("prompt", a.prompt)
    if not 1 <= a.top <= MAX_DIST_ROWS:
        raise ParamError("top", f"must be an integer in [1, {MAX_DIST_ROWS}], got {a.top}")
    if a.plot and not os.path.isdir(os.path.dirname(os.path.abspath(a.plot))):
        raise ParamError("plot", f"no directory to write {a.plot!r} in")
    params = _checked_params(a)
    engine = _engine(a)
    params.validate(engine.vocab_size, eos_token_ids=sorted(engine.tokenizer.eos_token_ids))
    report = knob_report(engine, a.prompt, params, top=a.top)
    if a.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        from .explain import format_knob_report

        print(format_knob_report(report))
    if a.plot:
        from .explain import plot_knob_report

        plot_knob_report(report, a.plot)
        print(f"wrote {a.plot}", file=sys.stderr)
    return 0


def cmd_game(a: argparse.Namespace) -> int:
    """The summarization game (seed 001): CE of the paragraph after each --prefix, and a --search."""
    from .game import check_search, format_game, play, search_prefix, to_dict

    if a.search is not None:  # ranges first, before any model is loaded
        check_search(a.search, a.budget, a.width, a.top_k, a.paragraph_k)
    for p in a.prefix:
        _check_text("prefix", p)
    try:
        if a.paragraph_file == "-":
            paragraph = sys.stdin.read()
        else:
            with open(a.paragraph_file, encoding="utf-8") as f:
                paragraph = f.read()
    except OSError as e:
        raise ParamError("paragraph_file", f"cannot read {a.paragraph_file!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ParamError("paragraph_file", f"{a.paragraph_file!r} is not UTF-8 text (byte {e.start})") from None
    paragraph = paragraph.strip()
    if not paragraph:
        raise ParamError("paragraph_file", f"{a.paragraph_file!r} is empty")
    engine = _engine(a)
    color = a.color == "always" or (a.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    results = [play(engine, paragraph, a.prefix)]
    if a.search is not None:
        results.append(search_prefix(engine, paragraph, budget=a.budget, search=a.search, width=a.width,
                                     top_k=a.top_k, paragraph_k=a.paragraph_k))
    if a.json:
        out = to_dict(engine.tokenizer, results[0])
        if len(results) > 1:
            out["search"] = to_dict(engine.tokenizer, results[1])["search"]
        print(json.dumps(out, ensure_ascii=False, indent=2))
        return 0
    print(format_game(engine.tokenizer, results[0], color=color))
    if len(results) > 1:
        print(f"\n--- {a.search} search for a prefix of at most {a.budget} token{'' if a.budget == 1 else 's'}:")
        print(format_game(engine.tokenizer, results[1], color=color, header=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="logitlab", description="Get text out of trained language models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="complete a prompt (streams to the terminal)")
    g.add_argument("prompt")
    _add_model_flags(g)
    _add_sampling_flags(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--logprobs", type=int, default=None, metavar="N", help="top-N alternatives per token")
    g.add_argument("--logprobs-mode", default="raw", choices=["raw", "processed"])
    g.add_argument("--echo", action="store_true", help="include the prompt (and its logprobs)")
    g.add_argument("--explain", action="store_true", help="per-step trace of every pipeline stage")
    g.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence every step")
    g.add_argument("--json", action="store_true", help="print an OpenAI completions-shaped JSON object")
    add_driver_flags(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat using the model's chat template")
    _add_model_flags(c)
    _add_sampling_flags(c)
    c.add_argument("--system", default=None)
    c.set_defaults(func=cmd_chat, max_tokens=256)

    s = sub.add_parser("score", help="log-likelihood and perplexity of a text")
    s.add_argument("text", nargs="?")
    s.add_argument("--file", default=None)
    s.add_argument("--context", default=None, help="score P(text | context)")
    s.add_argument("--json", action="store_true")
    _add_model_flags(s)
    s.set_defaults(func=cmd_score)

    d = sub.add_parser("dist", help="the next-token distribution and what each sampling knob keeps")
    d.add_argument("prompt")
    _add_model_flags(d)
    _add_sampling_flags(d)
    d.add_argument("--top", type=int, default=20, help="rows to show")
    d.add_argument("--plot", default=None, metavar="OUT.png")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_dist)

    gm = sub.add_parser("game", help="the summarization game: cross-entropy of a paragraph after each prefix")
    gm.add_argument("paragraph_file", metavar="PARAGRAPH_FILE", help="UTF-8 text file ('-': stdin)")
    gm.add_argument("--prefix", action="append", default=[], metavar="TEXT", help="repeatable")
    gm.add_argument("--search", default=None, choices=["greedy", "beam"],
                    help="also look for a prefix of at most --budget tokens that lowers the CE most")
    gm.add_argument("--budget", type=int, default=4, help="prefix tokens the search may use")
    gm.add_argument("--width", type=int, default=4, help="prefixes kept per step by --search beam")
    gm.add_argument("--top-k", type=int, default=16, help="candidates per step: the model's top-k next tokens")
    gm.add_argument("--paragraph-k", type=int, default=32,
                    help="candidates per step: the paragraph's most surprising tokens")
    gm.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                    help="colour tokens by surprisal (auto: when stdout is a terminal)")
    gm.add_argument("--json", action="store_true")
    _add_model_flags(gm)
    gm.set_defaults(func=cmd_game)

    add_driver_commands(sub, _add_model_flags)
    add_serve_command(sub)
    add_train_command(sub)  # `train`: GPT training from scratch (train/cli.py)
    add_aot_command(sub)  # `aot` and `aot-data`: the arrow-of-time experiments (train/aot.py)

    sub.add_parser("bench", help="speed and memory benchmark (see BENCHMARKS.md; `logitlab bench -h`)",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["bench"]:  # the benchmark has its own parser (bench.py)
            from .bench import main as bench_main

            return bench_main(argv[1:])
        args = build_parser().parse_args(argv)
        _check_utf8(args)
        return args.func(args) or 0
    except ParamError as e:
        print(f"error: {e}", file=sys.stderr)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
    except (ValueError, OSError) as e:  # unknown model, unreadable file, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}" if re.match(r"^\w+: ", msg) else f"error: input: {msg}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
