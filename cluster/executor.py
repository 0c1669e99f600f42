"""Executors run a StepPlan on the ranks of one replica group.

`LocalExecutor` runs a single rank in this process. Multi-rank groups (tensor / pipeline /
expert parallel, one Ray actor per rank) implement the same interface, so the engine does not
know how many ranks it drives.
"""

from __future__ import annotations

from typing import Any, Protocol

from cluster import kv_shards
from cluster.config import EngineConfig
from workers.messages import StepPlan, StepResult


class Executor(Protocol):
    num_blocks: int
    hf_config: Any

    def execute(self, plan: StepPlan) -> StepResult: ...

    def kv_layout(self) -> tuple[int, int, int, str]: ...

    def export_blocks(self, block_ids: list[int], out: Any = None) -> Any:
        """The blocks in the whole model's form, written into `out` when given (and fitting)."""
        ...

    def import_blocks(self, block_ids: list[int], data: Any) -> None: ...

    def layout(self) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    def __init__(self, config: EngineConfig):
        from workers.model_runner import ModelRunner

        c, spec = config.cache, config.speculative
        self.runner = ModelRunner(
            config.model,
            block_size=c.block_size,
            kv_dtype=c.kv_dtype,
            draft=spec.draft if spec is not None else None,
        )
        self.runner.allocate_kv(
            c.num_blocks or self.runner.blocks_for_memory(c.kv_cache_memory_gib)
        )
        self.num_blocks = self.runner.num_blocks
        self.hf_config = self.runner.hf_config

    def execute(self, plan: StepPlan) -> StepResult:
        return self.runner.execute(plan)

    def kv_layout(self) -> tuple[int, int, int, str]:
        """(layers, KV heads, head dim, dtype): one rank holds the whole model's KV."""
        return kv_shards.whole([self.runner.kv_shard()])

    def export_blocks(self, block_ids: list[int], out=None):
        return self.runner.export_blocks(block_ids, out)

    def import_blocks(self, block_ids: list[int], data) -> None:
        self.runner.import_blocks(block_ids, data)

    def layout(self) -> dict[str, Any]:
        """One rank in this process: nothing to all-reduce (RayExecutor.layout: its ranks)."""
        return {"all_reduce": "none"}

    def shutdown(self) -> None:
        pass


def make_executor(config: EngineConfig) -> Executor:
    if config.parallel.is_single:
        return LocalExecutor(config)
    from cluster.ray_executor import RayExecutor

    return RayExecutor(config)
