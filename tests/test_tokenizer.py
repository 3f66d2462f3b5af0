"""Tokenizer: parity with transformers' tokenizer for the same GGUF (and with llama.cpp when installed),
chat templates, the sandbox, and the UTF-8-safe streaming detokenizer."""

from __future__ import annotations

import random

import pytest

from logitlab.tokenizer import IncrementalDetokenizer, NoChatTemplateError, Tokenizer

CORPUS = [
    "",
    "a",
    " ",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — déjà vu, Ærøskøbing, São Paulo, Zürich, Łódź",
    "e\u0301 (combining acute) vs é; ﬁ ligature; Å vs \u212b",
    "日本語のテキストと中文，한국어 텍스트",
    "Привет, мир! Ελληνικά. עברית العربية हिन्दी ไทย",
    "emoji 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇺🇸🇯🇵 🎉🎉 ❤️ 🫠",
    "tabs\tand\t\ttabs",
    "  lots   of    spaces  ",
    "\n\n\nnewlines\n \n",
    "\r\nwindows\r\nlines\r\n",
    "nbsp\u00a0here\u3000ideographic\u2003em",
    "def f(x):\n    return x**2  # square\n",
    "if (a && b) { return c[0]; } else {\n\tx->y = ~z;\n}",
    "1234567 3.14159 1e-9 0x1F -42 +7 1,000,000.50 2024-05-17 12:30:45",
    "  123 \t456\n789   0",
    "٣٤٥ ½ ¼ ² 一二三",
    "I'm sure you can't, we'll see, they've done it, she'd, he's, I'LL, DON'T",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "foo<|im_end|>bar<|endoftext|>",
    "<|im_start|><|im_end|><|im_start",
    "x=1;y=2\r\nz",
    "URL: https://example.com/a?b=c&d=e#frag",
    "Mixed: αβγ ∑∫√ ©®™ ½ ¼ → ⇒ ∞ ≠ ≤",
    "   leading and trailing   ",
    "\x00\x01\x7f control bytes",
    "<repo_name>org/repo<file_sep>main.py",
    "a" * 50 + " " + "ab" * 30,
    "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬…æ œ∑´®†¥¨ˆøπ“‘«",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "user", "content": "Ünïcödé 👨‍👩‍👧 and\nnew lines\n\n"},
        {"role": "assistant", "content": "  ok  "},
    ],
]


def _has_numeric(text: str) -> bool:
    return any(c.isnumeric() for c in text)


# ---- references: transformers' tokenizer for the same GGUF (loaded once), llama.cpp when installed ---------


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def hf_smollm_backend(hf_tokenizer):
    """transformers' tokenizer with the split that SmolLM2's own tokenizer.json and llama.cpp's "smollm"
    pre-tokenizer apply: every numeric character on its own, then GPT-2's byte-level split. transformers'
    GGUF converter does not read ``tokenizer.ggml.pre`` for this vocabulary, which only matters where a
    digit follows whitespace the vocabulary could merge with it ("  123", " ½")."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    backend = Backend.from_str(hf_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return backend


@pytest.fixture(scope="module")
def llama_cpp_vocab(gguf_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional reference)")
    return llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)


# ---- encode / decode ---------------------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_transformers(real_tokenizer, hf_tokenizer, hf_smollm_backend, text):
    ids = real_tokenizer.encode(text)
    assert ids == hf_smollm_backend.encode(text, add_special_tokens=False).ids
    if not _has_numeric(text):  # where the digit split cannot matter: transformers' GGUF tokenizer as it is
        assert ids == hf_tokenizer.encode(text, add_special_tokens=True)
    assert real_tokenizer.encode(text, add_special_tokens=False) == ids  # SmolLM2 adds no BOS


@pytest.mark.real_model
@pytest.mark.parametrize("text", CORPUS)
def test_decode_matches_transformers(real_tokenizer, hf_tokenizer, text):
    ids = real_tokenizer.encode(text)
    assert real_tokenizer.decode(ids) == text == hf_tokenizer.decode(ids, skip_special_tokens=False)
    assert real_tokenizer.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(
        ids, skip_special_tokens=True
    )


@pytest.mark.real_model
def test_decode_of_arbitrary_ids_matches_transformers(real_tokenizer, hf_tokenizer):
    """Including ids that cut characters apart (their bytes decode to U+FFFD the same way)."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(real_tokenizer.vocab_size) for _ in range(rng.randrange(1, 30))]
        for skip in (False, True):
            assert real_tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
                ids, skip_special_tokens=skip
            )


