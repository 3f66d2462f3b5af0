"""``logitlab bench``: speed and memory of the engine, side by side with its peers in ONE run.

These machines are noisy, so every figure that matters is printed as a ratio against a peer measured
in the same process moments apart: Hugging Face transformers holding the same (dequantized) weights,
and llama-cpp-python on the same GGUF when it is installed. Results go to stdout and, with --out, to
a JSON file; BENCHMARKS.md records them with the exact command.

Besides the peers, two figures of the same run are read against the machine itself:

- ``decode_bandwidth_fraction``: the bytes of weights one decode step streams (``weight_bytes_per_token``)
  times the 1-stream decode rate, over the read bandwidth measured in the same run
  (``read_bandwidth_gb_s``: best full read of a 1 GiB tensor, in a fresh process);
  ``forward_bandwidth_fraction``: the same for the model forward alone (its median time per step);
- the sampling overhead at one stream: a scheduler decode step against the model forward inside it (and
  the sampler call inside it), greedy and top-p 0.95.

With ``--dtype gguf`` the same engine is measured again with two-level activations (``int8x2``): 1-stream
decode, 32 streams and prefill, read as ratios to int8's.

``logitlab bench --spec``: speculative decoding against plain decode on an input-grounded prompt
(``bench_spec.py``); ``logitlab bench --fidelity``: how often each quantized mode's greedy text is float32's
(``bench_fidelity.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from .sampling import SamplingParams

PROMPT = "Once upon a time, there was a little robot who lived in a quiet village by the sea. Every morning"


DTYPES = ["float32", "bfloat16", "int8", "gguf"]  # gguf: compute on the GGUF's own 4-bit blocks

# buffers that only the batched / prefill paths read (decode never streams them): an int8 layer's bfloat16
# GEMM copy. A module may name more in a ``prefill_only_buffers`` attribute (a tuple of buffer names).
PREFILL_ONLY_BUFFERS = ("dequant",)


def sync(device) -> None:
    """Wait for the device's queued work (a timer around GPU work reads nothing otherwise)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def decode_once(engine, prompts: list, tokens: int, temperature: float) -> tuple[float, list[list[int]]]:
    """One stream per prompt (text or ids) through the engine's scheduler: generated tokens per second,
    timed from when every stream has its first token (prefill excluded), and the tokens."""
    params = SamplingParams(max_tokens=tokens, temperature=temperature, top_p=0.95 if temperature else 1.0,
                            ignore_eos=True, seed=1)
    sched = engine.scheduler
    reqs = [r for p in prompts for r in engine.make_requests(p, params)]
    sched.add(reqs)
    while any(not r.output_ids for r in reqs):
        sched.step()
    done0 = sum(len(r.output_ids) for r in reqs)
    sync(engine.device)
    t0 = time.perf_counter()
    while sched.has_work():
        sched.step()
    sync(engine.device)
    dt = time.perf_counter() - t0
    if any(r.error for r in reqs):
        raise RuntimeError(f"decode failed: {[r.error for r in reqs if r.error][0]}")
    return (sum(len(r.output_ids) for r in reqs) - done0) / dt, [list(r.output_ids) for r in reqs]


