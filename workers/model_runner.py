"""The step runner of one rank: owns the model, the paged KV tensors and per-request sampling
state; turns a StepPlan into flat input tensors, runs the forward pass, samples.

Layout of a step's flat batch: decode tokens first (one per request, or one per position of
a request verifying draft tokens), then prefill chunks, so attention can batch all decodes in
one call.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from parallel.comm_timer import COMM
from parallel.groups import SINGLE_RANK, ParallelGroups
from workers import kv_int8, progress, quantization
from workers.attention import build_metadata
from workers.config import DraftConfig, ModelConfig
from workers.draft_model import Drafter, make_drafter
from workers.kernels.dispatch import KernelPlan, cpu_has_fast_bf16, decide
from workers.loader import iter_weights, load_hf_config, resolve_model_path
from workers.messages import SeqPlan, StepPlan, StepResult, TokenMasks
from workers.models import compiled
from workers.models.llama import LlamaArch, LlamaForCausalLM
from workers.sampler import SamplingState
from workers.sampling_params import SamplingParams
from workers.spec_decode import sample_rows, sample_with_drafts, split_greedy

QUANTIZE_LM_HEAD = True
"""With model.quantization int8, the LM head too (a tied head gets its own int8 copy; the
embedding keeps the float one): SmolLM2's 49152 x 576 head is a fifth of its weights, and a
float32 head made int8 decode steps 1.6x slower (21.8 vs 13.4 ms at batch 1, 2-thread AVX2
EPYC, benchmarks/quant_linear.py) for +29 MB of int8 copy."""

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve large transient tensors from a heap it keeps, instead of
    fresh mmap()ed pages that the kernel must fault in and zero on every step. A step's
    activations (up to 12 MB for a 2,048-token prefill's gate/up projection; 0.4 MB at decode)
    are allocated and freed every layer; with glibc's defaults (mmap from 128 KiB, heap top
    trimmed past 2x that), the page faults doubled the time of the largest linear layer.
    Process-wide, like the tcmalloc preload vLLM's CPU backend uses. False where not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
        ok &= libc.mallopt(m_trim_threshold, 1 << 30)
        ok &= libc.mallopt(m_top_pad, 64 << 20)
        return bool(ok)
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _plain_greedy(p: SamplingParams) -> bool:
    """The token is the logits' argmax and nothing else is read from them or changes them (no
    penalties, logprobs, logit_bias or min_tokens): the LM head may pick it without writing the
    logits out."""
    return p.greedy and p.logprobs is None and not p.needs_penalties and not p.adjusts_logits


def _rows_of(
    masks: TokenMasks | None, seqs: list[SeqPlan]
) -> tuple[list[int], torch.Tensor] | None:
    """The plan's grammar masks for these sampling rows: (row indices, their mask words)."""
    if masks is None:
        return None
    where = {r: i for i, r in enumerate(masks.req_ids)}
    rows = [i for i, s in enumerate(seqs) if s.req_id in where]
    if not rows:
        return None
    pick = [where[seqs[i].req_id] for i in rows]
    return rows, torch.from_numpy(masks.words[pick])


