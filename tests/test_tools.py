"""Tool calling on /v1/chat/completions (server/tools.py): the call schema, the output readers, the prompt,
and the server through the official `openai` client and langchain-openai (a tiny random model over the real
tokenizer for formats and errors; the real SmolLM2 for realistic calls)."""

from __future__ import annotations

import json
import random

import jsonschema
import openai
import pytest
import server_harness
from server_harness import real_server

from logitlab.sampling import ParamError
from logitlab.server import tools
from logitlab.server.schemas import ChatRequest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
# finite argument grammars: even a random model completes a call of these
SWITCH = {"type": "function", "function": {
    "name": "set_light", "parameters": {"type": "object", "properties": {
        "room": {"enum": ["kitchen", "hall", "attic"]}, "on": {"type": "boolean"}}, "required": ["room", "on"]}}}
MODE = {"type": "function", "function": {
    "name": "set_mode", "parameters": {"type": "object", "properties": {"mode": {"enum": ["eco", "turbo"]}},
                                       "required": ["mode"]}}}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD, SWITCH, MODE)}


def _plan(tool_list, choice=None, parallel=None) -> tools.ToolPlan:
    body = ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "tools": tool_list,
                                       **({"tool_choice": choice} if choice is not None else {}),
                                       **({"parallel_tool_calls": parallel} if parallel is not None else {})})
    return tools.plan(body)


def _check_call(name: str, arguments: str) -> dict:
    """A call is one of the tools, its arguments JSON matching that tool's parameters schema."""
    assert name in PARAMS, name
    args = json.loads(arguments)
    jsonschema.validate(args, PARAMS[name])
    return args