def _decode_rate(engine, tokens: int, batch: int, temperature: float) -> float:
    """``decode_once`` over ``batch`` streams of the bench's prompt: tokens per second."""
    return decode_once(engine, [PROMPT + f" {i}" for i in range(batch)], tokens, temperature)[0]


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step streams: every parameter and buffer of ``model`` counted once by
    storage (a tied LM head and embedding share one), without the buffers only batched/prefill paths use
    (``PREFILL_ONLY_BUFFERS``, a module's ``prefill_only_buffers``), the RoPE tables and the embedding
    tables (a lookup reads a row of them; the token table counts when the LM head is tied to it, as it is
    then read whole by the head). The KV cache is not a weight and is not counted."""
    head = getattr(model, "lm_head", None)
    head_ranges = set()
    if head is not None:
        head_ranges = {(t.data_ptr(), t.nbytes) for t in [*head.parameters(), *head.buffers()] if t is not None}
    lookup_only = set()
    inner = getattr(model, "model", None)
    for name in ("embed_tokens", "embed_positions"):
        emb = getattr(inner, name, None) if inner is not None else None
        if emb is not None:
            lookup_only |= {(t.data_ptr(), t.nbytes) for t in [*emb.parameters(), *emb.buffers()] if t is not None}
    seen, total = set(), 0
    for mod in model.modules():
        skip = set(PREFILL_ONLY_BUFFERS) | set(getattr(mod, "prefill_only_buffers", ()))
        if mod is model:
            skip |= {"rope_cos", "rope_sin"}
        tensors = [(n, t) for n, t in mod.named_parameters(recurse=False)]
        tensors += [(n, t) for n, t in mod.named_buffers(recurse=False) if n not in skip]
        for _, t in tensors:
            if t is None or t.device.type == "meta":
                continue
            key = (t.data_ptr(), t.nbytes)
            if key in seen or (key in lookup_only and key not in head_ranges):
                continue
            seen.add(key)
            total += t.nbytes
    return total


_BANDWIDTH = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
x = torch.ones(max(1, int(float(sys.argv[2]) * (1 << 19))) * 512)  # float32, GiB * 2^28 elements
m, v = x.view(-1, 512), torch.ones(512)
best = {}
for name, f in (("sum", x.sum), ("mv", lambda: torch.mv(m, v))):
    f()
    for _ in range(int(sys.argv[3])):
        t0 = time.perf_counter()
        f()
        best[name] = min(best.get(name, 1e9), time.perf_counter() - t0)
print(max(x.nbytes / b / 1e9 for b in best.values()))
"""


def read_bandwidth_gb_s(threads: int, gib: float = 1.0, reps: int = 3) -> float:
    """The machine's read bandwidth now (GB/s): the best of ``reps`` full reads of a ``gib`` GiB float32
    tensor with ``threads`` threads (a sum, and a matrix-vector product over it: the decode step's own
    access pattern), in a fresh process so its gigabyte does not count in this one's peak RSS."""
    r = subprocess.run([sys.executable, "-c", _BANDWIDTH, str(threads), str(gib), str(reps)],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"bandwidth probe failed: {r.stderr.strip().splitlines()[-1:]}")
    return float(r.stdout.strip().splitlines()[-1])


class _TimedCall:
    """Stands in for a callable (the scheduler's model, its sampler) and records each call's wall time."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.times.append(time.perf_counter() - t0)
        return out

    def __getattr__(self, name):  # the model's attributes (config, dtype) as they are
        return getattr(self.fn, name)


def sampling_overhead(engine, tokens: int, top_p: bool) -> dict:
    """One stream through the engine's scheduler: per decode step, the wall time of ``step()``, of the model
    forward inside it and of the sampler call inside it (medians over ``tokens`` steps, prefill excluded).
    ``overhead``: the share of the step that is not the forward (sampling and the scheduler's bookkeeping);
    ``sample_fraction``: the sampler call's share."""
    params = SamplingParams(max_tokens=tokens + 1, temperature=0.8 if top_p else 0.0, top_p=0.95 if top_p else 1.0,
                            ignore_eos=True, seed=1)
    sched = engine.scheduler
    reqs = engine.make_requests(PROMPT, params)
    sched.add(reqs)
    while not reqs[0].output_ids:
        sched.step()
    model, fwd, smp = sched.model, _TimedCall(sched.model), _TimedCall(sched._sample)
    steps = []
    sched.model, sched._sample = fwd, smp
    try:
        while not reqs[0].finished:
            n_f, n_s = len(fwd.times), len(smp.times)
            t0 = time.perf_counter()
            sched.step()
            dt = time.perf_counter() - t0
            if len(fwd.times) == n_f + 1 and len(smp.times) == n_s + 1:  # a plain decode step
                steps.append((dt, fwd.times[-1], smp.times[-1]))
    finally:
        sched.model = model
        del sched._sample  # the instance attribute: back to the method
    med = [sorted(col)[len(col) // 2] for col in zip(*steps, strict=True)]
    step, forward, sample = med
    return {"step_ms": 1e3 * step, "forward_ms": 1e3 * forward, "sample_ms": 1e3 * sample,
            "overhead": 1 - forward / step, "sample_fraction": sample / step}


@torch.inference_mode()
def prefill_rate(model, n: int, reps: int = 2, warmup: int = 32) -> float:
    """Tokens per second of one ``n``-token forward (random ids, no cache), best of ``reps`` after a
    ``warmup``-token one."""
    dev = model.device
    toks = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(n).unsqueeze(0)
    model(toks[:, :warmup], pos[:, :warmup])
    best = float("inf")
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        model(toks, pos)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return n / best


def _hf_model(weights):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = weights.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
                      max_position_embeddings=c.context_length, rms_norm_eps=c.rms_norm_eps,
                      rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings)
    m = LlamaForCausalLM(cfg).eval()
    sd = dict(weights.state_dict)
    if c.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    m.load_state_dict(sd, strict=False)
    return m


@torch.inference_mode()
def _hf_decode_rate(hf, tokenizer, tokens: int, batch: int, sample: bool) -> float:
    ids = [tokenizer.encode(PROMPT + f" {i}") for i in range(batch)]
    width = max(map(len, ids))
    x = torch.tensor([[0] * (width - len(s)) + s for s in ids])  # left padding, as HF generate wants
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])
    kw = dict(attention_mask=mask, do_sample=sample, pad_token_id=0, top_p=0.95 if sample else None,
              temperature=0.8 if sample else None, top_k=None)
    hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)  # warm-up; also the prefill cost
    t0 = time.perf_counter()
    hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
    dt = time.perf_counter() - t0 - t_prefill
    return batch * (tokens - 1) / dt


