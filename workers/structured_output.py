"""What a request's output must match: a JSON schema, any JSON object, a regex or a grammar.

Pure Python (llguidance, no torch), like sampling_params: the router checks a spec here so a
bad schema or regex is a 400 / INVALID_ARGUMENT before anything is queued, and the engine
(cluster.grammar) turns the same spec into a matcher. A spec is text (a schema as JSON text),
so it is hashable: the engine compiles each distinct one once.

Grammar syntax is llguidance's Lark dialect (`start: ...`, regexes as /.../, `%json {...}`
to embed a schema); https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from workers.errors import InvalidRequest

Kind = Literal["json_schema", "json_object", "regex", "grammar"]
MAX_SPEC_CHARS = 100_000


class StructuredOutput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind = Field(description="What `spec` is; json_object needs no spec.")
    spec: str = Field("", max_length=MAX_SPEC_CHARS, description="Schema JSON, regex or grammar.")

    def grammar(self) -> str:
        """The llguidance grammar text of this spec (not yet checked: see `check`)."""
        return _grammar(self.kind, self.spec)

    def check(self, field: str) -> None:
        """Raise InvalidRequest naming `field` (the API's name for the spec) when the schema,
        regex or grammar is invalid. Cached: the same spec is checked once per process."""
        err = _error(self.kind, self.spec)
        if err:
            raise InvalidRequest(field, err)


def json_schema(schema: object) -> StructuredOutput:
    """A spec from a parsed schema; `{}` or a non-object is the caller's to refuse first."""
    return StructuredOutput(kind="json_schema", spec=json.dumps(schema, sort_keys=True))


# The JSON compiler's options: whitespace as json.dumps writes it (", " / ": "), so a model is
# steered to the spacing it saw in training instead of free runs of spaces and newlines, and a
# closed object once the schema allows no more properties (OpenAI's strict mode default).
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@lru_cache(maxsize=256)
def _grammar(kind: str, spec: str) -> str:
    from llguidance import LLMatcher

    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
    if kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(spec, defaults=_JSON_OPTIONS)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec)
    return LLMatcher.grammar_from_lark(spec)


@lru_cache(maxsize=256)
def _error(kind: str, spec: str) -> str:
    from llguidance import LLMatcher

    if kind == "json_schema":
        try:
            schema = json.loads(spec)
        except ValueError as e:
            return f"not valid JSON: {e}"
        if not isinstance(schema, dict):
            return "a JSON schema must be an object"
    if kind in ("regex", "grammar") and not spec:
        return "must not be empty"
    try:
        grammar = _grammar(kind, spec)
    except ValueError as e:
        return str(e)
    err = LLMatcher.validate_grammar(grammar)
    return " ".join(err.removeprefix("Error: ").split())  # one line: it goes in a JSON error
