"""Speculative decoding with a draft model, worker side: the draft's KV cache and its
proposals (the scheduler sends DRAFT_SLOT placeholders; cluster/spec_decode.py).

Two kinds of draft (workers.config.DraftConfig):

  num_layers: N -- self-speculative: the target's own first N layers, then its final norm and
      LM head. Its KV cache *is* the target's cache of those layers: at every position the
      target computes, its first N layers write exactly the K/V the draft would (same
      weights, same tokens, same positions). So the draft has no weights, no KV memory and
      no catch-up of its own, and a prefix-cache hit, a recompute after preemption or KV
      imported from a prefill group are as valid for it as for the target.
  model: path -- another model of the target's tokenizer, with its own KV cache: one tensor
      per draft layer, indexed by the target's block tables and slots (same block size and
      block count), so the scheduler's one block manager -- allocation, prefix caching,
      preemption, trims, frees -- serves both. mirror() runs the draft over every token the
      target runs over, in the same step and with the same attention metadata (prompt
      chunks, recomputes, verify rows), so a block the target filled is filled for the draft
      too and a prefix-cache hit is valid for both. (Imported KV is not: a request decoding
      on imported blocks gets poorer drafts, never wrong tokens.)

Each step, before the target runs (propose()): a speculating sequence is [last, k slots] at
start_pos; the draft runs k batched decode passes over all of them, pass j feeding the token
at start_pos + j (the last known token, then its own previous proposal) and proposing the
next. Greedy requests take the argmax; sampled ones draw from q, the draft's distribution
with the request's temperature / top-k / top-p, and keep q for the verification
(workers/spec_decode.accept_speculative). The K/V the passes wrote at start_pos ..
start_pos + k - 1 are rewritten by the target's verify step (shared cache) or by mirror()
(own cache) before anything reads them, so rejected drafts leave nothing behind.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from workers.attention import AttentionMetadata, build_metadata
from workers.config import DraftConfig
from workers.messages import SeqPlan
from workers.models.llama import LlamaForCausalLM
from workers.sampler import SamplingState, _filter

if TYPE_CHECKING:
    from workers.model_runner import ModelRunner


class Drafter:
    """`model`: the draft's module (the target's own for a layer-truncated draft, with
    `num_layers` set); `own_cache`: whether it keeps KV tensors of its own (allocate())."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        num_layers: int | None,
        own_cache: bool,
        block_size: int,
        device: torch.device,
        native: bool,
        greedy_head: bool,
    ):
        self.model = model
        self.num_layers = num_layers
        self.own_cache = own_cache
        self.block_size = block_size
        self.device = device
        self.native = native
        self.greedy_head = greedy_head
        self.kv_caches: list[torch.Tensor] = []  # own cache, or the target's first layers

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        """KV bytes a block costs the draft (0 when it shares the target's cache)."""
        if not self.own_cache:
            return 0
        layers, kvh, hd = self.model.kv_layout()
        return 2 * layers * self.block_size * kvh * hd * dtype.itemsize

    def allocate(self, num_blocks: int, dtype: torch.dtype, target: list[torch.Tensor]) -> None:
        if not self.own_cache:
            self.kv_caches = target[: self.num_layers]
            return
        layers, kvh, hd = self.model.kv_layout()
        self.kv_caches = [
            torch.zeros(2, num_blocks, self.block_size, kvh, hd, dtype=dtype, device=self.device)
            for _ in range(layers)
        ]

    def _forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, None, meta, self.kv_caches, num_layers=self.num_layers)

    def mirror(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> None:
        """Run the draft over the target's step (its flat tokens and metadata), so its own
        cache holds every position the target's does. Nothing to do for a shared cache."""
        if self.own_cache:
            self._forward(input_ids, meta)

    def propose(
        self, seqs: list[SeqPlan], states: dict[str, SamplingState], gen: torch.Generator
    ) -> tuple[list[SeqPlan], dict[str, torch.Tensor]]:
        """`seqs` with every speculating sequence's slots filled by the draft's tokens, and q
        ([k, V]) by request id for the sampled ones."""
        spec = [s for s in seqs if s.num_draft]
        if not spec:
            return seqs, {}
        bs = self.block_size
        drafts: dict[str, list[int]] = {s.req_id: [] for s in spec}
        qs: dict[str, list[torch.Tensor]] = {}
        for j in range(max(s.num_draft for s in spec)):
            # decode rows sorted by context length (build_metadata's order)
            live = sorted((s for s in spec if s.num_draft > j), key=lambda s: s.start_pos)
            ids, positions, slots, tables, lens = [], [], [], [], []
            for s in live:
                pos = s.start_pos + j  # slots there were allocated for the drafts
                ids.append(s.token_ids[0] if j == 0 else drafts[s.req_id][-1])
                positions.append(pos)
                slots.append(s.block_table[pos // bs] * bs + pos % bs)
                tables.append(s.block_table[: pos // bs + 1])
                lens.append(pos + 1)
            meta = build_metadata(
                positions, slots, tables, lens, [], bs, self.device, native=self.native
            )
            hidden = self._forward(torch.tensor(ids, device=self.device), meta)
            params = [states[s.req_id].params for s in live]
            tokens = None
            if self.greedy_head and all(p.greedy for p in params):
                tokens = self.model.greedy_tokens(hidden)  # no logits written
            if tokens is None:
                logits = self.model.compute_logits(hidden)
                tokens = logits.argmax(dim=-1)
                rand = [i for i, p in enumerate(params) if not p.greedy]
                if rand:
                    q = _filter(logits[rand].float(), [params[i] for i in rand])
                    for row, i in enumerate(rand):
                        st = states[live[i].req_id]
                        noise = torch.empty_like(q[row]).exponential_(generator=st.generator or gen)
                        tokens[i] = (q[row] / noise).argmax()  # a draw from q
                        qs.setdefault(live[i].req_id, []).append(q[row])
            for s, t in zip(live, tokens.tolist(), strict=True):
                drafts[s.req_id].append(t)
        out = []
        for s in seqs:
            if s.num_draft:
                known = s.token_ids[: len(s.token_ids) - s.num_draft]
                s = replace(s, token_ids=known + drafts[s.req_id])
            out.append(s)
        return out, {r: torch.stack(q) for r, q in qs.items()}


def make_drafter(draft: DraftConfig, runner: ModelRunner, path: str) -> tuple[Drafter, int]:
    """The drafter of `runner` (single rank: cluster.config refuses draft_model with
    tp/pp/ep > 1), `path` being the target's weights; and the bytes of the draft's own
    parameters (0 for a layer-truncated draft)."""
    from workers import progress, quantization
    from workers.loader import iter_weights, load_hf_config, resolve_model_path
    from workers.model_runner import QUANTIZE_LM_HEAD, _default_dtype

    args = (runner.block_size, runner.device, runner.native, runner.kernels.greedy_head)
    if draft.num_layers is not None:
        layers = runner.model.arch.num_layers
        if draft.num_layers >= layers:
            raise ValueError(
                f"speculative.draft.num_layers={draft.num_layers} must be below the target's "
                f"{layers} layers"
            )
        return Drafter(runner.model, draft.num_layers, False, *args), 0
    assert draft.model is not None
    draft_path = resolve_model_path(draft.model)
    draft_hf = load_hf_config(draft_path)
    check_same_vocab(path, draft_path, runner.hf_config, draft_hf)
    t0 = time.monotonic()
    cfg = runner.config
    with torch.device(runner.device), _default_dtype(runner.dtype):
        model = LlamaForCausalLM(draft_hf)
    int8, group_size = cfg.quantization == "int8", cfg.quantization_group_size
    if int8:
        quantization.prepare_int8(model, group_size)  # quantized as they load, like the target
    model.load_weights(iter_weights(draft_path, runner.dtype))
    if int8 and QUANTIZE_LM_HEAD:
        quantization.quantize_loaded(model.lm_head, group_size, "lm_head")
    model.eval()
    model.use_kernels(runner.kernels, prepack=cfg.prepack)
    size = sum({p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}.values())
    progress.phase("draft_model", time.monotonic() - t0)
    return Drafter(model, None, True, *args), size


def check_same_vocab(target_path: str, draft_path: str, target_hf, draft_hf) -> None:
    """Raise ValueError naming speculative.draft.model when the draft cannot propose the
    target's tokens: another vocabulary size, or another tokenizer."""
    from workers.loader import load_tokenizer

    field = f"speculative.draft.model={draft_path!r}"
    if draft_hf.vocab_size != target_hf.vocab_size:
        raise ValueError(
            f"{field}: vocabulary of {draft_hf.vocab_size} tokens, the target's has "
            f"{target_hf.vocab_size}; the draft must share the target's tokenizer"
        )
    if load_tokenizer(draft_path).get_vocab() != load_tokenizer(target_path).get_vocab():
        raise ValueError(f"{field}: its tokenizer differs from the target's")
