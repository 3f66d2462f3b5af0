"""Structured output: token masks from xgrammar (choice, regex, JSON schema, JSON object, EBNF grammar).

A constraint is a grammar compiled against the tokenizer's vocabulary. Each sequence being generated
holds its own *matcher* (the grammar's parse state). Before every sampling step the matcher says which
tokens may come next; that boolean mask ``allowed [B, V]`` is the FIRST stage of the sampling pipeline:
every disallowed logit becomes ``-inf`` before logit bias, penalties, temperature and truncation, so the
sampler's other stages, greedy, sampling and beam search all work unchanged on top of it. After a token
is chosen the matcher ``accept``s it; when the grammar is complete it allows only the stop (EOS) tokens,
and ``is_terminated`` turns true once one is accepted.

    info = tokenizer_info(engine.tokenizer, engine.vocab_size)
    c = Constraint.regex(r"[0-9]{3}", info)
    state = c.start()
    logits = apply_allowed(logits, allowed_masks([state], V))   # then sampling.process / sample
    state.accept(token)

Matchers support ``fork`` (beam search copies a parent hypothesis's parse state) and ``rollback``
(speculative decoding rejects drafted tokens).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..sampling import ParamError, SamplingBatch, process
from ..sampling.rng import uniforms

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - xgrammar is a declared dependency
        raise ParamError("constraint", "structured output needs the 'xgrammar' package") from e
    return xgrammar


# ---- tokenizer -> xgrammar TokenizerInfo ---------------------------------------------------------

_INFO_CACHE: dict[int, tuple[object, object]] = {}


def _detect_vocab_type(backend_json: dict) -> tuple[str, bool]:
    """(vocab type, add_prefix_space) from a Hugging Face ``tokenizers`` JSON description: ByteLevel
    (GPT-2 / SmolLM / Llama-3 style, 'Ġ' for space), ByteFallback (SentencePiece '<0x0A>' byte tokens,
    '▁' for space) or raw strings."""

    def types(node) -> list[dict]:
        if not node:
            return []
        if node.get("type") == "Sequence":
            key = "decoders" if "decoders" in node else "normalizers" if "normalizers" in node else (
                "pretokenizers")
            return [x for sub in node.get(key, []) for x in types(sub)]
        return [node]

    decoders = types(backend_json.get("decoder"))
    names = {d.get("type") for d in decoders}
    if "ByteLevel" in names:
        return "BYTE_LEVEL", False
    if "ByteFallback" in names:
        prefix = any(n.get("type") == "Prepend" for n in types(backend_json.get("normalizer")))
        prefix = prefix or any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
                               for p in types(backend_json.get("pre_tokenizer")))
        return "BYTE_FALLBACK", prefix
    return "RAW", False


def tokenizer_info(tokenizer, vocab_size: int | None = None, stop_token_ids: Sequence[int] | None = None):
    """An ``xgrammar.TokenizerInfo`` for our ``logitlab.tokenizer.Tokenizer`` (which wraps a Hugging Face
    ``tokenizers.Tokenizer``), a bare ``tokenizers.Tokenizer``, or a plain list of token strings/bytes
    (raw vocabulary, used by the tests' tiny models). ``vocab_size`` is the model's (the LM head's) size;
    ``stop_token_ids`` default to the tokenizer's EOS tokens. Cached per tokenizer object."""
    xgr = _xgr()
    if isinstance(tokenizer, xgr.TokenizerInfo):
        return tokenizer
    key = id(tokenizer)
    hit = _INFO_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer and hit[1].vocab_size == (vocab_size or hit[1].vocab_size):
        return hit[1]
    if isinstance(tokenizer, (list, tuple)):
        vocab = [t.encode() if isinstance(t, str) else bytes(t) for t in tokenizer]
        stops = list(stop_token_ids) if stop_token_ids is not None else None
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size or len(vocab),
                                 stop_token_ids=stops)
    else:
        backend = _backend(tokenizer)
        ids = backend.get_vocab(with_added_tokens=True)
        size = max(vocab_size or 0, max(ids.values()) + 1)
        encoded = [""] * size
        for tok, i in ids.items():
            encoded[i] = tok
        vtype, prefix = _detect_vocab_type(json.loads(backend.to_str()))
        if stop_token_ids is None:
            stop_token_ids = sorted(getattr(tokenizer, "eos_token_ids", None) or [])
        info = xgr.TokenizerInfo(encoded, getattr(xgr.VocabType, vtype), vocab_size=vocab_size or size,
                                 stop_token_ids=list(stop_token_ids) or None, add_prefix_space=prefix)
    _INFO_CACHE[key] = (tokenizer, info)
    return info


def _backend(tokenizer):
    """The Hugging Face ``tokenizers.Tokenizer`` inside our wrapper (or the object itself)."""
    for name in ("backend", "hf", "tokenizer", "_tokenizer", "_tok", "tok"):
        inner = getattr(tokenizer, name, None)
        if inner is not None and hasattr(inner, "to_str") and hasattr(inner, "get_vocab"):
            return inner
    if hasattr(tokenizer, "to_str") and hasattr(tokenizer, "get_vocab"):
        return tokenizer
    raise ParamError("constraint", f"cannot read the vocabulary of {type(tokenizer).__name__}")


# ---- what the user asked for -------------------------------------------------------------------

@dataclass(frozen=True)
class ConstraintSpec:
    """A structured-output request before compilation: ``kind`` is one of ``KINDS``; ``value`` is the JSON
    schema (a JSON string), the regex, the EBNF grammar, a tuple of choice strings, or None for
    json_object (any JSON object)."""

    kind: str
    value: object = None

    def validate(self) -> ConstraintSpec:
        if self.kind not in KINDS:
            raise ParamError("constraint", f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "choice":
            if not self.value or not all(isinstance(c, str) and c for c in self.value):
                raise ParamError("choice", "needs at least one non-empty string")
        elif self.kind != "json_object" and not (isinstance(self.value, str) and self.value.strip()):
            raise ParamError(_FIELD[self.kind], "must be a non-empty string")
        return self


_FIELD = {"json_schema": "json_schema", "json_object": "response_format", "regex": "regex",
          "grammar": "grammar", "choice": "choice"}


def _read_text(value: str, field: str, read_files: bool) -> str:
    """``value`` itself, or (``read_files``: the CLI, the Python API) the contents of the file it names."""
    if read_files and value and not value.lstrip().startswith(("{", "[")) and os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise ParamError(field, f"cannot read {value!r}: {e.strerror}") from None
    return value


def spec_from_options(json_schema=None, regex=None, grammar=None, choice=None, json_object=False,
                      read_files: bool = True) -> ConstraintSpec | None:
    """One spec from CLI flags / request fields (at most one may be set). ``json_schema`` may be a dict,
    a JSON string or (``read_files``) a file name; ``grammar`` EBNF text or (``read_files``) a file name.
    A server passes ``read_files=False``: a request's string is always the schema or grammar itself, and
    the file system is not even looked at (no probing which paths exist)."""
    given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                            ("choice", choice), ("json_object", json_object)) if v]
    if not given:
        return None
    if len(given) > 1:
        raise ParamError(given[1], f"only one structured-output constraint at a time (also got {given[0]})")
    if json_schema is not None and json_schema is not False:
        if isinstance(json_schema, dict):
            text = json.dumps(json_schema)
        else:
            text = _read_text(str(json_schema), "json_schema", read_files)
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as e:
                raise ParamError("json_schema", f"is not valid JSON ({e.msg} at {e.pos})") from None
            if not isinstance(parsed, dict):
                raise ParamError("json_schema", "must be a JSON object")
        return ConstraintSpec("json_schema", text).validate()
    if regex:
        return ConstraintSpec("regex", regex).validate()
    if grammar:
        return ConstraintSpec("grammar", _read_text(grammar, "grammar", read_files)).validate()
    if choice:
        return ConstraintSpec("choice", tuple(choice)).validate()
    return ConstraintSpec("json_object")


