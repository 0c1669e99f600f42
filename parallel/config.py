"""Parallel layout of one replica group."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from parallel.resources import CustomResources


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
        description="CPU tensor-parallel all-reduce: shm = through shared memory (every rank of "
        "a stage on one Ray node, native kernels); gloo = torch.distributed; auto = shm when "
        "the stage's ranks share a Ray node (same node id), else gloo.",
    )
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = Field(
        "pack",
        description="Ray placement strategy of the ranks: pack (default: one node when it fits, "
        "so the all-reduce can use shared memory), spread (across nodes when it can: more "
        "cores or memory per rank, gloo over the network), strict_pack (one node or fail), "
        "strict_spread (every rank on its own node or fail).",
    )
    rank_resources: CustomResources = Field(
        default_factory=dict,
        description="Ray custom resources each rank asks for besides its CPUs (e.g. "
        "{node_b: 0.1}): ranks only go to nodes that have them.",
    )
    cpus_per_rank: float = Field(1.0, gt=0, description="Ray CPUs reserved per worker actor.")
    cpu_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="With model.num_threads unset: the share of each node's cores this group's "
        "ranks on that node use together (each rank counts its own node's cores). None = "
        "int(cpus_per_rank) threads per rank. A Serve deployment sets it to each group's share.",
    )
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