def _assemble(deltas: list[dict]) -> dict:
    """OpenAI's streaming rule: content pieces concatenate; tool_calls merge by index (id/name once,
    arguments concatenated)."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content") or ""
        for e in d.get("tool_calls") or []:
            c = calls.setdefault(e["index"], {"id": None, "name": None, "arguments": ""})
            c["id"] = e.get("id") or c["id"]
            c["name"] = (e.get("function") or {}).get("name") or c["name"]
            c["arguments"] += (e.get("function") or {}).get("arguments") or ""
    return {"content": content, "calls": [calls[i] for i in sorted(calls)]}


def _read_in_pieces(tool_plan, text: str, cuts: list[int]):
    r = tools.reader(tool_plan)
    deltas, last = [], 0
    for c in [*cuts, len(text)]:
        deltas.append(r.feed(text[last:c]))
        last = c
    deltas.append(r.close())
    return r, _assemble(deltas)


# ---- the call schema ---------------------------------------------------------------------------------------

def test_call_schema_accepts_exactly_calls_of_the_tools():
    one = tools.call_schema(_plan([WEATHER, ADD], "required", parallel=False))
    jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, one)
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, one)
    for bad in ({"name": "add", "arguments": {"a": "1", "b": 2}},  # wrong type
                {"name": "add", "arguments": {"a": 1}},  # missing required
                {"name": "mul", "arguments": {"a": 1, "b": 2}},  # not a tool
                {"name": "add"},  # no arguments
                [{"name": "add", "arguments": {"a": 1, "b": 2}}]):  # a list when one call is asked for
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, one)
    many = tools.call_schema(_plan([WEATHER, ADD], "required"))
    jsonschema.validate([{"name": "add", "arguments": {"a": 1, "b": 2}},
                         {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}], many)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], many)  # at least one call
    named = tools.call_schema(_plan([WEATHER, ADD], {"type": "function", "function": {"name": "add"}}))
    jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, named)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, named)


def test_call_schema_keeps_each_tools_refs_pointing_into_its_own_defs():
    point = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    t1 = {"type": "function", "function": {"name": "move", "parameters": {
        "type": "object", "$defs": {"P": point}, "properties": {"to": {"$ref": "#/$defs/P"}}, "required": ["to"]}}}
    t2 = {"type": "function", "function": {"name": "say", "parameters": {
        "type": "object", "$defs": {"P": {"type": "string"}}, "properties": {"text": {"$ref": "#/$defs/P"}},
        "required": ["text"]}}}
    schema = tools.call_schema(_plan([t1, t2], "required", parallel=False))
    jsonschema.validate({"name": "move", "arguments": {"to": {"x": 3}}}, schema)
    jsonschema.validate({"name": "say", "arguments": {"text": "hi"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "move", "arguments": {"to": "hi"}}, schema)  # move's P, not say's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "say", "arguments": {"text": {"x": 3}}}, schema)


def test_plan_rules():
    with pytest.raises(ParamError) as e:
        _plan([])
    assert e.value.field == "tools"
    bad_name = {"type": "function", "function": {"name": "get weather"}}
    with pytest.raises(ParamError, match="function.name"):
        _plan([bad_name])
    with pytest.raises(ParamError, match="two tools"):
        _plan([ADD, ADD])
    with pytest.raises(ParamError, match="type 'object'"):
        _plan([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}])
    with pytest.raises(ParamError, match="not a valid JSON schema"):
        _plan([{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "integr"}}}}}])
    with pytest.raises(ParamError) as e:
        _plan([ADD], {"type": "function", "function": {"name": "mul"}})
    assert e.value.field == "tool_choice"
    p = _plan([{"type": "function", "function": {"name": "ping"}}, ADD])
    assert p.choice == "auto" and p.parallel and p.functions[0]["parameters"] == {"type": "object", "properties": {}}
    assert _plan([ADD], "required", parallel=False).parallel is False


def test_check_shape_without_jsonschema():
    tools.check_shape({"type": "object", "properties": {"a": {"type": ["integer", "null"]},
                                                        "b": {"anyOf": [{"type": "string"}, {"enum": [1, 2]}]},
                                                        "c": {"type": "array", "items": {"type": "boolean"}}},
                       "required": ["a"], "additionalProperties": False})
    for bad, where in (({"type": "object", "properties": {"a": {"type": "integr"}}}, "/properties/a"),
                       ({"type": "object", "properties": []}, "at /"),
                       ({"type": "object", "required": "a"}, "at /"),
                       ({"type": "object", "properties": {"a": {"anyOf": []}}}, "/properties/a"),
                       ({"type": "object", "properties": {"a": {"items": 3}}}, "/properties/a/items")):
        with pytest.raises(ValueError, match=where):
            tools.check_shape(bad)


# ---- reading the output ------------------------------------------------------------------------------------


def _auto(parallel=None):
    return _plan([WEATHER, ADD], "auto", parallel)


@pytest.mark.parametrize("text,content,calls", [
    ("The answer is 4.", "The answer is 4.", []),
    ('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 2}}</tool_call>', None, [("add", {"a": 2, "b": 2})]),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
     '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>  ',
     "Let me check.", [("get_weather", {"city": "Oslo"}), ("add", {"a": 1, "b": 2})]),
    ('{"name": "add", "parameters": {"a": 5, "b": 6}}', None, [("add", {"a": 5, "b": 6})]),  # Llama 3.1's JSON
    ('[{"name": "add", "arguments": {"a": 1, "b": 1}}, '
     '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}]',
     None, [("add", {"a": 1, "b": 1}), ("get_weather", {"city": "Rome"})]),
    ('{"tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 0, "b": 9}}}]}', None,
     [("add", {"a": 0, "b": 9})]),
    ('{"answer": 42}', '{"answer": 42}', []),  # JSON, but not a call
    ('<tool_call>{"name": "mul", "arguments": {}}</tool_call> ok', '<tool_call>{"name": "mul", "arguments": {}}'
     '</tool_call> ok', []),  # not one of the tools: stays content
    ('x <tool_call>{"name": "add", "arguments": {"a": 1,', 'x <tool_call>{"name": "add", "arguments": {"a": 1,', []),
    ('<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}', None, [("add", {"a": 3, "b": 4})]),  # unclosed
    ("a < b and <tool_ca", "a < b and <tool_ca", []),
])
def test_auto_reader(text, content, calls):
    p = _auto()
    whole = tools.reader(p)
    whole.feed(text)
    whole.close()
    msg = whole.message()
    assert msg["content"] == content
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg.get("tool_calls", [])]
    assert got == calls
    assert whole.finish_reason("stop") == ("tool_calls" if calls else "stop")
    assert whole.finish_reason("length") == "length"
    # streamed in any pieces, the deltas put together are the message
    rng = random.Random(len(text))
    for cuts in [list(range(1, len(text))), sorted(rng.sample(range(1, len(text)), min(5, len(text) - 1)))]:
        r, asm = _read_in_pieces(p, text, cuts)
        assert asm["content"] == (content or "")
        assert [(c["name"], json.loads(c["arguments"])) for c in asm["calls"]] == calls
        assert [c["id"] for c in asm["calls"]] == [c["id"] for c in r.calls]


def test_auto_reader_one_call_without_parallel_calls():
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>')
    r = tools.reader(_auto(parallel=False))
    r.feed(text)
    r.close()
    assert [json.loads(c["function"]["arguments"]) for c in r.message()["tool_calls"]] == [{"a": 1, "b": 2}]


def test_forced_reader_streams_arguments_as_generated():
    p = _plan([WEATHER, ADD], "required")
    text = '[{"name": "get_weather", "arguments": {"city": "S\\"o }{ ]", "unit": "celsius"}}, ' \
           '{"name": "add", "arguments": {"a": -1, "b": 20}}]'
    r = tools.reader(p)
    deltas = [r.feed(ch) for ch in text] + [r.close()]
    # the first call is announced once its name is read, before its arguments are complete
    first = next(i for i, d in enumerate(deltas) if d.get("tool_calls"))
    assert text[:first + 1].endswith('"get_weather"')
    assert deltas[first]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    asm = _assemble(deltas)
    assert asm["content"] == ""
    assert [(c["name"], c["arguments"]) for c in asm["calls"]] == [
        ("get_weather", '{"city": "S\\"o }{ ]", "unit": "celsius"}'), ("add", '{"a": -1, "b": 20}')]
    msg = r.message()
    assert msg["content"] is None and [c["function"]["arguments"] for c in msg["tool_calls"]] == \
        [c["arguments"] for c in asm["calls"]]
    single = tools.reader(_plan([ADD], {"type": "function", "function": {"name": "add"}}))
    single.feed('{"name": "add", "arguments": {"a": 1, "b": 2}}')
    single.close()
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in single.calls] == [("add", '{"a": 1, "b": 2}')]
    cut = tools.reader(p)  # cut short before a name: the text is the content
    cut.feed('[{"na')
    assert cut.close() == {"content": '[{"na'}


# ---- the prompt --------------------------------------------------------------------------------------------

HISTORY = [
    {"role": "user", "content": "What is 1 + 2?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {"name": "add", "arguments": args}}
                    for i, args in ((1, '{"a": 1, "b": 2}'), (2, '{"a": 2, "b": 2}'))]},
    {"role": "tool", "content": "3", "tool_call_id": "call_1"},
    {"role": "tool", "content": "4", "tool_call_id": "call_2"},
]


def test_history_as_text_for_a_template_without_tools():
    msgs, variables = tools.conversation(HISTORY, _plan([ADD], "auto"), "{{ messages }}")
    assert variables == {}
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert '"name": "add"' in msgs[0]["content"] and "<tool_call>" in msgs[0]["content"]
    assert msgs[2]["content"] == ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
                                  '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 2}}</tool_call>')
    assert msgs[3]["content"] == ('<tool_response>{"name": "add", "content": "3"}</tool_response>\n'
                                  '<tool_response>{"name": "add", "content": "4"}</tool_response>')
    # tool_choice none: no tool description, the history still rendered
    none_msgs, _ = tools.conversation(HISTORY, _plan([ADD], "none"), "{{ messages }}")
    assert [m["role"] for m in none_msgs] == ["user", "assistant", "user"]
    plain = [{"role": "user", "content": "hi"}]
    assert tools.conversation(plain, None, "{{ messages }}") == (plain, {})


def test_history_for_a_template_with_tools():
    template = ("{% for t in tools or [] %}{{ t.function.name }};{% endfor %}"
                "{% for m in messages %}{{ m.role }}{% endfor %}")
    assert tools.template_knows_tools(template) and not tools.template_knows_tools("{{ messages }}")
    msgs, variables = tools.conversation(HISTORY, _plan([ADD], "auto"), template)
    assert variables == {"tools": [ADD]}
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}  # an object, as transformers
    assert msgs[2] == {"role": "tool", "content": "3", "tool_call_id": "call_1", "name": "add"}


# ---- the server: errors ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(real_tokenizer):
    """A tiny random model over the real tokenizer with room for the tools' description (1024 positions)."""
    from logitlab.engine import Engine
    from logitlab.server.app import create_app

    from tiny import tiny_model

    def make():
        model = tiny_model(seed=0, vocab_size=real_tokenizer.vocab_size, context_length=1024)
        return create_app(Engine(model, real_tokenizer, name="tiny", max_batch=8, max_len=1024))

    return server_harness._get("tools-tiny", make)


