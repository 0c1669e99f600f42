"""The router proper: pick a replica group, relay its deltas, keep group state fresh.

Both front ends (router.grpc_api, router.openai_api) call `Router.stream()` / `Router.complete()`
with token ids and validated SamplingParams. Lifecycle of one request:

    choose a group (session pin, else the policy; unhealthy or unlinked groups are skipped)
    -> submit it over the group's link (router.link: one multiplexed stream per group); its
       first delta says accepted (tokens) or refused (overloaded: try the next group;
       invalid: raise)
    -> relay deltas; on the last one record metrics
    -> if our caller goes away first (CancelledError / generator close) or anything fails,
       close it with abort: the group stops the request and frees its KV blocks

A background task re-reads the directory (router.directory: which groups exist, where their
data planes listen, which are draining) every `discovery_interval_s`, and polls every group's
`stats()` (load, KV usage, prefix counters and, when they changed, the hashes of its cached
blocks) every `stats_interval_s`; a group that fails to answer is marked unhealthy until it
answers again. Draining groups get no new requests; their running streams go on. A group
that has not answered for `group_timeout_s` (hung, though its connection stays up) counts as
dead for its running requests: they resume on other groups.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.block_manager import block_hashes
from router.auth import ApiKeys
from router.choices import Choices
from router.config import RouterConfig
from router.errors import NoHealthyGroup, RequestAborted, error_from_group
from router.group_table import GroupState, GroupTable
from router.legs import Handoff, LegFailed, Progress
from router.link import Inbox
from router.metrics import RequestMetrics
from router.policies import Policy, SessionTable, make_policy
from router.running import Running, Ticket
from router.tokenize import Tokenizer
from router.validation import Limits
from workers.errors import EngineDead, EngineDraining, EngineOverloaded, InvalidRequest
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    """New output of one request (one or more tokens)."""

    ids: list[int]
    text: str
    logprobs: list[Any] | None  # per token: (logprob, top_ids, top_logprobs) or None
    finish: str | None = None
    usage: dict[str, int] | None = None
    group: str = ""
    index: int = 0  # which of the request's n choices
    stop_reason: int | str | None = None  # finish "stop": the stop token id, or stop string


class Router(GroupTable, Choices):
    def __init__(
        self,
        directory: Any,
        config: RouterConfig,
        model: str,
        metrics: RequestMetrics | None = None,
        info_sources: Sequence[Any] = (),
        disaggregated: bool = False,
    ):
        """`directory`: router.directory's (which groups exist); `info_sources`: handles
        whose `info()` any group answers (the pools' deployments)."""
        self.directory = directory
        self.info_sources = list(info_sources)
        self.config = config
        self.model = model
        self.router_id = uuid.uuid4().hex  # names this router replica to the groups
        self.groups: dict[str, GroupState] = {}
        self.disaggregated = disaggregated
        self.counters = {"migrations": 0, "prefill_fallbacks": 0}
        self.policy: Policy = make_policy(config.policy, config.max_load_imbalance)
        self.sessions = SessionTable(config.max_sessions)
        self.keys = ApiKeys(config)
        self.running = Running()
        self.metrics = metrics or RequestMetrics(model, enabled=False)
        self.tokenizer: Tokenizer | None = None
        self.limits: Limits | None = None
        self.block_size = 0
        self._poller: asyncio.Task | None = None
        self._discovered = 0.0

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Fetch the model's limits and tokenizer from the first group that answers, link to
        the groups the directory lists, then start polling. Raises NoHealthyGroup when no group
        answers within `startup_timeout_s`."""
        deadline = time.monotonic() + self.config.startup_timeout_s
        info, last_err = None, None
        while info is None and time.monotonic() < deadline:
            for source in self.info_sources:
                try:
                    info = await asyncio.wait_for(
                        source.info.remote(), max(1.0, deadline - time.monotonic())
                    )
                    break
                except Exception as e:  # not up yet, or restarting: try the next / again
                    last_err = e
            if info is None:
                await asyncio.sleep(1.0)
        if info is None:
            raise NoHealthyGroup(
                f"no replica group answered within the startup timeout: {last_err}"
            )
        self.tokenizer = Tokenizer(info["tokenizer_files"])
        self.block_size = info["block_size"]
        self.limits = Limits(
            max_model_len=info["max_model_len"],
            vocab_size=info["vocab_size"],
            max_n=self.config.max_n,
            max_prompt_chars=self.config.max_prompt_chars,
            max_messages=self.config.max_messages,
            max_stop_strings=self.config.max_stop_strings,
            max_stop_chars=self.config.max_stop_chars,
        )
        # One live link is enough to serve; the others join as they come up.
        while time.monotonic() < deadline:
            await self.discover()
            if any(g.link is not None and g.link.live.is_set() for g in self.groups.values()):
                break
            await asyncio.sleep(0.05)
        await self.poll_once()
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for g in self.groups.values():
            if g.link is not None:
                g.link.stop()

    def set_policy(self, name: str) -> None:
        self.policy = make_policy(name, self.config.max_load_imbalance)
        self.config = self.config.model_copy(update={"policy": name})

    def _candidates(
        self, prompt_hashes: Sequence[int], session_id: str | None, role: str = "decode"
    ) -> list[GroupState]:
        """Groups of `role`'s pool to try, best first: the pinned or chosen one, then the rest
        by load. The decode pool is every group that is not prefill-only."""
        healthy = [g for g in self.healthy_groups() if (g.role == "prefill") == (role == "prefill")]
        if not healthy:
            pool = "prefill" if role == "prefill" else "decode" if self.disaggregated else ""
            if any(
                g.draining and g.healthy and (g.role == "prefill") == (role == "prefill")
                for g in self.groups.values()
            ):
                raise EngineDraining(f"every {pool + ' ' if pool else ''}replica group is leaving")
            raise NoHealthyGroup(
                f"every {pool + ' ' if pool else ''}replica group is down or restarting"
            )
        first = None
        if session_id:
            pinned = self.sessions.get(session_id)
            first = next((g for g in healthy if g.name == pinned), None)
        if first is None:
            first = self.policy.choose(healthy, prompt_hashes)  # type: ignore[assignment]
        rest = sorted((g for g in healthy if g is not first), key=lambda g: g.load)
        return [first, *rest]  # type: ignore[list-item]

    # ---- requests --------------------------------------------------------------------------
    def _hashes(self, token_ids: list[int]) -> list[int]:
        return block_hashes(token_ids, self.block_size) if self.block_size else []

    async def stream(
        self,
        token_ids: list[int],
        params: SamplingParams,
        session_id: str | None = None,
        request_id: str | None = None,
        index: int = 0,
        key: str | None = None,
    ) -> AsyncIterator[Chunk]:
        """Deltas of one request; the last has finish and usage. `request_id` must not be
        running already (InvalidRequest); `key` (default: the id) is what `abort` finds it by.

        A request runs as one or more legs, each on one group. Colocated: one leg, unless its
        group dies mid-stream -- then it resumes on another group after the tokens already
        relayed (at most `max_migrations` times). Disaggregated: a prefill leg (first token,
        streamed at once; the prompt's KV stays under a lease there), then a decode leg that
        imports it and continues; the same resume covers a decode group dying mid-stream.
        """
        request_id = request_id or uuid.uuid4().hex
        ticket = self.running.start(request_id, key or request_id)
        # Also unregistered when the task driving us ends while we sit at a yield (see _leg).
        driver = asyncio.current_task()
        done = lambda _task: self.running.end(ticket)  # noqa: E731
        if driver is not None:
            driver.add_done_callback(done)
        reason, group, n_out = "", "router", 0  # for metrics.record_request
        try:
            async for chunk in self._legs(request_id, token_ids, params, session_id, index, ticket):
                reason, group, n_out = chunk.finish or reason, chunk.group, n_out + len(chunk.ids)
                yield chunk
        except (asyncio.CancelledError, GeneratorExit, RequestAborted):
            reason = reason or "abort"  # the client went away (or called Abort) before the end
            raise
        finally:
            self.metrics.record_request(group, reason or "error", len(token_ids), n_out)
            self.running.end(ticket)
            if driver is not None:
                driver.remove_done_callback(done)

    def abort(self, key: str) -> int:
        """Stop the running requests of `key` (gRPC Abort) as if their clients went away: the
        group aborts them and frees their KV blocks. Returns how many were running here."""
        return self.running.abort(key)

    async def _legs(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        session_id: str | None,
        index: int,
        ticket: Ticket,
    ) -> AsyncIterator[Chunk]:
        wire = params.model_dump(exclude_defaults=True)
        acc = Progress(time.monotonic())
        leg: dict[str, Any] = self._first_leg(len(token_ids))
        migrations = 0
        while True:
            role = "prefill" if leg.get("handoff") else "decode"
            try:
                async for chunk in self._leg(
                    request_id, token_ids, wire, session_id, index, role, leg, acc, ticket
                ):
                    yield chunk
                return
            except Handoff as h:
                leg = {"resume": list(acc.ids), "kv_from": self._kv_source(h.group)}
            except LegFailed as f:
                if f.before_start and role == "prefill":  # no prefill group: prefill on decode
                    self.counters["prefill_fallbacks"] += 1
                    self.metrics.prefill_fallbacks.inc(1, tags=self.metrics.tags("router"))
                    leg = {}
                    continue
                if migrations >= self.config.max_migrations or not f.movable:
                    raise f.error from None
                migrations += 1
                self.counters["migrations"] += 1
                self.metrics.migrations.inc(1, tags=self.metrics.tags("router"))
                log.warning(
                    "request %s: %s; resuming after %d tokens elsewhere (%d/%d)",
                    request_id,
                    f.error,
                    len(acc.ids),
                    migrations,
                    self.config.max_migrations,
                )
                leg = {"resume": list(acc.ids)} if acc.ids else {}

    def _kv_source(self, name: str) -> dict[str, Any]:
        """Where the decode group takes the prompt's KV from: the prefill group's data plane
        (secret included: the decode group receives it on its own authenticated link)."""
        g = self.groups.get(name)
        m = g.member if g is not None else None
        if m is None or m.handle is not None:  # unknown now, or a test fake: decode recomputes
            return {"group": name, "host": "", "port": 0, "secret": b"", "node_id": ""}
        return {
            "group": name,
            "host": m.host,
            "port": m.port,
            "secret": m.secret,
            "node_id": m.node_id,  # the same as the decode group's: shared memory (kv_arena)
        }

    def _first_leg(self, prompt_len: int) -> dict[str, Any]:
        """Prefill in the prefill pool (with a hand-off) or where it decodes: the rule of
        router.disaggregation -- short prompts, and any prompt while the prefill pool's queue
        is long, are prefilled by the decode group itself."""
        if not self.disaggregated or prompt_len < self.config.pd_min_prompt_tokens:
            return {}
        prefill = [g for g in self.healthy_groups() if g.role == "prefill"]
        if not prefill or min(g.num_waiting for g in prefill) > self.config.pd_max_prefill_queue:
            return {}
        return {"handoff": True}

    async def _leg(
        self,
        request_id: str,
        token_ids: list[int],
        wire: dict[str, Any],
        session_id: str | None,
        index: int,
        role: str,
        leg: dict[str, Any],
        acc: Progress,
        ticket: Ticket,
    ) -> AsyncIterator[Chunk]:
        """One leg on one group (see stream). Raises Handoff when a prefill leg ends in a
        hand-off, LegFailed when the group fails and the request may move on."""
        resumed = bool(leg.get("resume"))
        hashes = self._hashes(token_ids)
        group: GroupState | None = None
        outcome = "error"
        ended = False  # the group ended the request itself (finished or failed)
        released = False

        def release(_task: object = None) -> None:
            """Close the leg exactly once: from the finally below, or -- when whoever
            iterates us is cancelled while we sit at a `yield`, so no exception reaches this
            frame -- from the done-callback of the task that was driving us."""
            nonlocal released
            if released or group is None:
                return
            released = True
            assert group.link is not None
            group.link.close(request_id, abort=not ended)
            group.inflight -= 1
            e2e = time.monotonic() - acc.arrival
            result = outcome if ended or outcome != "error" else "cancelled"
            first_leg = acc.n_leg == len(acc.ids)  # this leg relayed the first token
            self.metrics.record_finished(
                group.name,
                result,
                0 if resumed else len(token_ids),
                acc.n_leg,
                acc.ttft if first_leg else None,
                e2e,
            )

        driver = asyncio.current_task()
        try:
            if ticket.aborted:  # between legs
                raise RequestAborted(f"request {request_id} was aborted")
            try:
                inbox, group, msg = await self._open(
                    request_id, token_ids, wire, hashes, session_id, role, leg
                )
            except (NoHealthyGroup, EngineOverloaded, EngineDraining) as e:
                raise LegFailed(e, before_start=True, movable=False) from None
            acc.n_leg = 0
            if driver is not None:
                driver.add_done_callback(release)
            ticket.attach(inbox)
            tags = self.metrics.tags(group.name)
            while True:
                if ticket.aborted:  # not `ended`: release() tells the group to abort it
                    raise RequestAborted(f"request {request_id} was aborted")
                if "error" in msg:
                    ended = True
                    err = error_from_group(msg["error"])
                    if isinstance(err, EngineDead):  # the group died under the request
                        raise LegFailed(err, before_start=not acc.ids, movable=True)
                    raise err
                now = time.monotonic()
                k = len(msg["ids"])
                if k:
                    if acc.ttft is None:
                        acc.ttft = now - acc.arrival
                    elif acc.ids:
                        for _ in range(k):
                            self.metrics.itl.observe((now - acc.last) / k, tags=tags)
                    acc.ids += msg["ids"]
                    acc.n_leg += k
                    acc.last = now
                finish = msg.get("finish")
                if finish is not None:
                    self.metrics.record_leg_end(group.name, msg)
                if finish == "handoff":
                    outcome, ended = "handoff", True
                    if k:
                        yield Chunk(
                            msg["ids"], msg["text"], msg["lp"], None, None, group.name, index
                        )
                    raise Handoff(group.name)
                if finish is not None:
                    outcome, ended = "finished", True
                chunk = Chunk(msg["ids"], msg["text"], msg["lp"], finish, msg.get("usage"))
                chunk.group, chunk.index, chunk.stop_reason = group.name, index, msg.get("stop")
                yield chunk
                if finish is not None:
                    return
                msg = await inbox.next()
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            release()
            if driver is not None:
                driver.remove_done_callback(release)

    async def _open(
        self,
        request_id: str,
        token_ids: list[int],
        wire: dict[str, Any],
        hashes: list[int],
        session_id: str | None,
        role: str = "decode",
        leg: dict[str, Any] | None = None,
    ) -> tuple[Inbox, GroupState, dict[str, Any]]:
        """Start the request on the best group of `role`'s pool that accepts it -> (its inbox,
        the group, its first delta). Refusals and unreachable groups move on to the next
        candidate."""
        overloaded: Exception | None = None
        draining: Exception | None = None
        for g in self._candidates(hashes, session_id, role):
            link = g.link
            assert link is not None
            inbox = link.open(request_id)
            g.inflight += 1
            accepted = False
            running = True  # the group may be running it: abort if we leave before its answer
            try:
                refused = await link.submit(request_id, token_ids, wire, leg or None)
                first = refused or await inbox.next()
                running = False
                accepted = "error" not in first
            except (asyncio.CancelledError, InvalidRequest):  # the request's fault, not the group's
                raise
            except Exception as e:  # the group died or is restarting: try the next one
                running = False
                log.warning("replica group %s failed a request: %r", g.name, e)
                g.healthy = False
                continue
            finally:
                if not accepted:
                    g.inflight -= 1
                    link.close(request_id, abort=running)
            if accepted:
                if session_id:
                    self.sessions.pin(session_id, g.name)
                if self.policy.uses_prefix:
                    g.add_pending(hashes, self.config.pending_prefix_ttl_s)
                return inbox, g, first
            err = error_from_group(first["error"])
            if isinstance(err, EngineOverloaded):
                overloaded = err
            elif isinstance(err, EngineDraining):
                draining = err  # healthy, but leaving: the next group may take it
            elif isinstance(err, EngineDead):
                g.healthy = False
            else:
                raise err
        if overloaded is not None:
            raise overloaded
        if draining is not None:
            raise draining
        raise NoHealthyGroup("no replica group accepted the request")

    def prompt_limits(self) -> Limits:
        if self.limits is None:
            raise NoHealthyGroup("the router has not reached a replica group yet")
        return self.limits

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        from router.validation import check_prompt_text, check_token_ids

        limits = self.prompt_limits()
        if isinstance(prompt, str):
            check_prompt_text(prompt, limits)
            assert self.tokenizer is not None
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise InvalidRequest("prompt", "must not be empty")
        check_token_ids(ids, limits)
        return ids
