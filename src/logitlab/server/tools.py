"""Tool calling on ``/v1/chat/completions``: OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls``.

``tool_choice`` (default ``auto`` when tools are given):

- ``none``: the tools stay out of the prompt and the output is never read as calls; it is the content.
- ``auto``: the tools go into the prompt and the model decides. Its text is read for calls (``AutoReader``):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes' format, which Qwen and
  SmolLM3 use), the text around them being the content; or an answer that is JSON and nothing else: one
  call (``arguments`` or Llama 3.1's ``parameters``), a list of calls, or ``{"tool_calls": [...]}``. A
  block that is not a call of one of the tools (bad JSON, an unknown name) stays in the content.
- ``required`` and a named function (``{"type": "function", "function": {"name": ...}}``): constrained
  decoding. ``call_schema`` builds one JSON schema, ``{"name": <a tool's name>, "arguments": <that tool's
  parameters>}`` (an ``anyOf`` over the tools; a list of one or more such calls when ``required`` with
  ``parallel_tool_calls``, the default; the named function alone, one call, when named), which runs as the
  request's constraint in the scheduler as ``guided_json`` does: the calls are valid JSON matching the
  schemas whatever the model, unless ``max_tokens`` cuts them short (``finish_reason`` ``length``).

With ``parallel_tool_calls: false`` at most one call is returned (``auto``: the first). A choice that makes
calls has ``content`` null (``auto``: the text around the calls, if any), ``tool_calls`` and
``finish_reason`` ``tool_calls``. Streamed, the calls arrive as ``delta.tool_calls`` in OpenAI's format
(``index``, then ``id``, ``type`` and ``function.name`` once, then ``function.arguments`` in pieces): a
constrained call as its arguments are generated, an ``auto`` block once it is closed. The same reader turns
the whole text into the non-streamed message, so the deltas put together are that message.

The prompt: a chat template that reads a ``tools`` variable (Qwen2.5, Llama 3.1, Hermes...) gets ``tools``
as OpenAI's list, and the history as transformers passes it (an assistant's ``tool_calls`` with
``function.arguments`` parsed into an object; ``tool`` messages with ``tool_call_id`` and the function's
``name``). A template that does not (SmolLM2's) gets plain messages (``as_text``): the tools described in
the system message (``preamble``), an assistant's calls as the ``<tool_call>`` lines it is asked to write
(after its content), and each run of ``tool`` messages as one user turn of
``<tool_response>{"name": ..., "content": ...}</tool_response>`` lines.

Checked before any work (400 naming the field): ``tools`` a non-empty list of at most ``MAX_TOOLS``
functions with distinct names of 1-64 letters, digits, ``_`` or ``-``, each ``parameters`` a JSON schema
(checked against JSON Schema's meta-schema when ``jsonschema`` is installed, else its shape) of type
``object`` (``{}`` or none: no arguments); a named function among them; ``tool_choice`` (other than
``none``) and ``parallel_tool_calls`` only with ``tools``; ``required`` / named not together with another
constraint or decoding driver (``guided_*``, ``response_format``, beam search...); ``auto`` and ``none`` may
be. A function's ``strict`` is accepted: ``required`` / named calls always match the schema exactly
(xgrammar's strict mode: no properties beyond the schema's), ``auto`` calls are not checked against it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache

from ..sampling import ParamError

MAX_TOOLS = 128  # OpenAI's limit
TAG_OPEN, TAG_CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


# ---- the request: which tools, which choice -------------------------------------------------------------

@dataclass(frozen=True)
class ToolPlan:
    """What a request asks of tool calling. ``functions``: ``{"name", "description", "parameters"}`` per
    tool (parameters always a schema of type object); ``choice``: ``none`` | ``auto`` | ``required`` |
    ``named`` (``named`` is then the function's name)."""

    functions: tuple[dict, ...]
    choice: str
    parallel: bool = True
    named: str | None = None

    @property
    def names(self) -> set[str]:
        return {f["name"] for f in self.functions}

    @property
    def forced(self) -> bool:
        """The output is a call by construction (constrained decoding)."""
        return self.choice in ("required", "named")

    @property
    def many(self) -> bool:
        """The constrained output is a list of calls (``required`` with parallel calls)."""
        return self.choice == "required" and self.parallel

    def openai_tools(self) -> list[dict]:
        return [{"type": "function", "function": dict(f)} for f in self.functions]

    def spec(self):
        """The constraint for ``required`` / named (a ``ConstraintSpec``), else None."""
        if not self.forced:
            return None
        from ..decoding.constraints import ConstraintSpec

        return ConstraintSpec("json_schema", json.dumps(call_schema(self), ensure_ascii=False))


def plan(body) -> ToolPlan | None:
    """The request's ``ToolPlan`` (None without tools); ParamError for what OpenAI's API refuses."""
    choice, parallel = body.tool_choice, body.parallel_tool_calls
    if body.tools is None:
        if choice is not None and choice != "none":
            raise ParamError("tool_choice", "is only allowed when tools are given")
        if parallel is not None:
            raise ParamError("parallel_tool_calls", "is only allowed when tools are given")
        return None
    if not body.tools:
        raise ParamError("tools", "must not be empty (leave it out for no tools)")
    if len(body.tools) > MAX_TOOLS:
        raise ParamError("tools", f"at most {MAX_TOOLS} tools, got {len(body.tools)}")
    functions, seen = [], set()
    for i, tool in enumerate(body.tools):
        fn = tool.function
        if not _NAME.fullmatch(fn.name):
            raise ParamError("tools", f"tools[{i}].function.name must be 1 to 64 letters, digits, '_' or '-', "
                                      f"got {fn.name[:80]!r}")
        if fn.name in seen:
            raise ParamError("tools", f"two tools are named {fn.name!r}")
        seen.add(fn.name)
        out = {"name": fn.name, "parameters": check_parameters(fn.parameters, f"tools[{i}].function.parameters")}
        if fn.description is not None:
            out = {"name": fn.name, "description": fn.description, "parameters": out["parameters"]}
        functions.append(out)
    named = None
    if choice is None:
        choice = "auto"
    elif not isinstance(choice, str):
        named, choice = choice.function.name, "named"
        if named not in seen:
            raise ParamError("tool_choice", f"names the function {named[:80]!r}, which is not in tools")
    return ToolPlan(tuple(functions), choice, parallel is not False, named)


def check_drivers(tool_plan: ToolPlan | None, opts) -> None:
    """``required`` / named is a constraint of its own: not with another one, nor with a decoding driver."""
    if tool_plan is not None and tool_plan.forced and opts is not None:
        raise ParamError("tool_choice", f"{tool_plan.choice!r} constrains the output to a tool call; it cannot be "
                                        "combined with guided_* / response_format or a decoding driver")


async def compile_calls(compile_spec, tool_plan: ToolPlan, max_bytes: int):
    """The call schema compiled by the app's ``compile_spec(spec, rf)`` (a worker, a cache), at most
    ``max_bytes`` of JSON as guided_json is (--max-guided-bytes); its errors name ``tools``."""
    spec = tool_plan.spec()
    size = len(spec.value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise ParamError("tools", f"make a call schema of {size} bytes; this server takes at most {max_bytes} "
                                  "(--max-guided-bytes)")
    try:
        return await compile_spec(spec, None)
    except ParamError as e:
        reason = re.sub(r"\S+\.cc:\d+: ", "", e.reason)  # xgrammar's source location
        raise ParamError("tools", f"the call schema made from them: {reason}") from None


def check_parameters(schema: dict | None, where: str) -> dict:
    """A function's ``parameters``: a JSON schema of type object (``{}`` or none: no arguments)."""
    if not schema:
        return {"type": "object", "properties": {}}
    if schema.get("type") != "object":
        raise ParamError("tools", f"{where} must be a JSON schema of type 'object', got type "
                                  f"{str(schema.get('type'))[:40]!r}")
    try:
        _check_meta(schema)
    except RecursionError:
        raise ParamError("tools", f"{where} is nested too deeply") from None
    except ValueError as e:
        raise ParamError("tools", f"{where} is not a valid JSON schema: {e}") from None
    return schema


def _check_meta(schema: dict) -> None:
    """ValueError unless ``schema`` is a valid JSON schema (jsonschema's meta-schema check when installed)."""
    try:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError
    except ImportError:
        return check_shape(schema)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        path = "/".join(str(p) for p in e.path)
        raise ValueError(f"{e.message[:200]}{f' (at {path})' if path else ''}") from None


def check_shape(schema, path: str = "") -> None:
    """The meta-schema's main rules, without jsonschema: ``type`` a type name or a list of them;
    ``properties`` / ``$defs`` objects of schemas; ``required`` a list of strings; ``items``,
    ``additionalProperties`` and ``not`` schemas; ``anyOf`` / ``oneOf`` / ``allOf`` non-empty lists of
    schemas; ``enum`` a list. ValueError naming the place otherwise."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"{schema!r:.40} is not a schema (at {path or '/'})")
    t = schema.get("type")
    if t is not None and not (t in _TYPES if isinstance(t, str) else isinstance(t, list) and t
                              and all(isinstance(x, str) and x in _TYPES for x in t)):
        raise ValueError(f"type {t!r:.40} is not one of {', '.join(sorted(_TYPES))} (at {path or '/'})")
    for key in ("properties", "$defs", "definitions"):
        if key in schema:
            if not isinstance(schema[key], dict):
                raise ValueError(f"{key} must be an object (at {path or '/'})")
            for name, sub in schema[key].items():
                check_shape(sub, f"{path}/{key}/{name}")
    req = schema.get("required")
    if req is not None and not (isinstance(req, list) and all(isinstance(x, str) for x in req)):
        raise ValueError(f"required must be a list of strings (at {path or '/'})")
    for key in ("items", "additionalProperties", "not"):
        if key in schema:
            check_shape(schema[key], f"{path}/{key}")
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            if not isinstance(schema[key], list) or not schema[key]:
                raise ValueError(f"{key} must be a non-empty list (at {path or '/'})")
            for j, sub in enumerate(schema[key]):
                check_shape(sub, f"{path}/{key}/{j}")
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise ValueError(f"enum must be a list (at {path or '/'})")


def call_schema(tool_plan: ToolPlan) -> dict:
    """The JSON schema of the constrained output: ``{"name": N, "arguments": <N's parameters>}`` for one of
    the tools (the named one), or a list of one or more such calls. Each tool's parameters sit in ``$defs``
    with their own ``$ref``s rebased there, so a schema's ``#/$defs/...`` still points into itself."""
    functions = [f for f in tool_plan.functions if tool_plan.named in (None, f["name"])]
    defs = {f"tool{i}": _rebase(f["parameters"], f"/$defs/tool{i}") for i, f in enumerate(functions)}
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                               "arguments": {"$ref": f"#/$defs/tool{i}"}},
              "required": ["name", "arguments"], "additionalProperties": False} for i, f in enumerate(functions)]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if tool_plan.many:
        return {"type": "array", "items": call, "minItems": 1, "$defs": defs}
    return {**call, "$defs": defs}