# ---- compiled constraint and per-sequence state ------------------------------------------------

_COMPILERS: dict[int, tuple[object, object]] = {}


def _compiler(info):
    hit = _COMPILERS.get(id(info))
    if hit is None or hit[0] is not info:
        # xgrammar's own cache keeps every grammar ever compiled (unbounded); GrammarCache below is bounded
        hit = (info, _xgr().GrammarCompiler(info, cache_enabled=False))
        _COMPILERS[id(info)] = hit
    return hit[1]


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF ``root ::= "a" | "b" | ...`` with each choice escaped as a string literal."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def compile_with(compiler, spec: ConstraintSpec, any_whitespace: bool = False):
    """``spec`` compiled by an ``xgrammar.GrammarCompiler`` (an xgrammar ``CompiledGrammar``); a grammar that
    does not compile is a ParamError naming the request field. Out of memory is ``MemoryError``."""
    spec.validate()
    try:
        if spec.kind == "json_schema":
            return compiler.compile_json_schema(spec.value, any_whitespace=any_whitespace)
        if spec.kind == "json_object":
            return compiler.compile_builtin_json_grammar()
        if spec.kind == "regex":
            return compiler.compile_regex(spec.value)
        if spec.kind == "grammar":
            return compiler.compile_grammar(spec.value)
        return compiler.compile_grammar(choice_grammar(spec.value))
    except RuntimeError as e:
        if "bad_alloc" in str(e):  # xgrammar's C++ ran out of memory (e.g. under RLIMIT_AS)
            raise MemoryError(str(e)) from None
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "does not compile"
        reason = reason.split("] ", 1)[-1] if reason.startswith("[") else reason
        raise ParamError(_FIELD[spec.kind], f"does not compile: {reason}") from None