class ModelRunner:
    """One rank's model slice. With pipeline parallelism a step's sequences are split into
    micro-batches; a stage sends each micro-batch's hidden states on (non-blocking) as soon as
    it is done and starts the next, so consecutive stages work at the same time."""

    def __init__(
        self,
        config: ModelConfig,
        block_size: int,
        groups: ParallelGroups = SINGLE_RANK,
        layer_range: tuple[int, int] | None = None,
        num_microbatches: int | None = None,
        draft: DraftConfig | None = None,
        kv_dtype: str = "auto",
    ):
        """`kv_dtype`: cache.kv_dtype -- auto (the model's dtype) or int8 (workers/kv_int8.py)."""
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if config.device == "cpu":
            keep_freed_memory()
        self.config = config
        self.groups = groups
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, config.device)
        if kv_dtype not in ("auto", "int8"):
            raise ValueError(f"cache.kv_dtype must be auto or int8, not {kv_dtype!r}")
        self.kv_dtype = torch.int8 if kv_dtype == "int8" else self.dtype
        self.block_size = block_size
        # every kernel choice of this rank, from model.kernels and the library's build report
        t0 = time.monotonic()
        if config.kernels != "torch" and self.device.type == "cpu":
            progress.report("kernels: loading the native CPU kernels (built on first use) ...")
        self.kernels: KernelPlan = decide(config.kernels, self.device)
        paths = [k for k, v in vars(self.kernels).items() if v is True]
        progress.phase("kernels", time.monotonic() - t0)
        progress.report(
            f"kernels: {', '.join(paths) or 'torch only'} ({time.monotonic() - t0:.1f} s)"
        )
        self.native = self.kernels.native
        self.num_microbatches = num_microbatches or groups.pp_size
        path = resolve_model_path(config.model)
        self.hf_config = load_hf_config(path)
        arch = LlamaArch.from_hf(self.hf_config)
        first, last = layer_range or (0, arch.num_layers)
        self.layer_range = (first, last)
        t0 = time.monotonic()
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = LlamaForCausalLM(self.hf_config, groups.tp, (first, last), groups.ep)
        progress.phase("model_init", time.monotonic() - t0)
        read_bytes = self._count_param_bytes()  # allocated already: the bar's total
        int8, group_size = config.quantization == "int8", config.quantization_group_size
        if int8:
            quantization.prepare_int8(self.model, group_size)  # quantized as they load
        weights = iter_weights(path, self.dtype, shard_filter=self._wants(first, last))
        self.model.load_weights(progress.weights(weights, read_bytes))
        if int8 and self.model.is_last and QUANTIZE_LM_HEAD:
            quantization.quantize_loaded(self.model.lm_head, group_size, "lm_head")
        self._param_bytes = self._count_param_bytes()
        self.model.eval()
        t0 = time.monotonic()
        self.model.use_kernels(self.kernels, prepack=config.prepack)
        progress.phase("prepack", time.monotonic() - t0)
        if config.compile == "torch_compile":
            self._compile(config.compile_backend)
        self.hidden_size = arch.hidden_size
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.states: dict[str, SamplingState] = {}
        self.generator = torch.Generator(device=self.device)  # where the logits are sampled
        self.generator.manual_seed(config.seed)
        self.drafter: Drafter | None = None  # speculative decoding's draft model (single rank)
        if draft is not None:
            self.drafter, extra = make_drafter(draft, self, path)
            self._param_bytes += extra

    def _compile(self, backend: str) -> None:
        """model.compile=torch_compile: the layers' dense code through torch.compile (graphs
        are built on the first steps), or eager with the reason logged where it cannot apply."""
        reason = compiled.why_not(self.model)
        if reason is None and self.groups.pp_size > 1:
            reason = f"pipeline parallelism (pp={self.groups.pp_size})"
        if reason is not None:
            log.warning("model.compile=torch_compile not applied: %s; running eager", reason)
            progress.report(f"compile: not applied ({reason})")
            return
        self.model.compiled = compiled.CompiledLayers(backend)
        progress.report(f"compile: torch.compile ({backend}) of the layers' dense code")

    def _wants(self, first: int, last: int):
        tied = self.model.arch.tie_word_embeddings and self.model.is_last

        def wants(name: str) -> bool:
            if ".layers." in name or name.startswith("layers."):
                idx = int(name.split("layers.")[1].split(".")[0])
                return first <= idx < last
            if "embed_tokens" in name:
                return self.model.is_first or tied
            return self.model.is_last  # final norm, lm_head

        return wants

    # ---- KV cache -------------------------------------------------------------------------
    def _kv_row(self) -> int:
        """The cache's last dim: the head dim, or with int8 the head dim + the scale's bytes."""
        hd = self.model.kv_layout()[2]
        return kv_int8.row_width(hd) if self.kv_dtype == torch.int8 else hd

    def bytes_per_block(self) -> int:
        """Every byte of a block: the int8 cache's scales and a separate draft's cache included."""
        layers, kvh, _ = self.model.kv_layout()
        own = 2 * layers * self.block_size * kvh * self._kv_row() * self.kv_dtype.itemsize
        return own + (self.drafter.bytes_per_block(self.dtype) if self.drafter else 0)

    def blocks_for_memory(self, gib: float) -> int:
        return max(2, int(gib * 2**30) // self.bytes_per_block())

    def allocate_kv(self, num_blocks: int) -> None:
        t0 = time.monotonic()
        layers, kvh, _ = self.model.kv_layout()
        self.num_blocks = num_blocks
        shape = (2, num_blocks, self.block_size, kvh, self._kv_row())
        self.kv_caches = [
            torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(layers)
        ]
        if self.drafter is not None:
            self.drafter.allocate(num_blocks, self.dtype, self.kv_caches)
        progress.phase("kv_cache", time.monotonic() - t0)

    # ---- per-request state ------------------------------------------------------------------
    def _update_states(self, plan: StepPlan) -> None:
        for req_id in plan.finished_req_ids:
            self.states.pop(req_id, None)
        for nr in plan.new_requests:
            st = SamplingState.create(nr.params, len(nr.prompt_token_ids), self.device)
            st.skip_draws(nr.num_output_tokens, self.hf_config.vocab_size)
            st.token_ids = list(nr.prompt_token_ids)
            self.states[nr.req_id] = st
        for seq in plan.seqs:
            hist = self.states[seq.req_id].token_ids
            known = seq.token_ids[
                : len(seq.token_ids) - seq.num_draft
            ]  # drafts are not its tokens yet
            if seq.start_pos > len(hist):
                # Drafts accepted last step are missing here (only the driver saw them); the
                # history is read by penalties alone, and penalised requests never speculate.
                continue
            end = seq.start_pos + len(known)
            if end > len(hist):
                hist.extend(known[len(hist) - seq.start_pos :])

    # ---- one step ---------------------------------------------------------------------------
    def _prepare(self, seqs: list[SeqPlan]):
        """Flat inputs for `seqs`: decode rows first (by context length), then prefill chunks.
        A sequence verifying drafts is decode rows too, one per position, each attending to
        the cache up to its own position: attention writes every row's K/V before it reads,
        so this is exact, and verification runs in the batched decode kernel instead of one
        prefill-attention call per sequence (3x the step time at batch 8 here)."""
        bs = self.block_size
        decode_rows = sorted(
            (
                (s.start_pos + j + 1, i, j)
                for i, s in enumerate(seqs)
                if s.is_decode or s.num_draft
                for j in range(len(s.token_ids))
            ),
            key=lambda r: r[0],
        )
        ids, positions, slots = [], [], []
        row_of: dict[tuple[int, int], int] = {}
        for length, i, j in decode_rows:
            seq = seqs[i]
            p = length - 1
            row_of[(i, j)] = len(ids)
            ids.append(seq.token_ids[j])
            positions.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
        prefill_meta = []
        for i, seq in enumerate(seqs):
            if seq.is_decode or seq.num_draft:
                continue
            n = len(seq.token_ids)
            q0 = len(ids)
            ids.extend(seq.token_ids)
            table = seq.block_table
            for p in range(seq.start_pos, seq.start_pos + n):
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
                row_of[(i, p - seq.start_pos)] = q0 + p - seq.start_pos
            used = -(-(seq.start_pos + n) // bs)
            prefill_meta.append((q0, n, seq.start_pos, table[:used]))
        rows: list[int] = []
        sample_seqs: list[SeqPlan] = []
        for i, seq in enumerate(seqs):
            if seq.sample:  # the last row, or the last num_draft + 1 when verifying drafts
                n = len(seq.token_ids)
                rows.extend(row_of[(i, j)] for j in range(n - sample_rows(seq), n))
                sample_seqs.append(seq)
        meta = build_metadata(
            positions,
            slots,
            [seqs[i].block_table[: -(-length // bs)] for length, i, _ in decode_rows],
            [length for length, _, _ in decode_rows],
            prefill_meta,
            bs,
            self.device,
            native=self.native,
        )
        return torch.tensor(ids, device=self.device), meta, rows, sample_seqs

    def _microbatches(self, seqs: list[SeqPlan]) -> list[list[SeqPlan]]:
        m = min(self.num_microbatches, len(seqs))
        if m <= 1:
            return [seqs]
        # Greedy balance by token count, keeping each micro-batch's plan order.
        loads = [0] * m
        buckets: list[list[SeqPlan]] = [[] for _ in range(m)]
        for seq in sorted(seqs, key=lambda s: -len(s.token_ids)):
            i = loads.index(min(loads))
            buckets[i].append(seq)
            loads[i] += len(seq.token_ids)
        rank = {s.req_id: i for i, s in enumerate(seqs)}
        return [sorted(b, key=lambda s: rank[s.req_id]) for b in buckets]

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult | None:
        """Run one step. Returns the StepResult on the driver rank, None elsewhere."""
        self._update_states(plan)
        g = self.groups
        sampled: dict[str, tuple[list[int], object]] = {}
        sends = []
        draft_probs: dict[str, torch.Tensor] = {}
        if self.drafter is not None:  # fill the scheduler's draft slots (single rank)
            seqs, draft_probs = self.drafter.propose(plan.seqs, self.states, self.generator)
            plan = replace(plan, seqs=seqs)
        for mb in self._microbatches(plan.seqs) if plan.seqs else []:
            input_ids, meta, rows, sample_seqs = self._prepare(mb)
            hidden = None
            # Hidden states cross stages on the model's device: NCCL sends only CUDA tensors,
            # gloo CPU ones, and the config pairs them (cluster.config rejects gloo on CUDA).
            if not g.is_first_stage:
                hidden = torch.empty(
                    len(input_ids), self.hidden_size, dtype=self.dtype, device=self.device
                )
                with COMM.time():
                    dist.recv(hidden, src=g.prev_rank)
            hidden = self.model(input_ids, hidden, meta, self.kv_caches)
            if self.drafter is not None:
                self.drafter.mirror(input_ids, meta)  # its own cache follows the target's
            if not g.is_last_stage:
                out = hidden.contiguous()  # kept alive (in `sends`) until the send completes
                sends.append((dist.isend(out, dst=g.next_rank), out))
                continue
            if not sample_seqs:
                continue
            last = hidden[torch.tensor(rows, device=self.device)]
            states = [self.states[s.req_id] for s in sample_seqs]
            masks = _rows_of(plan.token_masks, sample_seqs)
            greedy = None
            # The fused head's argmax never sees a grammar mask: a micro-batch with a
            # constrained row takes the logits path (every TP rank knows, from the plan).
            if (
                self.kernels.greedy_head
                and masks is None
                and all(_plain_greedy(st.params) for st in states)
            ):
                greedy = self.model.greedy_tokens(last)  # None on every TP rank alike
            if greedy is None:
                logits = self.model.compute_logits(last)  # on every TP rank: the head gathers
            if not g.is_driver:
                continue
            if greedy is not None:
                tokens, lps = split_greedy(sample_seqs, greedy.tolist()), None
            else:
                tokens, lps = sample_with_drafts(
                    logits, sample_seqs, states, self.generator, self.native, masks, draft_probs
                )
            for i, s in enumerate(sample_seqs):
                sampled[s.req_id] = (tokens[i], lps[i] if lps is not None else None)
        with COMM.time():
            for work, _ in sends:
                work.wait()
        if not g.is_driver:
            return None
        req_ids = [s.req_id for s in plan.seqs if s.sample]
        toks = [sampled[r][0][0] for r in req_ids]
        want_lp = any(sampled[r][1] is not None for r in req_ids)
        lp = [sampled[r][1] for r in req_ids] if want_lp else None
        more = None
        if any(s.num_draft for s in plan.seqs):
            more = [sampled[r][0][1:] for r in req_ids]
        return StepResult(plan.step_id, req_ids, toks, lp, more)

    # ---- KV export / import (disaggregated prefill) ----------------------------------------
    def export_blocks(self, block_ids: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """[layers, 2, n, block_size, kv_heads, head_dim] copy of the given blocks, on the host
        (a hand-off, not a step): into `out` when it has that shape and dtype (a prefill
        group's shared-memory slot, or a range of its blocks), else into new memory."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        c0 = self.kv_caches[0]
        shape = (len(self.kv_caches), 2, len(block_ids), *c0.shape[2:])
        if out is None or tuple(out.shape) != shape or out.dtype != c0.dtype:
            out = torch.empty(shape, dtype=c0.dtype)
        n, per_block = len(block_ids), c0[0, 0].numel()
        for layer, c in enumerate(self.kv_caches):
            # [K / V, block, its values]: a block range of a slot views this way too
            src, dst = c.view(2, c.shape[1], per_block), out[layer].view(2, n, per_block)
            if c.device.type == "cpu":
                # a gather of whole blocks: as fast as on the 5-D view into a whole slot, 2.6x
                # faster into a block range of one, 6x faster than K and V apart (EPYC-AVX2);
                # advanced indexing c[:, idx] was far slower
                torch.index_select(src, 1, idx, out=dst)
            else:
                dst.copy_(src.index_select(1, idx))
        return out

    def import_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Write export_blocks' form of this rank's shard into the given blocks. The dtype
        must be this cache's: converting would continue from values the sender never had."""
        if data.dtype != self.kv_dtype:
            raise ValueError(f"KV of dtype {data.dtype} cannot go into a {self.kv_dtype} cache")
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for c, d in zip(self.kv_caches, data, strict=True):
            c.index_copy_(1, idx, d.to(device=self.device))

    def kv_shard(self) -> dict:
        """Where this rank's KV cache sits in the whole model's: layers [first, last) and KV
        heads [first, last) (ranks that replicate a head -- tp > KV heads, or EP ranks without
        TP -- report the same range), head dim and dtype. cluster.kv_shards gathers and
        scatters a group's blocks with it. The int8 cache reports int8 and its row of head dim
        + 4 (the scale's bytes, kv_int8): what its exports hold, and never a float cache's."""
        _, heads, _ = self.model.kv_layout()
        qkv = next(iter(self.model.layers.values())).self_attn.qkv_proj
        first = self.groups.tp.rank // qkv.kv_replicas * heads
        return {
            "layers": list(self.layer_range),
            "heads": [first, first + heads],
            "head_dim": self._kv_row(),
            "dtype": str(self.kv_dtype).removeprefix("torch."),
        }

    def param_bytes(self) -> int:
        """Bytes of this rank's loaded parameters (tied weights counted once)."""
        return self._param_bytes

    def _count_param_bytes(self) -> int:
        seen = {p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}
        return sum(seen.values())
