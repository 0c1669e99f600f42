"""The step runner of one rank: owns the model, the paged KV tensors and per-request sampling
state; turns a StepPlan into flat input tensors, runs the forward pass, samples.

Layout of a step's flat batch: decode tokens first (one per request), then prefill chunks, so
attention can batch all decodes in one call.
"""

from __future__ import annotations

import contextlib

import torch

from parallel.layers import SINGLE, TPGroup
from workers.attention import build_metadata
from workers.config import ModelConfig
from workers.loader import iter_weights, load_hf_config, resolve_model_path
from workers.messages import SeqPlan, StepPlan, StepResult
from workers.models.llama import LlamaForCausalLM
from workers.sampler import SamplingState, sample

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        block_size: int,
        num_blocks: int | None = None,
        kv_cache_memory_gib: float = 1.0,
        tp: TPGroup = SINGLE,
        layer_range: tuple[int, int] | None = None,
    ):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, config.device)
        self.block_size = block_size
        path = resolve_model_path(config.model)
        self.hf_config = load_hf_config(path)
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = LlamaForCausalLM(self.hf_config, tp, layer_range)
        self.model.load_weights(iter_weights(path, self.dtype))
        self.model.eval()

        layers, kvh, hd = self.model.kv_layout()
        bytes_per_block = 2 * layers * block_size * kvh * hd * self.dtype.itemsize
        if num_blocks is None:
            num_blocks = max(2, int(kv_cache_memory_gib * 2**30) // bytes_per_block)
        self.num_blocks = num_blocks
        self.kv_caches = [
            torch.zeros(2, num_blocks, block_size, kvh, hd, dtype=self.dtype, device=self.device)
            for _ in range(layers)
        ]
        self.states: dict[str, SamplingState] = {}
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(config.seed)

    # ---- per-request state ------------------------------------------------------------------
    def _update_states(self, plan: StepPlan) -> None:
        for req_id in plan.finished_req_ids:
            self.states.pop(req_id, None)
        for nr in plan.new_requests:
            st = SamplingState.create(nr.params, len(nr.prompt_token_ids))
            st.token_ids = list(nr.prompt_token_ids)
            self.states[nr.req_id] = st
        for seq in plan.seqs:
            hist = self.states[seq.req_id].token_ids
            end = seq.start_pos + len(seq.token_ids)
            if end > len(hist):
                hist.extend(seq.token_ids[len(hist) - seq.start_pos :])

    # ---- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        self._update_states(plan)
        if not plan.seqs:
            return StepResult(plan.step_id, [], [])
        decodes = [s for s in plan.seqs if s.is_decode]
        prefills = [s for s in plan.seqs if not s.is_decode]
        ordered = decodes + prefills
        ids, positions, slots = [], [], []
        bs = self.block_size
        prefill_meta = []
        sample_rows: list[int] = []
        sample_seqs: list[SeqPlan] = []
        for seq in ordered:
            n = len(seq.token_ids)
            q0 = len(ids)
            ids.extend(seq.token_ids)
            table = seq.block_table
            for p in range(seq.start_pos, seq.start_pos + n):
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            if not seq.is_decode:
                used = -(-(seq.start_pos + n) // bs)
                prefill_meta.append((q0, n, seq.start_pos, table[:used]))
            if seq.sample:
                sample_rows.append(len(ids) - 1)
                sample_seqs.append(seq)
        meta = build_metadata(
            positions,
            slots,
            [s.block_table[: -(-(s.start_pos + 1) // bs)] for s in decodes],
            [s.start_pos + 1 for s in decodes],
            prefill_meta,
            bs,
            self.device,
        )
        input_ids = torch.tensor(ids, device=self.device)
        hidden = self.model(input_ids, None, meta, self.kv_caches)
        if not sample_seqs:
            return StepResult(plan.step_id, [], [])
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        states = [self.states[s.req_id] for s in sample_seqs]
        tokens, lps = sample(logits.cpu(), states, self.generator)
        # Report in plan order.
        order = {s.req_id: i for i, s in enumerate(sample_seqs)}
        req_ids = [s.req_id for s in plan.seqs if s.sample]
        toks = [tokens[order[r]] for r in req_ids]
        lp = [lps[order[r]] for r in req_ids] if lps is not None else None
        return StepResult(plan.step_id, req_ids, toks, lp)

    # ---- KV export / import (disaggregated prefill) ----------------------------------------
    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """[layers, 2, n, block_size, kv_heads, head_dim] copy of the given blocks."""
        idx = torch.tensor(block_ids, device=self.device)
        return torch.stack([c[:, idx] for c in self.kv_caches]).cpu()

    def import_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, device=self.device)
        for c, d in zip(self.kv_caches, data, strict=True):
            c[:, idx] = d.to(device=self.device, dtype=c.dtype)