@torch.inference_mode()
def _hf_prefill_rate(hf, n: int) -> float:
    toks = torch.randint(0, hf.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    hf(toks[:, :32])
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        hf(toks, use_cache=False, logits_to_keep=1)
        best = min(best, time.perf_counter() - t0)
    return n / best


def _llamacpp(gguf_path: str, tokens: int, prefill: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=gguf_path, n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False)
    ids = llm.tokenize(PROMPT.encode())
    llm.eval(ids)  # warm-up
    llm.reset()
    llm.eval(ids)
    n = 0
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
        n += 1
    decode = n / (time.perf_counter() - t0)
    long = list(range(100, 100 + prefill))
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(long)
    pre = prefill / (time.perf_counter() - t0)
    return {"decode_tok_s": decode, "prefill_tok_s": pre}


def _load_times(model: str, dtype: str) -> dict:
    """Cold (GGUF -> converted cache) and warm (memory-mapped cache) load, each in a fresh process so
    imports and caches are counted honestly; of the warm one, also the part that ``import torch`` takes
    (the interpreter's cost of any PyTorch program, whatever it loads) and the rest."""
    code = ("import time,sys; t=time.perf_counter(); import torch; t1=time.perf_counter(); "
            "from logitlab.engine import Engine; "
            f"Engine.load({model!r}, dtype={dtype!r}, max_batch=1, max_len=256); "
            "print(t1-t, time.perf_counter()-t)")
    from .weights import resolve_model

    src = str(resolve_model(model))
    out = {}
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, LOGITLAB_HOME=home)
        target = src
        if src.endswith(".gguf"):  # a fresh home holding only the GGUF: the first load converts
            target = os.path.join(home, os.path.basename(src))
            os.symlink(src, target)
            code = code.replace(repr(model), repr(target))
        for label in ("cold_load_s", "warm_load_s"):
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr else "load failed")
            torch_s, total_s = map(float, r.stdout.strip().splitlines()[-1].split())
            out[label] = total_s
    out["warm_torch_import_s"] = torch_s
    out["warm_load_past_torch_import_s"] = out["warm_load_s"] - torch_s
    return out


