"""The router's picture of its replica groups, kept fresh: which exist (re-read from the
directory, router.directory, every `discovery_interval_s`: groups join and leave as pools
scale), their load, KV usage and cached block hashes (polled with the `stats` control call
every `stats_interval_s`), which are draining, and which have gone silent.

    GroupState     one group, as this router sees it
    GroupTable     the part of router.core.Router that maintains them (a mixin: it reads the
                   router's config, directory, metrics and router_id)

A group that fails to answer is marked unhealthy until it answers again; one silent for
`group_timeout_s` has its running requests moved on (router.link.GroupLink.fail_open).
Draining groups get no new requests; their running streams go on, and a group that left the
directory is forgotten once none of ours runs there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from cluster.registry import Member
from router.link import GroupLink
from router.policies import GroupView

log = logging.getLogger("router.core")  # the router's one log, as before this file was split out


@dataclass
class GroupState(GroupView):
    role: str = "colocated"  # colocated | prefill | decode
    member: Member | None = None
    link: GroupLink | None = None
    fingerprint: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    draining: bool = False  # leaving (announced, or gone from the directory): nothing new
    answered: float = field(default_factory=time.monotonic)  # its last stats answer


class GroupTable:
    groups: dict[str, GroupState]

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            try:
                if time.monotonic() - self._discovered >= self.config.discovery_interval_s:
                    await self.discover()
                await self.poll_once()
            except Exception:  # keep polling whatever happens
                log.exception("polling group stats failed")

    async def discover(self) -> None:
        """Link to groups that appeared, mark draining ones, drop those gone whose streams
        have all ended. A directory that cannot answer keeps the groups we know."""
        self._discovered = time.monotonic()
        try:
            members = await asyncio.wait_for(self.directory.members(), 10)
        except Exception as e:
            log.warning("group directory not answering, keeping %d groups: %r",
                        len(self.groups), e)  # fmt: skip
            return
        listed = {m.name: m for m in members}
        for m in members:
            g = self.groups.get(m.name)
            moved = (
                g is not None
                and g.member is not None
                and ((g.member.host, g.member.port) != (m.host, m.port))
            )
            if moved:  # the same name at a new address: a restarted process
                self._forget(g)
                g = None
            if g is None:
                g = GroupState(name=m.name, role=m.role, member=m)
                g.link = GroupLink(m, self.router_id, direct=self.config.data_plane == "direct")
                g.link.start()
                self.groups[m.name] = g
                log.info("replica group %s (%s) joined at %s:%d", m.name, m.role, m.host, m.port)
            g.draining = m.state == "draining"
        for g in list(self.groups.values()):
            if g.name in listed:
                continue
            g.draining = True  # left the directory: no new requests
            if g.link is None or g.link.num_open == 0 or not g.link.live.is_set():
                self._forget(g)
                log.info("replica group %s left", g.name)

    def _forget(self, g: GroupState) -> None:
        if g.link is not None:
            g.link.stop()
        self.groups.pop(g.name, None)
        self.metrics.forget_group(g.name)

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(g) for g in list(self.groups.values())))

    async def _poll(self, g: GroupState) -> None:
        # Never wait past group_timeout_s: a silent group's requests must move within it.
        timeout = min(max(2.0, 10 * self.config.stats_interval_s), self.config.group_timeout_s)
        try:
            assert g.link is not None
            s = await asyncio.wait_for(g.link.call("stats", g.fingerprint), timeout)
        except Exception as e:
            if g.healthy and (g.link is None or g.link.live.is_set()):
                log.warning("replica group %s is not answering: %r", g.name, e)
            g.healthy = False
            self._fail_if_silent(g)
            return
        g.answered = time.monotonic()
        g.healthy = bool(s["healthy"])
        g.draining = g.draining or bool(s.get("draining"))
        g.num_running, g.num_waiting, g.kv_usage = s["num_running"], s["num_waiting"], s["kv_usage"]
        if s["hashes"] is not None:
            g.publish(s["hashes"])
            g.fingerprint = s["hash_fingerprint"]
        g.stats = s
        self.metrics.record_group(g.name, s)

    def _fail_if_silent(self, g: GroupState) -> None:
        """A group silent for group_timeout_s will not finish our requests: move them on."""
        silent = time.monotonic() - g.answered
        if g.link is None or silent < self.config.group_timeout_s:
            return
        moved = g.link.fail_open(f"replica group {g.name} has not answered for {silent:.0f} s")
        if moved:
            log.warning("replica group %s silent for %.0f s: moving its %d request(s)",
                        g.name, silent, moved)  # fmt: skip

    def healthy_groups(self) -> list[GroupState]:
        """Groups that may take new requests: answering, linked, and not draining."""
        return [
            g
            for g in self.groups.values()
            if g.healthy and not g.draining and g.link is not None and g.link.live.is_set()
        ]

    def group_stats(self) -> list[dict[str, Any]]:
        return [
            {"name": g.name, "role": g.role}
            | {k: v for k, v in g.stats.items() if k != "hashes"}
            | {"healthy": g.healthy, "draining": g.draining}
            for g in self.groups.values()
        ]

    async def drain_groups(self) -> int:
        """Tell every group to refuse new requests (app shutdown); their running requests go
        on. Returns how many are still in flight across them."""
        counts = await asyncio.gather(
            *(g.link.call("drain") for g in list(self.groups.values()) if g.link is not None),
            return_exceptions=True,
        )
        return sum(c for c in counts if isinstance(c, int))
