"""Requests running in this router replica, by id: what `Abort` (gRPC) finds and stops, and
what keeps two running requests from sharing an id (the group link multiplexes by id).

A request is registered under its own id (the client's `X-Request-Id` / `request_id`, or a
generated one; choice i of n > 1 runs as `{id}-{i}`) and under the id the client knows, its
key. `abort(key)` marks every request of that key and wakes the one waiting on its group's
deltas; the router then closes it exactly as when the client goes away: the group is told
to abort it and frees its KV blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from router.link import Inbox
from workers.errors import InvalidRequest

# An error delta (Inbox never merges one into tokens) of a kind no group sends: it only wakes
# the leg waiting on the inbox, which then sees its ticket aborted.
ABORTED_KIND = "aborted"


@dataclass(eq=False)  # identity: two requests are never "equal"
class Ticket:
    request_id: str
    key: str
    aborted: bool = False
    inbox: Inbox | None = None  # the current leg's, once a group accepted it

    def attach(self, inbox: Inbox) -> None:
        self.inbox = inbox
        if self.aborted:
            self._wake()

    def _wake(self) -> None:
        if self.inbox is not None:
            self.inbox.put({"error": {"kind": ABORTED_KIND, "field": None, "message": ""}})


@dataclass
class Running:
    _by_id: dict[str, Ticket] = field(default_factory=dict)
    _by_key: dict[str, list[Ticket]] = field(default_factory=dict)

    def start(self, request_id: str, key: str) -> Ticket:
        if request_id in self._by_id:
            raise InvalidRequest("request_id", f"{request_id!r} is the id of a running request")
        t = self._by_id[request_id] = Ticket(request_id, key)
        self._by_key.setdefault(key, []).append(t)
        return t

    def end(self, t: Ticket) -> None:
        self._by_id.pop(t.request_id, None)
        same = self._by_key.get(t.key, [])
        if t in same:
            same.remove(t)
        if not same:
            self._by_key.pop(t.key, None)

    def abort(self, key: str) -> int:
        """Stop every running request of `key`; returns how many there were."""
        tickets = list(self._by_key.get(key, ()))
        for t in tickets:
            if not t.aborted:
                t.aborted = True
                t._wake()
        return len(tickets)

    def __len__(self) -> int:
        return len(self._by_id)
