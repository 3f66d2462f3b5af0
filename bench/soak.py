"""Soak test: N streaming clients for T seconds against `logitlab serve` on loopback, bounded.

    python bench/soak.py --clients 64 --duration 300            # the default model, a server process
    python bench/soak.py --tiny --clients 8 --duration 10       # a tiny random model (a harness check)

Each client sends streaming completions back to back (varied prompts, lengths and sampling settings, a
few with stop strings or logprobs) until the duration is up. Reported: requests, errors (non-200, a
broken stream, an error chunk), time to first token and request latency (p50 / p99), throughput, and the
server's RSS sampled every few seconds (start, peak, end: flat memory means no leak). Every request has a
timeout and the whole run a hard limit, so it always stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_bench import _pct, _spawn_server, _start_server  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is", "Write a haiku about the sea.",
           "List three colours:", "def fibonacci(n):", "Explain gravity to a child.", "1, 2, 3, 4,"]


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return float("nan")


async def soak(base: str, model: str, clients: int, duration: float, pid: int | None) -> dict:
    import httpx

    ttft, latency, errors, tokens = [], [], [], 0
    rss: list[tuple[float, float]] = []
    t_start = time.monotonic()
    stop_at = t_start + duration

    async def client(i: int, http):
        nonlocal tokens
        rng = random.Random(i)
        while time.monotonic() < stop_at:
            body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": rng.choice([8, 16, 32, 64]),
                    "temperature": rng.choice([0.0, 0.7, 1.0]), "top_p": rng.choice([1.0, 0.9]),
                    "seed": rng.randrange(1 << 30), "stream": True}
            if rng.random() < 0.2:
                body["stop"] = ["."]
            if rng.random() < 0.2:
                body["logprobs"] = 2
            t0, first = time.monotonic(), None
            try:
                async with http.stream("POST", base + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}")
                        await r.aread()
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        obj = json.loads(line[6:])
                        if "error" in obj:
                            errors.append(obj["error"].get("message", "error chunk"))
                        for ch in obj.get("choices", []):
                            if ch.get("text"):
                                tokens += 1
                                if first is None:
                                    first = time.monotonic() - t0
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            latency.append(time.monotonic() - t0)
            if first is not None:
                ttft.append(first)

    async def sample_rss():
        while time.monotonic() < stop_at + 5:
            if pid is not None:
                rss.append((time.monotonic() - t_start, _rss_mb(pid)))
            await asyncio.sleep(5)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as http:
        sampler = asyncio.create_task(sample_rss())
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        sampler.cancel()
    wall = time.monotonic() - t_start
    mem = [m for _, m in rss]
    return {"clients": clients, "duration_s": duration, "wall_s": wall, "requests": len(latency),
            "errors": len(errors), "first_errors": errors[:3], "tokens": tokens, "tok_s": tokens / wall,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "latency_p50_s": _pct(latency, 50), "latency_p99_s": _pct(latency, 99),
            "rss_start_mb": mem[0] if mem else None, "rss_peak_mb": max(mem) if mem else None,
            "rss_end_mb": mem[-1] if mem else None, "rss_samples": rss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=300.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--timeout", type=float, default=1200.0, help="hard limit for the whole run (s)")
    p.add_argument("--json", default=None, metavar="OUT.json")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 1024 or not 0 < args.duration <= 3600:
        p.error("--clients in [1, 1024], --duration in (0, 3600]")
    args.clients_list = args.clients
    args.clients, args.in_process = [args.max_batch], False  # the harness sizes the server from this
    base, model, server = _start_server(args) if args.tiny else _spawn_server(args)
    pid = getattr(server, "pid", None) or (__import__("os").getpid() if args.tiny else None)
    try:
        res = asyncio.run(asyncio.wait_for(soak(base, model, args.clients_list, args.duration, pid),
                                           timeout=args.timeout))
    finally:
        if hasattr(server, "terminate"):
            server.terminate()
            server.wait(30)
        else:
            server.should_exit = True
    show = {k: v for k, v in res.items() if k != "rss_samples"}
    for k, v in show.items():
        print(f"{k:<16} {v:.3f}" if isinstance(v, float) else f"{k:<16} {v}")
    if res["rss_samples"]:
        print("rss over time (s, MB): " + ", ".join(f"{t:.0f}:{m:.0f}" for t, m in res["rss_samples"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