@pytest.fixture(scope="module")
def client(tiny):
    return openai.OpenAI(base_url=tiny.url + "/v1", api_key="unused", max_retries=0, timeout=120)


USER = [{"role": "user", "content": "Turn on the kitchen light"}]


@pytest.mark.parametrize("extra,param", [
    ({"tools": {"type": "function"}}, "tools"),  # not a list
    ({"tools": []}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "properties": {"a": {"type": 5}}}}}]},
     "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "mul"}}}, "tool_choice"),
    ({"tools": [ADD], "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"tools": [ADD], "tool_choice": "required", "guided_regex": "[0-9]+"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {  # valid, but the $ref leads nowhere
        "type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}}}], "tool_choice": "required"}, "tools"),
    ({"messages": [*USER, {"role": "tool", "content": "3"}]}, "messages"),  # no tool_call_id
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{}"}}]}]}, "messages"),
])
def test_bad_tools_are_400(tiny, extra, param):
    import httpx

    r = httpx.post(tiny.url + "/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 2,
                                                            **extra}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_bad_tools_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, tools=[SWITCH],
                                       tool_choice={"type": "function", "function": {"name": "set_mode"}})
    assert e.value.body["param"] == "tool_choice" and "set_mode" in e.value.body["message"]


# ---- the server: calls --------------------------------------------------------------------------------------

