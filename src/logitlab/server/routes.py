"""The API and playground routes of ``create_app`` (app.py): ``register_routes(app, ctx)`` adds them to an
app, over the state ``create_app`` built (``AppContext``: the engine, its runner, metrics, sandbox and limits).
What each route does is described in app.py's docstring."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel

from ..decoding.modes import DriverOptions
from ..engine import GenerationResult
from ..openai_format import completion_response
from ..sampling import ParamError, SamplingParams
from . import conformance, parsing, schemas, tools
from .distribution import next_token_distribution
from .errors import APIError, _driver_errors, error_response, queue_full
from .guards import Limits
from .metrics import Metrics
from .parsing import _logit_bias, _prompts, contrastive_of, is_streamable
from .responses import _chat_logprobs, _completion, _json, merged_extra, mode_extra
from .runner import QueueFull, Runner
from .sandbox import EngineSandbox
from .streaming import (
    _ClientGone,
    _Gone,
    _include_usage,
    _sse_response,
    _Stream,
    _watch_disconnect,
    replay_chat,
    replay_completion,
    sse,
)
from .token_stream import ChatChunks, CompletionChunks, internal_failure, stream_tokens, usage


@dataclass(frozen=True)
class AppContext:
    """What the routes share with ``create_app``; see its docstring for the fields' meaning."""

    engine: object
    runner: Runner
    metrics: Metrics
    sandbox: EngineSandbox
    limits: Limits
    served: list[str]
    max_queue: int
    max_body_bytes: int
    api_key: str | None = None


