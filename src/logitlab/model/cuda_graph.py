"""The one-token decode step replayed from CUDA graphs (opt-in: ``LOGITLAB_CUDA_GRAPH=1``, or ``use(True)``).

A decode step of a small model on a GPU is bound by kernel launches, not by the GPU: ~12 kernels per layer,
each a few microseconds of Python and driver work for far less of GPU work. A CUDA graph records the step's
kernels once and replays them with one launch. It applies to plain decode steps only (one new token per
row over the paged KV cache, logits of that token, no early exits) on a CUDA model; everything else, and
every step while this is off, runs the eager ``Transformer.forward``.

A graph fixes every shape and every address, so:

- There is one graph per (rows, table width) bucket, both rounded up to a power of two (at most
  ``MAX_ROWS`` rows). Padding rows feed token 0 at position 0 and write their key and value into the
  scratch block (as the eager step's padding does); their logits are dropped. Padding table columns name
  the scratch block.
- The step attends over all ``width * block_size`` key slots of the padded table, masked by each row's
  position (key j is visible iff j <= position), where the eager step attends over the batch's longest
  row. The visible keys, their order and the mask are the same; the extra slots are masked out (weight
  exactly 0). Results equal the eager step up to the order of floating-point additions in the softmax
  and the value product.
- The inputs of a step are one int64 buffer ``[rows, 4 + width]`` (token, position, write block, write
  offset, block table), filled by ONE host-to-device copy per step; they are computed on the host
  exactly as ``forward`` computes them (no device sync). The logits come out of a static buffer, copied.
- Graphs hold the addresses of the weights and of the KV pool: ``Transformer`` drops its graphs when its
  weights move or are replaced, and a pool that is reallocated (a paged pool that grows) gets new ones.
  (The scheduler allocates a device pool whole, so it never grows.)
- Warm-up and capture run on all-zero buffers: every key and value they write lands in the scratch block.

The graphs of one model and pool share one memory pool: they are never replayed concurrently, and each
replay's logits are copied out at once (a later replay of another graph may reuse that memory).
"""

from __future__ import annotations

import contextlib
import os
import weakref

import torch

from .paged_cache import SCRATCH

MAX_ROWS = 64  # larger batches run eagerly (their launches are amortised over the rows anyway)
WARMUP = 2  # eager runs on a side stream before capture (cuBLAS picks its kernels, the allocator warms up)

_forced: bool | None = None


def enabled() -> bool:
    """Whether decode steps of CUDA models are captured: ``use()`` if set, else ``LOGITLAB_CUDA_GRAPH=1``."""
    if _forced is not None:
        return _forced
    return os.environ.get("LOGITLAB_CUDA_GRAPH", "0") == "1"


@contextlib.contextmanager
def use(on: bool):
    """Capture (True) or run eagerly (False) inside the block, whatever the environment says."""
    global _forced
    before, _forced = _forced, bool(on)
    try:
        yield
    finally:
        _forced = before


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class _Graph:
    def __init__(self, graph, inputs: torch.Tensor, logits: torch.Tensor):
        self.graph, self.inputs, self.logits = graph, inputs, logits


class DecodeGraphs:
    """The captured decode steps of one model over one paged KV cache, by (rows, width) bucket."""

    def __init__(self, model, cache, capture: bool = True):
        """capture=False: the same static buffers and steps, run eagerly (no CUDA needed: the tests' way to
        run everything but the capture itself)."""
        self.model, self.cache_ref, self.capture = model, weakref.ref(cache), capture
        self.pool_key = _pool_key(cache)
        self.device = cache.pool.device
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.mempool = torch.cuda.graph_pool_handle() if capture else None
        self.captures = self.replays = 0

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache, block_tables: torch.Tensor,
                 valid: torch.Tensor | None) -> torch.Tensor:
        """tokens, positions, valid [B, 1] and block_tables [B, W], on the host -> logits [B, V] float32 on
        the model's device (as ``forward`` returns them)."""
        B, W = block_tables.shape
        key = (_bucket(B), _bucket(max(W, 1)))
        host = host_inputs(self.model, tokens, positions, cache, block_tables, valid, *key)
        with torch.inference_mode():  # the static buffers are inference tensors whatever the caller's mode
            g = self.graphs.get(key)
            if g is None:
                g = self.graphs[key] = self._capture(cache, *key)
            g.inputs.copy_(host)  # the step's one host-to-device copy
            if g.graph is None:
                return decode_step(self.model, cache, g.inputs)[:B]
            g.graph.replay()
            self.replays += 1
            return g.logits[:B].clone()

    def _capture(self, cache, rows: int, width: int) -> _Graph:
        dev = self.device
        inputs = torch.zeros(rows, 4 + width, dtype=torch.int64, device=dev)
        inputs[:, 2] = SCRATCH  # all padding: warm-up and capture write only the scratch block
        inputs[:, 4:] = SCRATCH
        if not self.capture:
            return _Graph(None, inputs, None)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                decode_step(self.model, cache, inputs)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            logits = decode_step(self.model, cache, inputs)
        self.captures += 1
        return _Graph(graph, inputs, logits)


