"""Live logitlab servers for the server, fuzz and playground tests: uvicorn in a background thread on
127.0.0.1 and a free port, one per configuration for the whole test session (started on first use)."""

from __future__ import annotations

import atexit
import socket
import threading
import time

import uvicorn

from logitlab.engine import Engine
from logitlab.server.app import create_app

from tiny import tiny_model

API_KEY = "sk-test-key"


class LiveServer:
    def __init__(self, app):
        self.app = app
        self.engine = app.state.engine
        self.runner = app.state.runner
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name=f"uvicorn-{self.port}")
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


_servers: dict[str, LiveServer] = {}
_lock = threading.Lock()
_tiny_models: dict[int, object] = {}


def _tiny_engine(tokenizer, max_batch: int, name: str = "tiny") -> Engine:
    model = _tiny_models.get(tokenizer.vocab_size)
    if model is None:
        model = _tiny_models[tokenizer.vocab_size] = tiny_model(seed=0, vocab_size=tokenizer.vocab_size,
                                                                 context_length=256)
    return Engine(model, tokenizer, name=name, max_batch=max_batch, max_len=256)


def _get(key: str, make) -> LiveServer:
    with _lock:
        if key not in _servers:
            _servers[key] = LiveServer(make())
        return _servers[key]


def tiny_server(tokenizer) -> LiveServer:
    """A tiny random model over the real tokenizer: no API key, 16 slots."""
    return _get("tiny", lambda: create_app(_tiny_engine(tokenizer, max_batch=16), max_queue=256))


def strict_server(tokenizer) -> LiveServer:
    """The same tiny model behind an API key, 2 slots, a queue of 2 and a 4 KiB body limit."""
    return _get("strict", lambda: create_app(_tiny_engine(tokenizer, max_batch=2), api_key=API_KEY,
                                             max_queue=2, max_body_bytes=4096))


def real_server(engine) -> LiveServer:
    return _get("real", lambda: create_app(engine))


@atexit.register
def _stop_all() -> None:
    for s in _servers.values():
        s.stop()
