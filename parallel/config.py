"""Parallel layout of one replica group."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ParallelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tp: int = Field(1, ge=1, le=64, description="Tensor-parallel ranks.")
    pp: int = Field(1, ge=1, le=64, description="Pipeline stages.")
    ep: int = Field(1, ge=1, le=64, description="Expert-parallel ranks (MoE layers).")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto = nccl on CUDA, gloo on CPU."
    )
    cpus_per_rank: float = Field(1.0, gt=0, description="Ray CPUs reserved per worker actor.")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp
