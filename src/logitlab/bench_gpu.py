"""Decode speed on a GPU, side by side with Hugging Face transformers on the same GPU and the same weights.

``python -m logitlab.bench_gpu [--out DIR]`` (``bench/gpu_check.sh`` runs it after the tests marked ``gpu``;
``logitlab bench --device cuda`` is meant to call ``main``). For each dtype (float16, bfloat16, int8):

- ``decode_1_tok_s``: one stream, greedy, decode steps replayed from CUDA graphs (``model/cuda_graph.py``),
  and ``decode_1_eager_tok_s``: the same with every kernel launched from Python;
- ``sampled_8_tok_s``: eight streams, temperature 0.8 and top-p 0.95, seeded, graphs on;
- ``prefill_512_tok_s``: one 512-token forward;
- ``hf_decode_1_tok_s`` / ``hf_sampled_8_tok_s``: transformers' ``LlamaForCausalLM`` holding the same weights
  in the same dtype on the same GPU, through ``generate()`` (int8 is compared with transformers in bfloat16:
  our int8 layers compute with their bfloat16 copy on a GPU);
- ``graph_matches_eager``: the greedy tokens of the graph run equal the eager run's;
- ``weight_bytes_per_token`` and ``decode_1_weight_gb_s``: the weights one step reads, and at what rate the
  1-stream run reads them (an H100's HBM3 reads ~3 TB/s: the distance to the bandwidth bound).

Every rate is generated tokens per second, prefill excluded, timed after ``torch.cuda.synchronize()``. Each
timed run follows an untimed one of the same length (CUDA graphs captured, cuBLAS warm).

Weights: the default model when its GGUF is already in logitlab's cache (nothing is ever downloaded here: a
GPU machine may have no network), else random weights of the default model's shape, and the report says
which. Speed does not depend on the values; the prompts are token ids either way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .model.config import ModelConfig

DTYPES = ("float16", "bfloat16", "int8")
# SmolLM2-135M-Instruct, the default model
DEFAULT_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                     num_kv_heads=3, head_dim=64, context_length=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                     tie_word_embeddings=True)
TINY_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, context_length=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
TARGET_TOK_S, TARGET_RATIO = 1500.0, 3.0


@dataclass
class Source:
    """Weights to build every engine and the transformers model from (Hugging Face names)."""

    config: ModelConfig
    state_dict: dict
    tokenizer: object  # a logitlab Tokenizer, or an ids-only stand-in
    label: str
    real: bool


def ids_tokenizer(eos: int = 0):
    """A tokenizer stand-in for prompts given as token ids (results carry no text)."""
    from .decoding.scheduler import _IdsOnly

    return _IdsOnly([eos])


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of ``config``'s Llama shape in Hugging Face names (norms near 1, embeddings and
    projections scaled so the logits are not flat)."""
    g = torch.Generator().manual_seed(seed)
    c, f, d, H, K = config.hidden_size, config.intermediate_size, config.head_dim, config.num_heads, config.num_kv_heads

    def w(*shape, std):
        return torch.randn(*shape, generator=g) * std

    sd = {"model.embed_tokens.weight": w(config.vocab_size, c, std=0.15), "model.norm.weight": 1 + w(c, std=0.1)}
    sc, sa, sf = c ** -0.5, 0.5 * (H * d) ** -0.5, 0.5 * f ** -0.5  # inputs of width c, H*d, f
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": 1 + w(c, std=0.1), p + "post_attention_layernorm.weight": 1 + w(c, std=0.1),
            p + "self_attn.q_proj.weight": w(H * d, c, std=sc), p + "self_attn.k_proj.weight": w(K * d, c, std=sc),
            p + "self_attn.v_proj.weight": w(K * d, c, std=sc), p + "self_attn.o_proj.weight": w(c, H * d, std=sa),
            p + "mlp.gate_proj.weight": w(f, c, std=sc), p + "mlp.up_proj.weight": w(f, c, std=sc),
            p + "mlp.down_proj.weight": w(c, f, std=sf),
        })
    if not config.tie_word_embeddings:
        sd["lm_head.weight"] = w(config.vocab_size, c, std=c ** -0.5)
    return sd