def _stream(client, **kw):
    deltas, finish, ids = {}, {}, {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            deltas.setdefault(ch.index, []).append(ch.delta.model_dump(exclude_none=True))
            ids.setdefault(ch.index, []).extend((ch.model_extra or {}).get("token_ids") or [])
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    return {i: _assemble(d) for i, d in deltas.items()}, finish


def _as_plain(message) -> dict:
    calls = message.tool_calls or []
    return {"content": message.content or "", "calls": [(c.function.name, c.function.arguments) for c in calls]}


@pytest.mark.parametrize("choice,parallel", [("required", False), ({"type": "function",
                                                                    "function": {"name": "set_mode"}}, None),
                                             ("required", True)])
def test_constrained_calls_from_a_random_model_match_the_schema(client, choice, parallel):
    """Even a random model's calls are valid under required / named; streamed = non-streamed."""
    kw = dict(model="tiny", messages=USER, tools=[SWITCH, MODE], tool_choice=choice, max_tokens=120,
              temperature=1.0, seed=5, n=2)
    if parallel is not None:
        kw["parallel_tool_calls"] = parallel
    r = client.chat.completions.create(**kw)
    for c in r.choices:
        calls = c.message.tool_calls
        assert calls and c.message.content is None
        if c.finish_reason == "length":  # a list of calls cut short: every call but the last is complete
            assert parallel is not False
            calls = calls[:-1]
        else:
            assert c.finish_reason == "tool_calls"
        if parallel is False or isinstance(choice, dict):
            assert len(c.message.tool_calls) == 1
        if isinstance(choice, dict):
            assert c.message.tool_calls[0].function.name == "set_mode"
        for call in calls:
            assert call.type == "function" and call.id.startswith("call_")
            _check_call(call.function.name, call.function.arguments)
        assert len({call.id for call in c.message.tool_calls}) == len(c.message.tool_calls)
    streamed, finish = _stream(client, **kw)
    for c in r.choices:
        s = streamed[c.index]
        assert {"content": s["content"], "calls": [(x["name"], x["arguments"]) for x in s["calls"]]} == \
            _as_plain(c.message)
        assert finish[c.index] == c.finish_reason


REGEX_CALLS = (r'Sure\.\n<tool_call>\{"name": "set_light", "arguments": \{"room": "hall", "on": true\}\}</tool_call>'
               r'\n<tool_call>\{"name": "set_mode", "arguments": \{"mode": "eco"\}\}</tool_call>')


def test_auto_reads_calls_and_none_never_does(client):
    """The output forced (guided_regex) to two Hermes-style calls: auto returns them as tool_calls, streamed
    or not; none returns the same text as content, exactly as a request without tools does."""
    kw = dict(model="tiny", messages=USER, max_tokens=200, temperature=0, extra_body={"guided_regex": REGEX_CALLS})
    auto = client.chat.completions.create(tools=[SWITCH, MODE], **kw).choices[0]
    assert auto.finish_reason == "tool_calls" and auto.message.content == "Sure."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in auto.message.tool_calls] == \
        [("set_light", {"room": "hall", "on": True}), ("set_mode", {"mode": "eco"})]
    streamed, finish = _stream(client, tools=[SWITCH, MODE], **kw)
    assert finish == {0: "tool_calls"}
    assert {"content": streamed[0]["content"], "calls": [(x["name"], x["arguments"]) for x in streamed[0]["calls"]]} \
        == _as_plain(auto.message)
    one = client.chat.completions.create(tools=[SWITCH, MODE], parallel_tool_calls=False, **kw).choices[0]
    assert [c.function.name for c in one.message.tool_calls] == ["set_light"]
    none = client.chat.completions.create(tools=[SWITCH, MODE], tool_choice="none", **kw).choices[0]
    plain = client.chat.completions.create(**kw).choices[0]
    assert none.message.tool_calls is None and none.finish_reason == "stop"
    assert none.message.content == plain.message.content and "<tool_call>" in none.message.content
    streamed_none, _ = _stream(client, tools=[SWITCH, MODE], tool_choice="none", **kw)
    assert streamed_none[0] == {"content": plain.message.content, "calls": []}
    # tool_choice none with a random model, unconstrained: no calls either
    free = client.chat.completions.create(model="tiny", messages=USER, tools=[SWITCH, MODE], tool_choice="none",
                                          max_tokens=8, seed=1, n=3)
    assert all(c.message.tool_calls is None for c in free.choices)


