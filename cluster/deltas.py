"""What a replica group sends for a request: one delta per engine output (token ids, text,
logprobs; on the last one finish, usage and the optional keys the router's metrics read), or
an error delta. The shapes are documented in cluster/replica_group.py."""

from __future__ import annotations

from typing import Any

from workers.errors import EngineDraining, EngineOverloaded, InvalidRequest
from workers.sampling_params import SamplingParams

ERROR_KINDS = ("invalid", "overloaded", "draining", "dead")


def encode_error(exc: BaseException) -> dict[str, Any]:
    """The wire form of an engine error (see the module docstring)."""
    if isinstance(exc, InvalidRequest):
        return {"kind": "invalid", "field": exc.field, "message": exc.message}
    if isinstance(exc, EngineOverloaded):
        return {"kind": "overloaded", "field": None, "message": str(exc)}
    if isinstance(exc, EngineDraining):
        return {"kind": "draining", "field": None, "message": str(exc)}
    return {"kind": "dead", "field": None, "message": f"replica group failed: {exc}"}


def delta(out, params: SamplingParams, group: str) -> dict[str, Any]:
    """The message for one engine output of a request (see cluster/replica_group.py's
    docstring for the shapes); `group`: this group's name (a hand-off names its source)."""
    msg: dict[str, Any] = {"ids": out.new_token_ids, "text": out.delta_text, "lp": None}
    if params.logprobs is not None:
        msg["lp"] = [
            None if lp is None else (lp.token_logprob, lp.top_ids, lp.top_logprobs)
            for lp in out.new_logprobs
        ]
    if out.finished:
        msg["finish"] = out.finish_reason
        if out.stop_reason is not None:  # token id or stop string (gRPC's finish_reason_code)
            msg["stop"] = out.stop_reason
        msg["usage"] = {
            "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": len(out.token_ids),
            "cached_tokens": out.num_cached_tokens,
        }
        msg["preemptions"] = out.num_preemptions
        timing = leg_timing(out)
        if timing is not None:
            msg["timing"] = timing
    if out.finish_reason == "handoff":
        msg["handoff"] = {"group": group, "kv_tokens": len(out.kv[0]) if out.kv else 0}
    if out.first_token_time is not None and len(out.token_ids) == len(out.new_token_ids):
        msg["ttft"] = out.first_token_time - out.arrival_time  # queue + prefill in the group
    return msg


def leg_timing(out) -> dict[str, float] | None:
    """Seconds this leg spent queued, prefilling (admitted -> first token) and decoding (first
    -> last token) in this group: the router's per-phase histograms. Optional on the wire: a
    router that does not know the key ignores it, one that gets no key records nothing."""
    if out.scheduled_time is None or out.first_token_time is None or out.finished_time is None:
        return None
    return {
        "queue": max(0.0, out.scheduled_time - out.arrival_time),
        "prefill": max(0.0, out.first_token_time - out.scheduled_time),
        "decode": max(0.0, out.finished_time - out.first_token_time),
    }