def default_model_cached() -> bool:
    """The default model's GGUF is in the cache (checked, never fetched) and the ``gguf`` package imports."""
    import importlib.util

    from .weights.registry import DEFAULT_MODEL, MODELS, _is_cached, cache_dir

    spec = MODELS[DEFAULT_MODEL]
    return importlib.util.find_spec("gguf") is not None and _is_cached(cache_dir() / spec.filename, spec)


def weights_source(shape: str = "default", seed: int = 0) -> Source:
    """The default model's weights when cached (``shape="default"``), else random weights of its shape;
    ``shape="tiny"``: a tiny random model (the CPU smoke test of this module)."""
    if shape == "default" and default_model_cached():
        from .weights import DEFAULT_MODEL, load_weights

        w = load_weights(DEFAULT_MODEL, progress=False)
        return Source(w.config, w.state_dict, w.tokenizer, f"{w.name} (its GGUF, dequantized)", True)
    config = ModelConfig(**(TINY_SHAPE if shape == "tiny" else DEFAULT_SHAPE))
    label = "random weights, tiny shape" if shape == "tiny" else "random weights of the default model's shape " \
        "(the default model's GGUF is not in the cache here, or the gguf package is missing)"
    return Source(config, random_state_dict(config, seed), ids_tokenizer(0), label, False)


def prompts(src: Source, n: int, length: int = 24) -> list[list[int]]:
    """``n`` distinct prompts as token ids: the bench's text prompt (numbered) when there is a tokenizer."""
    if src.real:
        from .bench import PROMPT

        return [src.tokenizer.encode(PROMPT + f" {i}") for i in range(n)]
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(1, src.config.vocab_size, (length + i % 3,), generator=g).tolist() for i in range(n)]


def build_model(src: Source, dtype: str, device):
    """A Transformer of ``src`` in ``dtype`` ("float32", "float16", "bfloat16", "int8") on ``device``."""
    from .model.store import build_model as build

    if dtype == "float16":
        return build(src.config, src.state_dict, "float32").to(device, torch.float16)
    return build(src.config, src.state_dict, dtype).to(device)


def build_engine(src: Source, dtype: str, device, max_batch: int = 8, max_len: int = 1024):
    from .engine import Engine

    return Engine(build_model(src, dtype, device), src.tokenizer, name=src.label, max_batch=max_batch,
                  max_len=max_len, device=device)


def decode_rate(engine, ids: list[list[int]], tokens: int, temperature: float,
                graphs: bool) -> tuple[float, list[list[int]]]:
    """Generated tokens per second over ``len(ids)`` streams, prefill excluded, after an untimed run of the
    same length; and the timed run's tokens."""
    from .bench import decode_once
    from .model import cuda_graph

    with cuda_graph.use(graphs):
        decode_once(engine, ids, tokens, temperature)
        return decode_once(engine, ids, tokens, temperature)


def prefill_rate(model, n: int) -> float:
    """``bench.prefill_rate``: best of three after a whole-length warm-up (graph capture, autotuning)."""
    from .bench import prefill_rate

    return prefill_rate(model, n, reps=3, warmup=n)


def hf_model(src: Source, dtype: str, device):
    """transformers' LlamaForCausalLM with ``src``'s weights (``bench._hf_model``) in ``dtype`` on ``device``."""
    from types import SimpleNamespace

    from .bench import _hf_model

    hf = _hf_model(SimpleNamespace(config=src.config, state_dict=src.state_dict))
    return hf.to(device, {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype, torch.float32))


