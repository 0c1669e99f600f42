"""Where the router learns which replica groups exist: a pool's groups come and go while it
serves (autoscaling, failures, updates), so the router re-reads this every
`router.discovery_interval_s` and links to new groups, stops choosing draining ones, and lets
go of those that left once their streams ended.

    RegistryDirectory(handle)   the app's `registry` deployment (cluster.registry)
    StaticDirectory(members)    a fixed list (tests; a list the caller may change)
"""

from __future__ import annotations

from typing import Any

from cluster.registry import Member


class RegistryDirectory:
    def __init__(self, handle: Any):
        self.handle = handle

    async def members(self) -> list[Member]:
        return [Member.from_dict(d) for d in await self.handle.members.remote()]


class StaticDirectory:
    def __init__(self, members: list[Member]):
        self.list = members

    async def members(self) -> list[Member]:
        return list(self.list)