def host_inputs(model, tokens, positions, cache, block_tables, valid, rows: int, width: int) -> torch.Tensor:
    """A step's static input buffer, computed on the host as ``Transformer.forward`` computes the same
    values: [rows, 4 + width] int64 = token, position (padding: 0), write block (padding: scratch), write
    offset, block table (padded with the scratch block). In Python integers (a few rows: cheaper than a
    dozen small tensor ops), one tensor at the end. Out-of-range ids are refused here: on the device they
    would be a device-side assert (a dead CUDA context)."""
    B, W = block_tables.shape
    bs, V = cache.block_size, model.config.vocab_size
    tok, pos = tokens.reshape(B).tolist(), positions.reshape(B).tolist()
    tables = block_tables.tolist()
    ok = [True] * B if valid is None else valid.reshape(B).tolist()
    flat = [b for t in tables for b in t]
    if flat and not (0 <= min(flat) and max(flat) < cache.allocated_blocks):
        raise ValueError("model: a block table names a block outside the pool")
    if tok and not (0 <= min(tok) and max(tok) < V):
        raise ValueError("model: a token id is outside the vocabulary")
    limit = model.rope_cos.shape[0] if model.config.position == "rope" else model.config.context_length + 1
    pad = [SCRATCH] * (width - W)
    out = []
    for i in range(B):
        if ok[i]:  # forward: write block = table[min(p // bs, W - 1)], offset p % bs
            p = pos[i]
            if not 0 <= p < limit:
                raise ValueError("model: a position is outside the context")
            out.append([tok[i], p, tables[i][min(p // bs, W - 1)], p % bs, *tables[i], *pad])
        else:  # padding: position 0, written to the scratch block
            out.append([tok[i], 0, SCRATCH, 0, *tables[i], *pad])
    out += [[0, 0, SCRATCH, 0, *([SCRATCH] * width)] for _ in range(rows - B)]
    return torch.tensor(out, dtype=torch.int64, device="cpu")


def decode_step(model, cache, inputs: torch.Tensor) -> torch.Tensor:
    """One decode step from the static buffer ``inputs`` [rows, 4 + width] (see ``host_inputs``): what is
    captured, and (run eagerly) the reference the graph is tested against. Only device work: no sync."""
    from .transformer import Step

    B, width = inputs.shape[0], inputs.shape[1] - 4
    tokens, positions = inputs[:, 0:1], inputs[:, 1:2]
    L = width * cache.block_size
    mask = torch.arange(L, device=inputs.device).view(1, 1, 1, L) <= positions.view(B, 1, 1, 1)
    cos = sin = None
    if model.config.position == "rope":
        cos = model.rope_cos[positions].unsqueeze(2).to(model.dtype)  # [B, 1, 1, D]
        sin = model.rope_sin[positions].unsqueeze(2).to(model.dtype)
    step = Step(cos, sin, positions, L, mask, model.config.num_heads // model.config.num_kv_heads, None)
    step.tables, step.write_blocks, step.write_offsets = inputs[:, 4:], inputs[:, 2:3], inputs[:, 3:4]
    valid = torch.ones(B, 1, dtype=torch.bool, device=inputs.device)
    return model.run_layers(tokens, positions, step, cache, "last", valid)


def _pool_key(cache) -> tuple[int, int]:
    return cache.pool.data_ptr(), cache.allocated_blocks


def for_model(model, cache, rows: int) -> DecodeGraphs | None:
    """The model's graphs over ``cache`` (made on first use), or None: capture off, not a CUDA model, the
    pool elsewhere, or more than ``MAX_ROWS`` rows."""
    if not enabled() or rows > MAX_ROWS or cache.pool.device != model.device or model.device.type != "cuda":
        return None
    runners: dict = model.__dict__.setdefault("_cuda_graphs", {})
    for k in [k for k, r in runners.items() if r.cache_ref() is None]:
        del runners[k]  # the cache is gone: so are its graphs
    runner = runners.get(id(cache))
    if runner is None or runner.cache_ref() is not cache or runner.pool_key != _pool_key(cache):
        runner = runners[id(cache)] = DecodeGraphs(model, cache)  # new, or the pool was reallocated
    return runner