@torch.inference_mode()
def hf_decode_rate(hf, ids: list[list[int]], tokens: int, sample: bool, device) -> float:
    """transformers ``generate()`` over ``len(ids)`` left-padded streams: tokens per second, prefill excluded
    (a 1-token generate timed separately), after an untimed warm-up."""
    width = max(map(len, ids))
    x = torch.tensor([[0] * (width - len(s)) + s for s in ids], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids], device=device)
    kw = dict(attention_mask=mask, do_sample=sample, pad_token_id=0, top_p=0.95 if sample else None,
              temperature=0.8 if sample else None, top_k=None)

    from .bench import sync

    def timed(n):
        sync(device)
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(device)
        return time.perf_counter() - t0

    timed(min(tokens, 16))  # warm-up
    t_prefill = timed(1)
    dt = timed(tokens) - t_prefill
    return len(ids) * (tokens - 1) / dt


def weight_bytes_read(model) -> int:
    """Bytes of weights one decode step reads (``bench.weight_bytes_per_token``), where an int8 layer on a
    GPU reads its bfloat16 copy rather than its int8 weights and scales."""
    from .bench import weight_bytes_per_token
    from .model.quant import Int8Linear

    total = weight_bytes_per_token(model)
    for m in model.modules():
        if isinstance(m, Int8Linear) and m.dequant.device.type != "cpu":
            total += m.dequant.nbytes - m.qweight.nbytes - m.scale.nbytes
    return total


def _captures(engine) -> int:
    return sum(r.captures for r in engine.model.__dict__.get("_cuda_graphs", {}).values())


def run(device: str = "cuda", dtypes=DTYPES, tokens: int = 256, streams: int = 8, shape: str = "default",
        skip_hf: bool = False, log=print) -> dict:
    """Every figure of the module docstring, as one flat dict."""
    dev = torch.device(device)
    src = weights_source(shape)
    res: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "torch": torch.__version__, "weights": src.label, "tokens_per_stream": tokens, "streams": streams}
    ids = prompts(src, streams)
    for dtype in dtypes:
        t0 = time.perf_counter()
        engine = build_engine(src, dtype, dev, max_batch=streams, max_len=max(1024, tokens + 64))
        r1, toks_graph = decode_rate(engine, ids[:1], tokens, 0.0, graphs=True)
        res[f"{dtype}.decode_1_tok_s"] = r1
        r1e, toks_eager = decode_rate(engine, ids[:1], tokens, 0.0, graphs=False)
        res[f"{dtype}.decode_1_eager_tok_s"] = r1e
        res[f"{dtype}.graph_matches_eager"] = toks_graph == toks_eager
        res[f"{dtype}.sampled_{streams}_tok_s"] = decode_rate(engine, ids, tokens, 0.8, graphs=True)[0]
        res[f"{dtype}.prefill_512_tok_s"] = prefill_rate(engine.model, min(512, engine.max_len))
        res[f"{dtype}.weight_bytes_per_token"] = nbytes = weight_bytes_read(engine.model)
        res[f"{dtype}.decode_1_weight_gb_s"] = nbytes * r1 / 1e9  # the weights' read rate at one stream
        res[f"{dtype}.graphs_captured"] = _captures(engine)
        del engine
        if not skip_hf:
            hf_dtype = "bfloat16" if dtype == "int8" else dtype
            hf = hf_model(src, hf_dtype, dev)
            res[f"{dtype}.hf_{hf_dtype}_decode_1_tok_s"] = hf_decode_rate(hf, ids[:1], tokens, False, dev)
            res[f"{dtype}.hf_{hf_dtype}_sampled_{streams}_tok_s"] = hf_decode_rate(hf, ids, tokens, True, dev)
            del hf
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        log(f"{dtype}: done in {time.perf_counter() - t0:.1f} s")
    return res