def _rebase(schema, prefix: str):
    """``schema`` with every local ``$ref`` ("#...") moved under the JSON pointer ``prefix``."""
    if isinstance(schema, dict):
        return {k: ("#" + prefix + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#")
                    else _rebase(v, prefix)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rebase(v, prefix) for v in schema]
    return schema


# ---- the prompt ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def template_knows_tools(template: str | None) -> bool:
    """Whether a chat template reads a ``tools`` variable (it then renders tools, calls and results itself)."""
    if not template:
        return False
    try:
        from jinja2 import Environment, meta

        env = Environment(extensions=["jinja2.ext.loopcontrols"])
        return "tools" in meta.find_undeclared_variables(env.parse(template))
    except Exception:  # noqa: BLE001 - a template jinja2 cannot parse renders nothing either: the fallback
        return False


def conversation(messages: list[dict], tool_plan: ToolPlan | None, template: str | None) -> tuple[list, dict]:
    """(messages, extra template variables) for the request's conversation: ``messages`` are
    ``schemas.Message.as_dict()``s. Unchanged when no tools and no tool calls are involved."""
    for i, m in enumerate(messages):  # OpenAI's rules for the history
        if m["role"] == "tool" and not m.get("tool_call_id"):
            raise ParamError("messages", f"messages[{i}]: a tool message needs tool_call_id (the call it answers)")
        if m.get("tool_calls") and m["role"] != "assistant":
            raise ParamError("messages", f"messages[{i}]: only assistant messages have tool_calls")
    tools = tool_plan.openai_tools() if tool_plan is not None and tool_plan.choice != "none" else None
    has_calls = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if not tools and not has_calls:
        return messages, {}
    if template_knows_tools(template):
        return for_template(messages), ({"tools": tools} if tools else {})
    out = as_text(messages)
    if tools:
        text = preamble(tool_plan)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}" if out[0]["content"] else text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, {}


