"""Request and group metrics, exported by Ray's metrics agent in Prometheus format.

Ray prefixes every name with `ray_` (e.g. `ray_flotilla_time_to_first_token_seconds`); scrape
the node's metrics export port (`flotilla serve` prints it). Every series carries `model` and
`group` tags. Latencies are measured in the router, so they include routing and the hops
between router and group -- what a client sees minus the proxy.

Where each value comes from:
  * measured here, per request: TTFT, ITL, end-to-end latency, finish reasons
    (`flotilla_request_success{finished_reason}`: stop | length | abort | error, one per
    request -- per choice when n > 1), prompt / generation tokens per request;
  * from a group's last delta of each leg (cluster.replica_group): queue / prefill / decode
    time in that group, preemptions, prefix-cache queries and hits in tokens. As counters and
    histograms (not the groups' cumulative totals) they window with rate() and add up across
    router replicas without counting a group twice. A request that moved between groups (a
    P/D hand-off, a migration) is timed once per group it ran on; a leg its client cancelled
    sends no last delta and is not timed.
  * from the groups' stats polls: running / waiting, KV usage, the prefix-cache hit rate
    since the group started (kept for older dashboards; prefer the counters) and KV hand-off
    totals.

Every value is also kept in process (router.metrics_mirror) for the router's own
`GET /metrics`: the same names, this replica's share only. Outside a Ray worker (unit tests)
`RequestMetrics(enabled=False)` records to that mirror alone.
"""

from __future__ import annotations

from typing import Any

from router.metrics_mirror import Mirror

# Seconds. TTFT and end-to-end span interactive to long generations; ITL is per token.
# fmt: off
_TTFT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
_E2E_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0]
# Queue / prefill / decode time in a group: from a free slot (~ms) to a long queue.
_PHASE_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                  20.0, 40.0, 80.0, 160.0, 320.0, 640.0]
# Tokens per request, 1-2-5 steps (vLLM's) up to a 1M-token context.
_BYTE_BUCKETS = [float(1 << e) for e in range(16, 34, 2)]  # 64 KiB .. 4 GiB
_TOKEN_BUCKETS = [m * 10**e for e in range(6) for m in (1, 2, 5)] + [1_000_000]
# fmt: on
_TAGS = ("model", "group")


class _Noop:
    def observe(self, *a: Any, **k: Any) -> None: ...
    def inc(self, *a: Any, **k: Any) -> None: ...
    def set(self, *a: Any, **k: Any) -> None: ...


class _Both:
    """One metric recorded to Ray and to the in-process mirror."""

    __slots__ = ("ray", "mirror")

    def __init__(self, ray_metric: Any, mirror_metric: Any):
        self.ray, self.mirror = ray_metric, mirror_metric

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.ray.observe(value, tags=tags)
        self.mirror.observe(value, tags=tags)

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        # Ray refuses 0; the mirror takes it, so a series exists (rate() = 0, not "no data")
        # from the first request on.
        if value > 0:
            self.ray.inc(value, tags=tags)
        self.mirror.inc(value, tags=tags)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.ray.set(value, tags=tags)
        self.mirror.set(value, tags=tags)