def run(args) -> dict:
    from .engine import Engine
    from .weights import load_weights, resolve_model

    torch.set_num_threads(args.threads)
    res: dict = {"model": args.model, "dtype": args.dtype, "threads": args.threads}
    print(f"logitlab bench: {args.model} dtype={args.dtype} threads={args.threads}", file=sys.stderr)
    if not args.skip_load:
        res.update(_load_times(args.model, args.dtype))
    w = load_weights(args.model)
    engine = Engine.load(args.model, dtype=args.dtype, max_batch=32, max_len=1024)
    _decode_rate(engine, 8, 1, 0.0)  # warm-up: fault in the memory-mapped weights, build the native kernels
    res["decode_1_tok_s"] = _decode_rate(engine, args.tokens, 1, 0.0)
    # the machine's read bandwidth, moments after: the share of it that 1-stream decode reaches
    res["read_bandwidth_gb_s"] = read_bandwidth_gb_s(args.threads)
    res["weight_bytes_per_token"] = weight_bytes_per_token(engine.model)
    res["decode_bandwidth_fraction"] = (res["weight_bytes_per_token"] * res["decode_1_tok_s"]
                                        / (res["read_bandwidth_gb_s"] * 1e9))
    for label, top_p in (("greedy", False), ("top_p", True)):
        o = sampling_overhead(engine, args.tokens, top_p)
        res[f"step_ms_{label}"], res[f"forward_ms_{label}"] = o["step_ms"], o["forward_ms"]
        res[f"sample_ms_{label}"] = o["sample_ms"]
        res[f"sampling_overhead_{label}"], res[f"sample_fraction_{label}"] = o["overhead"], o["sample_fraction"]
    # the forward alone (median of the greedy steps above): the same bytes over the model's own time
    res["forward_bandwidth_fraction"] = (res["weight_bytes_per_token"] / (res["forward_ms_greedy"] / 1e3)
                                         / (res["read_bandwidth_gb_s"] * 1e9))
    if args.dtype == "int8":
        from .model import native

        if native.available():
            with native.switched_off():
                res["decode_1_pytorch_only_tok_s"] = _decode_rate(engine, args.tokens, 1, 0.0)
    res["sampled_8_tok_s"] = _decode_rate(engine, args.tokens, 8, 0.8)
    res["sampled_32_tok_s"] = _decode_rate(engine, args.tokens, 32, 0.8)
    res["prefill_512_tok_s"] = prefill_rate(engine.model, 512)
    if args.no_cache:
        nc = Engine(engine.model, engine.tokenizer, max_batch=1, max_len=1024, use_cache=False)
        res["no_kv_cache_decode_1_tok_s"] = _decode_rate(nc, args.tokens, 1, 0.0)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.dtype == "gguf":  # the same engine with two-level activations, side by side (after the peak RSS: a
        # second set of 32 streams grows the KV pool, whose released blocks stay cached)
        from .model.gguf_model import set_activations

        set_activations(engine.model, "int8x2")
        _decode_rate(engine, 8, 1, 0.0)
        res["int8x2_decode_1_tok_s"] = _decode_rate(engine, args.tokens, 1, 0.0)
        res["int8x2_sampled_32_tok_s"] = _decode_rate(engine, args.tokens, 32, 0.8)
        res["int8x2_prefill_512_tok_s"] = prefill_rate(engine.model, 512)
        set_activations(engine.model, "int8")
    del engine
    if not args.skip_hf:
        hf = _hf_model(w)
        res["hf_decode_1_tok_s"] = _hf_decode_rate(hf, w.tokenizer, args.tokens, 1, False)
        res["hf_sampled_8_tok_s"] = _hf_decode_rate(hf, w.tokenizer, args.tokens, 8, True)
        res["hf_prefill_512_tok_s"] = _hf_prefill_rate(hf, 512)
        del hf
    src = str(resolve_model(args.model))
    if src.endswith(".gguf") and not args.skip_llamacpp:
        lc = _llamacpp(src, args.tokens, 512)
        if lc:
            res["llamacpp_decode_1_tok_s"] = lc["decode_tok_s"]
            res["llamacpp_prefill_512_tok_s"] = lc["prefill_tok_s"]
    return res