def _call_names(messages: list[dict]) -> dict[str, str]:
    """tool_call_id -> the function's name, from the assistants' calls."""
    return {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()}


def _arguments(text: str):
    """A call's ``arguments`` (JSON text) as an object for a template; the text itself if it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def for_template(messages: list[dict]) -> list[dict]:
    """Messages as transformers passes them to a template that knows tools."""
    names, out = _call_names(messages), []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {"name": c["function"]["name"],
                                                  "arguments": _arguments(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        if m["role"] == "tool" and m.get("tool_call_id") in names:
            m["name"] = names[m["tool_call_id"]]
        out.append(m)
    return out


def call_text(name: str, arguments: str) -> str:
    """One call in the fallback format (the arguments' JSON text as it is)."""
    try:
        json.loads(arguments)
    except ValueError:
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f'{TAG_OPEN}{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {arguments}}}{TAG_CLOSE}'


def as_text(messages: list[dict]) -> list[dict]:
    """The conversation in plain roles for a template without tools: calls as ``<tool_call>`` lines after
    the assistant's content; each run of tool results as one user turn of ``<tool_response>`` lines."""
    names, out = _call_names(messages), []
    for m in messages:
        if m["role"] == "tool":
            result = {"name": names[m["tool_call_id"]]} if m.get("tool_call_id") in names else {}
            line = f"<tool_response>{json.dumps({**result, 'content': m['content']}, ensure_ascii=False)}" \
                   "</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + line
            else:
                out.append({"role": "user", "content": line, "tool_results": True})
            continue
        text = m["content"]
        if m.get("tool_calls"):
            calls = "\n".join(call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
            text = f"{text}\n{calls}" if text else calls
        out.append({"role": m["role"], "content": text})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def preamble(tool_plan: ToolPlan) -> str:
    """The system text that describes the tools and the call format, for a template without tools."""
    tools = "\n".join(json.dumps(t, ensure_ascii=False) for t in tool_plan.openai_tools())
    head = f"You can call functions (tools). The tools, one JSON object each:\n<tools>\n{tools}\n</tools>\n"
    if tool_plan.forced:
        what = f"the function {tool_plan.named}" if tool_plan.named else "one of the tools"
        form = '[{"name": <tool name>, "arguments": <arguments object>}, ...]' if tool_plan.many else \
            '{"name": <tool name>, "arguments": <arguments object>}'
        return head + f"Answer only with a call of {what}, as JSON: {form}"
    many = "one line per call, each" if tool_plan.parallel else "one call (at most),"
    return head + (f"To call a tool, answer with {many} exactly\n"
                   f'{TAG_OPEN}{{"name": <tool name>, "arguments": <arguments object>}}{TAG_CLOSE}\n'
                   "The results come back in <tool_response> tags. If no tool is needed, answer in plain text.")


# ---- the output: content and calls, token by token ----------------------------------------------------------

class _Reader:
    """One choice's output read into content and tool calls as it is generated. ``feed`` / ``close`` return
    the chat-chunk ``delta`` that the new text adds (``content`` and/or ``tool_calls``, possibly ``{}``);
    ``message()`` is everything so far as a non-streamed message. The content given out is the decided
    content text with leading and trailing whitespace held back (so it is the final content, stripped)."""

    def __init__(self, tool_plan: ToolPlan):
        self.plan = tool_plan
        self.calls: list[dict] = []  # {"id", "type", "function": {"name", "arguments"}}
        self.content = ""  # content given out
        self._raw = ""  # content decided (unstripped)
        self._pieces: list[tuple] = []  # ("content", text) | ("call", i) | ("args", i, text)

    # what subclasses call
    def _add_content(self, text: str) -> None:
        self._raw += text
        target = self._raw.lstrip().rstrip()
        if len(target) > len(self.content):
            self._pieces.append(("content", target[len(self.content):]))
            self.content = target

    def _add_call(self, name: str, arguments: str = "") -> int:
        i = len(self.calls)
        self.calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                           "function": {"name": name, "arguments": ""}})
        self._pieces.append(("call", i))
        self._add_args(i, arguments)
        return i

    def _add_args(self, i: int, text: str) -> None:
        if text:
            self.calls[i]["function"]["arguments"] += text
            self._pieces.append(("args", i, text))

    def _delta(self) -> dict:
        delta: dict = {}
        entries: list[dict] = []
        for piece in self._pieces:
            if piece[0] == "content":
                delta["content"] = delta.get("content", "") + piece[1]
                continue
            i = piece[1]
            if not entries or entries[-1]["index"] != i:
                entries.append({"index": i, "function": {}})
            entry = entries[-1]
            if piece[0] == "call":
                c = self.calls[i]
                entry.update(id=c["id"], type="function")
                entry["function"] = {"name": c["function"]["name"], "arguments": ""}
            else:
                entry["function"]["arguments"] = entry["function"].get("arguments", "") + piece[2]
        self._pieces = []
        if entries:
            delta["tool_calls"] = entries
        return delta

    def feed(self, text: str) -> dict:
        self._step(text, final=False)
        return self._delta()

    def close(self) -> dict:
        self._step("", final=True)
        return self._delta()

    def _step(self, text: str, final: bool) -> None:
        raise NotImplementedError

    def message(self) -> dict:
        msg = {"role": "assistant", "content": self.content if self.content or not self.calls else None}
        if self.calls:
            msg["tool_calls"] = [{**c, "function": dict(c["function"])} for c in self.calls]
        return msg

    def finish_reason(self, reason: str | None) -> str | None:
        """``stop`` becomes ``tool_calls`` when the output made calls; ``length`` (cut short) stays."""
        return "tool_calls" if self.calls and reason == "stop" else reason


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a beginning of ``tag`` (held back: a tag may follow)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class AutoReader(_Reader):
    """``tool_choice: auto``: ``<tool_call>`` blocks, or an answer that is JSON and nothing else."""

    def __init__(self, tool_plan: ToolPlan):
        super().__init__(tool_plan)
        self._buf = ""
        self._mode = "start"  # start (whitespace so far) | text | call (in a block) | json (all of it is JSON)

    def _call(self, obj) -> tuple[str, str] | None:
        """(name, arguments JSON) if ``obj`` is a call of one of the tools."""
        if not isinstance(obj, dict):
            return None
        if isinstance(obj.get("function"), dict):  # OpenAI's own shape, inside {"tool_calls": [...]}
            obj = obj["function"]
        name, args = obj.get("name"), obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if name not in self.plan.names or not isinstance(args, dict):
            return None
        return name, json.dumps(args, ensure_ascii=False)

    def _take(self, calls: list[tuple[str, str]]) -> None:
        for name, args in calls:
            if self.calls and not self.plan.parallel:
                return  # one call only: the first
            self._add_call(name, args)

    def _json_calls(self, text: str) -> list | None:
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if isinstance(obj, dict) and isinstance(obj.get("tool_calls"), list):
            obj = obj["tool_calls"]
        items = obj if isinstance(obj, list) else [obj]
        calls = [self._call(x) for x in items]
        return calls if calls and all(calls) else None

    def _step(self, text: str, final: bool) -> None:
        self._buf += text
        while True:
            if self._mode == "start":
                head = self._buf.lstrip()
                if not head:
                    if final:
                        self._add_content(self._buf)
                        self._buf = ""
                    return
                self._mode = "json" if head[0] in "{[" else "text"
            if self._mode == "json":
                if final:
                    calls = self._json_calls(self._buf)
                    if calls is None:
                        self._add_content(self._buf)
                    else:
                        self._take(calls)
                    self._buf = ""
                return
            if self._mode == "text":
                i = self._buf.find(TAG_OPEN)
                if i >= 0:
                    self._add_content(self._buf[:i])
                    self._buf, self._mode = self._buf[i + len(TAG_OPEN):], "call"
                    continue
                keep = 0 if final else _partial_suffix(self._buf, TAG_OPEN)
                self._add_content(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                return
            # in a block: decided at its closing tag, or at the end of the output
            j = self._buf.find(TAG_CLOSE)
            if j < 0 and not final:
                return
            block, rest = (self._buf[:j], self._buf[j + len(TAG_CLOSE):]) if j >= 0 else (self._buf, "")
            calls = self._json_calls(block.strip())
            if calls is None:
                self._add_content(TAG_OPEN + block + (TAG_CLOSE if j >= 0 else ""))
            else:
                self._take(calls)
            self._buf, self._mode = rest, "text"


class ForcedReader(_Reader):
    """``required`` / named: the output is JSON the grammar shaped (a call, or a list of calls). A character
    scanner follows strings and nesting; a call is announced as soon as its ``name`` is read, and its
    ``arguments`` value is passed on as it is generated (its exact text)."""

    def __init__(self, tool_plan: ToolPlan):
        super().__init__(tool_plan)
        self._text = ""
        self._depth, self._in_str, self._esc, self._str_at = 0, False, False, 0
        self._call_depth = 2 if tool_plan.many else 1
        self._key, self._expect_key = None, False
        self._open: list[dict] = []  # per call seen: name, args start / end, index once announced, chars sent

    def _scan(self, start: int) -> None:
        t, d = self._text, self._call_depth
        for i in range(start, len(t)):
            c = t[i]
            cur = self._open[-1] if self._open else None
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == "\\":
                    self._esc = True
                elif c == '"':
                    self._in_str = False
                    if self._depth == d and cur is not None:
                        value = json.loads(t[self._str_at: i + 1])
                        if self._expect_key:
                            self._key = value
                        elif self._key == "name" and cur["name"] is None:
                            cur["name"] = value
                continue
            if c == '"':
                self._in_str, self._str_at = True, i
            elif c in "{[":
                self._depth += 1
                if self._depth == d and c == "{":
                    self._open.append({"name": None, "start": None, "end": None, "index": None, "sent": 0})
                    self._key, self._expect_key = None, True
                elif self._depth == d + 1 and cur is not None and self._key == "arguments" and cur["start"] is None:
                    cur["start"] = i
            elif c in "}]":
                if self._depth == d + 1 and cur is not None and cur["start"] is not None and cur["end"] is None:
                    cur["end"] = i + 1
                self._depth -= 1
            elif self._depth == d and c == ":":
                self._expect_key = False
            elif self._depth == d and c == ",":
                self._expect_key = True

    def _step(self, text: str, final: bool) -> None:
        start = len(self._text)
        self._text += text
        self._scan(start)
        for call in self._open:
            if call["index"] is None:
                if call["name"] is None:
                    break  # calls are announced in order
                call["index"] = self._add_call(call["name"])
            if call["start"] is not None:
                end = call["end"] if call["end"] is not None else len(self._text)
                self._add_args(call["index"], self._text[call["start"] + call["sent"]: end])
                call["sent"] = end - call["start"]
        if final and not self.calls:  # cut short before any call was named: the text is all there is
            self._add_content(self._text)


def reader(tool_plan: ToolPlan) -> _Reader:
    return ForcedReader(tool_plan) if tool_plan.forced else AutoReader(tool_plan)


def reads_output(tool_plan: ToolPlan | None) -> bool:
    """Whether a request's output is read for calls (not without tools, nor with ``none``)."""
    return tool_plan is not None and tool_plan.choice != "none"


def finish_choices(tool_plan: ToolPlan | None, choices: list[dict]) -> list[dict]:
    """Non-streamed chat choices (``message.content`` the generated text) with their calls read out."""
    if not reads_output(tool_plan):
        return choices
    for ch in choices:
        r = reader(tool_plan)
        r.feed(ch["message"]["content"] or "")
        r.close()
        ch["message"] = r.message()
        ch["finish_reason"] = r.finish_reason(ch["finish_reason"])
    return choices


async def stream_calls(gen, tool_plan: ToolPlan | None, sse):
    """Wrap a chat SSE generator (``data: {chunk}`` lines): each choice's ``delta.content`` goes through its
    reader, which gives the chunk its content and ``tool_calls`` deltas; the last chunk's ``finish_reason``
    becomes ``tool_calls`` when calls were made. Other fields (token_ids, logprobs...) pass unchanged.
    ``sse`` encodes a chunk as the app does. Closing this generator closes ``gen``."""
    if not reads_output(tool_plan):
        async for line in gen:
            yield line
        return
    readers: dict[int, _Reader] = {}
    try:
        async for line in gen:
            if not line.startswith("data: {"):
                yield line
                continue
            obj = json.loads(line[len("data: "):])
            for ch in obj.get("choices") or []:
                delta = ch.get("delta") or {}
                r = readers.setdefault(ch.get("index", 0), reader(tool_plan))
                if "role" in delta:  # a choice's first chunk: the role only
                    continue
                out = r.feed(delta.pop("content", None) or "")
                if ch.get("finish_reason") is not None:
                    out = _merge(out, r.close())
                    ch["finish_reason"] = r.finish_reason(ch["finish_reason"])
                ch["delta"] = {**delta, **out}
            yield sse(obj)
    finally:
        await gen.aclose()


def _merge(a: dict, b: dict) -> dict:
    """Two consecutive deltas of one choice as one."""
    out = dict(a)
    if "content" in b:
        out["content"] = out.get("content", "") + b["content"]
    calls = [dict(e, function=dict(e["function"])) for e in a.get("tool_calls", [])]
    for e in b.get("tool_calls", []):
        if calls and calls[-1]["index"] == e["index"]:
            f = calls[-1]["function"]
            f["arguments"] = f.get("arguments", "") + e["function"].get("arguments", "")
        else:
            calls.append(e)
    if calls:
        out["tool_calls"] = calls
    return out
