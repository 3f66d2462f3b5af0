"""Serving benchmark: N concurrent streaming clients against `logitlab serve` on loopback.

    python bench/server_bench.py                          # the default model, 1, 8 and 32 clients
    python bench/server_bench.py --clients 1,8,32 --duration 20 --max-tokens 32 --dtype bfloat16
    python bench/server_bench.py --url http://127.0.0.1:8000 --model NAME   # an already running server
    python bench/server_bench.py --tiny                   # a tiny random model (a smoke test of the harness)

For each client count C, C clients each send streaming completions back to back (fixed length:
``ignore_eos``) for ``--duration`` seconds; requests still running then are finished and counted. Reports
output throughput (generated tokens / wall time), time to first token (TTFT) and request latency
(p50/p99), the throughput ratio to 1 client, and from the server's /metrics the mean scheduler step time
and the fraction of wall time the engine was stepping ("busy": near 100% means the HTTP layer keeps the
engine fed, and the engine's step time is the limit). Bounded: every level stops after its duration plus at
most one request length, and a hard timeout covers the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


async def _one(client, url: str, body: dict) -> tuple[float, float, int]:
    """One streaming request: (ttft, latency, tokens)."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            for ch in obj.get("choices", []):
                n = len(ch.get("token_ids") or []) or (1 if ch.get("text") else 0)
                if n and ttft is None:
                    ttft = time.perf_counter() - t0
                tokens += n
    return (ttft if ttft is not None else float("nan")), time.perf_counter() - t0, tokens


async def _sched_counters(client, base: str) -> tuple[float, float]:
    """(scheduler steps, seconds spent in steps) from the server's /metrics."""
    text = (await client.get(base + "/metrics")).text
    vals = {}
    for line in text.splitlines():
        if line.startswith(("logitlab_scheduler_steps_total ", "logitlab_scheduler_step_seconds_total ")):
            name, value = line.split()
            vals[name] = float(value)
    return (vals.get("logitlab_scheduler_steps_total", 0.0),
            vals.get("logitlab_scheduler_step_seconds_total", 0.0))


async def _level(base: str, model: str, clients: int, duration: float, max_tokens: int,
                 headers: dict) -> dict:
    import httpx

    url = base + "/v1/completions"
    stats: list[tuple[float, float, int]] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits, headers=headers) as client:
        steps0, busy0 = await _sched_counters(client, base)
        t_start = time.perf_counter()
        stop_at = t_start + duration

        async def worker(w: int) -> None:
            i = 0
            while i == 0 or time.perf_counter() < stop_at:  # at least one request per client
                body = {"model": model, "prompt": f"Request {w}.{i}: tell me a story about the number {i}.",
                        "max_tokens": max_tokens, "temperature": 0.8, "seed": w * 1000 + i, "stream": True,
                        "ignore_eos": True}
                try:
                    stats.append(await _one(client, url, body))
                except Exception as e:  # noqa: BLE001 - report, keep going
                    errors.append(str(e))
                    await asyncio.sleep(0.05)
                i += 1

        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t_start
        steps1, busy1 = await _sched_counters(client, base)
    tokens = sum(s[2] for s in stats)
    ttfts = [s[0] for s in stats if s[0] == s[0]]
    lat = [s[1] for s in stats]
    return {"clients": clients, "requests": len(stats), "errors": len(errors), "tokens": tokens,
            "wall_s": wall,
            "throughput_tok_s": tokens / wall if wall else 0.0,
            "ttft_p50_s": _pct(ttfts, 50), "ttft_p99_s": _pct(ttfts, 99),
            "latency_p50_s": _pct(lat, 50), "latency_p99_s": _pct(lat, 99),
            "per_client_tok_s": statistics.mean(s[2] / s[1] for s in stats) if stats else 0.0,
            "step_ms": 1000 * (busy1 - busy0) / max(1.0, steps1 - steps0),
            "engine_busy": (busy1 - busy0) / wall if wall else 0.0,
            "first_error": errors[0] if errors else None}


