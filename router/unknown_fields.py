"""Request fields this server does not know: ignored (as vLLM's OpenAI server does), unless
they look like a typo of one it does.

Clients written for OpenAI send fields that change nothing here (`metadata`, `store`,
`service_tier`, `parallel_tool_calls`, `stream_options.continuous_usage_stats`, ...); refusing
them breaks those clients for no benefit. What must not be lost is typo protection: a
misspelt `max_token` silently ignored would quietly change the output. So an unknown name
close to a known one of the same object is still refused (400 naming it, with the likely
intended name), and `router.unknown_fields: reject` refuses every unknown field.
The names ignored are logged once per request and returned in the `x-flotilla-ignored-fields`
response header (dotted paths for nested ones).
"""

from __future__ import annotations

import difflib

from pydantic import BaseModel

from workers.errors import InvalidRequest

HEADER = "x-flotilla-ignored-fields"

# Real OpenAI / vLLM names that happen to look like a typo of a field we know: ignore them
# like any other unknown field instead of suggesting the look-alike.
_NOT_TYPOS = frozenset({"prompt_logprobs", "stop_reason", "top_n"})
_CUTOFF = 0.85  # difflib ratio: "max_token" ~ "max_tokens" (0.95), "metadata" ~ nothing


def _known(model: BaseModel) -> list[str]:
    names = []
    for name, info in type(model).model_fields.items():
        names.append(name)
        if info.alias:
            names.append(info.alias)
    return names


def unknown_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of the fields pydantic kept aside as extra (extra="allow"), depth first
    through nested request models; a list of models (chat messages) is not searched: their
    extra fields are meant for the chat template."""
    out = [prefix + name for name in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out += unknown_fields(value, f"{prefix}{name}.")
    return out


def check(model: BaseModel, reject_all: bool = False) -> list[str]:
    """The unknown fields of a parsed request, to be ignored; raises InvalidRequest for one
    that looks like a typo (or for any, with `reject_all`)."""
    ignored = unknown_fields(model)
    for path in ignored:
        parent, _, name = path.rpartition(".")
        owner = model
        for part in filter(None, parent.split(".")):
            owner = getattr(owner, part)
        if reject_all:
            raise InvalidRequest(path, "unknown field (router.unknown_fields is reject)")
        if name in _NOT_TYPOS:
            continue
        close = difflib.get_close_matches(name, _known(owner), n=1, cutoff=_CUTOFF)
        if close:
            hint = f"{parent}.{close[0]}" if parent else close[0]
            raise InvalidRequest(path, f"unknown field; did you mean {hint!r}?")
    return ignored


def header_value(paths: list[str]) -> str:
    """The header's value: names as sent, but escaped (`\\u0100`, `\\n`) where they hold what a
    header cannot carry -- controls, non-ASCII, lone surrogates -- so any name can be echoed."""
    return ",".join(p.encode("unicode_escape").decode("ascii") for p in paths)
