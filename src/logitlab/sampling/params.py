"""SamplingParams: everything a user can set about decoding, validated in ONE place.

Every front end (Python API, CLI, HTTP server) builds a SamplingParams and calls ``validate``; an invalid
value raises ``ParamError(field, reason)`` whose message names the field and the allowed range, e.g.
``top_p: must be in (0, 1], got 1.5``. The sampler itself assumes validated parameters.

Ranges (and the choices behind the ones no standard fixes):

=============================  =====================  ===============================================
field                          allowed                note
=============================  =====================  ===============================================
max_tokens                     int >= 1               and prompt_len + max_tokens <= context_length
temperature                    float >= 0             0 = greedy (argmax of the processed logits);
                                                      0 < T < 1e-5 is greedy too (as in vLLM)
top_k                          [0, 2^31 - 1]          0 = off; k >= vocab keeps everything
top_p, typical_p               (0, 1]                 1 = off
min_p                          [0, 1]                 0 = off
epsilon, eta                   [0, 1)                 0 = off
frequency/presence_penalty     [-2, 2]                OpenAI's range
repetition_penalty             (0, 10]                1 = off; > 10 only ever zeroes a token's chance,
                                                      which banned_token_ids says explicitly
temperature_*_penalty          [0, 10]                0 = off; k_i = 1 + f*count + p*[count>0]
logit_bias                     {id: [-100, 100]}      OpenAI's range
allowed/banned/stop_token_ids  ids in [0, vocab)      allowed minus banned must be non-empty
min_tokens                     [0, max_tokens]        needs a non-EOS token to be allowed
stop                           <= 16 non-empty str
n                              [1, 4096]
logprobs                       None or [0, 20]        number of top alternatives per token
logprobs_mode                  "raw" | "processed"
seed                           None or 64-bit int     used modulo 2^63; None = a random seed
top_n_sigma                    float >= 0             0 = off (llama.cpp's -1); keep l >= max - n*sigma
xtc_probability                [0, 1]                 0 = off; chance per step that XTC applies
xtc_threshold                  [0, 1]                 > 0.5 can never remove anything (llama.cpp: off)
dry_multiplier                 [0, 100]               0 = off; 100 already bans (webui's slider ends at 5)
dry_base                       [1, 100]               llama.cpp silently disables DRY below 1: rejected
dry_allowed_length             [1, 2^31 - 1]          0 would penalise every token that ever followed
                                                      any other one (a match of length 0)
dry_penalty_last_n             [-1, 2^31 - 1]         -1 = the whole context, 0 = off (llama.cpp)
dry_sequence_breakers          <= 32 str, 1-40 chars  llama.cpp truncates longer ones; rejected here
mirostat                       0, 1 or 2              0 = off; 1/2 replace every truncation knob
mirostat_tau                   [0, 100]               target surprise in bits (a uniform choice among
                                                      50k tokens is 15.6 bits)
mirostat_eta                   [0, 1]                 learning rate of mu
dynatemp_range                 [0, 100]               0 = off; T in [max(0, T - r), T + r]
dynatemp_exponent              [0, 100]
no_repeat_ngram_size           [0, 2^31 - 1]          0 = off
=============================  =====================  ===============================================

Booleans are not integers here (``top_k=True`` is rejected) and NaN / inf are rejected everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
MAX_N = 4096  # samples share their prompt's KV blocks; rows beyond --max-batch wait their turn
MAX_REPETITION_PENALTY = 10.0
MAX_TEMPERATURE_PENALTY = 10.0
MAX_LOGIT_BIAS = 100.0
GREEDY_BELOW = 1e-5  # temperatures in (0, GREEDY_BELOW) are greedy (see validate)
MAX_DRY_BREAKERS = 32
MAX_DRY_BREAKER_CHARS = 40  # llama.cpp's MAX_CHAR_LEN
MAX_INT32 = 2**31 - 1  # llama.cpp's int32 parameters; larger values only overflow tensors
MAX_NEW_SAMPLER_FLOAT = 100.0  # dry_multiplier / dry_base / mirostat_tau / dynatemp_*: far beyond any use
DEFAULT_DRY_SEQUENCE_BREAKERS = ("\n", ":", "\"", "*")  # llama.cpp's and text-generation-webui's default


class ParamError(ValueError):
    """An invalid sampling parameter: ``str(e) == f"{field}: {reason}"``."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    epsilon: float = 0.0
    eta: float = 0.0
    frequency_penalty: float = 0.0  # OpenAI, additive: l -= f * count
    presence_penalty: float = 0.0  # OpenAI, additive: l -= p * [count > 0]
    repetition_penalty: float = 1.0  # CTRL / HF, multiplicative, prompt and output tokens
    temperature_frequency_penalty: float = 0.0  # seed 000: per-token temperature
    temperature_presence_penalty: float = 0.0
    penalize_prompt: bool = False  # frequency/presence and temperature penalties count prompt tokens too
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    banned_token_ids: list[int] | None = None
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # number of top alternatives to return; None = no logprobs
    logprobs_mode: str = "raw"  # "raw" (the model's log-softmax) or "processed" (after the pipeline)
    echo: bool = False
    explain: bool = False
    # The samplers of llama.cpp / text-generation-webui / transformers, with their names (README, pipeline).
    top_n_sigma: float = 0.0  # keep l >= max(l) - n * std(l); 0 = off
    xtc_probability: float = 0.0  # XTC: with this chance, remove every token with p >= xtc_threshold but the
    xtc_threshold: float = 0.1  # least probable of them
    dry_multiplier: float = 0.0  # DRY: l -= multiplier * base^(match_length - allowed_length); 0 = off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1  # tokens of the context searched for repeats; -1 = all, 0 = off
    dry_sequence_breakers: list[str] = field(default_factory=lambda: list(DEFAULT_DRY_SEQUENCE_BREAKERS))
    mirostat: int = 0  # 0 = off, 1 = Mirostat (v1), 2 = Mirostat 2.0; replaces the truncation knobs
    mirostat_tau: float = 5.0  # target surprise, in bits
    mirostat_eta: float = 0.1  # learning rate of mu
    dynatemp_range: float = 0.0  # dynamic temperature: T +- range, scaled by the normalised entropy
    dynatemp_exponent: float = 1.0
    no_repeat_ngram_size: int = 0  # transformers: ban tokens completing an n-gram already in the sequence

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        """Build from a plain dict (JSON body, config file); unknown keys raise ParamError naming the key.
        Call ``validate`` afterwards (it needs the vocabulary size)."""
        if not isinstance(d, dict):
            raise ParamError("params", f"must be a mapping of names to values, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise ParamError(str(key), "unknown sampling parameter")
        return cls(**d)

    def validate(self, vocab_size: int, context_length: int | None = None, prompt_len: int | None = None,
                 eos_token_ids=()) -> SamplingParams:
        """Check every field; raise ParamError naming the first bad one. Returns self."""
        _int(self, "max_tokens", lo=1)
        _num(self, "temperature", lo=0.0, text="must be >= 0 (0 = greedy)")
        if 0 < self.temperature < GREEDY_BELOW:  # below ~1e-45 T is 0 in float32 and was read as T = 1;
            self.temperature = 0.0  # any T this small samples the argmax anyway (vLLM's rule)
        # bounded: the sampler holds k in an int64 tensor (2**63 overflowed there, failing the whole batch)
        _int(self, "top_k", lo=0, hi=MAX_INT32, text=f"must be an integer in [0, {MAX_INT32}] (0 = off)")
        _num(self, "top_p", lo=0.0, hi=1.0, lo_open=True, text="must be in (0, 1]")
        _num(self, "min_p", lo=0.0, hi=1.0, text="must be in [0, 1]")
        _num(self, "typical_p", lo=0.0, hi=1.0, lo_open=True, text="must be in (0, 1]")
        _num(self, "epsilon", lo=0.0, hi=1.0, hi_open=True, text="must be in [0, 1)")
        _num(self, "eta", lo=0.0, hi=1.0, hi_open=True, text="must be in [0, 1)")
        _num(self, "frequency_penalty", lo=-2.0, hi=2.0, text="must be in [-2, 2]")
        _num(self, "presence_penalty", lo=-2.0, hi=2.0, text="must be in [-2, 2]")
        _num(self, "repetition_penalty", lo=0.0, hi=MAX_REPETITION_PENALTY, lo_open=True,
             text=f"must be in (0, {MAX_REPETITION_PENALTY:g}] (1 = off)")
        for name in ("temperature_frequency_penalty", "temperature_presence_penalty"):
            _num(self, name, lo=0.0, hi=MAX_TEMPERATURE_PENALTY,
                 text=f"must be in [0, {MAX_TEMPERATURE_PENALTY:g}] (0 = off)")
        for name in ("penalize_prompt", "ignore_eos", "echo", "explain"):
            if not isinstance(getattr(self, name), bool):
                raise ParamError(name, f"must be true or false, got {getattr(self, name)!r}")
        _int(self, "n", lo=1, hi=MAX_N)
        _int(self, "min_tokens", lo=0, hi=self.max_tokens,
             text=f"must be an integer in [0, max_tokens={self.max_tokens}]")
        if self.logprobs is not None:
            _int(self, "logprobs", lo=0, hi=MAX_LOGPROBS,
                 text=f"must be null (off) or an integer in [0, {MAX_LOGPROBS}]")
        if not isinstance(self.logprobs_mode, str) or self.logprobs_mode not in ("raw", "processed"):
            raise ParamError("logprobs_mode", f"must be 'raw' or 'processed', got {self.logprobs_mode!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise ParamError("seed", f"must be null or a 64-bit integer, got {self.seed!r}")
        self._validate_new_samplers()

        if not isinstance(self.stop, list | tuple):
            raise ParamError("stop", f"must be a list of strings, got {type(self.stop).__name__}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ParamError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ParamError("stop", f"stop strings must be non-empty strings, got {s!r}")

        _ids(self.stop_token_ids, "stop_token_ids", vocab_size)
        if self.allowed_token_ids is not None:
            _ids(self.allowed_token_ids, "allowed_token_ids", vocab_size)
        if self.banned_token_ids is not None:
            _ids(self.banned_token_ids, "banned_token_ids", vocab_size)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ParamError("logit_bias", "must map token ids to biases")
            _ids(list(self.logit_bias), "logit_bias", vocab_size)
            for tok, b in self.logit_bias.items():
                if not _is_num(b) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
                    raise ParamError("logit_bias", f"bias for token {tok} must be in [-{MAX_LOGIT_BIAS:g}, "
                                     f"{MAX_LOGIT_BIAS:g}], got {b!r}")
        self._check_some_token_left(vocab_size, eos_token_ids)

        if context_length is not None and prompt_len is not None:
            total = prompt_len + self.max_tokens
            if total > context_length:
                raise ParamError("max_tokens", f"prompt ({prompt_len} tokens) + max_tokens "
                                 f"({self.max_tokens}) = {total} exceeds the context length "
                                 f"({context_length} tokens)")
        return self

    def _validate_new_samplers(self) -> None:
        """top-n-sigma, XTC, DRY, Mirostat, dynamic temperature, no_repeat_ngram_size."""
        _num(self, "top_n_sigma", lo=0.0, text="must be >= 0 (0 = off)")
        _num(self, "xtc_probability", lo=0.0, hi=1.0, text="must be in [0, 1] (0 = off)")
        _num(self, "xtc_threshold", lo=0.0, hi=1.0, text="must be in [0, 1] (above 0.5 XTC removes nothing)")
        big = MAX_NEW_SAMPLER_FLOAT
        _num(self, "dry_multiplier", lo=0.0, hi=big, text=f"must be in [0, {big:g}] (0 = off)")
        _num(self, "dry_base", lo=1.0, hi=big, text=f"must be in [1, {big:g}]")
        _int(self, "dry_allowed_length", lo=1, hi=MAX_INT32)
        _int(self, "dry_penalty_last_n", lo=-1, hi=MAX_INT32,
             text=f"must be an integer in [-1, {MAX_INT32}] (-1 = the whole context, 0 = off)")
        b = self.dry_sequence_breakers
        if not isinstance(b, list | tuple):
            raise ParamError("dry_sequence_breakers", f"must be a list of strings, got {type(b).__name__}")
        if len(b) > MAX_DRY_BREAKERS:
            raise ParamError("dry_sequence_breakers", f"at most {MAX_DRY_BREAKERS} strings, got {len(b)}")
        for s in b:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_DRY_BREAKER_CHARS:
                raise ParamError("dry_sequence_breakers", f"each must be a string of 1 to {MAX_DRY_BREAKER_CHARS} "
                                 f"characters, got {s!r}")
        if not _is_int(self.mirostat) or self.mirostat not in (0, 1, 2):
            raise ParamError("mirostat", f"must be 0 (off), 1 or 2, got {self.mirostat!r}")
        _num(self, "mirostat_tau", lo=0.0, hi=big, text=f"must be in [0, {big:g}] (target surprise in bits)")
        _num(self, "mirostat_eta", lo=0.0, hi=1.0, text="must be in [0, 1]")
        _num(self, "dynatemp_range", lo=0.0, hi=big, text=f"must be in [0, {big:g}] (0 = off)")
        _num(self, "dynatemp_exponent", lo=0.0, hi=big, text=f"must be in [0, {big:g}]")
        _int(self, "no_repeat_ngram_size", lo=0, hi=MAX_INT32, text=f"must be an integer in [0, {MAX_INT32}] (0 = off)")

    def _check_some_token_left(self, vocab_size: int, eos_token_ids) -> None:
        """allowed minus banned must be non-empty, and hold a non-EOS token when min_tokens > 0."""
        banned = set(self.banned_token_ids or ())
        eos = set(eos_token_ids)
        if self.allowed_token_ids is None:
            left_count = vocab_size - len(banned)
            if left_count <= 0:
                raise ParamError("banned_token_ids", "bans every token of the vocabulary")
            only_eos = left_count <= len(eos) and (set(range(vocab_size)) - banned) <= eos
        else:
            left = set(self.allowed_token_ids) - banned
            if not left:
                raise ParamError("allowed_token_ids", "no token is left once banned_token_ids are removed")
            only_eos = left <= eos
        if self.min_tokens > 0 and only_eos:
            raise ParamError("min_tokens", f"must be 0 when only end-of-sequence tokens are allowed, got "
                             f"{self.min_tokens}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _int(p, name, lo=None, hi=None, text=None):
    v = getattr(p, name)
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        if text is None:
            text = f"must be an integer >= {lo}" if hi is None else f"must be an integer in [{lo}, {hi}]"
        raise ParamError(name, f"{text}, got {v!r}")


def _num(p, name, lo, hi=None, lo_open=False, hi_open=False, text=""):
    v = getattr(p, name)
    ok = _is_num(v) and (v > lo if lo_open else v >= lo)
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        raise ParamError(name, f"{text}, got {v!r}")


def _ids(ids, name, vocab_size):
    if not isinstance(ids, list | tuple | set | frozenset | dict):
        raise ParamError(name, f"must be a list of token ids, got {type(ids).__name__}")
    for t in ids:
        if not _is_int(t) or not 0 <= t < vocab_size:
            raise ParamError(name, f"token ids must be integers in [0, {vocab_size}), got {t!r}")
