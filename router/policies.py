"""Routing policies: which replica group serves a request.

One interface, `Policy.choose(groups, prompt_hashes) -> GroupView`, over what the router knows
about each group: health, load (published by the group, plus the router's own in-flight count
so a burst between two polls does not all land on one group), and which KV blocks the group has
cached (the hashes it publishes, plus the prompts this router just sent it, until the group's
next publication confirms them). Hashes are cluster.block_manager.block_hashes of token ids --
the same function the engine's prefix cache uses -- so a match means the group really holds
that prefix; nothing is guessed from text.

Session pinning (`SessionTable`) sits in front of any policy.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class GroupView:
    """The router's picture of one replica group."""

    name: str
    healthy: bool = True
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    inflight: int = 0  # requests this router has in flight on the group
    cached: frozenset[int] = frozenset()  # block hashes the group published
    pending: dict[int, float] = field(default_factory=dict)  # hash -> expiry (monotonic)

    @property
    def load(self) -> float:
        """Requests queued or running (the larger of the group's and our own count) plus the
        fraction of KV blocks in use, which separates groups with equal request counts."""
        return max(self.num_running + self.num_waiting, self.inflight) + self.kv_usage

    def prefix_match(self, prompt_hashes: Sequence[int], now: float | None = None) -> int:
        """How many leading blocks of the prompt this group holds."""
        n = 0
        for h in prompt_hashes:
            if h in self.cached:
                n += 1
                continue
            expiry = self.pending.get(h)
            if expiry is None or expiry < (time.monotonic() if now is None else now):
                break
            n += 1
        return n

    def add_pending(self, prompt_hashes: Sequence[int], ttl_s: float) -> None:
        expiry = time.monotonic() + ttl_s
        for h in prompt_hashes:
            if h not in self.cached:
                self.pending[h] = expiry

    def publish(self, hashes: Sequence[int]) -> None:
        """The group's own list replaces ours; pending hashes it now holds, or that expired,
        are dropped."""
        self.cached = frozenset(hashes)
        now = time.monotonic()
        self.pending = {h: t for h, t in self.pending.items() if t >= now and h not in self.cached}


class Policy(Protocol):
    uses_prefix: bool

    def choose(self, groups: Sequence[GroupView], prompt_hashes: Sequence[int]) -> GroupView:
        """Pick one of `groups` (all healthy, at least one)."""
        ...


class RoundRobin:
    uses_prefix = False

    def __init__(self) -> None:
        self._next = 0

    def choose(self, groups: Sequence[GroupView], prompt_hashes: Sequence[int]) -> GroupView:
        group = groups[self._next % len(groups)]
        self._next += 1
        return group


class PowerOfTwoChoices:
    """The less loaded of two groups drawn at random: near least-loaded balance without every
    router herding onto the same group between two load reports."""

    uses_prefix = False

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, groups: Sequence[GroupView], prompt_hashes: Sequence[int]) -> GroupView:
        if len(groups) == 1:
            return groups[0]
        a, b = self._rng.sample(list(groups), 2)
        return a if a.load <= b.load else b


class PrefixAware:
    """The group holding the longest cached prefix of the prompt; among equals (no hit
    anywhere, say) the least loaded, then round-robin. A hit is ignored when its group is more
    than `max_load_imbalance` requests busier than the least loaded one: a recomputed prefix
    is cheaper than a long queue."""

    uses_prefix = True

    def __init__(self, max_load_imbalance: float = 8.0) -> None:
        self.max_load_imbalance = max_load_imbalance
        self._rr = 0

    def choose(self, groups: Sequence[GroupView], prompt_hashes: Sequence[int]) -> GroupView:
        now = time.monotonic()
        least = min(g.load for g in groups)
        eligible = [g for g in groups if g.load - least <= self.max_load_imbalance]
        best = max(g.prefix_match(prompt_hashes, now) for g in eligible)
        tied = [g for g in eligible if g.prefix_match(prompt_hashes, now) == best]
        lowest = min(g.load for g in tied)
        tied = [g for g in tied if g.load == lowest]
        self._rr += 1
        return tied[self._rr % len(tied)]


def make_policy(name: str, max_load_imbalance: float = 8.0, seed: int | None = None) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    if name == "power_of_two":
        return PowerOfTwoChoices(seed)
    if name == "prefix_aware":
        return PrefixAware(max_load_imbalance)
    raise ValueError(f"unknown routing policy {name!r}")


class SessionTable:
    """session id -> group name, least recently used first out."""

    def __init__(self, max_sessions: int = 100_000) -> None:
        self.max_sessions = max_sessions
        self._pins: OrderedDict[str, str] = OrderedDict()

    def get(self, session_id: str) -> str | None:
        name = self._pins.get(session_id)
        if name is not None:
            self._pins.move_to_end(session_id)
        return name

    def pin(self, session_id: str, group_name: str) -> None:
        self._pins[session_id] = group_name
        self._pins.move_to_end(session_id)
        while len(self._pins) > self.max_sessions:
            self._pins.popitem(last=False)

    def __len__(self) -> int:
        return len(self._pins)
