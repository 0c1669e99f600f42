"""Tool calling for models whose chat template takes `tools` (Qwen2 / Qwen3 and other Hermes-
style templates): the tools go into the prompt through the template, and the model's
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks come back as OpenAI
`tool_calls`.

    tool_choice "none"      the tools are left out of the prompt: plain text
    tool_choice "auto"      (the default with tools) free text; tool-call blocks are parsed out
    tool_choice "required"  the output is constrained to one call's JSON, {"name", "arguments"}
    {"type": "function", "function": {"name": f}}   the same, for f only

A forced call is constrained to the JSON inside the tags (what the model writes between them),
not to the tags: the tags are single special tokens in Qwen's vocabulary, which a text grammar
does not produce; the router knows the call is the whole output.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from workers.errors import InvalidRequest
from workers.structured_output import StructuredOutput, json_schema

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_OPEN = "<tool_call>"


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools mean for rendering, sampling and the answer."""

    tools: list[dict[str, Any]] | None  # for the chat template; None: leave them out
    forced: StructuredOutput | None  # a constrained call (required / named)
    parse: bool  # the answer's text may hold tool calls


NO_TOOLS = ToolPlan(None, None, False)


def _functions(tools: list[Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        field = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequest(f"{field}.type", "only 'function' tools are supported")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest(f"{field}.function.name", "required (a non-empty string)")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InvalidRequest(f"{field}.function.parameters", "must be a JSON schema object")
        json_schema(params).check(f"{field}.function.parameters")
        if fn["name"] in out:
            raise InvalidRequest(f"{field}.function.name", f"{fn['name']!r} is given twice")
        out[fn["name"]] = params
    return out


def _call_schema(functions: dict[str, dict[str, Any]]) -> StructuredOutput:
    """One call to any of `functions`: {"name": that name, "arguments": its parameters}."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, params in functions.items()
    ]
    return json_schema(options[0] if len(options) == 1 else {"anyOf": options})


def plan(
    tools: list[Any] | None,
    tool_choice: str | dict[str, Any] | None,
    template_has_tools: bool,
    tools_field: str = "tools",
) -> ToolPlan:
    """Validate `tools` / `tool_choice` (400s name the field; `tools_field`: "functions" when
    the request used the legacy names) and decide what they do."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice", "needs tools")
        return NO_TOOLS
    functions = _functions(tools)
    if tool_choice == "none":
        return NO_TOOLS
    if not template_has_tools:
        raise InvalidRequest(tools_field, "this model's chat template does not support tools")
    if tool_choice in (None, "auto"):
        return ToolPlan(tools, None, True)
    if tool_choice == "required":
        return ToolPlan(tools, _call_schema(functions), True)
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise InvalidRequest(
                "tool_choice", "expected {'type': 'function', 'function': {'name'}}"
            )
        if name not in functions:
            raise InvalidRequest("tool_choice.function.name", f"{name!r} is not in tools")
        return ToolPlan(tools, _call_schema({name: functions[name]}), True)
    raise InvalidRequest(
        "tool_choice", f"{tool_choice!r}; expected 'none', 'auto', 'required' or a function"
    )


def _call(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {
            "name": obj["name"],
            "arguments": args if isinstance(args, str) else json.dumps(args),
        },
    }


def parse(text: str, forced: bool) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a finished answer. `forced`: the whole text is one call's JSON
    (a constrained answer); otherwise Hermes blocks are cut out of the text, and a block
    that is not a call's JSON stays in the content as written."""
    if forced:
        try:
            call = _call(json.loads(text))
        except ValueError:
            call = None  # cut short (finish_reason "length"): the text is all there is
        return (None, [call]) if call else (text, [])
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        try:
            call = _call(json.loads(m.group(1)))
        except ValueError:
            call = None
        if call is None:
            continue
        kept.append(text[pos : m.start()])
        calls.append(call)
        pos = m.end()
    kept.append(text[pos:])
    content = "".join(kept).strip() if calls else text
    return (content or None), calls


def split_stream(pending: str, holding: bool) -> tuple[str, str, bool]:
    """Streamed text not yet sent -> (send now, hold back, holding from now on). From the
    first '<tool_call>' on, an answer is held and parsed when it ends; a prefix of that tag at
    the end is held until the next text shows whether it is one."""
    if holding:
        return "", pending, True
    i = pending.find(_OPEN)
    if i >= 0:
        return pending[:i], pending[i:], True
    for k in range(len(_OPEN) - 1, 0, -1):
        if pending.endswith(_OPEN[:k]):
            return pending[:-k], pending[-k:], False
    return pending, "", False