def test_history_with_calls_and_results_renders(tiny, client):
    """An assistant message with tool_calls (as the client returned it) and tool results are accepted and
    rendered in the fallback text format (SmolLM2's template knows no tools)."""
    import httpx

    r = client.chat.completions.create(model="tiny", messages=USER, tools=[SWITCH], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=60, seed=2)
    msg = r.choices[0].message
    call = msg.tool_calls[0]
    history = [*USER, msg, {"role": "tool", "tool_call_id": call.id, "content": "done"}]
    again = client.chat.completions.create(model="tiny", messages=history, tools=[SWITCH], max_tokens=4, seed=2)
    assert again.choices[0].message.role == "assistant"
    dicts = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "set_light",
                                                          "arguments": '{"room": "attic", "on": false}'}}]},
             {"role": "tool", "tool_call_id": "call_9", "content": "the attic is dark"}]
    tok = httpx.post(tiny.url + "/tokenize", json={"model": "tiny", "messages": dicts}, timeout=30).json()
    text = tiny.engine.tokenizer.decode(tok["tokens"])
    assert ('<|im_start|>assistant\n<tool_call>{"name": "set_light", "arguments": {"room": "attic", "on": false}}'
            '</tool_call><|im_end|>') in text
    assert ('<|im_start|>user\n<tool_response>{"name": "set_light", "content": "the attic is dark"}'
            '</tool_response><|im_end|>') in text


