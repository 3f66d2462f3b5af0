"""Streams beside decoding drivers: do a beam search and a speculative request pause the plain streams?

    logitlab bench --server --mixed            # the default model, in a separate server process
    python bench/mixed_bench.py --tiny         # a tiny random model (a smoke test of the harness)

8 clients stream plain completions for ``--duration`` seconds, twice: alone, then with one client sending
beam searches (width 4, 64 tokens) and one sending speculative requests (n-gram draft, 64 tokens) back to
back alongside. Reported: the p50 / p99 / max gap between consecutive chunks of the plain streams in both
phases and the p99 ratio (issue 9's target: within 2x), plus how many driver requests completed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_bench import _pct, _spawn_server, _start_server  # noqa: E402

PLAIN = {"prompt": "Write a long story about a lighthouse keeper.", "temperature": 0.8, "ignore_eos": True}
BEAM = {"prompt": "The three most important inventions are", "max_tokens": 64, "beam_width": 4,
        "ignore_eos": True}
SPEC = {"prompt": "Repeat this: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat.",
        "max_tokens": 64, "temperature": 0, "speculative": {"draft": "ngram", "num_tokens": 4}, "ignore_eos": True}


async def _phase(base: str, model: str, duration: float, max_tokens: int, drivers: bool) -> dict:
    import httpx

    gaps: list[float] = []
    done = {"plain": 0, "beam": 0, "speculative": 0, "errors": 0}
    stop_at = time.monotonic() + duration
    async with httpx.AsyncClient(timeout=300) as client:
        async def stream_client(i: int):
            while time.monotonic() < stop_at:
                body = {**PLAIN, "model": model, "max_tokens": max_tokens, "seed": i, "stream": True}
                last = None
                async with client.stream("POST", base + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        done["errors"] += 1
                        await r.aread()
                        continue
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            now = time.monotonic()
                            if last is not None:
                                gaps.append(now - last)
                            last = now
                done["plain"] += 1

        async def driver_client(body: dict, name: str):
            while time.monotonic() < stop_at:
                r = await client.post(base + "/v1/completions", json={**body, "model": model})
                done[name if r.status_code == 200 else "errors"] += 1

        tasks = [stream_client(i) for i in range(8)]
        if drivers:
            tasks += [driver_client(BEAM, "beam"), driver_client(SPEC, "speculative")]
        await asyncio.gather(*tasks)
    return {"gap_p50_s": _pct(gaps, 50), "gap_p99_s": _pct(gaps, 99), "gap_max_s": max(gaps, default=float("nan")),
            **done}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mixed_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--json", default=None, metavar="OUT.json")
    args = p.parse_args(argv)
    args.clients, args.in_process = [10], False
    base, model, server = _start_server(args) if args.tiny else _spawn_server(args)
    try:
        alone = asyncio.run(_phase(base, model, args.duration, args.max_tokens, drivers=False))
        mixed = asyncio.run(_phase(base, model, args.duration, args.max_tokens, drivers=True))
    finally:
        if hasattr(server, "terminate"):
            server.terminate()
            server.wait(30)
        else:
            server.should_exit = True
    res = {"model": model, "alone": alone, "with_beam_and_speculative": mixed,
           "p99_gap_ratio": mixed["gap_p99_s"] / alone["gap_p99_s"]}
    for name, ph in (("8 streams alone", alone), ("+ beam + speculative", mixed)):
        print(f"{name:<22} gap p50 {ph['gap_p50_s'] * 1e3:7.1f} ms  p99 {ph['gap_p99_s'] * 1e3:7.1f} ms  "
              f"max {ph['gap_max_s'] * 1e3:7.1f} ms  streams {ph['plain']}  beam {ph['beam']}  "
              f"speculative {ph['speculative']}  errors {ph['errors']}")
    print(f"p99 gap with drivers / alone: {res['p99_gap_ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if alone["errors"] == mixed["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
