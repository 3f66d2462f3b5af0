"""``logitlab serve``: the OpenAI-compatible server and the playground.

Wired into the main CLI by ``add_serve_command(sub)`` on its sub-parsers object.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys


def add_serve_command(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching, "
                              "and the playground at /")
    s.add_argument("--model", default=None, help="alias, .gguf path or Hugging Face directory "
                   "(default: smollm2-135m-instruct)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8", "gguf", "float16"],
                   help="float16: with --device cuda only")
    s.add_argument("--exact-head", action="store_true", help="with --dtype gguf: a float32 LM head")
    s.add_argument("--activations", default=None, choices=["int8", "int8x2"],
                   help="with --dtype gguf: int8 (default, as llama.cpp) or int8x2 (about 16 bits: greedy text "
                        "equal to float32's; prefill and large batches about half as fast)")
    s.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="cpu (default), cuda or cuda:N: the model, its KV cache and the sampler run there")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine "
                   "only; use 0.0.0.0 deliberately, with --api-key)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' "
                   "(default: $LOGITLAB_API_KEY if set)")
    s.add_argument("--max-batch", type=int, default=32, help="the largest decode batch (rows)")
    s.add_argument("--max-len", type=int, default=2048, help="tokens per request (prompt + completion)")
    s.add_argument("--kv-memory", type=float, default=None, metavar="GB",
                   help="KV-cache budget (default: what --max-batch requests of --max-len need, at most half the "
                        "free memory); memory is taken as blocks are used")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    s.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="name(s) clients use in 'model' (default: the model's name)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_guard_flags(s)
    s.set_defaults(func=cmd_serve)
    return s


def add_guard_flags(s: argparse.ArgumentParser) -> None:
    """Host names answered, and what one request may ask for (``guards.Limits``)."""
    from .guards import Limits

    d = Limits()
    g = s.add_argument_group("limits per request (larger requests get 400) and the Host names answered")
    g.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="also answer requests for this Host name (repeatable; '*': any). Always answered: "
                        "localhost, 127.0.0.1, [::1] and the --host address; bound to 0.0.0.0 or ::, also any IP "
                        "address and this machine's name. Others get 403 (DNS-rebinding protection)")
    g.add_argument("--max-guided-bytes", type=int, default=d.max_guided_bytes, metavar="N",
                   help="size of guided_regex / guided_grammar / guided_json / response_format's schema")
    g.add_argument("--max-guided-choices", type=int, default=d.max_guided_choices, metavar="N",
                   help="guided_choice options")
    g.add_argument("--max-guided-choice-bytes", type=int, default=d.max_guided_choice_bytes, metavar="N",
                   help="guided_choice options' bytes in all")
    g.add_argument("--max-beam-width", type=int, default=d.max_beam_width, metavar="W",
                   help="beam_width (at most --max-batch)")
    g.add_argument("--grammar-timeout", type=float, default=d.grammar_timeout_s, metavar="S",
                   help="seconds one grammar may take to compile (in a worker process)")
    g.add_argument("--grammar-memory-mb", type=int, default=d.grammar_memory_mb, metavar="MB",
                   help="memory one grammar may take to compile")
    g.add_argument("--grammar-cache-mb", type=int, default=d.grammar_cache_mb, metavar="MB",
                   help="compiled grammars kept for reuse (least recently used out first)")
    g.add_argument("--template-timeout", type=float, default=d.template_timeout_s, metavar="S",
                   help="seconds the model's chat template may take to render one conversation")


def limits_from_args(a: argparse.Namespace):
    from .guards import Limits

    return Limits(max_guided_bytes=a.max_guided_bytes, max_guided_choices=a.max_guided_choices,
                  max_guided_choice_bytes=a.max_guided_choice_bytes, max_beam_width=a.max_beam_width,
                  grammar_timeout_s=a.grammar_timeout, grammar_memory_mb=a.grammar_memory_mb,
                  grammar_cache_mb=a.grammar_cache_mb, template_timeout_s=a.template_timeout)


# Upper bounds, checked before the model is loaded: the KV cache holds max_batch x max_len positions (and
# max_len above the model's context length is cut to it anyway); a queue or body limit past these is a typo.
LIMITS = {"max_batch": 1024, "max_len": 1 << 20, "max_queue": 1 << 20, "max_body_bytes": 1 << 30,
          "max_guided_bytes": 1 << 24, "max_guided_choices": 1 << 16, "max_guided_choice_bytes": 1 << 24,
          "max_beam_width": 1024, "grammar_memory_mb": 1 << 16, "grammar_cache_mb": 1 << 16}
SECONDS = {"grammar_timeout": 3600.0, "template_timeout": 3600.0}


def _check(a) -> None:
    from ..sampling import ParamError

    for name, hi in LIMITS.items():
        if not 1 <= getattr(a, name) <= hi:
            raise ParamError(name.replace("_", "-"), f"must be an integer in [1, {hi}], got {getattr(a, name)}")
    for name, hi in SECONDS.items():
        v = getattr(a, name)
        if not 0 < v <= hi:  # also false for nan
            raise ParamError(name.replace("_", "-"), f"must be a number of seconds in (0, {hi:g}], got {v}")
    for name in a.allowed_host or []:
        if not name.strip():
            raise ParamError("allowed-host", "must not be empty")
    if not 0 <= a.port <= 65535:
        raise ParamError("port", f"must be in [0, 65535], got {a.port}")
    if a.kv_memory is not None and not 0 < a.kv_memory < 1e6:  # also false for nan
        raise ParamError("kv-memory", f"must be a positive number of GB, got {a.kv_memory}")
    if getattr(a, "device", "cpu") != "cpu":
        from ..engine import resolve_device

        resolve_device(a.device)  # a GPU this machine lacks: one line before the socket and the model
    elif a.dtype == "float16":
        raise ParamError("dtype", "float16 runs on a GPU only (add --device cuda)")
    for name in a.served_model_name or []:
        if not name.strip():
            raise ParamError("served-model-name", "must not be empty")


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), made before the model is loaded: a port in use or a host that does not
    resolve is one line and exit 2 within a second, not a uvicorn log after the load. uvicorn then serves on
    this very socket (no window in which another process could take the port)."""
    from ..sampling import ParamError

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ParamError("host", f"cannot resolve {host!r}: {getattr(e, 'strerror', None) or e}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart after a stop
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ParamError("port", f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


GRACEFUL_S = 3  # open connections get this long after SIGTERM / Ctrl-C
HARD_EXIT_S = GRACEFUL_S + 4  # ... and the process this long in all, whatever it is doing


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, plus a deadline on stopping: once asked to stop, the process exits within
        HARD_EXIT_S even if something holds the event loop or a thread (faulthandler's watchdog is a C thread:
        it needs neither; it prints every thread's stack, which says what held the shutdown)."""

        def handle_exit(self, sig, frame) -> None:
            import faulthandler

            faulthandler.dump_traceback_later(HARD_EXIT_S, exit=True)
            super().handle_exit(sig, frame)

    return Server


def cmd_serve(a: argparse.Namespace) -> int:
    _check(a)
    sock = _listen(a.host, a.port)
    try:
        import uvicorn

        from ..engine import Engine
        from ..weights import DEFAULT_MODEL
        from .app import create_app

        api_key = a.api_key or os.environ.get("LOGITLAB_API_KEY") or None
        if not _is_loopback(a.host) and api_key is None:
            print(f"warning: serving on {a.host} without --api-key: anyone who can reach this port can use it",
                  file=sys.stderr)
        engine = Engine.load(a.model or DEFAULT_MODEL, dtype=a.dtype, max_batch=a.max_batch, max_len=a.max_len,
                             kv_memory=a.kv_memory, exact_head=a.exact_head,
                             activations=a.activations,
                             **({"device": a.device} if getattr(a, "device", "cpu") != "cpu" else {}))
        app = create_app(engine, api_key=api_key, max_queue=a.max_queue, max_body_bytes=a.max_body_bytes,
                         model_names=a.served_model_name, limits=limits_from_args(a), bind_host=a.host,
                         allowed_hosts=a.allowed_host)
        port = sock.getsockname()[1]
        print(f"logitlab: serving {engine.name} on http://{a.host}:{port}  (playground: /, API: /v1)",
              file=sys.stderr)
        config = uvicorn.Config(app, host=a.host, port=port, log_level=a.log_level,
                                timeout_graceful_shutdown=GRACEFUL_S)
        _server_class()(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
