"""Typed errors shared by every layer (pure Python: safe to import from the router)."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request parameter is out of range. `field` names it; the message names the limit.

    Raised before any engine state changes, so a rejected request never holds KV blocks.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class EngineDead(RuntimeError):
    """The engine (or one of its ranks) failed; in-flight requests fail with this error."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the request was not accepted (retry later)."""


class EngineDraining(RuntimeError):
    """The group is shutting down (Ctrl-C, SIGTERM, scale-down): it finishes what it has and
    accepts nothing new, so the router sends the request elsewhere or answers UNAVAILABLE."""