# ---- LangChain ---------------------------------------------------------------------------------------------

def test_langchain_bind_tools_and_structured_output(tiny):
    from typing import Literal

    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    llm = ChatOpenAI(model="tiny", base_url=tiny.url + "/v1", api_key="unused", max_retries=0, timeout=120,
                     temperature=0, max_tokens=60)

    class Light(BaseModel):
        """Switch a room's light."""

        room: Literal["kitchen", "hall", "attic"]
        on: bool

    got = llm.with_structured_output(Light, method="function_calling").invoke("Turn on the hall light")
    assert isinstance(got, Light)
    bound = llm.bind_tools([SWITCH, MODE], tool_choice="set_mode")
    ai = bound.invoke([HumanMessage("eco mode please")])
    assert [c["name"] for c in ai.tool_calls] == ["set_mode"]
    jsonschema.validate(ai.tool_calls[0]["args"], PARAMS["set_mode"])
    chunks = list(bound.stream([HumanMessage("eco mode please")]))  # LangChain merges the streamed deltas
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(c["name"], c["args"]) for c in ai.tool_calls]
    # the call and its result go back as history
    follow = bound.invoke([HumanMessage("eco mode please"), ai,
                           ToolMessage("mode set", tool_call_id=ai.tool_calls[0]["id"])])
    assert follow.tool_calls and follow.tool_calls[0]["name"] == "set_mode"
    # auto: whatever the model says is either text or valid calls
    auto = llm.bind_tools([SWITCH, MODE]).invoke("hello")
    for c in auto.tool_calls:
        jsonschema.validate(c["args"], PARAMS[c["name"]])


# ---- the real model ----------------------------------------------------------------------------------------

@pytest.mark.real_model
def test_real_model_calls(real_engine):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    s = real_server(real_engine)
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": "What is the weather like in Paris?"}]
    kw = dict(model="smollm2-135m-instruct", messages=msgs, tools=[WEATHER, ADD], tool_choice="required",
              parallel_tool_calls=False, max_tokens=40, temperature=0)
    r = client.chat.completions.create(**kw).choices[0]
    assert r.finish_reason == "tool_calls" and len(r.message.tool_calls) == 1
    call = r.message.tool_calls[0]
    args = _check_call(call.function.name, call.function.arguments)
    assert call.function.name == "get_weather" and args["city"] == "Paris"
    streamed, finish = _stream(client, **kw)
    assert finish == {0: "tool_calls"}
    assert [(c["name"], c["arguments"]) for c in streamed[0]["calls"]] == _as_plain(r.message)["calls"]
    named = client.chat.completions.create(**{**kw, "messages": [{"role": "user", "content": "Add 2 and 3"}],
                                              "tool_choice": {"type": "function", "function": {"name": "add"}}})
    c = named.choices[0].message.tool_calls[0]
    assert c.function.name == "add" and _check_call("add", c.function.arguments) == {"a": 2, "b": 3}

    class Weather(BaseModel):
        """The weather question's city."""

        city: str

    llm = ChatOpenAI(model="smollm2-135m-instruct", base_url=s.url + "/v1", api_key="unused", max_retries=0,
                     temperature=0, max_tokens=40)
    w = llm.with_structured_output(Weather, method="function_calling").invoke("Is it raining in Berlin?")
    assert isinstance(w, Weather) and w.city == "Berlin"
