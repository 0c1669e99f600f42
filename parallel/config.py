"""Parallel layout of one replica group."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ParallelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tp: int = Field(1, ge=1, le=64, description="Tensor-parallel ranks.")
    pp: int = Field(1, ge=1, le=64, description="Pipeline stages.")
    ep: int = Field(1, ge=1, le=64, description="Expert-parallel ranks (MoE layers).")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto = nccl on CUDA, gloo on CPU."
    )
    cpu_all_reduce: Literal["auto", "shm", "gloo"] = Field(
        "auto",
        description="CPU tensor-parallel all-reduce: shm = through shared memory (ranks on one "
        "node, native kernels); gloo = torch.distributed; auto = shm when possible.",
    )
    cpus_per_rank: float = Field(1.0, gt=0, description="Ray CPUs reserved per worker actor.")
    placement_timeout_s: float = Field(
        60.0, gt=0, description="How long to wait for the group's placement before failing."
    )
    step_timeout_s: float = Field(
        300.0, gt=0, description="A step taking longer marks the group unhealthy."
    )

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        if self.tp > 1 and self.ep > 1 and self.tp != self.ep:
            raise ValueError(
                f"tp={self.tp} and ep={self.ep}: expert parallelism runs on the tensor-parallel "
                "ranks of a stage, so when both are > 1 they must be equal"
            )
        return self

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage (they share attention by TP and experts by EP)."""
        return max(self.tp, self.ep)

    @property
    def world_size(self) -> int:
        return self.pp * self.stage_size

    @property
    def is_single(self) -> bool:
        return self.world_size == 1
