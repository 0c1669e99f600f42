"""Which replica groups exist right now, and where their data planes listen.

A pool is one Serve deployment whose replicas come and go (autoscaling, failures, rolling
updates), and a Serve handle reaches *some* replica, never a chosen one. So each group announces
itself here -- name, role, node, data-plane address and secret -- every `heartbeat_s`, and the
routers read the list as often. The state is soft: a group that stops announcing (killed, node
lost) drops out after `ttl_s`; a restarted registry is refilled within one heartbeat.

    GroupRegistry     the Serve deployment `registry` (one replica, no CPU reserved)
    Member            one group's entry

A member's `state` is "ready" or "draining" (being removed: routers send it nothing new, but
its running streams go on).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

HEARTBEAT_S = 1.0
TTL_S = 5.0


@dataclass
class Member:
    name: str
    role: str  # colocated | prefill | decode
    host: str
    port: int
    secret: bytes
    node_id: str = ""
    state: str = "ready"  # ready | draining
    handle: Any = None  # tests: a fake group behind the Serve-handle data plane

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("handle")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Member:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class GroupRegistry:
    def __init__(self, ttl_s: float = TTL_S):
        self.ttl_s = ttl_s
        self._members: dict[str, tuple[float, dict[str, Any]]] = {}

    def announce(self, member: dict[str, Any]) -> list[dict[str, Any]]:
        """Record `member`; the current list (members()) in return, so that a group learns of
        its peers with its heartbeat (decode groups open pair groups: cluster/kv_links.py)."""
        self._members[member["name"]] = (time.monotonic(), member)
        return self.members()

    def leave(self, name: str) -> None:
        self._members.pop(name, None)

    def members(self) -> list[dict[str, Any]]:
        """Every group heard from within the last `ttl_s`."""
        now = time.monotonic()
        for name in [n for n, (t, _) in self._members.items() if now - t > self.ttl_s]:
            del self._members[name]
        return [m for _, m in self._members.values()]
