"""Choice (``guided_choice``) as a mode of the scheduler: score every option after the prompt, then pick.

The prompt is prefilled once (its cached prefix blocks reused); each option is then a row that shares the
prompt's blocks and feeds its own tokens (teacher forcing), at most ``chunk`` options per step, so a long
list of options never holds the batch for more than one chunk's forward. The per-token log-probabilities
are ``classify.continuation_logprobs``'s; the pick is ``classify.rank_choices``'s (argmax, or a seeded draw
per sample at a temperature).
"""

from __future__ import annotations

import torch

from ..sampling import ParamError, SamplingParams


class ChoiceGroup:
    kind = "choice"

    def __init__(self, prompt_ids: list[int], options: list[list[int]], params: SamplingParams, chunk: int = 4,
                 texts: list[str] | None = None):
        if not options or any(not o for o in options):
            raise ParamError("guided_choice", "every choice needs at least one token")
        self.prompt_ids, self.options, self.params = list(prompt_ids), [list(o) for o in options], params
        self.texts = list(texts) if texts is not None else None
        self.chunk = max(1, chunk)
        self.W = min(self.chunk, len(options))  # rows of the batch its scoring forward takes
        self.max_tokens = max(len(o) for o in options)
        self.per_token: list[list[float] | None] = [None] * len(options)
        self.next = 0  # the first option not yet scored
        self.table: list[int] = []
        self.lp0: torch.Tensor | None = None  # log p(first token | prompt)
        self.requests: list = []  # the scheduler's visible requests (the n samples)
        self.reserved = 0
        self.done = self.aborted = False

    def prefill(self, sched) -> None:
        """The prompt into the cache (cached prefix blocks reused), and the next-token distribution after it."""
        (self.table,), last = sched.prefill_prompts([self.prompt_ids], [len(self.prompt_ids)])
        self.lp0 = torch.log_softmax(last[0].float(), -1)

    def score_chunk(self, sched) -> None:
        """Score the next ``chunk`` options in one forward: each a row sharing the prompt's blocks."""
        cache, P = sched.cache, len(self.prompt_ids)
        opts = self.options[self.next: self.next + self.chunk]
        tables = [cache.share(self.table) for _ in opts]
        L = max(len(o) for o in opts)
        try:
            if L > 1:
                tokens = torch.zeros(len(opts), L - 1, dtype=torch.long)
                valid = torch.zeros(len(opts), L - 1, dtype=torch.bool)
                for i, (o, t) in enumerate(zip(opts, tables, strict=True)):
                    tokens[i, : len(o) - 1] = torch.tensor(o[:-1])
                    valid[i, : len(o) - 1] = True
                    for p in range(P, P + len(o) - 1):
                        cache.ensure_writable(t, p)
                positions = (P + torch.arange(L - 1)).expand(len(opts), -1)
                logits = sched.model(tokens, positions, cache, valid=valid, logits_at="all",
                                     block_tables=cache.table_tensor(tables))
                lp = torch.log_softmax(logits.float(), -1)  # [C, L-1, V]: the prediction of token j+1
            for i, o in enumerate(opts):
                vals = [float(self.lp0[o[0]])] + [float(lp[i, j, o[j + 1]]) for j in range(len(o) - 1)]
                self.per_token[self.next + i] = vals
        finally:
            for t in tables:
                cache.release(t)
        self.next += len(opts)
        if self.next >= len(self.options):
            self.finish(cache)

    def live(self) -> int:
        return 0

    @property
    def tables(self) -> list[list[int]]:
        """The block tables it holds between steps (the prompt's; option rows live within one step)."""
        return [self.table] if self.table else []

    def picks(self):
        """(the options ranked at temperature 0, the option index of each of the ``n`` samples): at
        temperature 0 the best first, then the next; else a draw per sample from its own seed."""
        from ..classify import rank_choices
        from ..sampling.rng import derive_seed

        names = self.texts or [str(i) for i in range(len(self.options))]
        ranked = rank_choices(names, self.per_token)
        order = sorted(range(len(self.options)), key=lambda i: -ranked.probs[i])
        out = []
        for i in range(self.params.n):
            if self.params.temperature == 0:
                out.append(order[i % len(order)])
            else:
                seed = derive_seed(self.params.seed if self.params.seed is not None else 0, i)
                out.append(rank_choices(names, self.per_token, self.params.temperature, seed % (1 << 63)).index)
        return ranked, out

    def finish(self, cache) -> None:
        cache.release(self.table)
        self.table, self.done = [], True

    def abort(self, cache) -> None:
        if cache is not None and self.table:
            cache.release(self.table)
        self.table, self.done, self.aborted = [], True, True
