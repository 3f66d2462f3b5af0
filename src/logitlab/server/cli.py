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
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine "
                   "only; use 0.0.0.0 deliberately, with --api-key)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' "
                   "(default: $LOGITLAB_API_KEY if set)")
    s.add_argument("--max-batch", type=int, default=32, help="KV-cache slots = the largest decode batch")
    s.add_argument("--max-len", type=int, default=2048, help="tokens per slot (prompt + completion)")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    s.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="name(s) clients use in 'model' (default: the model's name)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)
    return s


# Upper bounds, checked before the model is loaded: the KV cache holds max_batch x max_len positions (and
# max_len above the model's context length is cut to it anyway); a queue or body limit past these is a typo.
LIMITS = {"max_batch": 1024, "max_len": 1 << 20, "max_queue": 1 << 20, "max_body_bytes": 1 << 30}


def _check(a) -> None:
    from ..sampling import ParamError

    for name, hi in LIMITS.items():
        if not 1 <= getattr(a, name) <= hi:
            raise ParamError(name.replace("_", "-"), f"must be an integer in [1, {hi}], got {getattr(a, name)}")
    if not 0 <= a.port <= 65535:
        raise ParamError("port", f"must be in [0, 65535], got {a.port}")
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
        engine = Engine.load(a.model or DEFAULT_MODEL, dtype=a.dtype, max_batch=a.max_batch, max_len=a.max_len)
        app = create_app(engine, api_key=api_key, max_queue=a.max_queue, max_body_bytes=a.max_body_bytes,
                         model_names=a.served_model_name)
        port = sock.getsockname()[1]
        print(f"logitlab: serving {engine.name} on http://{a.host}:{port}  (playground: /, API: /v1)",
              file=sys.stderr)
        config = uvicorn.Config(app, host=a.host, port=port, log_level=a.log_level, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