def report(res: dict) -> str:
    lines = [f"{k:<28} {v:10.2f}" if isinstance(v, float) else f"{k:<28} {v}" for k, v in res.items()]
    ratios = []

    def ratio(label, a, b):
        if a in res and b in res:
            ratios.append(f"{label:<44} {res[a] / res[b]:6.2f}x")

    ratio("1-stream decode vs transformers", "decode_1_tok_s", "hf_decode_1_tok_s")
    ratio("32-stream sampled vs transformers 8-stream", "sampled_32_tok_s", "hf_sampled_8_tok_s")
    ratio("8-stream sampled vs transformers 8-stream", "sampled_8_tok_s", "hf_sampled_8_tok_s")
    ratio("prefill 512 vs transformers", "prefill_512_tok_s", "hf_prefill_512_tok_s")
    ratio("1-stream decode vs llama.cpp", "decode_1_tok_s", "llamacpp_decode_1_tok_s")
    ratio("prefill 512 vs llama.cpp", "prefill_512_tok_s", "llamacpp_prefill_512_tok_s")
    ratio("KV cache vs no cache (1-stream decode)", "decode_1_tok_s", "no_kv_cache_decode_1_tok_s")
    ratio("native kernels vs PyTorch only (1-stream)", "decode_1_tok_s", "decode_1_pytorch_only_tok_s")
    ratio("int8x2 vs int8: 1-stream decode", "int8x2_decode_1_tok_s", "decode_1_tok_s")
    ratio("int8x2 vs int8: 32-stream sampled", "int8x2_sampled_32_tok_s", "sampled_32_tok_s")
    ratio("int8x2 vs int8: prefill 512", "int8x2_prefill_512_tok_s", "prefill_512_tok_s")
    ratio("int8x2 1-stream decode vs llama.cpp", "int8x2_decode_1_tok_s", "llamacpp_decode_1_tok_s")
    ratio("int8x2 32-stream vs transformers 8-stream", "int8x2_sampled_32_tok_s", "hf_sampled_8_tok_s")
    ratio("int8x2 prefill 512 vs llama.cpp", "int8x2_prefill_512_tok_s", "llamacpp_prefill_512_tok_s")
    fractions = []

    def fraction(label, key):
        if key in res:
            fractions.append(f"{label:<44} {res[key]:6.1%}")

    fraction("1-stream decode: share of read bandwidth", "decode_bandwidth_fraction")
    fraction("1-stream forward alone: share of bandwidth", "forward_bandwidth_fraction")
    fraction("1-stream step outside the forward, greedy", "sampling_overhead_greedy")
    fraction("1-stream step outside the forward, top-p", "sampling_overhead_top_p")
    fraction("1-stream step in the sampler call, greedy", "sample_fraction_greedy")
    fraction("1-stream step in the sampler call, top-p", "sample_fraction_top_p")
    out = lines + ["", "ratios (same run):"] + ratios
    return "\n".join(out + ["", "fractions (same run):"] + fractions if fractions else out)


def parser() -> argparse.ArgumentParser:
    from .weights import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="logitlab bench", epilog="`logitlab bench --server -h`: serving benchmark; "
                                "`logitlab bench --train -h`: training throughput; `logitlab bench --kv -h`: KV "
                                "memory; `logitlab bench --spec -h`: speculative decoding; `logitlab bench "
                                "--fidelity -h`: greedy text against float32's")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="int8", choices=DTYPES)
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per stream")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-cache", action="store_true", help="also measure decoding without the KV cache")
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "--server":  # the serving benchmark lives in the repository's bench/
        import runpy
        from pathlib import Path

        script = Path(__file__).resolve().parents[2] / "bench" / "server_bench.py"
        if not script.exists():
            raise ValueError("bench: --server needs the repository checkout (bench/server_bench.py)")
        return runpy.run_path(str(script))["main"](argv[1:])
    if argv and argv[0] == "--kv":  # paged KV cache: memory and prefix-cache figures (bench_kv.py)
        from .bench_kv import main as kv_main

        return kv_main(argv[1:])
    if argv and argv[0] == "--spec":  # speculative vs plain decode on an input-grounded prompt (bench_spec.py)
        from .bench_spec import main as spec_main

        return spec_main(argv[1:])
    if argv and any(a == "--device" or a.startswith("--device=") for a in argv):  # a GPU (bench_gpu.py)
        from .bench_gpu import main as gpu_main

        return gpu_main(argv)
    if argv and argv[0] == "--fidelity":  # greedy text against float32's on a corpus (bench_fidelity.py)
        from .bench_fidelity import main as fidelity_main

        return fidelity_main(argv[1:])
    if argv and argv[0] == "--train":  # training throughput against transformers (bench_train.py)
        from .bench_train import main as train_main

        return train_main(argv[1:])
    args = parser().parse_args(argv)
    res = run(args)
    print(report(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0
