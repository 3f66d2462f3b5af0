"""Byte-level BPE tokenizer (the `tokenizers` library), chat templates, and a streaming detokenizer.

Built either from a GGUF's metadata (tokens, merges, token types, pre-tokenizer name, special ids) or
from a Hugging Face ``tokenizer.json``. Chat templates are rendered in Jinja's immutable sandbox: a
template comes with a model file, so it is untrusted input.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
_CONTROL, _USER_DEFINED = 3, 4

# The GPT-2 split pattern, and the pre-tokenizers llama.cpp applies for each `tokenizer.ggml.pre`.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_FIRST = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}

# Tokens that end a turn or a document, besides the declared EOS.
_END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>")


def _pre_tokenizer(pre: str):
    if pre in _DIGITS_FIRST:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama3", "llama-bpe", "smaug-bpe", "dbrx"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # gpt2 and default


class Tokenizer:
    def __init__(self, tok: HFTokenizer, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos: bool = False, chat_template: str | None = None):
        self._tok = tok
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        ends = {vocab[t] for t in _END_TOKENS if t in vocab}
        self.eos_token_ids = frozenset(ends | ({eos_token_id} if eos_token_id is not None else set()))
        self._special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> Tokenizer:
        if meta.get("tokenizer.ggml.model", "gpt2") != "gpt2":
            raise ValueError(f"model: tokenizer type {meta.get('tokenizer.ggml.model')!r} is not supported "
                             "(only byte-level BPE, 'gpt2')")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        vocab = {t: i for i, t in enumerate(tokens)}
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt2"))
        tok.decoder = decoders.ByteLevel()
        added = [AddedToken(t, special=ty == _CONTROL, normalized=False)
                 for t, ty in zip(tokens, types, strict=True) if ty in (_CONTROL, _USER_DEFINED)]
        tok.add_tokens([a for a in added if not a.special])
        tok.add_special_tokens([a for a in added if a.special])
        return cls(tok, meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        vocab = tok.get_vocab(with_added_tokens=True)

        def tid(key):
            v = cfg.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            return vocab.get(v) if v is not None else None

        # tokenizer.json's post-processor decides BOS; we add it ourselves, so turn it off there.
        probe = tok.encode("a", add_special_tokens=True).ids
        add_bos = len(probe) > 1 and probe[0] == tid("bos_token")
        tok.no_padding()
        if add_bos:
            from tokenizers import processors

            tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
        return cls(tok, tid("bos_token"), tid("eos_token"), add_bos=add_bos,
                   chat_template=cfg.get("chat_template"))

    # ---- text <-> ids --------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        """Readable text of one token (its bytes decoded; a partial UTF-8 byte shows as U+FFFD)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ---- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("model: this model has no chat template")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template)
        piece = self._tok.id_to_token
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=piece(self.bos_token_id) if self.bos_token_id is not None else "",
            eos_token=piece(self.eos_token_id) if self.eos_token_id is not None else "",
        )


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas without ever emitting half a UTF-8 character.

    Byte-level BPE tokens can split a character's bytes (an emoji is often 2-4 tokens), and decoding
    such a prefix yields U+FFFD. Like vLLM / TGI, we decode a short window of ids ending at the newest
    one, compare it with the same window minus the newest ids, and emit the difference only once it
    does not end in U+FFFD. Each step decodes a bounded window, so a long generation stays O(n).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window used as decoding context
        self.read_offset = 0  # ids before this have been emitted

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # incomplete character: wait for more bytes
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]
