"""The engine side of structured output: one grammar matcher per constrained request.

    add_request ──▶ Grammars.start(spec, resumed outputs) ──▶ RequestGrammar (replayed)
    each step   ──▶ masks(rows) ──▶ StepPlan.token_masks ──▶ the sampler masks those rows
    each token  ──▶ RequestGrammar.accept(token)           ──▶ finished: dropped

The matcher advances with every token the request keeps. A preemption keeps the request's
tokens (recompute, cluster.scheduler), so its matcher stays valid; a request that resumes here
after tokens produced elsewhere (a prefill hand-off, a migration after a group died) has its
grammar replayed over those tokens before it is queued, so its next mask continues where the
other group stopped.

Costs (llguidance, benchmarks/grammar_overhead.py): building the library's view of the
tokenizer takes 0.5 s for a 49k vocabulary (2-3 s with the library's first import), so it
starts in a background thread when the engine starts and the first constrained request waits
for it only if it comes sooner; a grammar's text
and a compiled matcher in its start state are cached per distinct spec: a request gets a copy
(0.25 ms against 3 ms to compile the SmolLM2 benchmark schema and build its first mask); a
mask costs 20-90 us per row per step, accepting a token ~10 us.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

from workers.errors import InvalidRequest
from workers.messages import TokenMasks
from workers.structured_output import StructuredOutput


def mask_words(vocab_size: int) -> int:
    """int32 words per mask row: one bit per token id of the model's vocabulary."""
    return (vocab_size + 31) // 32


class RequestGrammar:
    """One request's matcher. `eos_ids`: the engine's end tokens, all allowed exactly when the
    grammar accepts (the library knows one set; the engine may end on more)."""

    def __init__(self, matcher, eos_ids: frozenset[int]):
        self.matcher = matcher
        self.eos_ids = eos_ids

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into `row` (int32 words)."""
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        if self.matcher.is_accepting():
            bits = row.view(np.uint32)
            for t in self.eos_ids:
                if t < 32 * len(row):
                    bits[t >> 5] |= np.uint32(1 << (t & 31))

    def accept(self, token: int) -> bool:
        """Advance by a sampled token. An end token ends the request: nothing to advance."""
        if token in self.eos_ids:
            return self.matcher.is_accepting()
        return self.matcher.consume_token(token)

    def replay(self, tokens: Sequence[int]) -> bool:
        """Advance over tokens produced elsewhere; False when they do not fit the grammar."""
        return all(self.accept(t) for t in tokens)

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class Grammars:
    """The grammar matchers of one engine, and the library's tokenizer they share."""

    CACHED_SPECS = 64  # compiled start-state matchers kept, least recently used dropped

    def __init__(self, hf_tokenizer, vocab_size: int, eos_ids: Iterable[int]):
        self.vocab_size = vocab_size
        self.words = mask_words(vocab_size)
        self.eos_ids = frozenset(eos_ids)
        self._active: dict[str, RequestGrammar] = {}
        self._compiled: OrderedDict[StructuredOutput, object] = OrderedDict()
        self._lltok = None
        self._failed: BaseException | None = None
        self._ready = threading.Event()
        # Not a daemon: one still inside llguidance's native code when the interpreter
        # finalizes crashes the process (SIGSEGV, 1 exit in 15 right after an engine was
        # built); exit waits for the build instead (under a second).
        args = (hf_tokenizer,)
        threading.Thread(target=self._build, args=args, name="grammar-tok").start()

    def _build(self, hf_tokenizer) -> None:
        try:
            import llguidance.hf

            # n_vocab: the model's row count (it may pad past the tokenizer's); every end
            # token the engine stops on counts as EOS for the library too.
            self._lltok = llguidance.hf.from_tokenizer(
                hf_tokenizer, n_vocab=self.vocab_size, eos_token=sorted(self.eos_ids) or None
            )
        except BaseException as e:  # reported to the first request that needs it
            self._failed = e
        finally:
            self._ready.set()

    def _tokenizer(self):
        self._ready.wait()
        if self._failed is not None:
            raise RuntimeError(f"structured output is unavailable: {self._failed}")
        return self._lltok

    # ---- per request --------------------------------------------------------------------------
    def start(self, req_id: str, spec: StructuredOutput, resumed: Sequence[int] = ()) -> None:
        """A matcher for `req_id`, advanced over `resumed`; InvalidRequest when the spec does
        not compile or the resumed tokens do not fit it (nothing is kept then)."""
        g = RequestGrammar(self._compile(spec).deep_copy(), self.eos_ids)
        if not g.replay(resumed):
            raise InvalidRequest("resume_output_ids", "the tokens do not match the grammar")
        self._active[req_id] = g

    def _compile(self, spec: StructuredOutput):
        """The start-state matcher of `spec`, compiled once (its first mask built, which
        builds the lexer), for requests to copy."""
        import llguidance

        template = self._compiled.get(spec)
        if template is not None:
            self._compiled.move_to_end(spec)
            return template
        spec.check("structured")  # the router checked too; this engine is the authority
        template = llguidance.LLMatcher(self._tokenizer(), spec.grammar(), log_level=0)
        if template.is_error():
            raise InvalidRequest("structured", " ".join(template.get_error().split()))
        RequestGrammar(template, self.eos_ids).fill(np.zeros(self.words, dtype=np.int32))
        self._compiled[spec] = template
        if len(self._compiled) > self.CACHED_SPECS:
            self._compiled.popitem(last=False)
        return template

    def accept(self, req_id: str, token: int) -> bool:
        """Advance `req_id`'s matcher (True for an unconstrained request)."""
        g = self._active.get(req_id)
        return g is None or g.accept(token)

    def drop(self, req_id: str) -> None:
        self._active.pop(req_id, None)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._active

    def __len__(self) -> int:
        return len(self._active)

    def masks(self, req_ids: Sequence[str]) -> TokenMasks | None:
        """The next-token masks of the constrained requests among `req_ids` (those sampling
        this step), or None when there are none."""
        mine = [r for r in req_ids if r in self._active]
        if not mine:
            return None
        words = np.zeros((len(mine), self.words), dtype=np.int32)
        for i, r in enumerate(mine):
            self._active[r].fill(words[i])
        return TokenMasks(mine, words)
