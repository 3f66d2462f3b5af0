"""``logitlab serve``: the OpenAI-compatible server and the playground.

Wired into the main CLI by ``add_serve_command(sub)`` on its sub-parsers object.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
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


def _check(a) -> None:
    from ..sampling import ParamError

    for name in ("max_batch", "max_len", "max_queue", "max_body_bytes"):
        if getattr(a, name) < 1:
            raise ParamError(name.replace("_", "-"), f"must be >= 1, got {getattr(a, name)}")
    if not 0 <= a.port <= 65535:
        raise ParamError("port", f"must be in [0, 65535], got {a.port}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(a: argparse.Namespace) -> int:
    _check(a)
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
    print(f"logitlab: serving {engine.name} on http://{a.host}:{a.port}  (playground: /, API: /v1)",
          file=sys.stderr)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=5)
    return 0
