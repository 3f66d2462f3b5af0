"""The server's guards before any work: which Host names it answers (DNS rebinding), which request bodies
it reads (CSRF), and how much work one request may ask for (``Limits``).

Host: a web page on ``evil.example`` whose name the attacker re-points at 127.0.0.1 ("DNS rebinding")
could otherwise read and drive a key-less server on this machine. Its requests still say
``Host: evil.example``, so, as Jupyter and Vite do, only these names are answered: the loopback names
(``localhost``, ``127.0.0.1``, ``::1``), the address the server is bound to, the names given with
``--allowed-host`` (``*``: any), and, when bound to every interface (``0.0.0.0`` / ``::``), any IP
address and this machine's host name (a rebinding page always uses a domain name). Others get 403.

Content type: a page on any site may POST ``text/plain``, form or multipart bodies, or a body without a
Content-Type (a Blob), to 127.0.0.1 without the browser asking first. ``application/json`` makes the
browser ask (a CORS preflight), which this server does not grant, so the API reads JSON bodies only:
anything else gets 415 (here when the header names another type; in the app's body reader, after the
413 size check, when it is missing).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class Limits:
    """How much work one request may ask for (``logitlab serve`` flags in brackets). Requests over a limit
    get 400 naming the field, before any work is done.

    - ``max_guided_bytes`` [--max-guided-bytes]: UTF-8 bytes of ``guided_regex``, ``guided_grammar``,
      ``guided_json`` or ``response_format``'s schema (as compact JSON).
    - ``max_guided_choices`` / ``max_guided_choice_bytes`` [--max-guided-choices, --max-guided-choice-bytes]:
      ``guided_choice`` options, and their bytes in all (each option is scored by a forward pass).
    - ``max_beam_width`` [--max-beam-width]: ``beam_width`` (also at most --max-batch: each beam is a row).
    - ``grammar_timeout_s`` / ``grammar_memory_mb`` [--grammar-timeout, --grammar-memory-mb]: one grammar's
      compilation, in a worker process: wall-clock seconds, and memory beyond the worker's own.
    - ``grammar_cache_mb`` [--grammar-cache-mb]: compiled grammars kept for reuse (least recently used
      out first); one grammar larger than this is refused.
    - ``template_timeout_s`` / ``template_memory_mb`` [--template-timeout]: rendering the model's chat template
      for one request, in a worker process.
    """

    max_guided_bytes: int = 64 << 10
    max_guided_choices: int = 64
    max_guided_choice_bytes: int = 8 << 10
    max_beam_width: int = 32
    grammar_timeout_s: float = 10.0
    grammar_memory_mb: int = 1024
    grammar_cache_mb: int = 256
    template_timeout_s: float = 2.0
    template_memory_mb: int = 512


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def check_driver_sizes(data: dict, limits: Limits) -> None:
    """ParamError when a decoding-driver field of a request body (``data``: field -> JSON value) is over its
    limit. ``beam_width`` is checked here too, against this server's cap."""
    from ..sampling import ParamError

    for field in ("guided_regex", "guided_grammar", "guided_json"):
        v = data.get(field)
        if v is None:
            continue
        size = _utf8_len(v) if isinstance(v, str) else _utf8_len(json.dumps(v, separators=(",", ":")))
        if size > limits.max_guided_bytes:
            raise ParamError(field, f"is {size} bytes; this server takes at most {limits.max_guided_bytes} "
                                    "(--max-guided-bytes)")
    rf = data.get("response_format")
    if isinstance(rf, dict) and rf.get("json_schema") is not None:
        size = _utf8_len(json.dumps(rf["json_schema"], separators=(",", ":")))
        if size > limits.max_guided_bytes:
            raise ParamError("response_format", f"json_schema is {size} bytes; this server takes at most "
                                                f"{limits.max_guided_bytes} (--max-guided-bytes)")
    choice = data.get("guided_choice")
    if isinstance(choice, list):
        if len(choice) > limits.max_guided_choices:
            raise ParamError("guided_choice", f"has {len(choice)} options; this server takes at most "
                                              f"{limits.max_guided_choices} (--max-guided-choices)")
        size = sum(_utf8_len(c) for c in choice if isinstance(c, str))
        if size > limits.max_guided_choice_bytes:
            raise ParamError("guided_choice", f"options are {size} bytes in all; this server takes at most "
                                              f"{limits.max_guided_choice_bytes} (--max-guided-choice-bytes)")
    width = data.get("beam_width")
    if isinstance(width, int) and not isinstance(width, bool) and width > limits.max_beam_width:
        raise ParamError("beam_width", f"must be at most {limits.max_beam_width} on this server "
                                       f"(--max-beam-width), got {width}")


# ---- Host ------------------------------------------------------------------------------------------

def _host_name(header: str) -> str:
    """``Host`` header -> lower-case name or address without port or brackets."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1: h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostPolicy:
    names: frozenset[str]
    any_host: bool = False
    any_ip: bool = False

    @classmethod
    def for_bind(cls, bind_host: str = "127.0.0.1", allowed: Sequence[str] = ()) -> HostPolicy:
        """The names a server bound to ``bind_host`` answers, plus ``allowed`` (``*``: every name)."""
        extra = [_host_name(a) for a in allowed if a.strip()]
        names = set(LOOPBACK_NAMES) | {a for a in extra if a != "*"}
        wildcard = bind_host.strip() in WILDCARD_BINDS
        if wildcard:
            try:
                names.add(socket.gethostname().lower())
            except OSError:
                pass
        else:
            names.add(_host_name(bind_host))
        return cls(frozenset(names), any_host="*" in extra, any_ip=wildcard)

    @classmethod
    def anyone(cls) -> HostPolicy:
        return cls(frozenset(), any_host=True)

    def allows(self, header: str | None) -> bool:
        if self.any_host or header is None:  # no Host at all: an HTTP/1.0 tool, not a browser
            return True
        name = _host_name(header)
        return name in self.names or (self.any_ip and _is_ip(name))


# ---- the ASGI guard --------------------------------------------------------------------------------

def _error(status: int, message: str, code: str) -> tuple[dict, dict]:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, {"type": "http.response.body", "body": body}


def is_json(content_type: str | None) -> bool:
    """``application/json``, with or without parameters (``; charset=utf-8``)."""
    return content_type is not None and content_type.split(";", 1)[0].strip().lower() == "application/json"


def not_json_message(content_type: str | None) -> str:
    got = repr(content_type[:100]) if content_type is not None else "none"
    return f"The request body must be JSON, sent with 'Content-Type: application/json' (got {got})"


class Guard:
    """ASGI middleware: 403 for a Host this server does not answer, 415 for a POST whose body is not JSON."""

    def __init__(self, app, policy: HostPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers") or ():
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        host = headers.get("host")
        if not self.policy.allows(host):
            return await self._refuse(send, 403, f"This server does not answer for the host name {host[:100]!r}; "
                                                 "start it with --allowed-host NAME to allow it", "invalid_host")
        ctype = headers.get("content-type")
        if scope["method"] == "POST" and ctype is not None and not is_json(ctype):
            # (no Content-Type at all is refused by the routes' body reader, after its size check)
            return await self._refuse(send, 415, not_json_message(ctype), "unsupported_media_type")
        return await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(send, status: int, message: str, code: str) -> None:
        start, body = _error(status, message, code)
        await send(start)
        await send(body)
