"""Device placement, checked without a GPU.

A step must create every tensor on the model's device: on CUDA a tensor made without `device=`
lands on the host, and the first op mixing it with a CUDA tensor fails (or, for an index,
silently syncs). On this CPU-only machine the host *is* the model's device, so such a mistake
is invisible -- unless the default device is something else. These tests run real steps of a
tiny random-weight model on the CPU (torch kernels, float32) with the default device set to
`meta` and a TorchFunctionMode that checks every torch call: any tensor that is not on the
model's device (a `meta` one made without `device=`, or one moved elsewhere) fails the test at
the call that made it, with the line. Pipeline-parallel transfers go through fake send/recv
that record the device of what is sent and received (NCCL takes only CUDA tensors).

What this cannot catch: code that branches on `device.type` (a `.cpu()` only taken when the
device is not the CPU) -- that needs the GPU smoke run (benchmarks/gpu_smoke.py).
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from cluster.config import CacheConfig, EngineConfig, SchedulerConfig
from cluster.engine import LLMEngine
from parallel.groups import SINGLE_RANK, ParallelGroups
from workers.config import ModelConfig
from workers.messages import NewRequest, SeqPlan, StepPlan
from workers.model_runner import ModelRunner
from workers.sampling_params import SamplingParams


class DeviceChecker(TorchFunctionMode):
    """Fails on the first torch call that takes or returns a tensor off `device`."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def _check(self, func, what: str, tree) -> None:
        for t in tree_leaves(tree):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                here = "".join(traceback.format_stack(limit=6)[:-2])
                name = getattr(func, "__qualname__", None) or repr(func)
                raise AssertionError(
                    f"{name} {what} a tensor on {t.device}, the model is on {self.device}:\n{here}"
                )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._check(func, "takes", (args, kwargs))
        out = func(*args, **kwargs)
        self._check(func, "returns", out)
        return out