class GrammarCache:
    """Compiled constraints, least recently used out first, bounded in bytes (xgrammar's own measure of a
    compiled grammar: its token-mask cache and automata). Keyed by ``grammar_key``. Thread-safe."""

    def __init__(self, max_bytes: int = 256 << 20):
        import threading

        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict = OrderedDict()  # key -> (Constraint, bytes)
        self.bytes = 0

    def get(self, key):
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key, constraint: Constraint) -> None:
        """Keep ``constraint`` unless it alone is larger than the whole cache; evict the oldest to fit."""
        size = constraint.nbytes
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if size > self.max_bytes:
                return
            self._items[key] = (constraint, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped

    def __len__(self) -> int:
        return len(self._items)


def grammar_key(spec: ConstraintSpec, info, any_whitespace: bool = False) -> tuple:
    """What a compiled grammar depends on: the vocabulary (its TokenizerInfo), the constraint, the options."""
    return id(info), spec.kind, spec.value, any_whitespace


DEFAULT_CACHE = GrammarCache()  # compile_constraint's (the CLI's and the Python API's)


class Constraint:
    """A grammar compiled for one vocabulary. ``start()`` gives a fresh per-sequence state."""

    def __init__(self, compiled, info, spec: ConstraintSpec | None = None):
        self.compiled, self.info, self.spec = compiled, info, spec
        self.vocab_size = info.vocab_size

    @property
    def nbytes(self) -> int:
        """The compiled grammar's memory, as xgrammar counts it."""
        return int(self.compiled.memory_size_bytes)

    def serialize(self) -> str:
        """The compiled grammar as JSON (``from_serialized`` reads it back against the same vocabulary)."""
        return self.compiled.serialize_json()

    @classmethod
    def from_serialized(cls, data: str, info, spec: ConstraintSpec | None = None) -> Constraint:
        """A grammar compiled elsewhere (a worker process) for the vocabulary ``info``."""
        return cls(_xgr().CompiledGrammar.deserialize_json(data, info), info, spec)

    @classmethod
    def from_spec(cls, spec: ConstraintSpec, info, any_whitespace: bool = False) -> Constraint:
        """Compile ``spec``. ``any_whitespace=False`` makes JSON compact (``{"a": 1}``-style separators
        only), which keeps small models from wandering into endless whitespace."""
        return cls(compile_with(_compiler(info), spec, any_whitespace), info, spec)

    @classmethod
    def json_schema(cls, schema, info, any_whitespace: bool = False) -> Constraint:
        return cls.from_spec(spec_from_options(json_schema=schema), info, any_whitespace)

    @classmethod
    def json_object(cls, info) -> Constraint:
        return cls.from_spec(ConstraintSpec("json_object"), info)

    @classmethod
    def regex(cls, pattern: str, info) -> Constraint:
        return cls.from_spec(ConstraintSpec("regex", pattern), info)

    @classmethod
    def grammar(cls, ebnf: str, info) -> Constraint:
        return cls.from_spec(ConstraintSpec("grammar", ebnf), info)

    @classmethod
    def choice(cls, choices: Sequence[str], info) -> Constraint:
        """Token-level choice (the first stage masks every token that leaves all choices). For the exact
        choice by full-sequence probability use ``logitlab.classify.choose``."""
        return cls.from_spec(ConstraintSpec("choice", tuple(choices)), info)

    def start(self) -> ConstraintState:
        return ConstraintState(_xgr().GrammarMatcher(self.compiled), self.vocab_size)


class ConstraintState:
    """One sequence's position in the grammar."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def allowed(self) -> torch.Tensor:
        """bool [V]: the tokens the grammar allows next."""
        return allowed_masks([self], self.vocab_size)[0]

    def accept(self, token: int) -> bool:
        """Advance by ``token``; False (state unchanged) if the grammar does not allow it."""
        return bool(self.matcher.accept_token(int(token)))

    def accept_string(self, text: str) -> bool:
        return bool(self.matcher.accept_string(text))

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.matcher.rollback(int(num_tokens))

    def fork(self) -> ConstraintState:
        return ConstraintState(self.matcher.fork(), self.vocab_size)

    @property
    def terminated(self) -> bool:
        """A stop token was accepted: the output is complete."""
        return bool(self.matcher.is_terminated())


_BITS = torch.arange(32, dtype=torch.int32)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's packed int32 bitmask [B, ceil(V/32)] (bit j of word w = token 32w + j) -> bool [B, V]."""
    bits = (bitmask.unsqueeze(-1) >> _BITS) & 1  # [B, W, 32]
    return bits.bool().reshape(bitmask.shape[0], -1)[:, :vocab_size]


def allowed_masks(states: Sequence[ConstraintState | None], vocab_size: int) -> torch.Tensor:
    """bool [B, V] for a batch of rows; a row whose state is None (unconstrained) allows everything,
    and so does a row whose matcher has already terminated (it is finished anyway)."""
    B = len(states)
    allowed = torch.ones(B, vocab_size, dtype=torch.bool)
    rows = [i for i, s in enumerate(states) if s is not None and not s.terminated]
    if rows:
        size = states[rows[0]].vocab_size  # the tokenizer's (may differ from the LM head's)
        bitmask = _xgr().allocate_token_bitmask(len(rows), size)
        for j, i in enumerate(rows):
            states[i].fill(bitmask, j)
        mask = bitmask_to_bool(bitmask, size)
        allowed[rows] = mask[:, :vocab_size] if size >= vocab_size else _pad_mask(mask, vocab_size)
    return allowed


def _pad_mask(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The tokenizer knows fewer tokens than the model's LM head: the extra (padding) rows are banned."""
    out = torch.zeros(mask.shape[0], vocab_size, dtype=torch.bool)
    out[:, : mask.shape[1]] = mask
    return out


def apply_allowed(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """The first pipeline stage: ``logits`` with every token outside ``allowed`` set to -inf (new tensor)."""
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed, float("-inf"))


# ---- the sampling pipeline for the drivers (beam, speculative, contrastive, constrained decode) ---------

def resolve_model(model_or_engine, prompt, eos_token_ids=None):
    """(model, tokenizer or None, prompt ids, EOS ids) from an Engine (text or ids) or a bare Transformer
    (ids only; no EOS unless given)."""
    model = getattr(model_or_engine, "model", None)
    if model is not None and hasattr(model_or_engine, "tokenizer"):
        engine = model_or_engine
        ids = engine.encode_prompt(prompt)
        eos = sorted(engine.tokenizer.eos_token_ids) if eos_token_ids is None else list(eos_token_ids)
        return engine.model, engine.tokenizer, ids, eos
    model = model_or_engine
    if isinstance(prompt, str):
        raise ParamError("prompt", "a bare model takes token ids; pass an Engine to use text")
    ids = [int(t) for t in prompt]
    V = model.config.vocab_size
    if not ids or any(not 0 <= t < V for t in ids):
        raise ParamError("prompt", f"must be a non-empty list of token ids in [0, {V})")
    return model, None, ids, list(eos_token_ids or [])


def sample_seeds(params, n: int, seed: int | None = None) -> list[int]:
    """The per-sample seeds of a driver run: ``seed`` (else ``params.seed``, else 0) derived per sample,
    the same derivation the engine uses for its ``n`` samples."""
    from ..sampling.rng import derive_seed

    base = seed if seed is not None else (params.seed if params.seed is not None else 0)
    return [derive_seed(base, i) for i in range(n)]


def stop_token_set(params, eos) -> set[int]:
    """Token ids that end a sample: end-of-sequence (unless ignore_eos) and the stop_token_ids."""
    stop = set() if getattr(params, "ignore_eos", False) else {int(e) for e in eos}
    return stop | set(getattr(params, "stop_token_ids", None) or [])


class PipelineRows:
    """The sampling pipeline's per-row state for rows that a driver generates: one SamplingParams (or one
    per row), the rows' seeds, prompt and output token counts (penalties), tokens generated so far
    (min_tokens). ``logprobs`` runs the pipeline — constraint mask first, then ``sampling.process`` — and
    returns the final normalised log-probabilities [B, V]. ``distribution=True`` reads temperature 0 as 1
    (beam search and contrastive scoring want the distribution, not its argmax)."""

    def __init__(self, params, prompt_ids, vocab_size: int, eos_ids, count: int, seeds=None,
                 distribution: bool = False):
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * count
        if distribution:
            plist = [_as_distribution(p) for p in plist]
        self.params, self.vocab_size, self.eos_ids = plist, vocab_size, list(eos_ids)
        self.seeds = torch.tensor(list(seeds) if seeds is not None else [0] * count, dtype=torch.long)
        ids = torch.tensor(list(prompt_ids), dtype=torch.long)
        self.prompt_counts = torch.zeros(count, vocab_size, dtype=torch.int32)
        self.prompt_counts.index_add_(1, ids, torch.ones(count, len(ids), dtype=torch.int32))
        self.output_counts = torch.zeros(count, vocab_size, dtype=torch.int32)
        self.num_generated = torch.zeros(count, dtype=torch.long)
        self._batches: dict[tuple, object] = {}

    @property
    def count(self) -> int:
        return len(self.params)

    def batch(self, repeat: int = 1):
        key = (tuple(id(p) for p in self.params), tuple(self.seeds.tolist()), repeat)
        b = self._batches.get(key)
        if b is None:
            plist = [p for p in self.params for _ in range(repeat)]
            seeds = [s for s in self.seeds.tolist() for _ in range(repeat)]
            b = SamplingBatch.build(plist, seeds, self.vocab_size, self.eos_ids)
            self._batches = {key: b}
        return b

    def logprobs(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] -> the pipeline's final log-probabilities [B, V] (-inf where removed)."""
        return process(apply_allowed(logits.float(), allowed), self.batch(), output_counts=self.output_counts,
                       prompt_counts=self.prompt_counts, num_generated=self.num_generated)

    def logprobs_ahead(self, logits: torch.Tensor, drafted: torch.Tensor,
                       allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Verification of drafted tokens: logits [B, T, V] at T consecutive positions, where position j
        follows the rows' tokens plus ``drafted[:, :j]`` ([B, T-1]). Penalty counts and token counters
        advance along the draft, exactly as if the tokens had been generated one by one."""
        B, T, V = logits.shape
        counts = self.output_counts.unsqueeze(1).repeat(1, T, 1)  # [B, T, V]
        if T > 1:
            onehot = torch.zeros(B, T - 1, V, dtype=torch.int32)
            onehot.scatter_(2, drafted[:, : T - 1].unsqueeze(-1), 1)
            counts[:, 1:] += onehot.cumsum(1, dtype=torch.int32)
        num = self.num_generated.unsqueeze(1) + torch.arange(T)
        flat = logits.reshape(B * T, V).float()
        if allowed is not None:
            flat = apply_allowed(flat, allowed.reshape(B * T, V))
        out = process(flat, self.batch(T), output_counts=counts.reshape(B * T, V),
                      prompt_counts=self.prompt_counts.repeat_interleave(T, 0), num_generated=num.reshape(-1))
        return out.view(B, T, V)

    def append(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Count one new token per row (rows where ``active`` is False are left alone)."""
        inc = torch.ones(self.count, dtype=torch.int32) if active is None else active.to(torch.int32)
        self.output_counts[torch.arange(self.count), tokens] += inc
        self.num_generated += inc.long()

    def reorder(self, parents: torch.Tensor, tokens: torch.Tensor) -> None:
        """Beam search: row j becomes a copy of row ``parents[j]`` extended by ``tokens[j]``."""
        self.params = [self.params[i] for i in parents.tolist()]
        self.seeds = self.seeds[parents]
        self.output_counts = self.output_counts[parents]
        self.prompt_counts = self.prompt_counts[parents]
        self.num_generated = self.num_generated[parents]
        self.append(tokens)

    def uniforms(self, counters: torch.Tensor, stream: int = 0) -> torch.Tensor:
        """Per-row uniforms in [0, 1) from the rows' own seeds (counter-based: batch-independent)."""
        return uniforms(self.seeds, counters, stream=stream)


def _as_distribution(p):
    if p.temperature == 0:
        from dataclasses import replace

        return replace(p, temperature=1.0)
    return p


# ---- compile against a model's tokenizer, and a constrained decode loop ------------------------------

def engine_tokenizer_info(tokenizer_or_engine, vocab_size: int | None = None, eos_token_ids=None):
    """The TokenizerInfo of an Engine (its tokenizer, its LM head's vocabulary size) or of a tokenizer."""
    tok = getattr(tokenizer_or_engine, "tokenizer", None) if hasattr(tokenizer_or_engine, "model") else None
    if tok is not None:
        vocab_size = vocab_size or tokenizer_or_engine.model.config.vocab_size
        tokenizer_or_engine = tok
    return tokenizer_info(tokenizer_or_engine, vocab_size, eos_token_ids)


def compile_constraint(spec: ConstraintSpec, tokenizer_or_engine, vocab_size: int | None = None,
                       eos_token_ids=None, cache: GrammarCache | None = DEFAULT_CACHE) -> Constraint:
    """Compile ``spec`` for an Engine (its tokenizer and vocabulary size), our Tokenizer, a
    ``tokenizers.Tokenizer`` or a list of token strings, in this process (no time or memory budget: a
    server compiles requests' grammars in a worker process, ``logitlab.server.sandbox``). Compiled grammars
    are kept in ``cache`` (bounded, least recently used out; None: not kept)."""
    info = engine_tokenizer_info(tokenizer_or_engine, vocab_size, eos_token_ids)
    key = grammar_key(spec, info)
    hit = cache.get(key) if cache is not None else None
    if hit is not None and hit.info is info:
        return hit
    constraint = Constraint.from_spec(spec, info)
    if cache is not None:
        cache.put(key, constraint)
    return constraint


@dataclass
class ConstrainedOutput:
    token_ids: list[list[int]]
    finish_reasons: list[str]  # "stop" (grammar complete, EOS accepted) | "length" | "error" (nothing allowed)
    texts: list[str] | None = None
    token_logprobs: list[list[float]] | None = None  # the pipeline's (processed) logprob of each token


@torch.inference_mode()
def constrained_generate(model_or_engine, prompt, constraint: Constraint, params=None, max_tokens: int | None = None,
                         n: int | None = None, seed: int | None = None, eos_token_ids=None) -> ConstrainedOutput:
    """Greedy or sampled generation of ``n`` rows under ``constraint`` (structured output): the mask is the
    pipeline's first stage, then ``sampling.process`` and the inverse-CDF draw with each row's own seed.
    A row ends when the grammar is complete and its stop token (EOS) is drawn. It runs in a scheduler of its
    own, the path every constrained request of the engine takes (no second decode loop)."""
    from dataclasses import replace

    from ..sampling import SamplingParams
    from .scheduler import Request, Scheduler

    params = params or SamplingParams()
    model, tokenizer, prompt_ids, eos = resolve_model(model_or_engine, prompt, eos_token_ids)
    params = replace(params, max_tokens=params.max_tokens if max_tokens is None else max_tokens,
                     n=params.n if n is None else n, logprobs_mode="processed")
    seeds = sample_seeds(params, params.n, seed)
    P, ctx = len(prompt_ids), model.config.context_length
    cache_len = min(ctx, P + params.max_tokens)
    if P >= cache_len:
        raise ParamError("prompt", f"has {P} tokens; the context holds {ctx}")
    sched = Scheduler.standalone(model, tokenizer, eos, params.n, cache_len, cache_len)
    requests = [Request(list(prompt_ids), params, s, group=0, index=i, constraint=constraint.start())
                for i, s in enumerate(seeds)]
    out, texts = sched.run_to_end(requests, tokenizer)
    return ConstrainedOutput(out, [r.finish_reason for r in requests], texts,
                             [list(r.token_logprobs) for r in requests])
