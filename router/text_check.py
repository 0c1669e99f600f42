"""Strings in a JSON body that cannot travel on: lone surrogates.

JSON may escape any UTF-16 code unit (`"\\ud800"`), so a parsed body can hold a str with an
unpaired surrogate -- not a Unicode character, and not encodable as UTF-8. Such a string would
fail deep inside: the tokenizer (500), a JSON or header response (500), or the msgpack frame
to a replica group (where it looked like a dead group). Refused once, right after parsing,
naming where it sits.
"""

from __future__ import annotations

from typing import Any

from workers.errors import InvalidRequest


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_text(data: Any, path: str = "") -> None:
    """Raise InvalidRequest naming the first field (dotted path, list indexes included) whose
    name or string value holds a lone surrogate."""
    if isinstance(data, str):
        if _has_surrogate(data):
            raise InvalidRequest(path or "body", "not valid Unicode (a lone surrogate escape)")
    elif isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if _has_surrogate(key):
                where = where.encode("unicode_escape").decode("ascii")
                raise InvalidRequest(where, "field name is not valid Unicode (a lone surrogate)")
            check_text(value, where)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            check_text(value, f"{path}.{i}" if path else str(i))