def _spawn_server(args) -> tuple[str, str, object]:
    """``python -m logitlab.server`` in its own process (clients and server do not share a GIL)."""
    import subprocess

    import httpx

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    max_batch = max(args.clients)
    cmd = [sys.executable, "-m", "logitlab.server", "--port", str(port), "--max-batch", str(max_batch),
           "--max-len", str(args.max_len), "--max-queue", str(4 * max_batch), "--dtype", args.dtype,
           "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.2)
    model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    return base, model, proc


def _start_server(args) -> tuple[str, str, object]:
    """The server in a thread of this process (needed for --tiny, which builds the model here)."""
    import uvicorn

    from logitlab.engine import Engine
    from logitlab.server.app import create_app

    max_batch = max(args.clients)
    from logitlab.weights import DEFAULT_MODEL, load_weights

    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny import tiny_model  # tests/tiny.py, put on the path just above

        tok = load_weights(DEFAULT_MODEL).tokenizer
        engine = Engine(tiny_model(vocab_size=tok.vocab_size, context_length=512), tok, name="tiny",
                        max_batch=max_batch, max_len=512)
    else:
        engine = Engine.load(args.model or DEFAULT_MODEL, dtype=args.dtype, max_batch=max_batch,
                             max_len=args.max_len)
    app = create_app(engine, max_queue=4 * max_batch)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", engine.name, server


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "--mixed":  # streams beside beam search and speculative decoding (mixed_bench.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from mixed_bench import main as mixed_main

        return mixed_main(argv[1:])
    p = argparse.ArgumentParser(prog="server_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--tiny", action="store_true", help="a tiny random model (tests the harness, not speed)")
    p.add_argument("--in-process", action="store_true", help="run the server in a thread of this process "
                   "(default: a separate process)")
    p.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per client count")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=900.0, help="hard limit for the whole run (s)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if not args.clients or min(args.clients) < 1:
        p.error("--clients: positive integers")

    server = None
    if args.url:
        base, model = args.url.rstrip("/"), args.model or "default"
        if args.model is None:
            import httpx

            model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    elif args.tiny or args.in_process:
        base, model, server = _start_server(args)
    else:
        base, model, server = _spawn_server(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def run_all() -> list[dict]:
        # warm-up: one short request (allocations, first-call overheads)
        await _level(base, model, 1, 0.0, 4, headers)
        out = []
        for c in args.clients:
            res = await _level(base, model, c, args.duration, args.max_tokens, headers)
            out.append(res)
            print(f"  {c:>3} clients: {res['requests']:>4} requests, {res['tokens']:>6} tokens in "
                  f"{res['wall_s']:.1f} s", file=sys.stderr)
        return out

    print(f"logitlab server benchmark: model {model}, {args.max_tokens} tokens per request, "
          f"{args.duration:.0f} s per level", file=sys.stderr)
    results = asyncio.run(asyncio.wait_for(run_all(), timeout=args.timeout))
    base_tp = next((r["throughput_tok_s"] for r in results if r["clients"] == 1),
                   results[0]["throughput_tok_s"])
    print(f"\n{'clients':>7} {'req':>5} {'err':>4} {'tok/s':>8} {'x 1 client':>10} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'lat p50':>8} {'lat p99':>8} {'tok/s/client':>12} {'step ms':>8} {'busy':>5}")
    for r in results:
        r["ratio_to_1_client"] = r["throughput_tok_s"] / base_tp if base_tp else float("nan")
        print(f"{r['clients']:>7} {r['requests']:>5} {r['errors']:>4} {r['throughput_tok_s']:>8.1f} "
              f"{r['ratio_to_1_client']:>9.2f}x {r['ttft_p50_s']:>8.3f}s {r['ttft_p99_s']:>8.3f}s "
              f"{r['latency_p50_s']:>7.2f}s {r['latency_p99_s']:>7.2f}s {r['per_client_tok_s']:>12.1f} "
              f"{r['step_ms']:>8.1f} {r['engine_busy']:>5.0%}")
        if r["first_error"]:
            print(f"        first error: {r['first_error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, "max_tokens": args.max_tokens, "duration_s": args.duration,
                       "results": results}, f, indent=2)
    if hasattr(server, "terminate"):
        server.terminate()
        server.wait(30)
    elif server is not None:
        server.should_exit = True
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