@pytest.mark.real_model
def test_encode_matches_llama_cpp(real_tokenizer, llama_cpp_vocab):
    for text in CORPUS + ["  123", " 12 345  6789", "\n\n42", "\t\t7", " ½"]:
        expected = llama_cpp_vocab.tokenize(text.encode(), add_bos=False, special=True)
        assert real_tokenizer.encode(text) == expected, text


@pytest.mark.real_model
def test_special_tokens_and_ids(real_tokenizer, hf_tokenizer):
    tok = real_tokenizer
    assert tok.vocab_size == len(hf_tokenizer) == 49152
    assert (tok.bos_token_id, tok.eos_token_id) == (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id)
    im_start, im_end, eot = hf_tokenizer.convert_tokens_to_ids(
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    )
    assert tok.eos_token_ids == {tok.eos_token_id, im_end, eot}
    ids = tok.encode("<|im_start|>user<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end and tok.token_to_id("<|im_end|>") == im_end
    assert tok.decode(ids, skip_special_tokens=True) == "user"
    assert "<|im_start" not in tok.decode(tok.encode("<|im_start|>"), skip_special_tokens=True)


@pytest.mark.real_model
def test_id_to_piece_is_readable(real_tokenizer, hf_tokenizer):
    tok = real_tokenizer
    specials = set(hf_tokenizer.all_special_ids) | set(hf_tokenizer.added_tokens_decoder)
    to_byte = {c: b for b, c in enumerate(_byte_alphabet())}
    partial = 0
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        if i in specials:
            assert piece == hf_tokenizer.convert_ids_to_tokens(i)
            continue
        raw = bytes(to_byte[c] for c in hf_tokenizer.convert_ids_to_tokens(i))
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: its bytes, escaped, never U+FFFD
            partial += 1
            assert "\\x" in piece and "\ufffd" not in piece, i
        else:
            assert piece == hf_tokenizer.decode([i]), i
    assert partial > 100
    with pytest.raises(IndexError):
        tok.id_to_piece(tok.vocab_size)


# ---- chat templates ----------------------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(real_tokenizer, hf_tokenizer, messages, add_generation_prompt):
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert (
        real_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    )


def _tiny(template: str | None) -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    return Tokenizer(
        Backend(models.BPE(vocab={"a": 0, "<s>": 1, "</s>": 2}, merges=[])), 1, 2, chat_template=template
    )


def test_chat_template_is_sandboxed():
    from jinja2.exceptions import SecurityError

    for evil in (
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append(1) }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
    ):
        with pytest.raises(SecurityError):
            _tiny(evil).apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_environment_matches_transformers_conventions():
    from jinja2.exceptions import TemplateError

    t = _tiny(
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'bad' %}"
        "{{ raise_exception('no ' + m['role']) }}{% endif %}{{ m | tojson }}"
        "{% if loop.index == 1 %}{% continue %}{% endif %}!{% endfor %}"
        "{% if add_generation_prompt %}{{ eos_token }}{% endif %}{{ extra }}"
    )
    msgs = [{"role": "user", "content": "é<>"}, {"role": "user", "content": "b"}]
    out = t.apply_chat_template(msgs, add_generation_prompt=True, extra="X")
    assert out == '<s>{"role": "user", "content": "é<>"}{"role": "user", "content": "b"}!</s>X'
    with pytest.raises(TemplateError, match="no bad"):
        t.apply_chat_template([{"role": "bad", "content": ""}])
    # trim_blocks + lstrip_blocks: a line holding only a block tag leaves nothing behind
    t = _tiny("{% for m in messages %}\n  {% if true %}\n[{{ m.content }}]\n  {% endif %}\n{% endfor %}")
    assert t.apply_chat_template([{"content": "a"}, {"content": "b"}]) == "[a]\n[b]\n"


def test_missing_chat_template_is_a_clear_error():
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        _tiny(None).apply_chat_template([{"role": "user", "content": "x"}])
    assert issubclass(NoChatTemplateError, ValueError)


# ---- a GGUF tokenizer written here (no real model): llama3's split, BOS, user-defined tokens ---------------


