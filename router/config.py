"""Router sub-config: routing policy, sessions, API limits. Part of deploy.config.FlotillaConfig."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PolicyName = Literal["round_robin", "power_of_two", "prefix_aware"]


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: PolicyName = Field(
        "prefix_aware",
        description="How a request picks its replica group: round_robin, power_of_two (the "
        "less loaded of two random groups) or prefix_aware (the group holding the longest "
        "cached prefix of the prompt, ties broken by load).",
    )
    session_header: str = Field(
        "x-session-id",
        min_length=1,
        description="HTTP header (gRPC: the session_id field) that pins a conversation to one "
        "group while that group stays healthy.",
    )
    max_sessions: int = Field(100_000, ge=1, description="Pinned sessions kept (LRU).")
    stats_interval_s: float = Field(
        0.25, ge=0.01, le=60, description="How often the router polls each group's load and cache."
    )
    max_load_imbalance: float = Field(
        8.0,
        ge=0,
        description="prefix_aware: ignore a cache hit on a group whose load exceeds the least "
        "loaded group's by more than this many requests.",
    )
    pending_prefix_ttl_s: float = Field(
        10.0,
        ge=0,
        description="prefix_aware: how long the hashes of a prompt just routed to a group count "
        "as cached there before the group's own published hashes confirm them.",
    )
    max_n: int = Field(8, ge=1, le=128, description="Most completions per request (`n`).")
    max_prompt_chars: int = Field(
        1_000_000, ge=1, description="Longest prompt text accepted before tokenizing."
    )
    max_body_bytes: int = Field(
        16 << 20,
        ge=1024,
        description="Largest HTTP request body read (413 past it, before it is all in memory).",
    )
    max_messages: int = Field(
        1024, ge=1, description="Most chat messages in one request (HTTP and gRPC)."
    )
    max_stop_strings: int = Field(16, ge=0, description="Most stop strings in one request.")
    max_stop_chars: int = Field(1024, ge=1, description="Longest stop string accepted.")
    api_keys: list[str] = Field(
        default_factory=list,
        description="Accepted API keys (HTTP `Authorization: Bearer KEY`, gRPC metadata "
        "`authorization: Bearer KEY`); empty with no api_keys_env = no authentication. Keys "
        "written here are visible to whoever can read the Serve config: prefer api_keys_env.",
    )
    api_keys_env: str | None = Field(
        None,
        min_length=1,
        description="Name of an environment variable of the router's process holding accepted "
        "API keys, comma-separated (set it where Ray starts: `flotilla serve`'s shell, or "
        "`ray start` on each node). Unset or empty variable: only api_keys count.",
    )
    unknown_fields: Literal["ignore", "reject"] = Field(
        "ignore",
        description="OpenAI request fields this server does not know: ignore = serve the "
        "request (the names are logged and returned in the x-flotilla-ignored-fields header), "
        "except a name that looks like a typo of a known field (400 with the likely name); "
        "reject = 400 for any unknown field.",
    )
    data_plane: Literal["direct", "serve"] = Field(
        "direct",
        description="How the router talks to its groups once started: direct = one TCP "
        "connection per group to the group's own server (~0.1 ms a message); serve = Serve "
        "handle calls and a Serve stream (~3 ms a call; a test seam: a Serve handle reaches "
        "some replica of a pool, not a chosen one, so only fakes with a handle per group use "
        "it).",
    )
    discovery_interval_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="How often the router re-reads which replica groups exist (groups join "
        "and leave as pools scale); a new group gets requests within about this long.",
    )
    max_migrations: int = Field(
        2,
        ge=0,
        le=16,
        description="How many times one request may move to another group after its group "
        "died under it (resumed after the tokens already sent: re-prefill of prompt + "
        "output); past it the request fails with UNAVAILABLE / 503.",
    )
    group_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A group that has not answered a stats call for this long (its event "
        "loop hung, its connection alive but silent) counts as dead for the requests it runs "
        "for this router: each moves to another group, resumed after the tokens already "
        "sent. It is marked unhealthy as soon as one stats call fails.",
    )
    pd_min_prompt_tokens: int = Field(
        256,
        ge=0,
        description="With prefill/decode pools: prompts shorter than this are prefilled by "
        "the decode group itself (the hand-off would cost more than the prefill).",
    )
    pd_max_prefill_queue: int = Field(
        8,
        ge=0,
        description="With prefill/decode pools: while every prefill group has more requests "
        "waiting than this, new prompts are prefilled by the decode group.",
    )
    startup_timeout_s: float = Field(
        600, gt=0, description="How long the router waits for a first group to answer."
    )
