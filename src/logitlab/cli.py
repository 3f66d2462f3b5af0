"""The ``logitlab`` command line: generate | chat | score | dist | classify | demo | serve | bench.

Bad input never prints a traceback: one line ``error: <field>: <reason>`` on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from .decoding.cli_ext import add_driver_commands, add_driver_flags, driver_requested, run_driver_generate
from .sampling import ParamError, SamplingParams
from .server.cli import add_serve_command


class CLIError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        raise CLIError(f"arguments: {message}")


# ---- flags shared by generate / chat / dist ------------------------------------------------------

def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="alias, .gguf path or Hugging Face directory "
                   "(default: smollm2-135m-instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"],
                   help="weight precision (int8 = weight-only int8 with bfloat16 activations)")


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


def _parse_logit_bias(items: list[str]) -> dict[int, float] | None:
    if not items:
        return None
    bias = {}
    for item in items:
        try:
            tok, val = item.split(":")
            bias[int(tok)] = float(val)
        except ValueError:
            raise ParamError("logit_bias", f"expected ID:BIAS, got {item!r}") from None
    return bias


def _params(a: argparse.Namespace, **extra) -> SamplingParams:
    return SamplingParams(
        max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
        typical_p=a.typical_p, epsilon=a.epsilon, eta=a.eta, frequency_penalty=a.frequency_penalty,
        presence_penalty=a.presence_penalty, repetition_penalty=a.repetition_penalty,
        temperature_frequency_penalty=a.temperature_frequency_penalty,
        temperature_presence_penalty=a.temperature_presence_penalty, penalize_prompt=a.penalize_prompt,
        logit_bias=_parse_logit_bias(a.logit_bias), allowed_token_ids=a.allowed_token_id,
        banned_token_ids=a.banned_token_id, min_tokens=a.min_tokens, stop=list(a.stop),
        stop_token_ids=list(a.stop_token_id), ignore_eos=a.ignore_eos, seed=a.seed, n=a.n, **extra,
    )


def _engine(a: argparse.Namespace, **kw):
    from .engine import Engine
    from .weights import DEFAULT_MODEL

    return Engine.load(a.model or DEFAULT_MODEL, dtype=a.dtype, **kw)


# ---- commands ----------------------------------------------------------------------------------

def cmd_generate(a: argparse.Namespace) -> int:
    params = _params(a, logprobs=a.logprobs, logprobs_mode=a.logprobs_mode, echo=a.echo, explain=a.explain)
    engine = _engine(a, use_cache=not a.no_kv_cache, max_batch=max(a.n, 1))
    prompt = engine.chat_prompt([{"role": "user", "content": a.prompt}]) if a.chat else a.prompt
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
    engine = _engine(a)
    params = _params(a)
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
        for ev in engine.stream(engine.chat_prompt(messages), params):
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
    else:
        text = a.text
    engine = _engine(a)
    res = engine.score(text, context=a.context, progress=a.file is not None)
    tok = engine.tokenizer
    if a.json:
        print(json.dumps({
            "total_logprob": res.total_logprob, "num_tokens": len(res.tokens), "perplexity": res.perplexity,
            "tokens": [tok.decode([t]) for t in res.tokens], "token_ids": res.tokens,
            "token_logprobs": res.token_logprobs,
        }, ensure_ascii=False, indent=2))
        return 0
    if a.file is None:
        for t, lp in zip(res.tokens, res.token_logprobs, strict=True):
            print(f"{tok.decode([t])!r:>20} {lp:9.3f}")
    print(f"tokens: {len(res.tokens)}  total logprob: {res.total_logprob:.3f}  "
          f"cross-entropy: {-res.total_logprob / len(res.tokens):.3f} nats/token  "
          f"perplexity: {res.perplexity:.3f}")
    return 0


def cmd_dist(a: argparse.Namespace) -> int:
    from .explain import knob_report

    engine = _engine(a)
    params = _params(a)
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

    add_driver_commands(sub, _add_model_flags)
    add_serve_command(sub)

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