def _byte_alphabet() -> list[str]:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    import gguf

    path = tmp_path_factory.mktemp("tok") / "tok.gguf"
    merges = ["Ġ t", "h e", "Ġt he", "1 2", "12 3", "3 4", "Ġ Ġ", "ĠĠ ĠĠ", "o r", "w or"]
    tokens = _byte_alphabet() + [m.replace(" ", "") for m in merges] + ["<|begin|>", "<|end|>", "<think>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3, 3, 4])
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 3)
    w.add_eos_token_id(len(tokens) - 2)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(str(path))
    from logitlab.weights.gguf_loader import read_metadata

    return path, Tokenizer.from_gguf_metadata(read_metadata(reader))


TINY_TEXTS = [
    "the other word",
    "  the  1234 world",
    "<|begin|>x<think>y<|end|>",
    "🎉 the\n\n   12 ",
    "",
    "a<thi",
]


def test_tiny_gguf_tokenizer_matches_transformers(tiny_gguf):
    from transformers import AutoTokenizer

    path, tok = tiny_gguf
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TINY_TEXTS:
        assert tok.encode(text) == hf.encode(text), text
        assert tok.encode(text)[0] == tok.bos_token_id and tok.add_bos
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
        ids = tok.encode(text)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == hf.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )


def test_tiny_gguf_tokenizer_details(tiny_gguf):
    _, tok = tiny_gguf
    t = {p: tok.token_to_id(p) for p in ("123", "4", "34", "<think>", "<|end|>")}
    assert tok.encode("1234", add_special_tokens=False) == [
        t["123"],
        t["4"],
    ]  # llama3 splits digits in threes
    assert tok.encode("<think>", add_special_tokens=False) == [t["<think>"]]
    assert (
        tok.decode([t["<think>"], t["<|end|>"]], skip_special_tokens=True) == "<think>"
    )  # user-defined stays
    assert t["<|end|>"] in tok.eos_token_ids and tok.id_to_piece(t["<|end|>"]) == "<|end|>"


def test_unknown_pre_tokenizer_warns_and_uses_gpt2_split():
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "something-new",
        "tokenizer.ggml.tokens": _byte_alphabet(),
        "tokenizer.ggml.merges": [],
    }
    with pytest.warns(UserWarning, match="something-new"):
        tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.decode(tok.encode("hé 12")) == "hé 12"
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "llama"})


# ---- streaming detokenizer ---------------------------------------------------------------------------------


def _stream(tok, ids, skip=False) -> list[str]:
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    return [d.push(i) for i in ids] + [d.flush()]


@pytest.mark.real_model
@pytest.mark.parametrize("text", CORPUS)
def test_incremental_detokenizer_reproduces_decode(real_tokenizer, text):
    ids = real_tokenizer.encode(text, add_special_tokens=False)
    for skip in (False, True):
        pieces = _stream(real_tokenizer, ids, skip)
        assert "".join(pieces) == real_tokenizer.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)


@pytest.mark.real_model
@pytest.mark.parametrize("emoji", ["🎉", "👨‍👩‍👧", "🇯🇵", "𝔘"])
def test_characters_split_over_byte_tokens_are_held_back(real_tokenizer, emoji):
    ids = real_tokenizer.encode("x" + emoji, add_special_tokens=False)
    assert len(ids) > 2  # the character's bytes are spread over several tokens
    pieces = _stream(real_tokenizer, ids)
    assert "".join(pieces) == "x" + emoji
    assert all(p == "" or "\ufffd" not in p for p in pieces)
    for p in pieces:  # every emitted piece is whole characters of the text, in order
        assert p.encode().decode() == p


@pytest.mark.real_model
def test_incremental_detokenizer_on_arbitrary_ids(real_tokenizer):
    rng = random.Random(1)
    for _ in range(100):
        ids = [rng.randrange(real_tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert "".join(_stream(real_tokenizer, ids)) == real_tokenizer.decode(ids)


@pytest.mark.real_model
def test_incremental_detokenizer_decodes_a_bounded_window(real_tokenizer, monkeypatch):
    """Long generations stay linear: each push decodes a few ids, not the whole history."""
    ids = real_tokenizer.encode(" ".join(CORPUS) * 5, add_special_tokens=False)
    assert len(ids) > 2000
    sizes = []
    decode = real_tokenizer.decode
    monkeypatch.setattr(real_tokenizer, "decode", lambda i, **kw: sizes.append(len(i)) or decode(i, **kw))
    text = "".join(_stream(real_tokenizer, ids))
    monkeypatch.undo()
    assert text == real_tokenizer.decode(ids)
    assert max(sizes) <= 16