def report(res: dict) -> str:
    lines = [f"{k:<44} {v:12.2f}" if isinstance(v, float) else f"{k:<44} {v}" for k, v in res.items()]
    lines.append("")
    streams = res.get("streams", 8)
    for dtype in dict.fromkeys(k.split(".")[0] for k in res if k.endswith(".decode_1_tok_s")):
        one = res.get(f"{dtype}.decode_1_tok_s")
        if one is None:
            continue
        hf_dtype = "bfloat16" if dtype == "int8" else dtype
        hf1 = res.get(f"{dtype}.hf_{hf_dtype}_decode_1_tok_s")
        hf8 = res.get(f"{dtype}.hf_{hf_dtype}_sampled_{streams}_tok_s")
        eager = res.get(f"{dtype}.decode_1_eager_tok_s")
        parts = [f"{dtype:<9} 1-stream {one:8.0f} tok/s ({'meets' if one >= TARGET_TOK_S else 'MISSES'} "
                 f"{TARGET_TOK_S:.0f})"]
        if eager:
            parts.append(f"graphs {one / eager:4.2f}x eager")
        if hf1:
            verdict = "meets" if one / hf1 >= TARGET_RATIO else "MISSES"
            parts.append(f"{one / hf1:5.2f}x transformers {hf_dtype} ({verdict} {TARGET_RATIO:.0f}x)")
        if hf8:
            parts.append(f"{streams}-stream sampled {res[f'{dtype}.sampled_{streams}_tok_s'] / hf8:5.2f}x transformers")
        lines.append(", ".join(parts))
    return "\n".join(lines)


def install_model(folder: str | Path) -> str:
    """The default model's GGUF carried in pieces (``FOLDER/<name>.part*``, e.g. ``split -b 40M``; the carried
    tree of one call holds at most 64 MiB) -> logitlab's cache, once every piece is there and the whole
    has the registered size and sha256. Returns what happened, in words."""
    import hashlib

    from .weights.registry import DEFAULT_MODEL, MODELS, _is_cached, _sidecar, cache_dir

    spec = MODELS[DEFAULT_MODEL]
    target = cache_dir() / spec.filename
    if _is_cached(target, spec):
        return f"{target} is cached"
    parts = sorted(Path(folder).glob(spec.filename + ".part*"))
    if not parts:
        return f"no pieces of {spec.filename} in {folder}"
    size = sum(p.stat().st_size for p in parts)
    if size != spec.size:
        return f"{len(parts)} pieces of {spec.filename}: {size} of {spec.size} bytes (more to come)"
    h = hashlib.sha256()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        for p in parts:
            data = p.read_bytes()
            h.update(data)
            out.write(data)
    if h.hexdigest() != spec.sha256:
        tmp.unlink()
        return f"pieces of {spec.filename} do not hash to the registered sha256"
    os.replace(tmp, target)
    _sidecar(target).write_text(f"{spec.sha256}  {target.name}\n")
    return f"installed {target}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="logitlab bench --device cuda", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated: float16,bfloat16,int8,float32")
    p.add_argument("--tokens", type=int, default=256, help="generated tokens per stream")
    p.add_argument("--streams", type=int, default=8, help="streams of the sampled run")
    p.add_argument("--skip-hf", action="store_true", help="no transformers baseline")
    p.add_argument("--shape", default="default", choices=["default", "tiny"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="folder for bench_gpu.json and bench_gpu.txt")
    p.add_argument("--install-model", default=None, metavar="DIR",
                   help="only install the default model's GGUF from pieces in DIR (see install_model) and exit")
    a = p.parse_args(argv)
    if a.install_model is not None:
        print(f"logitlab: {install_model(a.install_model)}", file=sys.stderr)
        return 0
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"error: device: {a.device} was asked for but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    res = run(a.device, [d.strip() for d in a.dtypes.split(",") if d.strip()], a.tokens, a.streams, a.shape,
              a.skip_hf, log=lambda m: print(f"logitlab: {m}", file=sys.stderr, flush=True))
    text = report(res)
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_gpu.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "bench_gpu.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
