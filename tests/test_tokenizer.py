"""Tokenizer parity (transformers' tokenizer for the same GGUF, and llama.cpp's when installed),
chat template, and the UTF-8-safe streaming detokenizer."""

from __future__ import annotations

import re

import pytest

from logitlab.tokenizer import IncrementalDetokenizer

CORPUS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", "naïve café — déjà vu, Ærøskøbing",
    "日本語のテキストと中文", "Привет, мир!", "emoji 👍🏽 👨‍👩‍👧 🎉🎉", "tabs\tand\ttabs", "  lots   of spaces  ",
    "\n\n\nnewlines\n \n", "def f(x):\n    return x**2  # square\n", "if (a && b) { return c[0]; }",
    "1234567 3.14159 1e-9 0x1F", "I'm sure you can't, we'll see, they've done it",
    "<|im_start|>user\nHi there<|im_end|>\n", "x=1;y=2\r\nz", "a", " ", "URL: https://example.com/a?b=c&d=e",
    "Mixed: αβγ ∑∫√ ©®™ ½ ¼", "   leading and trailing   ",
]

# llama.cpp's "smollm" pre-tokenizer splits numeric characters before the byte-level regex (as SmolLM2's
# own tokenizer.json does); transformers' GGUF converter ignores `tokenizer.ggml.pre`. That only shows
# where whitespace precedes a numeric character the vocabulary could have merged with it: a run of 2+
# whitespace before a digit, or a space before a non-ASCII numeral (e.g. " ½"). There we follow llama.cpp
# (checked against llama-cpp-python below, when it is installed).
_WS_BEFORE_DIGIT = re.compile(r"\s{2,}\d|\s(?=[½¼¾⅓⅔²³¹])")


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.mark.real_model
@pytest.mark.parametrize("text", CORPUS)
def test_ids_and_text_match_transformers(real_tokenizer, hf_tokenizer, text):
    ids = real_tokenizer.encode(text)
    assert real_tokenizer.decode(ids) == text
    if not _WS_BEFORE_DIGIT.search(text):
        assert ids == hf_tokenizer.encode(text, add_special_tokens=True)
    assert real_tokenizer.decode(ids) == hf_tokenizer.decode(ids)


@pytest.mark.real_model
def test_ids_match_llama_cpp_including_digits(real_tokenizer, gguf_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional peer)")
    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    for text in CORPUS + ["  123", " 12 345  6789", "\n\n42"]:
        assert real_tokenizer.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True), text


@pytest.mark.real_model
def test_special_tokens_and_eos(real_tokenizer):
    ids = real_tokenizer.encode("<|im_start|>user<|im_end|>")
    assert ids[0] == real_tokenizer.token_to_id("<|im_start|>") and ids[-1] == real_tokenizer.eos_token_id
    assert real_tokenizer.token_to_id("<|endoftext|>") in real_tokenizer.eos_token_ids
    assert real_tokenizer.decode(ids, skip_special_tokens=True) == "user"


@pytest.mark.real_model
def test_chat_template_matches_transformers(real_tokenizer, hf_tokenizer):
    convs = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    ]
    for msgs in convs:
        for gen in (True, False):
            expected = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert real_tokenizer.apply_chat_template(msgs, add_generation_prompt=gen) == expected


@pytest.mark.real_model
def test_chat_template_is_sandboxed(real_tokenizer):
    from jinja2.exceptions import SecurityError

    template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    evil = real_tokenizer.__class__(real_tokenizer._tok, 1, 2, chat_template=template)
    with pytest.raises(SecurityError):
        evil.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.real_model
@pytest.mark.parametrize("text", CORPUS)
def test_incremental_detokenizer_reproduces_decode(real_tokenizer, text):
    ids = real_tokenizer.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(real_tokenizer)
    pieces = [d.push(i) for i in ids]
    pieces.append(d.flush())
    assert "".join(pieces) == real_tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.real_model
def test_emoji_split_over_byte_tokens_is_held_back(real_tokenizer):
    ids = real_tokenizer.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1  # the emoji's 4 bytes are several tokens
    d = IncrementalDetokenizer(real_tokenizer)
    out = [d.push(i) for i in ids]
    assert out[:-1] == [""] * (len(ids) - 1) and out[-1] == "🎉"
