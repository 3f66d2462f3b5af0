"""A static, preallocated key/value cache.

One tensor per layer for keys and one for values, shaped ``[slots, kv_heads, max_len + 1, head_dim]``.
A *slot* is one sequence (one row of a decode batch). Slots are allocated once, written in place and
never resized, so a decode step has static shapes.

The extra last position (index ``max_len``) is a scratch column: padding tokens of a ragged prefill
batch write their keys/values there, so they never overwrite a real entry and are never read (the
attention mask only admits keys at positions ``<= `` the query's position, and real positions are
``< max_len``).
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, slots: int, max_len: int, dtype: torch.dtype = torch.float32):
        if max_len > config.context_length:
            raise ValueError(f"max_len {max_len} exceeds the model's context length {config.context_length}")
        shape = (slots, config.num_kv_heads, max_len + 1, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_layers)]
        self.slots = slots
        self.dtype = dtype
        self.max_len = max_len
        self.scratch = max_len  # position index padding tokens are written to

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Move the first ``length`` positions of slot ``src`` to slot ``dst`` (used to keep a batch's
        live slots contiguous, and to fork one prefill into ``n`` samples or ``B`` beams)."""
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]

    def reorder(self, rows: slice, order: torch.Tensor, length: int) -> None:
        """In place: slot ``rows.start + i`` takes the contents of slot ``rows.start + order[i]``
        (beam search reorders its hypotheses after every step)."""
        for t in self.k + self.v:
            view = t[rows, :, :length]
            view.copy_(view.index_select(0, order))