def checked(device: torch.device):
    """Default device `meta` (under the checker, so the checker sees what it produced)."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch.device("meta"))
    stack.enter_context(DeviceChecker(device))
    return stack


def test_checker_catches_a_tensor_made_without_device():
    with pytest.raises(AssertionError, match="on meta"), checked(torch.device("cpu")):
        torch.arange(4)
    with checked(torch.device("cpu")):
        torch.arange(4, device="cpu")


@pytest.mark.parametrize("arch", ["mistral", "qwen3_moe"])
def test_engine_steps_keep_tensors_on_the_model_device(arch, tiny_model_dir):
    """Chunked prefill (earlier context gathered with an offset mask), a prefix-cache hit,
    sliding windows (mistral), experts (qwen3_moe), decodes in length groups, and every
    sampler feature, all under the checker; the tokens match an unchecked run."""
    engine = LLMEngine(
        EngineConfig(
            model=ModelConfig(model=tiny_model_dir(arch), dtype="float32", kernels="torch"),
            cache=CacheConfig(block_size=8, num_blocks=64),
            scheduler=SchedulerConfig(max_num_batched_tokens=24),
        )
    )
    shared = [300 + i for i in range(17)]
    prompts = [shared + [7, 8, 9], [11, 12, 13, 14, 15], shared + [40] * 20, [5] * 31]
    params = [
        SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True),
        SamplingParams(
            max_tokens=6, temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, seed=3, ignore_eos=True
        ),
        SamplingParams(
            max_tokens=6,
            temperature=0.0,
            repetition_penalty=1.3,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            ignore_eos=True,
        ),
        SamplingParams(max_tokens=6, temperature=1.0, seed=5, logprobs=0, ignore_eos=True),
    ]
    want = [o.token_ids for o in engine.generate(prompts, params)]
    with checked(torch.device("cpu")):
        got = [o.token_ids for o in engine.generate(prompts, params)]
    assert got == want
    assert engine.stats().num_preemptions == 0


class FakeP2P:
    """dist.isend / dist.recv between two stages held in this process (in send order)."""

    def __init__(self):
        self.queue: list[torch.Tensor] = []
        self.devices: list[tuple[str, torch.device]] = []

    def isend(self, tensor, dst):
        self.devices.append(("send", tensor.device))
        self.queue.append(tensor.clone())

        class Done:
            def wait(self):
                return True

        return Done()

    def recv(self, tensor, src):
        self.devices.append(("recv", tensor.device))
        tensor.copy_(self.queue.pop(0))
        return src


def _stage(path: str, pp_rank: int, layers: tuple[int, int]) -> ModelRunner:
    groups = ParallelGroups(
        rank=pp_rank,
        world_size=2,
        pp_rank=pp_rank,
        pp_size=2,
        tp=SINGLE_RANK.tp,
        ep=SINGLE_RANK.ep,
        prev_rank=0 if pp_rank else None,
        next_rank=None if pp_rank else 1,
    )
    cfg = ModelConfig(model=path, dtype="float32", kernels="torch")
    runner = ModelRunner(cfg, block_size=4, groups=groups, layer_range=layers)
    runner.allocate_kv(32)
    return runner


def _run(execute) -> list[dict[str, int]]:
    """Two requests through `execute`: both prompts in one step, then three decode steps."""
    prompts = {"a": [100 + i for i in range(10)], "b": [900, 901, 902, 903, 904]}
    tables = {"a": [0, 1, 2, 3], "b": [4, 5, 6]}
    lens = {r: len(p) for r, p in prompts.items()}
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True)
    plan = StepPlan(
        0,
        [SeqPlan(r, p, 0, tables[r], True) for r, p in prompts.items()],
        [NewRequest(r, p, params) for r, p in prompts.items()],
    )
    out = []
    for step in range(1, 5):
        res = execute(plan)
        toks = dict(zip(res.req_ids, res.token_ids, strict=True))
        out.append(toks)
        plan = StepPlan(step, [SeqPlan(r, [toks[r]], lens[r], tables[r], True) for r in prompts])
        for r in prompts:
            lens[r] += 1
    return out


def test_pipeline_stages_send_and_receive_on_the_model_device(tiny_model_dir, monkeypatch):
    """A 2-stage pipeline in one process: stage 0 runs layers [0, 2) and sends hidden states,
    stage 1 receives them, runs layer 2 and samples. Everything, transfers included, stays on
    the model's device, and the tokens equal the single-rank runner's."""
    path = tiny_model_dir("llama")
    single = ModelRunner(ModelConfig(model=path, dtype="float32", kernels="torch"), block_size=4)
    single.allocate_kv(32)
    want = _run(single.execute)

    p2p = FakeP2P()
    monkeypatch.setattr(dist, "isend", p2p.isend)
    monkeypatch.setattr(dist, "recv", p2p.recv)
    first, last = _stage(path, 0, (0, 2)), _stage(path, 1, (2, 3))

    def pipelined(plan):
        with checked(torch.device("cpu")):
            assert first.execute(plan) is None
            return last.execute(plan)

    assert _run(pipelined) == want
    assert p2p.devices and {d for _, d in p2p.devices} == {torch.device("cpu")}
    assert {k for k, _ in p2p.devices} == {"send", "recv"}


def test_rope_tables_follow_the_model_device():
    """Llama 3's scaled rotary (transformers' rope-init function, which makes tensors of its
    own) built while the model is built under another default device: the tables land there.
    They used to mix a host tensor with one on the default device and fail."""
    import transformers

    from workers.models.rope import rope_tables

    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=16,
        max_position_embeddings=256,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    )
    cos, sin = rope_tables(cfg, 16, 256)
    with torch.device("meta"):
        mcos, msin = rope_tables(cfg, 16, 256)
    assert cos.device.type == "cpu" and mcos.device.type == msin.device.type == "meta"
    assert mcos.shape == cos.shape == sin.shape == (256, 16)


def test_gloo_is_refused_for_a_multi_rank_cuda_group():
    from parallel.config import ParallelConfig

    cuda = ModelConfig(device="cuda")
    with pytest.raises(ValueError, match="gloo's send/recv and all-to-all take CPU tensors"):
        EngineConfig(model=cuda, parallel=ParallelConfig(pp=2, backend="gloo"))
    EngineConfig(model=cuda, parallel=ParallelConfig(pp=2))  # auto: nccl
    EngineConfig(model=cuda, parallel=ParallelConfig(backend="gloo"))  # one rank: no transfers
