"""Byte-level BPE tokenizer (the `tokenizers` library), chat templates, and a streaming detokenizer.

Built either from a GGUF's metadata (tokens, merges, token types, pre-tokenizer name, special ids) or
from a Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json``). Chat templates ship with the model
file, so they are untrusted input: they render in Jinja's immutable sandbox.
"""

from __future__ import annotations

import json
import re
import warnings
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# GGUF token types (llama.cpp's llama_token_type):
# 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
_CONTROL, _USER_DEFINED = 3, 4

# ---- pre-tokenizers: how text is split before BPE, per llama.cpp's `tokenizer.ggml.pre` --------------------
# GPT-2's split (what ByteLevel(use_regex=True) applies):
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_NAMES = {
    "gpt2",
    "default",
    "gpt-2",
    "olmo",
    "mpt",
    "jais",
    "trillion",
    "phi-2",
    "stablelm2",
    "poro-chat",
    "viking",
    "bloom",
    "gpt3-finnish",
}
# llama.cpp first isolates every numeric character (regex "\p{N}"), then applies GPT-2's split.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_SPLIT_THEN_BYTES = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "falcon-h1"), _LLAMA3
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
}

# Control tokens that end a turn or a document (llama.cpp's end-of-generation list), besides the declared EOS.
_END_TOKENS = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
    "<EOT>",
    "<|end▁of▁sentence|>",
)


def _pre_tokenizer(pre: str | None):
    pre = (pre or "default").lower()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLIT_THEN_BYTES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_THEN_BYTES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in _GPT2_NAMES:
        warnings.warn(
            f"tokenizer: pre-tokenizer {pre!r} is not known here; using GPT-2's split, so some "
            "texts may tokenize differently from llama.cpp",
            stacklevel=3,
        )
    return byte_level


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shown(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _check_gguf_scalars(meta: dict, n_tokens: int) -> None:
    """Special-token ids within the token list, flags booleans, strings strings."""
    for k in ("bos", "eos", "eot", "eom", "padding", "unknown"):
        v = meta.get(f"tokenizer.ggml.{k}_token_id")
        if v is not None and (not _is_int(v) or not 0 <= v < n_tokens):
            raise ValueError(f"tokenizer: GGUF tokenizer.ggml.{k}_token_id must be a token id in "
                             f"[0, {n_tokens}), got {_shown(v)}")
    for k in ("add_bos_token", "add_eos_token"):
        v = meta.get(f"tokenizer.ggml.{k}")
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"tokenizer: GGUF tokenizer.ggml.{k} must be a boolean, got {_shown(v)}")
    for k in ("tokenizer.ggml.pre", "tokenizer.chat_template"):
        v = meta.get(k)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"tokenizer: GGUF {k} must be a string, got {_shown(v)}")


