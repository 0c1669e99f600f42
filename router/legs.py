"""The states a request passes through when it moves between replica groups (router.core).

A request runs as legs, each on one group:

    colocated:      [leg on any group] ----------------------------------------> finished
    disaggregated:  [prefill leg, handoff=True] --Handoff(group)--> [decode leg, resume=[first
                    token], kv_from=group] ---------------------------------> finished
    a group dies:   any leg --LegFailed(movable)--> [leg on another group, resume=tokens relayed
                    so far] (at most router.max_migrations times)
    no prefill:     prefill leg --LegFailed(before_start)--> [decode leg that prefills itself]

Progress is what the client has already received, across legs: the tokens a resumed leg
continues after, and the first-token time.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Handoff(Exception):
    """A prefill leg ended in a hand-off; the decode leg imports the KV from `group`."""

    def __init__(self, group: str):
        self.group = group


class LegFailed(Exception):
    """A leg's group failed. `before_start`: no token of this request reached the client yet;
    `movable`: the request may resume elsewhere."""

    def __init__(self, error: Exception, before_start: bool, movable: bool):
        self.error, self.before_start, self.movable = error, before_start, movable


@dataclass
class Progress:
    """What a request has relayed so far, across its legs."""

    arrival: float
    ids: list[int] = field(default_factory=list)
    ttft: float | None = None
    last: float = 0.0
    n_leg: int = 0  # tokens relayed by the current leg
