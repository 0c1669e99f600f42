"""What a decode group accepts from a prefill group: the whole model's KV blocks of the same
layout -- model, layers, KV heads, head dim, dtype, block size. Ranks' shards gather into and
scatter out of that form (replicated heads included); anything that does not fit is refused
with the reason, and a replica group recomputes instead of importing it."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from cluster import kv_shards, kv_transfer
from cluster.kv_transfer import KVLayout

LAYOUT = KVLayout("tiny", layers=3, kv_heads=2, head_dim=16, dtype="float32", block_size=8)


@pytest.mark.parametrize(
    "field,value",
    [("model", "other"), ("layers", 4), ("kv_heads", 4), ("head_dim", 32), ("dtype", "bfloat16"),
     ("block_size", 16)],
)  # fmt: skip
def test_a_layout_mismatch_names_the_field(field, value):
    sent = KVLayout(**{**LAYOUT.__dict__, field: value})
    assert LAYOUT.mismatch(sent) == f"{field} {value!r} != {getattr(LAYOUT, field)!r}"
    data = torch.zeros(sent.shape(2), dtype=getattr(torch, sent.dtype))
    with pytest.raises(ValueError, match=f"does not match this group's: {field}"):
        LAYOUT.check(list(range(16)), data, sent)
    assert LAYOUT.mismatch(LAYOUT) is None


def test_data_without_a_layout_is_checked_by_shape_and_dtype():
    LAYOUT.check(list(range(17)), torch.zeros(LAYOUT.shape(2)), None)  # 2 full blocks
    with pytest.raises(ValueError, match=r"shape \[3, 2, 2, 8, 1, 16\] float32"):
        LAYOUT.check(list(range(16)), torch.zeros(3, 2, 2, 8, 1, 16), None)
    with pytest.raises(ValueError, match="bfloat16"):
        LAYOUT.check(list(range(16)), torch.zeros(LAYOUT.shape(2), dtype=torch.bfloat16), None)


def _shard(layers, heads):
    return {"layers": list(layers), "heads": list(heads), "head_dim": 16, "dtype": "float32"}


@pytest.mark.parametrize(
    "shards",
    [
        [_shard((0, 3), (0, 2))],  # one rank
        [_shard((0, 3), (0, 1)), _shard((0, 3), (1, 2))],  # tp=2: a head each
        [_shard((0, 2), (0, 2)), _shard((2, 3), (0, 2))],  # pp=2
        # tp=4 on 2 KV heads: pairs of ranks replicate a head
        [_shard((0, 3), (0, 1)), _shard((0, 3), (0, 1)), _shard((0, 3), (1, 2)),
         _shard((0, 3), (1, 2))],
        [_shard((0, 3), (0, 2)), _shard((0, 3), (0, 2))],  # ep=2 without tp: replicas
        [_shard((0, 2), (0, 1)), _shard((0, 2), (1, 2)), _shard((2, 3), (0, 1)),
         _shard((2, 3), (1, 2))],  # tp=2 x pp=2
    ],
    ids=["single", "tp2", "pp2", "tp4-replicated", "ep2", "tp2xpp2"],
)  # fmt: skip
def test_shards_gather_into_and_scatter_out_of_the_whole(shards):
    whole = torch.randn(3, 2, 4, 8, 2, 16)
    assert kv_shards.whole(shards) == (3, 2, 16, "float32")
    parts = [kv_shards.scatter(s, whole) for s in shards]  # what each rank holds
    ranks = kv_shards.holders(shards)
    assert len(ranks) == len({(*s["layers"], *s["heads"]) for s in shards})
    assert torch.equal(kv_shards.gather(shards, {r: parts[r] for r in ranks}), whole)


def test_shards_that_leave_a_gap_are_refused():
    with pytest.raises(ValueError, match="do not cover 3 layers x 2 heads"):
        kv_shards.whole([_shard((0, 3), (0, 1)), _shard((0, 2), (1, 2))])


def _group(layout: KVLayout):
    """Just what ReplicaGroup._fitting_kv reads of its group."""
    return SimpleNamespace(
        engine=SimpleNamespace(engine=SimpleNamespace(kv_layout=layout)), arena_maps=None
    )


def test_a_group_recomputes_kv_that_does_not_fit_and_says_why(caplog):
    from cluster.replica_group import ReplicaGroup

    tokens = list(range(20))
    data = torch.randn(LAYOUT.shape(2))
    msg = kv_transfer.pack(tokens[:16], data, LAYOUT)
    got = ReplicaGroup._fitting_kv(_group(LAYOUT), msg, "r1", "prefill-a")
    assert got is not None and got[0] == tokens[:16] and torch.equal(got[1], data)
    other = KVLayout(**{**LAYOUT.__dict__, "dtype": "bfloat16"})
    with caplog.at_level(logging.WARNING, logger="cluster.replica_group"):
        assert ReplicaGroup._fitting_kv(_group(other), msg, "r2", "prefill-a") is None
    assert "KV of r2 from prefill-a does not fit, recomputing" in caplog.text
    assert "dtype 'float32' != 'bfloat16'" in caplog.text


def test_an_engine_refuses_kv_of_another_dtype_and_keeps_its_blocks(tiny_model_dir):
    from cluster.config import CacheConfig, EngineConfig
    from cluster.engine import LLMEngine
    from workers.config import ModelConfig
    from workers.sampling_params import SamplingParams

    def engine(dtype: str) -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model=ModelConfig(model=tiny_model_dir("llama"), dtype=dtype, num_threads=1),
                cache=CacheConfig(block_size=8, num_blocks=32),
            )
        )

    bf16, fp32 = engine("bfloat16"), engine("float32")
    prompt = [100 + i for i in range(20)]
    bf16.add_request(prompt, SamplingParams(max_tokens=4, temperature=0.0), handoff=True)
    while bf16.has_unfinished():
        out = bf16.step()
    tokens, data = out[-1].kv
    with pytest.raises(ValueError, match="dtype 'bfloat16' != 'float32'"):
        fp32.import_kv(tokens, data, bf16.kv_layout)
    with pytest.raises(ValueError, match="bfloat16"):  # no layout: the data's dtype says it
        fp32.import_kv(tokens, data)
    bm = fp32.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not bm.cached_block_hashes()
