"""The OpenAI-compatible HTTP API and the playground, over one Engine.

    from logitlab.server.app import create_app
    app = create_app(Engine.load(), api_key=None)      # then: uvicorn.run(app, host="127.0.0.1")

Every generation request goes through ``Engine.make_requests`` (validation, tokenization, seeds) and the
engine's scheduler, which one background thread drives (``runner.Runner``): concurrent HTTP requests
join the running decode batch at the next step (continuous batching). Errors are OpenAI error objects;
no input from a client yields a 500 (a 500 means a bug in logitlab).

Issue-4 request fields (both endpoints; see ``schemas.DRIVER_FIELDS``): a structured-output constraint
alone (``guided_json`` / ``guided_regex`` / ``guided_grammar``, chat's ``response_format``) is compiled
once and handed to ``Engine.make_requests``, so those requests stream and batch like any other. The other
drivers (``beam_width``, ``contrastive``, ``speculative``, ``guided_choice``, each possibly with a
constraint) run whole on the runner thread (``Runner.call``, between two scheduler steps, so they never
race it) and answer in one piece; with ``stream: true`` that piece is sent as SSE chunks (one per choice,
then one with no choices carrying the extra fields ``beam`` / ``speculative`` / ``choice`` /
``contrastive``, then ``[DONE]``). The server reads no files for these fields and loads no other model:
``contrastive.amateur`` must be ``early-exit:K``; ``speculative.draft`` one of ``early-exit:K``,
``ngram``, ``ngram:N``, ``int8``.

Hardening (issue 11): ``guards.py`` answers only this server's Host names (DNS rebinding) and reads JSON
bodies only (CSRF), and bounds what one request may ask for (``guards.Limits``); grammars compile and chat
templates render in worker processes under a time and memory budget (``sandbox.py``), never on the event
loop or the runner thread; a non-streaming request whose client leaves is cancelled at once; a 429 says
when to retry (``Retry-After``).

Layout: ``create_app`` builds the app's state (the runner, metrics, sandbox, limits), its middleware and
the playground page; ``routes.py`` registers the API routes over that state (``register_routes(app,
AppContext)``: auth, the runner's helpers, the routes); the rest is by concern: ``errors.py`` (OpenAI error
objects, exception handlers), ``parsing.py`` (request bodies, sampling parameters, driver fields),
``responses.py`` (JSON, completions, extra fields), ``streaming.py`` (SSE), ``token_stream.py`` (the one
token streamer both generation routes use, with a chunk shape each).
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .errors import add_error_handlers
from .guards import Guard, HostPolicy, Limits
from .metrics import Metrics
from .routes import AppContext, register_routes
from .runner import Runner
from .sandbox import EngineSandbox

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def create_app(engine, api_key: str | None = None, max_queue: int = 256, max_body_bytes: int = 1 << 20,
               model_names: list[str] | None = None, limits: Limits | None = None, bind_host: str | None = None,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The FastAPI app. ``api_key``: when set, every API route needs ``Authorization: Bearer KEY``
    (``/health``, the playground page and its static files do not). ``max_queue``: rows of work waiting
    before new requests get 429 (runner.py). ``max_body_bytes``: larger bodies get 413. ``model_names``: the
    names clients may use in ``model`` (default: the engine's name). ``limits``: what one request may ask for
    (``guards.Limits``). ``bind_host``: the address the server listens on; given (``logitlab serve`` always
    gives it), only its Host names and ``allowed_hosts`` are answered (``guards.HostPolicy``; ``"*"``: any);
    None, an app embedded elsewhere: any Host (its own server or proxy decides)."""
    import dataclasses

    metrics = Metrics()
    runner = Runner(engine, max_queue=max_queue, metrics=metrics)
    served = list(model_names or [engine.name])
    max_batch = engine.scheduler.max_batch
    limits = limits or Limits()
    limits = dataclasses.replace(limits, max_beam_width=min(limits.max_beam_width, max_batch))
    # a rendered conversation longer than the body could carry is refused in the worker (no huge id lists)
    sandbox = EngineSandbox(engine, limits, max_prompt_tokens=max(engine.max_len, max_body_bytes))

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        try:
            yield
        finally:
            sandbox.close()  # kills the workers: a compile or render in progress ends now
            runner.stop()

    app = FastAPI(title="logitlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.runner, app.state.metrics = engine, runner, metrics
    app.state.sandbox, app.state.limits = sandbox, limits

    # ---- errors ------------------------------------------------------------------------------
    add_error_handlers(app)  # errors.py: OpenAI error objects for every exception

    # ---- metrics middleware (pure ASGI, so streamed responses are timed to their end) ---------
    class _Timing:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            t0, status = time.perf_counter(), [500]

            async def send_wrapper(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                    if scope["path"] == "/" or scope["path"].startswith("/static/"):
                        message.setdefault("headers", [])
                        message["headers"] = list(message["headers"]) + [
                            (b"content-security-policy", CSP.encode()),
                            (b"x-content-type-options", b"nosniff"),
                        ]
                await send(message)

            try:
                await self.inner(scope, receive, send_wrapper)
            finally:
                metrics.record_request(scope["path"], status[0], time.perf_counter() - t0)

    # Host and content-type guard (guards.py) inside the timing, so refusals are counted too
    policy = HostPolicy.for_bind(bind_host, allowed_hosts or ()) if bind_host is not None else HostPolicy.anyone()
    app.add_middleware(Guard, policy=policy)
    app.add_middleware(_Timing)

    # ---- routes (routes.py) ---------------------------------------------------------------------
    register_routes(app, AppContext(engine=engine, runner=runner, metrics=metrics, sandbox=sandbox, limits=limits,
                                    served=served, max_queue=max_queue, max_body_bytes=max_body_bytes,
                                    api_key=api_key))

    @app.get("/")
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