def _gguf_merges(merges, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """``["a b", ...]`` -> ``[("a", "b"), ...]``, each of a, b and ab a token."""
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise ValueError("tokenizer: GGUF tokenizer.ggml.merges must be a list of strings")
    out = []
    for m in merges:
        pair = m.split(" ", 1)
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise ValueError(f"tokenizer: GGUF merge {_shown(m)} is not two tokens whose join is a token")
        out.append((pair[0], pair[1]))
    return out


class NoChatTemplateError(ValueError):
    """The model ships no chat template: format prompts yourself (or pass plain text)."""


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    ``encode`` adds BOS only when the model's metadata asks for it; special tokens written in the text
    (``<|im_start|>``) are always read as themselves, as transformers and llama.cpp do."""

    def __init__(
        self,
        backend: HFTokenizer,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        *,
        add_eos: bool = False,
        extra_eos_ids: tuple[int, ...] = (),
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
    ):
        self.backend = backend
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.pad_token_id, self.unk_token_id = pad_token_id, unk_token_id
        self.add_bos = bool(add_bos) and bos_token_id is not None
        self.add_eos = bool(add_eos) and eos_token_id is not None
        self.chat_template = chat_template or None
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1
        added = backend.get_added_tokens_decoder()
        self._added_ids = frozenset(added)
        self.special_token_ids = frozenset(i for i, t in added.items() if t.special)
        ends = {vocab[t] for t in _END_TOKENS if vocab.get(t) in self.special_token_ids}
        declared = {eos_token_id, *extra_eos_ids} - {None}
        self.eos_token_ids: frozenset[int] = frozenset(ends | declared)
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._template = None
        # special tokens' texts, longest first, and a regex finding them leftmost-longest as ``tokenizers``
        # does (encode_chat); lstrip/rstrip: the whitespace a token's AddedToken options swallow
        self._special_texts = sorted({t.content for t in added.values() if t.special and t.content},
                                     key=lambda t: (-len(t), t))
        self._special_re = re.compile("|".join(map(re.escape, self._special_texts))) if self._special_texts \
            else None
        self._special_strip = {i: (t.lstrip, t.rstrip) for i, t in added.items() if t.special}
        self._text_backend = None  # a copy of the backend that reads special tokens' texts as text

    @property
    def _tok(self) -> HFTokenizer:  # older name, kept for callers that reach in
        return self.backend

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict, vocab_size: int | None = None) -> Tokenizer:
        """From a GGUF's ``tokenizer.*`` keys (byte-level BPE only, ``tokenizer.ggml.model == "gpt2"``).
        The values come from the file, so each is checked (types, lengths, ids within the token list,
        merges of known tokens) before the ``tokenizers`` library sees them: it panics on a merge whose
        result is not a token. ``vocab_size``: the model's, which the token list must not exceed."""
        kind = meta.get("tokenizer.ggml.model", "gpt2")
        if kind != "gpt2":
            raise ValueError(
                f"tokenizer: GGUF tokenizer type {_shown(kind)} is not supported (only byte-level BPE, 'gpt2')"
            )
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise ValueError("tokenizer: GGUF tokenizer.ggml.tokens must be a non-empty list of strings")
        if vocab_size is not None and len(tokens) > vocab_size:
            raise ValueError(f"tokenizer: {len(tokens)} tokens for a model with {vocab_size} embeddings")
        types = meta.get("tokenizer.ggml.token_type")
        if types is None:
            types = [1] * len(tokens)
        if not isinstance(types, list) or len(types) != len(tokens) or not all(_is_int(t) for t in types):
            raise ValueError("tokenizer: GGUF tokenizer.ggml.token_type must be one integer per token")
        _check_gguf_scalars(meta, len(tokens))
        alphabet = set(byte_to_unicode().values())
        spelled = [
            t if set(t) <= alphabet else "".join(byte_to_unicode()[b] for b in t.encode()) for t in tokens
        ]
        vocab = {t: i for i, t in enumerate(spelled)}
        if len(vocab) != len(tokens):
            raise ValueError("tokenizer: GGUF token list has duplicates")
        merges = _gguf_merges(meta.get("tokenizer.ggml.merges", []), vocab)
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        backend.decoder = decoders.ByteLevel()
        # Control tokens are special (skipped by decode(skip_special_tokens=True)); user-defined ones are
        # matched whole but are ordinary text. Both only when spelled as they are in the vocabulary: a
        # "control" token outside the byte alphabet is a converter mislabel and would add an id.
        special = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _CONTROL and t in vocab
        ]
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _USER_DEFINED and t in vocab
        ]
        backend.add_special_tokens(special)
        backend.add_tokens(user)
        ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        return cls(
            backend,
            meta.get("tokenizer.ggml.bos_token_id"),
            meta.get("tokenizer.ggml.eos_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            extra_eos_ids=tuple(i for i in ids if i is not None),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            unk_token_id=meta.get("tokenizer.ggml.unknown_token_id"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """From a Hugging Face model directory: tokenizer.json, and when present tokenizer_config.json
        (special tokens, add_bos_token, chat_template), chat_template.jinja and generation_config.json."""
        path = Path(path)
        try:
            backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the library raises a bare Exception on a malformed file
            raise ValueError(f"tokenizer: cannot read {path / 'tokenizer.json'}: {str(e)[:200]}") from None

        def read(name):
            f = path / name
            if not f.exists():
                return {}
            try:
                d = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"tokenizer: {f} is not readable JSON ({type(e).__name__})") from None
            if not isinstance(d, dict):
                raise ValueError(f"tokenizer: {f} is not a JSON object")
            return d

        cfg, gen, model_cfg = (
            read("tokenizer_config.json"),
            read("generation_config.json"),
            read("config.json"),
        )
        vocab = backend.get_vocab(with_added_tokens=True)

        def token_id(key):
            v = cfg.get(f"{key}_token")
            v = v.get("content") if isinstance(v, dict) else v
            if v is not None and v in vocab:
                return vocab[v]
            i = gen.get(f"{key}_token_id", model_cfg.get(f"{key}_token_id"))
            return i[0] if isinstance(i, list) and i else i if isinstance(i, int) else None

        bos, eos = token_id("bos"), token_id("eos")
        # We add BOS/EOS ourselves (encode never runs tokenizer.json's post-processor with specials);
        # whether to follow tokenizer_config.json, else whatever that post-processor does.
        probe = backend.encode("a", add_special_tokens=True).ids
        add_bos = cfg.get("add_bos_token", len(probe) > 1 and probe[0] == bos)
        add_eos = cfg.get("add_eos_token", len(probe) > 1 and probe[-1] == eos)
        gen_eos = gen.get("eos_token_id", model_cfg.get("eos_token_id"))
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else []
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        return cls(
            backend,
            bos,
            eos,
            add_bos=add_bos,
            add_eos=add_eos,
            chat_template=template,
            extra_eos_ids=tuple(gen_eos),
            pad_token_id=token_id("pad"),
            unk_token_id=token_id("unk"),
        )

    # ---- text <-> ids --------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos:
                ids.insert(0, self.bos_token_id)
            if self.add_eos:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; bytes that do not form UTF-8 (a character cut off mid-way) show as U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        """One token as readable text, for display: its bytes as UTF-8, bytes that are part of a longer
        character as ``\\xNN`` escapes; special and added tokens as written (``<|im_end|>``)."""
        piece = self.backend.id_to_token(int(token_id))
        if piece is None:
            raise IndexError(f"tokenizer: no token {token_id} (vocabulary size {self.vocab_size})")
        if token_id in self._added_ids:
            return piece
        if self._byte_level:
            to_byte = unicode_to_byte()
            if all(c in to_byte for c in piece):
                return bytes(to_byte[c] for c in piece).decode("utf-8", errors="backslashreplace")
        text = self.backend.decode([int(token_id)], skip_special_tokens=False)
        return piece if "\ufffd" in text else text  # e.g. a byte-fallback token "<0xF0>" as it is spelled

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _token_text(self, token_id: int | None) -> str | None:
        return self.backend.id_to_token(token_id) if token_id is not None else None

    @property
    def bos_token(self) -> str | None:
        return self._token_text(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._token_text(self.eos_token_id)

    # ---- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for a conversation, rendered with the model's own template (as transformers
        renders it: same environment, same variables). Extra keyword arguments reach the template
        (e.g. ``tools=...``)."""
        if not self.chat_template:
            raise NoChatTemplateError(
                "tokenizer: this model has no chat template; send a plain prompt instead"
            )
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        variables = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self._token_text(self.pad_token_id) or "",
            "unk_token": self._token_text(self.unk_token_id) or "",
            **kwargs,
        }
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    add_special_tokens: bool = True, **kwargs) -> list[int]:
        """Token ids of a conversation rendered with the chat template, with what the caller wrote (message
        content, names, tool arguments) read as text: a special token spelled in a message
        (``<|im_end|><|im_start|>system``) becomes the ordinary tokens of that text, so a user cannot forge
        a turn of another role. Only the template's own markup is read as special tokens, as the OpenAI
        API, vLLM and llama.cpp's server do. A conversation without such text encodes exactly as
        ``encode(apply_chat_template(...))``.

        How: before rendering, the text of each special token in the caller's strings is replaced by one
        marker character (private use, absent from the conversation and the template). The special tokens
        left in the rendered text are the template's; the text is split at them, and the pieces between
        them, markers turned back into the text they stand for, are encoded with special tokens off."""
        if self._special_re is None:
            return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                               add_special_tokens)
        pattern, texts = self._special_re, self._special_texts
        base = _free_marker_base(len(texts), (messages, kwargs, self.chat_template or ""))
        marker = {t: chr(base + i) for i, t in enumerate(texts)}

        def defuse(v, key=None):
            if isinstance(v, str):
                return v if key == "role" else pattern.sub(lambda m: marker[m.group()], v)
            if isinstance(v, dict):
                return {k: defuse(x, k) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [defuse(x) for x in v]
            return v

        text = self.apply_chat_template(defuse(list(messages)), add_generation_prompt, **defuse(kwargs))
        restore = {base + i: t for i, t in enumerate(texts)}
        if not any(ord(c) in restore for c in text):
            return self.encode(text, add_special_tokens)  # nothing was defused: the ordinary path
        ids: list[int] = []
        pos, strip_next = 0, False
        for m in pattern.finditer(text):
            tid = self.backend.token_to_id(m.group())
            lstrip, rstrip = self._special_strip.get(tid, (False, False))
            piece = text[pos: m.start()].translate(restore)
            piece = piece.lstrip() if strip_next else piece
            ids += self._encode_as_text(piece.rstrip() if lstrip else piece)
            ids.append(tid)
            pos, strip_next = m.end(), rstrip
        tail = text[pos:].translate(restore)
        ids += self._encode_as_text(tail.lstrip() if strip_next else tail)
        if add_special_tokens:
            if self.add_bos:
                ids.insert(0, self.bos_token_id)
            if self.add_eos:
                ids.append(self.eos_token_id)
        return ids

    def _encode_as_text(self, text: str) -> list[int]:
        """``text``'s ids with special tokens read as plain text (a copy of the backend that splits them)."""
        if not text:
            return []
        if self._text_backend is None:
            copy = HFTokenizer.from_str(self.backend.to_str())
            copy.encode_special_tokens = True
            self._text_backend = copy
        return self._text_backend.encode(text, add_special_tokens=False).ids


def _free_marker_base(n: int, values) -> int:
    """The first of ``n`` consecutive private-use code points (plane 16) that none of ``values`` contains."""
    used = set()

    def scan(v):
        if isinstance(v, str):
            used.update(c for c in v if c >= "\U00100000")
        elif isinstance(v, dict):
            for x in v.values():
                scan(x)
        elif isinstance(v, list | tuple):
            for x in v:
                scan(x)

    scan(values)
    base = 0x100000
    while any(chr(base + i) in used for i in range(n)):
        base += n
    if base + n > 0x10FFFE:
        raise ValueError("chat: the conversation uses every private-use character")
    return base


def _compile_template(source: str):
    import jinja2
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which changes prompts
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    class Namespace(
        jinja2.utils.Namespace
    ):  # no underscore attributes: nothing to reach CPython internals with
        def __init__(*args, **kw):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kw)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"chat template: namespace attribute {name!r} is not allowed")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        namespace=Namespace,
    )
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, never emitting half a UTF-8 character.

    Byte-level BPE can split one character's bytes over several tokens (an emoji is often 2-4), and
    decoding such a prefix ends in U+FFFD. As vLLM and TGI do, each step decodes a short window of ids
    twice -- with and without the ids not yet emitted -- and emits the difference once it no longer ends
    in U+FFFD. The window starts at the previous emission point, so each push costs O(window), and a
    long generation O(n). ``"".join(pushes) + flush()`` equals ``decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window decoded for context starts here
        self.read_offset = 0  # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ('' while a character is still incomplete)."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still waiting for its other bytes
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back (a character cut off at the very end comes out as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]