def register_routes(app: FastAPI, ctx: AppContext) -> None:
    """Every route but the playground page and its static files (those stay with ``create_app``)."""
    engine, runner, metrics, sandbox, limits = ctx.engine, ctx.runner, ctx.metrics, ctx.sandbox, ctx.limits
    served, max_queue, max_body_bytes = ctx.served, ctx.max_queue, ctx.max_body_bytes
    tok = engine.tokenizer
    max_batch = engine.scheduler.max_batch
    key_bytes = ctx.api_key.encode("utf-8") if ctx.api_key else None

    # ---- helpers -----------------------------------------------------------------------------
    def auth(request: Request) -> None:
        if key_bytes is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode("latin-1", "replace")
        ok = hmac.compare_digest(given, key_bytes)  # constant time, whatever the scheme says
        if not (ok and scheme.lower() == "bearer"):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def read_body(request: Request, model: type[BaseModel]):
        return await parsing.read_body(request, model, max_body_bytes)

    def check_model(name: str | None) -> str:
        if name is not None and name not in served:
            raise APIError(404, f"The model `{name}` does not exist. This server serves: {', '.join(served)}",
                           param="model", code="model_not_found")
        return name or served[0]

    async def authorized_body(request: Request, schema: type[BaseModel]):
        """The first steps of every POST route: the API key, the body parsed against ``schema``, its model
        served here. Returns (body, model name)."""
        auth(request)
        body = await read_body(request, schema)
        return body, check_model(body.model)

    def sampling_params(body: schemas._Sampling, **extra) -> SamplingParams:
        return parsing.sampling_params(body, max_batch, **extra)

    def make_groups(prompts: list, params: SamplingParams, constraint=None, contrastive=None) -> list:
        total = len(prompts) * params.n
        if total > max_queue:
            raise ParamError("prompt", f"{len(prompts)} prompts x n={params.n} = {total} requests; "
                                       f"this server queues at most {max_queue}")
        if not prompts:
            raise ParamError("prompt", "must not be empty")
        groups = []
        for p in prompts:
            try:
                groups.append(engine.make_requests(p, params, constraint, contrastive))
            except ParamError:
                raise
            except (UnicodeError, TypeError, ValueError, OverflowError) as e:
                raise ParamError("prompt", f"cannot be tokenized: {e}") from None
        return groups

    def submit(groups: list) -> tuple[_Stream, list]:
        stream = _Stream(asyncio.get_running_loop())
        requests = [r for g in groups for r in g]
        try:
            runner.submit(requests, stream.sink)
        except QueueFull as e:
            raise queue_full(e) from None
        metrics.record_tokens(prompt=sum(len(g[0].prompt_ids) for g in groups))
        return stream, requests

    def abort(requests: list) -> None:
        left = [r for r in requests if not r.finished]
        if left:
            runner.abort(left)
            metrics.record_abort(len(left))

    async def events(request: Request, stream: _Stream, requests: list, t0: float, poll: bool):
        """Yield (event, trace) until every request has finished. ``poll``: raise _ClientGone as soon as
        the client disconnects, whether tokens are flowing or not (non-streaming responses; a streaming
        response is cancelled by the server when its client disconnects)."""
        remaining = {r.id for r in requests}
        first = True
        watcher = asyncio.ensure_future(_watch_disconnect(request, stream)) if poll else None
        try:
            while remaining:
                item = await stream.queue.get()
                if item is _Gone:
                    raise _ClientGone()
                ev, trace = item
                if ev.token_id is not None:
                    metrics.record_tokens(generated=1)
                    if first:
                        metrics.record_ttft(time.perf_counter() - t0)
                        first = False
                if ev.finish_reason is not None:
                    remaining.discard(ev.request.id)
                yield ev, trace
        finally:
            if watcher is not None:
                watcher.cancel()

    async def collect(request: Request, stream: _Stream, requests: list, t0: float) -> None:
        try:
            async for _ in events(request, stream, requests, t0, poll=True):
                pass
        except (_ClientGone, asyncio.CancelledError):
            abort(requests)
            raise

    def prompt_text(p) -> str:
        return p if isinstance(p, str) else tok.decode(p)

    # ---- decoding drivers: search, structured output, contrastive and speculative decoding ------------
    def driver_options(body) -> tuple[DriverOptions | None, object]:
        return parsing.driver_options(body, limits)

    async def compile_spec(spec, rf):
        """``spec`` compiled in a grammar worker (time and memory budget, bounded cache; sandbox.py)."""
        with _driver_errors(rf):
            return await sandbox.compile(spec)

    app.state.compile_spec = sandbox.compile  # for other routes (the playground's views)

    def encode(p, field: str = "prompt") -> list[int]:
        try:
            return engine.encode_prompt(p)
        except ParamError:
            raise
        except (UnicodeError, TypeError, ValueError, OverflowError) as e:
            raise ParamError(field, f"cannot be tokenized: {e}") from None

    async def run_beams(request: Request, ids: list, params: SamplingParams, opts: DriverOptions, spec, rf,
                        t0: float):
        """Beam searches, speculative decodes and choices as modes of the scheduler: submitted like any
        request (batched with the running ones, so nobody's stream pauses); [(GenerationResult, extra)]."""
        from ..decoding import modes

        constraint = await compile_spec(spec, rf) if spec is not None else None
        if opts.beam_width is not None:
            make, done = (lambda i: modes.beam_group(engine, i, params, opts, constraint)), modes.beam_completion
        elif opts.speculative:
            make, done = (lambda i: modes.spec_group(engine, i, params, opts)), modes.spec_completion
        else:
            make, done = (lambda i: modes.choice_group(engine, i, params, opts)), modes.choice_completion
        with _driver_errors(rf):
            groups = [make(i) for i in ids]
            for g in groups:
                engine.scheduler.check_fits(len(g.prompt_ids), g.max_tokens if opts.choice else params.max_tokens)
        stream = _Stream(asyncio.get_running_loop())
        requests = [r for g in groups for r in g.requests]
        try:
            runner.submit(requests, stream.sink)
        except QueueFull as e:
            raise queue_full(e) from None
        with _driver_errors(rf):
            await collect(request, stream, requests, t0)
            failure = internal_failure(requests)
            if failure is not None:
                raise failure
            if any(r.finish_reason == "error" for r in requests):
                raise ParamError("beam_width", next(r.error for r in requests if r.error) or "beam search failed")
            out = await asyncio.wrap_future(runner.call(
                lambda: [done(engine, i, params, opts, g) for i, g in zip(ids, groups, strict=True)]))
        metrics.record_tokens(prompt=sum(len(i) for i in ids),
                              generated=sum(len(c.token_ids) for r, _ in out for c in r.choices))
        return out

    async def run_drivers(prompts: list, params: SamplingParams, opts: DriverOptions, rf, t0: float,
                          request: Request, spec=None):
        """Beam search, speculative decoding or choice (the options ``is_streamable`` rejects) for every
        prompt, as modes of the scheduler (``run_beams``): [(GenerationResult, extra)]."""
        if not prompts:
            raise ParamError("prompt", "must not be empty")
        return await run_beams(request, [encode(p) for p in prompts], params, opts, spec, rf, t0)

    # ---- OpenAI / vLLM conformance (conformance.py): prompt_logprobs, driver logprobs, usage chunks ----
    async def prompt_lps(k: int | None, ids_list: list) -> list | None:
        if k is None:
            return None
        fut = runner.call(lambda: [conformance.prompt_logprobs(engine, ids, k) for ids in ids_list])
        return await asyncio.wrap_future(fut)

    async def with_logprobs(results: list, k: int | None, echo: bool, prompt_k: int | None) -> list | None:
        """A driver's results get the token-by-token path's logprobs (and prompt_logprobs, returned)."""
        if k is not None:
            await asyncio.wrap_future(runner.call(
                lambda: [conformance.fill_logprobs(engine, r, k, echo) for r in results]))
        return await prompt_lps(prompt_k, [r.prompt_ids for r in results])

    def conform(gen, body, prompt_tokens: list[int], n: int, plp, chat: bool = False, totals=None):
        so = body.stream_options
        return conformance.conform_stream(gen, sse, prompt_tokens=prompt_tokens, n=n, chat=chat, totals=totals,
                                          continuous=bool(so and so.continuous_usage_stats), prompt_lps=plp)

    def finished_completion(resp: dict, body, prompt_tokens: list[int], n: int, plp):
        """A completion made whole (prompt-only scoring, a decoding driver's result): its prompt logprobs,
        then JSON, or its chunks replayed as a stream."""
        if plp is not None:
            conformance.add_prompt_logprobs(resp, plp, n)
        if body.stream:
            return _sse_response(conform(replay_completion(resp, _include_usage(body)), body, prompt_tokens, n, None,
                                         totals=resp["usage"]))
        return _json(resp)

    # ---- routes: completions -----------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        body, model = await authorized_body(request, schemas.CompletionRequest)
        conformance.check_request(body)
        prompts = _prompts(body.prompt)
        want_lp = body.logprobs is not None
        prompt_only = body.max_tokens == 0  # OpenAI's legacy scoring request: echo + logprobs, no new token
        params = sampling_params(body, max_tokens=1 if prompt_only else body.max_tokens or 16,
                                 logprobs=body.logprobs, echo=body.echo)
        opts, spec = driver_options(body)  # checked even when nothing is generated
        if prompt_only:
            texts, ids_list = [prompt_text(p) for p in prompts], [g[0].prompt_ids for g in make_groups(prompts, params)]
            results = await asyncio.wrap_future(runner.call(lambda: conformance.prompt_only_results(
                engine, texts, ids_list, params.n, body.logprobs, bool(body.echo))))
            plp = await prompt_lps(body.prompt_logprobs, ids_list)
            resp = completion_response(tok, model, results, echo=bool(body.echo), logprobs=want_lp)
            return finished_completion(resp, body, [len(i) for i in ids_list], params.n, plp)
        constraint = None
        if opts is not None and not is_streamable(opts):
            out = await run_drivers(prompts, params, opts, None, t0, request, spec)
            results = [r for r, _ in out]
            plp = await with_logprobs(results, body.logprobs, bool(body.echo), body.prompt_logprobs)
            resp = completion_response(tok, model, results, echo=bool(body.echo), logprobs=want_lp,
                                       extra=merged_extra(out, spec))
            n_out = len(results[0].choices) if results else 1
            return finished_completion(resp, body, [len(r.prompt_ids) for r in results], n_out, plp)
        if spec is not None:
            constraint = await compile_spec(spec, None)
        groups = make_groups(prompts, params, constraint, contrastive_of(opts))
        plp = await prompt_lps(body.prompt_logprobs, [g[0].prompt_ids for g in groups])
        stream, requests = submit(groups)
        n = params.n
        texts = [prompt_text(p) for p in prompts]
        if body.stream:
            shape = CompletionChunks(tok, requests, groups, texts, n, bool(body.echo), want_lp)
            lines = stream_tokens(shape, events(request, stream, requests, t0, poll=False), requests, groups,
                                  model, _include_usage(body), abort)
            return _sse_response(conform(lines, body, [len(g[0].prompt_ids) for g in groups], n, plp))
        try:
            await collect(request, stream, requests, t0)
        except _ClientGone:
            return Response(status_code=499)
        if (err := internal_failure(requests)) is not None:
            raise err
        results = [GenerationResult(text, g[0].prompt_ids, [_completion(r) for r in g])
                   for text, g in zip(texts, groups, strict=True)]
        resp = completion_response(tok, model, results, echo=bool(body.echo), logprobs=want_lp,
                                   extra=mode_extra(opts, spec))
        return _json(conformance.add_prompt_logprobs(resp, plp, n) if plp is not None else resp)

    # ---- routes: chat ------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        body, model = await authorized_body(request, schemas.ChatRequest)
        conformance.check_request(body)
        tool_plan = tools.plan(body)  # tools, tool_choice, parallel_tool_calls (tools.py)
        messages, variables = tools.conversation([m.as_dict() for m in body.messages], tool_plan,
                                                 getattr(tok, "chat_template", None))
        # content as text (Engine.chat_prompt_ids), rendered in a template worker: bounded, off the event loop
        prompt = await sandbox.chat_ids(messages, variables=variables)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ParamError("max_completion_tokens", "give max_completion_tokens or max_tokens, not both")
        if body.top_logprobs is not None and not body.logprobs:
            raise ParamError("top_logprobs", "requires logprobs=true")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:  # as much as the context holds
            try:
                n_prompt = len(engine.encode_prompt(prompt))
            except (UnicodeError, TypeError, ValueError) as e:
                raise ParamError("messages", f"cannot be tokenized: {e}") from None
            max_tokens = max(1, engine.max_len - n_prompt)
        lp = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, max_tokens=max_tokens, logprobs=lp)
        rf = body.response_format
        opts, spec = driver_options(body)
        tools.check_drivers(tool_plan, opts)
        constraint = None
        if opts is not None and not is_streamable(opts):
            out = await run_drivers([prompt], params, opts, rf, t0, request, spec)
            plp = await with_logprobs([out[0][0]], lp, False, body.prompt_logprobs)
            resp = driver_chat_response(out[0][0], model, bool(body.logprobs), merged_extra(out, spec))
            if plp is not None:
                conformance.add_prompt_logprobs(resp, plp, 1, chat=True)
            if body.stream:
                return _sse_response(conform(replay_chat(resp, _include_usage(body)), body,
                                             [len(out[0][0].prompt_ids)], params.n, None, chat=True,
                                             totals=resp["usage"]))
            return _json(resp)
        if spec is not None:
            constraint = await compile_spec(spec, rf)
        if tool_plan is not None and tool_plan.forced:  # tool_choice required / named: the call schema
            constraint = await tools.compile_calls(compile_spec, tool_plan, limits.max_guided_bytes)
        try:
            groups = make_groups([prompt], params, constraint, contrastive_of(opts))
        except ParamError as e:
            if getattr(e, "field", None) == "logprobs":
                raise APIError(400, str(e), param="top_logprobs", code="invalid_value") from None
            raise
        plp = await prompt_lps(body.prompt_logprobs, [groups[0][0].prompt_ids])
        stream, requests = submit(groups)
        if body.stream:
            lines = stream_tokens(ChatChunks(tok, bool(body.logprobs)),
                                  events(request, stream, requests, t0, poll=False), requests, groups, model,
                                  _include_usage(body), abort)
            return _sse_response(conform(tools.stream_calls(lines, tool_plan, sse),
                                         body, [len(groups[0][0].prompt_ids)], params.n, plp, chat=True))
        try:
            await collect(request, stream, requests, t0)
        except _ClientGone:
            return Response(status_code=499)
        if (err := internal_failure(requests)) is not None:
            raise err
        choices = []
        for r in requests:
            choice = {"index": r.index, "message": {"role": "assistant", "content": r.text},
                      "logprobs": {"content": _chat_logprobs(tok, r.output_ids, r.token_logprobs,
                                                             r.top_logprobs)} if body.logprobs else None,
                      "finish_reason": r.finish_reason}
            if r.params.explain:
                choice["trace"] = r.trace
            if r.error:
                choice["error"] = r.error
            choices.append(choice)
        tools.finish_choices(tool_plan, choices)  # content and tool_calls read from the text
        resp = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                "created": int(time.time()), "model": model, "choices": choices, "usage": usage(groups)}
        resp.update(mode_extra(opts, spec) or {})
        if plp is not None:
            conformance.add_prompt_logprobs(resp, plp, 1, chat=True)
        return _json(resp)

    def driver_chat_response(res: GenerationResult, model: str, want_lp: bool, extra: dict) -> dict:
        choices = []
        for c in res.choices:
            choice = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                      "logprobs": {"content": _chat_logprobs(tok, c.token_ids, c.token_logprobs, c.top_logprobs)}
                      if want_lp else None, "finish_reason": c.finish_reason}
            if c.error:
                choice["error"] = c.error
            choices.append(choice)
        pt, ct = len(res.prompt_ids), sum(len(c.token_ids) for c in res.choices)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": choices,
                "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}, **extra}

    # ---- routes: models, tokens, health, metrics ---------------------------------------------
    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "logitlab",
                "max_model_len": engine.max_len}

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        return {"object": "list", "data": [model_card(m) for m in served]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request):
        auth(request)
        return model_card(check_model(name))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body, _ = await authorized_body(request, schemas.TokenizeRequest)
        if (body.prompt is None) == (body.messages is None):
            raise ParamError("prompt", "give exactly one of prompt or messages")
        if body.messages is not None:
            if not body.messages:
                raise ParamError("messages", "must not be empty")
            # as the chat route encodes them: message content as text, in a template worker
            messages, variables = tools.conversation([m.as_dict() for m in body.messages], None,
                                                     getattr(tok, "chat_template", None))
            ids = await sandbox.chat_ids(messages, body.add_special_tokens, variables=variables)
        else:
            try:
                ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            except (UnicodeError, TypeError, ValueError) as e:
                raise ParamError("prompt", f"cannot be tokenized: {e}") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_len,
                "token_strs": [tok.decode([i]) for i in ids]}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body, _ = await authorized_body(request, schemas.DetokenizeRequest)
        V = min(engine.vocab_size, tok.vocab_size)
        bad = [t for t in body.tokens if not 0 <= t < V]
        if bad:
            raise ParamError("tokens", f"token ids must be integers in [0, {V}), got {bad[0]}")
        return {"prompt": tok.decode(body.tokens)}

    @app.get("/health")
    async def health():
        if not runner.alive:
            return error_response(503, "the engine loop is not running", type_="server_error")
        return {"status": "ok", "model": served[0], "running": runner.running, "queued": runner.queued}

    @app.get("/metrics")
    async def metrics_route(request: Request):
        auth(request)
        return PlainTextResponse(metrics.render(runner), media_type="text/plain; version=0.0.4")

    # ---- routes: the playground --------------------------------------------------------------
    @app.post("/v1/distribution")
    async def distribution(request: Request):
        body, _ = await authorized_body(request, schemas.DistributionRequest)
        kw = {f: getattr(body, f) for f in schemas.DIST_PASS_THROUGH if getattr(body, f) is not None}
        if body.logit_bias is not None:
            kw["logit_bias"] = _logit_bias(body.logit_bias)
        try:
            params = SamplingParams(max_tokens=1, **kw)
        except ParamError:
            raise
        except (TypeError, ValueError) as e:
            raise APIError(400, f"invalid sampling parameters: {e}", code="invalid_value") from None
        try:
            ids = engine.encode_prompt(body.prompt)
        except ParamError:
            raise
        except (UnicodeError, TypeError, ValueError) as e:
            raise ParamError("prompt", f"cannot be tokenized: {e}") from None
        gen = list(body.generated)
        V = engine.vocab_size
        if any(not 0 <= t < V for t in gen):
            raise ParamError("generated", f"token ids must be integers in [0, {V})")
        if len(ids) + len(gen) > engine.max_len:
            raise ParamError("prompt", f"has {len(ids) + len(gen)} tokens (with generated); the context "
                                       f"holds {engine.max_len}")
        params.validate(V, context_length=engine.max_len, prompt_len=len(ids) + len(gen),
                        eos_token_ids=sorted(tok.eos_token_ids))
        fut = runner.call(lambda: next_token_distribution(engine, ids, gen, params, top=body.top))
        result = await asyncio.wrap_future(fut)
        result["model"] = served[0]
        return _json(result)

    conformance.register(app, engine, auth=auth)  # GET /tokenizer_info
    from .views import register as register_views  # the playground's pipeline, tree, lens and sequence views
    register_views(app, engine, runner, auth=auth, read_body=read_body, check_model=check_model)

    from .game_route import add_game_route  # POST /v1/game: the summarization game (game_route.py)

    add_game_route(app, engine, runner, auth, read_body, check_model, _json)
