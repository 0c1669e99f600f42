"""Engine sub-configs (KV cache, scheduler) and the EngineConfig a replica group receives."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from parallel.config import ParallelConfig
from workers.config import ModelConfig


class CacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block.")
    num_blocks: int | None = Field(
        None, ge=2, description="KV blocks per rank; default derives from kv_cache_memory_gib."
    )
    kv_cache_memory_gib: float = Field(1.0, gt=0, le=4096, description="KV memory per rank.")
    enable_prefix_caching: bool = Field(True, description="Share full blocks by hash chain.")


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_batched_tokens: int = Field(
        2048, ge=1, description="Token budget per step (decodes first, then prefill chunks)."
    )
    max_num_seqs: int = Field(128, ge=1, description="Most requests running at once.")
    max_waiting: int = Field(4096, ge=1, description="Queued requests before new ones are refused.")
    enable_chunked_prefill: bool = Field(True, description="Split prompts across steps.")


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig = Field(default_factory=ModelConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

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
        return self
