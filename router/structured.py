"""Request fields that constrain the output -> one StructuredOutput, or a 400 naming the field.

Where a constraint can come from (at most one per request):
  response_format   OpenAI: {"type": "text" | "json_object" | "json_schema",
                    "json_schema": {"name", "schema", "strict"}} (chat and, as in vLLM,
                    completions)
  structured_outputs  vLLM's extension: {"json": schema | JSON text, "regex": str,
                    "grammar": str (llguidance's Lark syntax), "json_object": true}, one key
  guided_json / guided_regex / guided_grammar   vLLM's older names of the same
  tool_choice       "required" or a named function (router.tools builds that schema)

The spec is checked here (compiled by the grammar library, without a model), so a bad schema
or regex is refused before the request is routed; the replica group checks it again.
"""

from __future__ import annotations

import json
from typing import Any

from workers.errors import InvalidRequest
from workers.structured_output import StructuredOutput, json_schema

_VLLM_KEYS = ("json", "regex", "grammar", "json_object")
_LEGACY = {"guided_json": "json", "guided_regex": "regex", "guided_grammar": "grammar"}


def from_response_format(rf: dict[str, Any] | None) -> StructuredOutput | None:
    if not rf:
        return None
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(kind="json_object")
    if kind != "json_schema":
        raise InvalidRequest(
            "response_format.type", f"{kind!r}; expected 'text', 'json_object' or 'json_schema'"
        )
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise InvalidRequest("response_format.json_schema", "required for type 'json_schema'")
    schema = js.get("schema")
    if schema is None:  # OpenAI allows it missing: any JSON then
        return StructuredOutput(kind="json_object")
    return _schema(schema, "response_format.json_schema.schema")


def _schema(schema: Any, field: str) -> StructuredOutput:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise InvalidRequest(field, f"not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise InvalidRequest(field, "a JSON schema must be an object")
    spec = json_schema(schema)
    spec.check(field)
    return spec


def one(key: str, value: Any, field: str) -> StructuredOutput:
    """One constraint given as vLLM names it (`key`: json, regex, grammar or json_object),
    checked; InvalidRequest names `field`."""
    if key == "json":
        return _schema(value, field)
    if key == "json_object":
        if value is not True:
            raise InvalidRequest(field, "must be true when given")
        return StructuredOutput(kind="json_object")
    if not isinstance(value, str):
        raise InvalidRequest(field, "must be a string")
    spec = StructuredOutput(kind=key, spec=value)
    spec.check(field)
    return spec


def from_request(
    response_format: dict[str, Any] | None, extra: dict[str, Any] | None
) -> StructuredOutput | None:
    """The one constraint of a request (its response_format and its extra fields), or None."""
    found: list[tuple[str, StructuredOutput | None]] = []
    spec = from_response_format(response_format)
    if spec is not None:
        found.append(("response_format", spec))
    extra = extra or {}
    so = extra.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise InvalidRequest("structured_outputs", "must be an object")
        keys = [k for k in _VLLM_KEYS if so.get(k) is not None]
        unknown = sorted(set(so) - set(_VLLM_KEYS))
        if unknown:
            raise InvalidRequest(f"structured_outputs.{unknown[0]}", "unknown field")
        if len(keys) > 1:
            raise InvalidRequest("structured_outputs", f"give one of {', '.join(keys)}")
        if keys:
            field = f"structured_outputs.{keys[0]}"
            found.append((field, one(keys[0], so[keys[0]], field)))
    for name, key in _LEGACY.items():
        if extra.get(name) is not None:
            found.append((name, one(key, extra[name], name)))
    if len(found) > 1:
        raise InvalidRequest(found[1][0], f"only one output constraint; {found[0][0]} is set")
    return found[0][1] if found else None
