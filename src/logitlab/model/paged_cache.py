"""A paged key/value cache: one pool of fixed-size blocks, a block table per sequence, shared prefixes.

Memory follows tokens in use, not slots x context (vLLM's PagedAttention, llama.cpp's one pool of cells):

- Each layer keeps one pool of keys and one of values, ``[blocks, kv_heads, block_size, head_dim]``. A
  sequence owns a *block table*, the list of block ids holding its positions ``0..len-1`` in order:
  position ``p`` lives in block ``table[p // block_size]`` at offset ``p % block_size``.
- The pool starts small and doubles as blocks are first used, up to the budget (``capacity`` blocks), so
  an idle engine holds almost nothing and the budget is a ceiling, not an allocation.
- Blocks are reference counted. Forking a sequence (the ``n`` samples of a prompt, beams) copies its
  table and bumps the counts: no key or value is copied. A sequence about to write into a block that
  others share first gets its own copy of that block (copy-on-write; only ever the last, partial block).
- Full blocks are keyed by their whole token prefix (a hash chain over the blocks before them). A new
  sequence whose prompt starts with cached blocks takes them and prefills only the rest. Released
  blocks that carry a key stay cached until the pool needs them back, least recently used first.
- Block 0 is scratch: padding tokens of a ragged batch write there, and a table is padded with it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .config import ModelConfig

SCRATCH = 0


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _device_free_bytes(device: torch.device) -> int | None:
    """Free memory of an accelerator now (CUDA: ``mem_get_info``); None where unknown."""
    try:
        return int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else None
    except (RuntimeError, AssertionError):
        return None


def kv_budget_tokens(config: ModelConfig, dtype: torch.dtype, max_batch: int, max_len: int,
                     gigabytes: float | None = None, device: torch.device | str = "cpu") -> int:
    """The KV pool's budget in tokens: ``gigabytes`` when given; else what ``max_batch`` sequences of
    ``max_len`` tokens would need, capped at half the memory available now (at least one sequence): the
    host's for a CPU pool, the device's free memory for a pool on an accelerator."""
    per_token = PagedKVCache.bytes_per_token(config, dtype)
    if gigabytes is not None:
        return max(1, int(gigabytes * 1e9) // per_token)
    want = max_batch * max_len
    device = torch.device(device)
    avail = _available_bytes() if device.type == "cpu" else _device_free_bytes(device)
    return max(max_len, min(want, avail // 2 // per_token)) if avail else want


class PoolExhausted(RuntimeError):
    """No free block, and nothing cached to evict."""


class PagedKVCache:
    def __init__(self, config: ModelConfig, capacity: int, block_size: int = 16, dtype: torch.dtype = torch.float32,
                 initial_blocks: int = 64, device: torch.device | str = "cpu"):
        """device: where the pool lives (the model's); the bookkeeping (tables, counts, prefix keys) stays
        in Python, and ``table_tensor`` on the host (the model moves tables to its device)."""
        if capacity < 2 or block_size < 1:
            raise ValueError(f"kv cache: needs at least 2 blocks of at least 1 position, got {capacity} x {block_size}")
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self.block_size, self.capacity = block_size, capacity  # capacity includes the scratch block
        self.kv_heads, self.head_dim = config.num_kv_heads, config.head_dim
        self._allocate(min(capacity, max(2, initial_blocks)))
        self.refs = [0] * capacity
        self.refs[SCRATCH] = 1  # never handed out
        self._free = list(range(capacity - 1, 0, -1))  # pop() gives the lowest id: the pool grows late
        self._key_of: dict[int, int] = {}  # block -> prefix key (full, cached blocks only)
        self._block_of: dict[int, int] = {}  # prefix key -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no table holds, LRU first
        self.hits = self.queries = 0  # prefix-cache statistics, in blocks

    # ---- sizes ---------------------------------------------------------------------------------
    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * torch.finfo(dtype).bits // 8

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def allocated_blocks(self) -> int:
        return self.k[0].shape[0]

    def nbytes(self) -> int:
        """Bytes the pool holds now (it grows with use)."""
        return self.pool.numel() * self.pool.element_size()

    def num_free(self) -> int:
        """Blocks that can be handed out now: free, or cached and held by no table (evictable)."""
        return len(self._free) + len(self._evictable)

    def used_blocks(self) -> int:
        """Blocks some sequence holds."""
        return self.capacity - 1 - self.num_free()

    def cached_blocks(self) -> int:
        """Blocks no sequence holds, kept for their prefix (evicted when the pool needs them)."""
        return len(self._evictable)

    # ---- allocation ----------------------------------------------------------------------------
    def _allocate(self, blocks: int) -> None:
        """One tensor for every layer's keys and values, [layers, 2, blocks, K, bs, D]; ``k[i]`` and ``v[i]``
        are contiguous views of it. One large allocation is memory-mapped by the allocator, so the old pool
        goes back to the system when it grows (per-layer pieces would stay in the heap)."""
        old = getattr(self, "pool", None)
        shape = (self.config.num_layers, 2, blocks, self.kv_heads, self.block_size, self.head_dim)
        self.pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if old is not None:
            self.pool[:, :, : old.shape[2]] = old
        self.k = [self.pool[i, 0] for i in range(self.config.num_layers)]
        self.v = [self.pool[i, 1] for i in range(self.config.num_layers)]

    def _grow_to(self, block: int) -> None:
        n = self.allocated_blocks
        if block < n:
            return
        self._allocate(min(self.capacity, max(2 * n, block + 1)))

    def allocate(self) -> int:
        if self._free:
            b = self._free.pop()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)  # least recently used cached block
            del self._block_of[self._key_of.pop(b)]
        else:
            raise PoolExhausted("kv cache: no free block")
        self._grow_to(b)
        self.refs[b] = 1
        return b

    def share(self, table: list[int]) -> list[int]:
        """A fork of ``table``: the same blocks, one more reference each."""
        for b in table:
            self._ref(b)
        return list(table)

    def _ref(self, b: int) -> None:
        if self.refs[b] == 0:
            self._evictable.pop(b, None)
        self.refs[b] += 1

    def release(self, table: list[int]) -> None:
        for b in table:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self._key_of:
                    self._evictable[b] = None  # stays cached until the pool needs it
                else:
                    self._free.append(b)
        table.clear()

    def ensure_writable(self, table: list[int], position: int) -> None:
        """Make position ``position`` writable for the sequence of ``table``: append a block when it
        starts a new one; copy the block when others share it (copy-on-write)."""
        j = position // self.block_size
        if j == len(table):
            table.append(self.allocate())
            return
        if j > len(table):
            raise ValueError(f"kv cache: position {position} skips blocks (table has {len(table)})")
        b = table[j]
        if self.refs[b] > 1 or b in self._key_of:  # shared, or a cached prefix block: copy before writing
            new = self.allocate()
            for pools in (self.k, self.v):
                for t in pools:
                    t[new] = t[b]
            self.refs[b] -= 1
            if self.refs[b] == 0:
                (self._evictable.__setitem__(b, None) if b in self._key_of else self._free.append(b))
            table[j] = new

    # ---- prefix caching ------------------------------------------------------------------------
    def _keys(self, tokens: list[int], n_blocks: int) -> list[int]:
        keys, h, bs = [], 0, self.block_size
        for j in range(n_blocks):
            h = hash((h, tuple(tokens[j * bs : (j + 1) * bs])))
            keys.append(h)
        return keys

    def match_prefix(self, tokens: list[int], limit: int) -> list[int]:
        """The cached blocks holding the longest prefix of ``tokens`` made of whole blocks, at most
        ``limit`` positions; each returned block gains a reference (the caller's table owns them)."""
        n = min(len(tokens), limit) // self.block_size
        out: list[int] = []
        for key in self._keys(tokens, n):
            b = self._block_of.get(key)
            if b is None:
                break
            out.append(b)
        self.queries += n
        self.hits += len(out)
        for b in out:
            self._ref(b)
        return out

    def register_prefix(self, tokens: list[int], table: list[int], length: int) -> None:
        """Key the full blocks of ``table`` that hold ``tokens[:length]`` so later sequences can reuse them."""
        n = min(length, len(tokens)) // self.block_size
        for key, b in zip(self._keys(tokens, n), table[:n], strict=False):
            if b in self._key_of or key in self._block_of:
                continue  # already keyed (this block, or an equal block of another sequence)
            self._key_of[b], self._block_of[key] = key, b

    # ---- tables as tensors -----------------------------------------------------------------------
    @staticmethod
    def table_tensor(tables: list[list[int]], min_blocks: int = 1) -> torch.Tensor:
        """Block tables [B, max blocks] (int64), padded with the scratch block."""
        width = max(min_blocks, max((len(t) for t in tables), default=0))
        out = torch.full((len(tables), width), SCRATCH, dtype=torch.int64, device="cpu")
        for i, t in enumerate(tables):
            if t:
                out[i, : len(t)] = torch.tensor(t, device="cpu")
        return out
