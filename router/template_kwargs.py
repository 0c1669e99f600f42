"""`chat_template_kwargs`: extra variables a request passes to the model's chat template
(vLLM's field; e.g. `{"enable_thinking": false}` for Qwen3's template).

They reach the template as render variables next to `messages`, `tools` and
`add_generation_prompt`. Names that are parameters of transformers' `apply_chat_template` are
refused: `tokenize` or `return_dict` would change what the call returns, `chat_template` would
let a request run a template of its own, and the rest would collide with arguments the router
sets. Names are Jinja identifiers (anything else a template could not read as a variable).
"""

from __future__ import annotations

import json
from typing import Any

from workers.errors import InvalidRequest

MAX_KWARGS = 32
MAX_JSON_CHARS = 16_384

_RESERVED = frozenset(
    {
        "messages",
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "raise_exception",  # the template's own helper functions (Jinja globals)
        "strftime_now",
    }
)


def check(kwargs: Any, field: str = "chat_template_kwargs") -> dict[str, Any]:
    """The request's value -> the kwargs to render with, or InvalidRequest naming the key."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise InvalidRequest(field, "must be an object of template variables")
    if len(kwargs) > MAX_KWARGS:
        raise InvalidRequest(field, f"{len(kwargs)} keys; the limit is {MAX_KWARGS}")
    for key in kwargs:
        if not key.isidentifier():
            raise InvalidRequest(f"{field}.{key}", "not a template variable name (an identifier)")
        if key in _RESERVED:
            raise InvalidRequest(f"{field}.{key}", "reserved: set by the server, not a request")
    size = len(json.dumps(kwargs))
    if size > MAX_JSON_CHARS:
        raise InvalidRequest(field, f"{size} characters of JSON; the limit is {MAX_JSON_CHARS}")
    return dict(kwargs)
