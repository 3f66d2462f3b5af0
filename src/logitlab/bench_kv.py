"""``logitlab bench --kv``: what the paged KV cache buys, measured (issue 9's figures).

- peak RSS of ``logitlab generate "Hello there" --max-tokens 1 --n 3000`` (a fresh process);
- RSS of an idle ``logitlab serve`` after it has loaded the model (a fresh process);
- time to first token of a request with a 400-token prompt, then of a second one sharing those 400
  tokens (the prefix cache serves them; only the rest is computed), as a ratio measured in one process;
- KV blocks held by n=8 samples of a 500-token prompt, against one prompt's worth.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request

# The peak is this process's VmHWM, not ru_maxrss: ru_maxrss survives exec and so starts at the parent's
# peak when the parent was large at fork (a test session holding several models); VmHWM belongs to the
# address space exec made.
_PEAK = ("import sys\nfrom logitlab.cli import main\nrc = main(sys.argv[1:])\n"
         "hwm = next(ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM:'))\n"
         "print('PEAK_RSS_KB', hwm, file=sys.stderr)\nsys.exit(rc)\n")


def generate_peak_rss_mb(model: str, n: int = 3000) -> float:
    """Peak RSS (MB) of one ``logitlab generate ... --n N --max-tokens 1`` process."""
    r = subprocess.run([sys.executable, "-c", _PEAK, "generate", "Hello there", "--max-tokens", "1", "--n", str(n),
                        "--seed", "0", "--model", model], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"generate --n {n} failed: {r.stderr.strip().splitlines()[-1:]}")
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("PEAK_RSS_KB"))
    return int(line.split()[1]) / 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def idle_server_rss_mb(model: str, timeout: float = 300) -> float:
    """RSS (MB) of ``logitlab serve`` once it answers /health, before any request."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "logitlab.cli", "serve", "--model", model, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("logitlab serve did not start")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(1.0)
        with open(f"/proc/{proc.pid}/status") as f:
            rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
        return rss / 1024
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def prefix_ttft(engine, prefix_tokens: int = 400, reps: int = 3) -> dict:
    """Time to first token of a fresh 400-token prompt vs a prompt sharing those 400 tokens (best of reps;
    each rep uses a new prefix so the first request of a pair is always a miss)."""
    from .sampling import SamplingParams

    p = SamplingParams(max_tokens=1, temperature=0)
    ids = engine.tokenizer.encode(" ".join(f"item{i}" for i in range(2000)), add_special_tokens=False)
    first, second = [], []
    for rep in range(reps):
        prefix = ids[rep * prefix_tokens: (rep + 1) * prefix_tokens]
        for times, tail in ((first, [11, 12, 13]), (second, [21, 22, 23])):
            t0 = time.perf_counter()
            engine.generate(prefix + tail, p)
            times.append(time.perf_counter() - t0)
    return {"ttft_first_s": min(first), "ttft_shared_prefix_s": min(second),
            "ttft_ratio": min(second) / min(first)}


def n_samples_blocks(engine, prompt_tokens: int = 500, n: int = 8) -> dict:
    from .sampling import SamplingParams

    sched, cache = engine.scheduler, engine.scheduler.cache
    ids = engine.tokenizer.encode(" ".join(["word"] * prompt_tokens), add_special_tokens=False)[:prompt_tokens]
    sched.add(engine.make_requests(ids, SamplingParams(max_tokens=8, temperature=1.0, seed=0, n=n, ignore_eos=True)))
    peak = 0
    while sched.has_work():
        sched.step()
        peak = max(peak, cache.used_blocks())
    one = cache.blocks_for(len(ids))
    return {"n": n, "prompt_blocks": one, "peak_blocks": peak, "blocks_vs_one_prompt": peak / one}


def main(argv: list[str]) -> int:
    from .weights import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="logitlab bench --kv", description="memory and prefix-cache figures")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--n", type=int, default=3000, help="samples for the generate peak-RSS figure")
    p.add_argument("--skip-processes", action="store_true", help="skip the two fresh-process RSS figures")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    if not 1 <= a.n <= 4096:
        raise ValueError(f"n: must be in [1, 4096], got {a.n}")
    from .engine import Engine

    res: dict = {"model": a.model}
    if not a.skip_processes:
        res[f"generate_n{a.n}_peak_rss_mb"] = generate_peak_rss_mb(a.model, a.n)
        res["idle_serve_rss_mb"] = idle_server_rss_mb(a.model)
    engine = Engine.load(a.model, max_batch=16, max_len=2048)
    engine.generate("warm up", None)
    res.update(prefix_ttft(engine))
    res.update(n_samples_blocks(engine))
    for k, v in res.items():
        print(f"{k:<32} {v:10.3f}" if isinstance(v, float) else f"{k:<32} {v}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