class RequestMetrics:
    def __init__(self, model: str, enabled: bool = True):
        self.model = model
        self.mirror = Mirror()
        mirror = self.mirror
        if enabled:
            from ray.util import metrics as m

            def hist(name, desc, buckets, tags=_TAGS):
                return _Both(
                    m.Histogram(name, desc, boundaries=buckets, tag_keys=tags),
                    mirror.histogram(name, desc, buckets, tags),
                )

            def gauge(name, desc):
                return _Both(m.Gauge(name, desc, tag_keys=_TAGS), mirror.gauge(name, desc, _TAGS))

            def counter(name, desc, tags=_TAGS):
                return _Both(m.Counter(name, desc, tag_keys=tags), mirror.counter(name, desc, tags))
        else:

            def hist(name, desc, buckets, tags=_TAGS):
                return _Both(_Noop(), mirror.histogram(name, desc, buckets, tags))

            def gauge(name, desc):
                return _Both(_Noop(), mirror.gauge(name, desc, _TAGS))

            def counter(name, desc, tags=_TAGS):
                return _Both(_Noop(), mirror.counter(name, desc, tags))

        self.ttft = hist(
            "flotilla_time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS
        )
        self.itl = hist(
            "flotilla_inter_token_latency_seconds", "Time between output tokens.", _ITL_BUCKETS
        )
        self.e2e = hist(
            "flotilla_e2e_request_latency_seconds",
            "Request latency, arrival to last token.",
            _E2E_BUCKETS,
        )
        self.prompt_tokens = counter("flotilla_prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("flotilla_generation_tokens", "Tokens generated.")
        self.requests = counter(
            "flotilla_requests", "Finished requests by outcome.", _TAGS + ("outcome",)
        )
        # vLLM's names (vllm:request_success, vllm:num_preemptions, ...) under our prefix.
        self.finished = counter(
            "flotilla_request_success",
            "Requests ended, by finish reason (stop, length, abort, error).",
            _TAGS + ("finished_reason",),
        )
        self.request_prompt_tokens = hist(
            "flotilla_request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS
        )
        self.request_generation_tokens = hist(
            "flotilla_request_generation_tokens",
            "Tokens returned per request.",
            _TOKEN_BUCKETS,
        )
        self.queue_time = hist(
            "flotilla_request_queue_time_seconds",
            "Time a request waited in a group's queue before it was first scheduled.",
            _PHASE_BUCKETS,
        )
        self.prefill_time = hist(
            "flotilla_request_prefill_time_seconds",
            "Time from first scheduled to first token in a group.",
            _PHASE_BUCKETS,
        )
        self.decode_time = hist(
            "flotilla_request_decode_time_seconds",
            "Time from first to last token in a group.",
            _PHASE_BUCKETS,
        )
        self.preemptions = counter(
            "flotilla_num_preemptions", "Times a request was preempted (its KV recomputed)."
        )
        self.prefix_queries = counter(
            "flotilla_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_hits = counter(
            "flotilla_prefix_cache_hits", "Prompt tokens found in the prefix cache."
        )
        self.running = gauge("flotilla_requests_running", "Requests running in the group.")
        self.waiting = gauge("flotilla_requests_waiting", "Requests waiting in the group's queue.")
        self.kv_usage = gauge("flotilla_kv_cache_usage", "Fraction of KV blocks in use (0-1).")
        self.prefix_hit_rate = gauge(
            "flotilla_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache (0-1)."
        )
        # Speculative decoding (vLLM's spec_decode_num_*_tokens): groups report running totals;
        # the counters take each group's increase (record_group).
        self.spec = {
            key: counter(f"flotilla_{key}", desc)
            for key, desc in (
                ("spec_decode_num_draft_tokens", "Draft tokens verified (speculative decoding)."),
                ("spec_decode_num_accepted_tokens", "Draft tokens accepted by the target."),
            )
        }
        self._spec_seen: dict[tuple[str, str], int] = {}
        # Moving requests between groups: counted where the router decides...
        self.migrations = counter(
            "flotilla_request_migrations", "Requests resumed on another group after theirs died."
        )
        self.prefill_fallbacks = counter(
            "flotilla_prefill_fallbacks", "Prompts prefilled on a decode group (no prefill group)."
        )
        # Each KV hand-off a decode group made, by how (shm, inline, recompute)...
        self.kv_transfer_time = hist(
            "flotilla_kv_transfer_time_seconds",
            "A decode group's fetch of a prompt's KV, from asking to imported or given up.",
            _PHASE_BUCKETS,
            _TAGS + ("via",),
        )
        self.kv_transfer_size = hist(
            "flotilla_kv_transfer_size_bytes",
            "Bytes of prompt KV a decode group received per hand-off.",
            _BYTE_BUCKETS,
            _TAGS + ("via",),
        )
        # ...and the groups' own KV hand-off totals, mirrored from their stats (cumulative).
        self.kv = {
            key: gauge(f"flotilla_{key}", desc)
            for key, desc in (
                ("kv_leases", "Prompts' KV held under a lease for a decode group."),
                ("kv_lease_blocks", "KV blocks held under leases for decode groups."),
                ("kv_lease_expiries", "Leases that ran out before a decode group took them."),
                ("kv_imports", "Prompts' KV imported from a prefill group."),
                ("kv_recomputes", "Hand-offs whose KV did not arrive: the prompt was recomputed."),
                ("kv_transfer_bytes", "KV bytes received from prefill groups."),
                ("kv_transfer_seconds", "Seconds spent receiving KV from prefill groups."),
                ("kv_dist_imports", "Prompts' KV received over a pair group (kv_transport dist)."),
                ("kv_link_failures", "Pair groups that failed to open or to carry a hand-off."),
            )
        }

    def tags(self, group: str) -> dict[str, str]:
        return {"model": self.model, "group": group}

    def record_group(self, group: str, stats: dict[str, Any]) -> None:
        t = self.tags(group)
        self.running.set(stats["num_running"], tags=t)
        self.waiting.set(stats["num_waiting"], tags=t)
        self.kv_usage.set(stats["kv_usage"], tags=t)
        self.prefix_hit_rate.set(stats["prefix_hit_rate"], tags=t)
        for key, g in self.kv.items():
            if key in stats:
                g.set(stats[key], tags=t)
        for key, c in self.spec.items():
            total = stats.get(key.replace("spec_decode_", "spec_"))
            if total is None:
                continue  # an older group
            # A restarted group starts again from 0: count its new total from there.
            last = self._spec_seen.get((group, key), 0)
            inc = total - last if total >= last else total
            if inc > 0:
                c.inc(inc, tags=t)
            self._spec_seen[(group, key)] = total

    def forget_group(self, group: str) -> None:
        """A group left: Ray keeps a gauge's last value, so zero its load rather than let a
        departed group look busy forever."""
        t = self.tags(group)
        for g in (self.running, self.waiting, self.kv_usage):
            g.set(0, tags=t)
        for key in self.spec:
            self._spec_seen.pop((group, key), None)

    def record_finished(
        self,
        group: str,
        outcome: str,
        prompt_tokens: int,
        output_tokens: int,
        ttft: float | None,
        e2e: float,
    ) -> None:
        t = self.tags(group)
        self.requests.inc(1, tags={**t, "outcome": outcome})
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens, tags=t)
        if output_tokens:
            self.generation_tokens.inc(output_tokens, tags=t)
        if ttft is not None:
            self.ttft.observe(ttft, tags=t)
        self.e2e.observe(e2e, tags=t)

    def record_leg_end(self, group: str, msg: dict[str, Any]) -> None:
        """A group's last delta of one leg (finished or handed off): its timings, preemptions
        and prefix-cache lookup. Keys a group does not send (an older one) record nothing."""
        t = self.tags(group)
        timing = msg.get("timing")
        if timing:
            self.queue_time.observe(timing["queue"], tags=t)
            self.prefill_time.observe(timing["prefill"], tags=t)
            self.decode_time.observe(timing["decode"], tags=t)
        if "preemptions" in msg:
            self.preemptions.inc(msg["preemptions"], tags=t)
        transfer = msg.get("kv_transfer")
        if transfer:
            tv = {**t, "via": transfer["via"]}
            self.kv_transfer_time.observe(transfer["seconds"], tags=tv)
            self.kv_transfer_size.observe(transfer["bytes"], tags=tv)
        usage = msg.get("usage")
        if usage:
            # A resumed leg's cache may also hold its earlier output tokens: never above 100%.
            queries = usage["prompt_tokens"]
            self.prefix_queries.inc(queries, tags=t)
            self.prefix_hits.inc(min(usage.get("cached_tokens", 0), queries), tags=t)

    def record_request(
        self, group: str, reason: str, prompt_tokens: int, generation_tokens: int
    ) -> None:
        """A request ended (once, whatever its legs): `reason` stop | length | abort | error,
        `group` the last one it ran on ("router" if none took it)."""
        t = self.tags(group)
        self.finished.inc(1, tags={**t, "finished_reason": reason})
        self.request_prompt_tokens.observe(prompt_tokens, tags=t)
        self.request_generation_tokens.observe(generation_tokens, tags=t)
