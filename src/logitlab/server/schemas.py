"""Request bodies of the HTTP API (pydantic, strict, unknown fields forbidden).

Only *types* are checked here; ranges and cross-field rules are checked in one place, by
``SamplingParams.validate`` (through ``Engine.make_requests``), so the HTTP API, the CLI and the Python API
accept exactly the same values. Every field named like a ``SamplingParams`` field is passed through
unchanged; OpenAI's names that differ (``logprobs``/``top_logprobs`` in chat, ``max_completion_tokens``)
are mapped in ``app.py``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="forbid", strict=True)

TokenIds = list[int]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM: usage in every chunk (server/conformance.py)


class Contrastive(BaseModel):
    """Contrastive decoding: ``amateur`` is ``early-exit:K`` (the expert's own first K layers)."""

    model_config = _STRICT
    amateur: str
    alpha: float | None = None


class Speculative(BaseModel):
    """Speculative decoding: ``draft`` is ``early-exit:K``, ``ngram`` / ``ngram:N``, ``int8`` or ``gguf``;
    ``num_tokens`` tokens are drafted per round."""

    model_config = _STRICT
    draft: str
    num_tokens: int | None = None


class _Knobs(BaseModel):
    """The sampling pipeline's knobs, shared by the completion endpoints and the distribution routes: OpenAI's
    names, logitlab's (the core engine's SamplingParams), and llama.cpp's server names for the newer
    samplers (with transformers' no_repeat_ngram_size)."""

    model_config = _STRICT

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    epsilon: float | None = None
    eta: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    temperature_frequency_penalty: float | None = None
    temperature_presence_penalty: float | None = None
    penalize_prompt: bool | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    banned_token_ids: list[int] | None = None
    top_n_sigma: float | None = None
    xtc_probability: float | None = None
    xtc_threshold: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None
    dry_sequence_breakers: list[str] | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    dynatemp_range: float | None = None
    dynatemp_exponent: float | None = None
    no_repeat_ngram_size: int | None = None


class _Sampling(_Knobs):
    """The fields both completion endpoints share: OpenAI's, then logitlab's extensions (the names of
    the core engine's ``SamplingParams``)."""

    model_config = _STRICT

    model: str | None = None
    max_tokens: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # extensions (the names of the core engine's SamplingParams)
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    logprobs_mode: Literal["raw", "processed"] | None = None
    explain: bool | None = None
    # decoding drivers: search, structured output, contrastive and speculative decoding (see app.py)
    beam_width: int | None = None
    length_penalty: float | None = None
    contrastive: Contrastive | None = None
    speculative: Speculative | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


# The decoding-driver fields (read by ``decoding.modes.DriverOptions.from_request``), chat adds response_format.
DRIVER_FIELDS = ("beam_width", "length_penalty", "contrastive", "speculative", "guided_json", "guided_regex",
                 "guided_choice", "guided_grammar", "response_format")


# The samplers of llama.cpp's server (same names), in the completion and distribution requests alike.
NEW_SAMPLERS = (
    "top_n_sigma", "xtc_probability", "xtc_threshold", "dry_multiplier", "dry_base", "dry_allowed_length",
    "dry_penalty_last_n", "dry_sequence_breakers", "mirostat", "mirostat_tau", "mirostat_eta", "dynatemp_range",
    "dynatemp_exponent", "no_repeat_ngram_size",
)

# Fields passed to SamplingParams under the same name (when the client sets them).
PASS_THROUGH = (
    "max_tokens", "temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "seed",
    "top_k", "min_p", "typical_p", "epsilon", "eta", "repetition_penalty", "temperature_frequency_penalty",
    "temperature_presence_penalty", "penalize_prompt", "min_tokens", "stop_token_ids", "ignore_eos",
    "allowed_token_ids", "banned_token_ids", "logprobs_mode", "explain", *NEW_SAMPLERS,
)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    logprobs: int | None = None
    echo: bool | None = None
    prompt_logprobs: int | None = None  # vLLM's: per prompt token its logprob and top k (conformance.py)


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    model_config = _STRICT
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """An assistant message's call of a tool (``tool_calls[i]``), as OpenAI's API returned it."""

    model_config = _STRICT
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages (tools.py renders them)
    tool_call_id: str | None = None  # tool messages: the call they answer

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        # "developer" is the newer name of "system" in OpenAI's API
        out = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class JsonSchemaFormat(BaseModel):
    model_config = _STRICT
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object) or
    ``json_schema`` (``json_schema.schema``)."""

    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(BaseModel):
    """A tool's function: ``parameters`` is the JSON schema of its arguments (an object; tools.py checks it)."""

    model_config = _STRICT
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = _STRICT
    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming one function: ``{"type": "function", "function": {"name": ...}}``."""

    model_config = _STRICT
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    response_format: ResponseFormat | None = None
    # tool calling (server/tools.py)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    prompt_logprobs: int | None = None  # vLLM's (conformance.py)


class TokenizeRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    tokens: TokenIds


class DistributionRequest(_Knobs):
    """The next-token distribution after ``prompt`` (+ ``generated``, which the penalties count as
    output), before and after the knobs: for the playground's chart."""

    model_config = _STRICT
    model: str | None = None
    prompt: str | TokenIds
    generated: TokenIds = []
    top: int = Field(default=50, ge=1, le=200)


DIST_PASS_THROUGH = (
    "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon", "eta", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "temperature_frequency_penalty",
    "temperature_presence_penalty", "penalize_prompt", "allowed_token_ids", "banned_token_ids", *NEW_SAMPLERS,
)
