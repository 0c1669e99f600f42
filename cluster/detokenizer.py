"""Incremental detokenization with stop strings, for streaming generated text.

`IncrementalDetokenizer` turns the token ids a request generates (one or a few per engine step)
into UTF-8 text deltas with the prefix_offset/read_offset scheme of vLLM and TGI. Each step
decodes only a short window: ``ids[prefix:read]`` (already emitted, kept as context) and
``ids[prefix:]``, and emits the new suffix. While the window's text ends in U+FFFD (a character
whose bytes are split across tokens, e.g. an emoji or CJK character in byte-level BPE), nothing
is emitted, so a delta never carries half a character.

Choices:

* Concatenating every delta and `flush()` gives ``tokenizer.decode(output_ids,
  skip_special_tokens=..., clean_up_tokenization_spaces=False)``, exactly for byte-level BPE
  (GPT-2 style) tokenizers, including invalid byte sequences (U+FFFD text is released once
  later tokens settle it, or at `flush()`).
* The last few prompt tokens are decoded as initial context, as in vLLM, so that a
  SentencePiece ``"▁"`` on the first output token becomes a leading space (the output
  continues the prompt). With byte-level BPE this changes nothing; the context is dropped if
  the prompt ends in the middle of a character.
* A partial character that never completes (garbage bytes) cannot grow the window forever:
  after `_MAX_HELD` held tokens, the text before the last `_CUT_TAIL` tokens is emitted when a
  check shows that cut is final.
* Stop strings: the output is cut right before the earliest match (ties: the stop listed first),
  or right after it with ``include_stop_str_in_output``. A text suffix that could still become a
  stop string is held back and released once it cannot, or at `flush()`. Only the held-back
  suffix plus the new delta is searched, so a step costs O(window + longest stop).
* `text` is what has been emitted so far (all deltas plus `flush()`); held-back text is not in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_FFFD = "\ufffd"
_PROMPT_CONTEXT = 5  # prompt tokens decoded as context for the first output tokens
_MAX_HELD = 6  # held tokens (or tokens without text) after which the window is shortened
_CUT_TAIL = 3  # tokens kept after a forced cut; >= 3 bytes settle any partial UTF-8 character


def _plain_backend(tokenizer: Any) -> Any:
    """The `tokenizers` object under a fast tokenizer whose decode is transformers' own: then
    ``decode(ids, skip_special_tokens=s, clean_up_tokenization_spaces=False)`` is exactly
    ``backend.decode(ids, skip_special_tokens=s)``, without the wrapper's per-call work (two
    thirds of the engine's detokenizing time). None for any other tokenizer."""
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    cls = type(tokenizer)
    if (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is PreTrainedTokenizerFast._decode
    ):
        return tokenizer.backend_tokenizer
    return None


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into clean UTF-8 text deltas; handles stop strings.

    Call `add_tokens` with each step's new ids; it returns ``(delta, matched_stop)``. Once a stop
    string matched (the caller then finishes the request), or after `flush()`, the detokenizer is
    finished and `add_tokens` raises. At any other finish (length, EOS), call `flush()` once to
    get the text still held back. `matched_stop` records the stop string that ended the output.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._backend = _plain_backend(tokenizer)
        self._skip_special = skip_special_tokens
        self._include_stop = include_stop_str_in_output
        self._stops = [s for s in dict.fromkeys(stop) if s]
        self._stop_prefixes = {s[:k] for s in self._stops for k in range(1, len(s))}
        self._max_held_chars = max((len(s) for s in self._stops), default=1) - 1
        # Special ids that decode to nothing are dropped, so they cannot grow the window.
        specials = getattr(tokenizer, "all_special_ids", ()) if skip_special_tokens else ()
        self._dropped = frozenset(i for i in specials if self._decode([i]) == "")
        tail = prompt_token_ids[max(0, len(prompt_token_ids) - _PROMPT_CONTEXT) :]
        context = [i for i in tail if i not in self._dropped]
        context_text = self._decode(context)
        if context_text.endswith(_FFFD):
            context, context_text = [], ""
        self._ids: list[int] = context  # prompt context + every output id
        self._prefix = 0  # window start: ids[prefix:read] decode to _prefix_text (emitted)
        self._read = len(context)  # ids[read:] have not been emitted yet
        self._prefix_text = context_text
        self._pending = ""  # decoded text held back as a possible stop-string prefix
        self._chunks: list[str] = []
        self._finished = False
        self.matched_stop: str | None = None

    @property
    def text(self) -> str:
        """Full output text emitted so far (held-back text is not included)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def finished(self) -> bool:
        return self._finished

    def add_tokens(
        self, new_token_ids: Sequence[int], match_stops: bool = True
    ) -> tuple[str, str | None]:
        """Append generated ids; return the new text and the stop string matched, if any.
        `match_stops` False (a request short of its min_tokens): the text is emitted as if there
        were no stop strings, and a later match can only start after it."""
        if self._finished:
            raise RuntimeError("detokenizer is finished (a stop string matched or flush() ran)")
        dropped = self._dropped
        self._ids.extend(i for i in new_token_ids if i not in dropped)
        return self._emit(self._detokenize(), final=False, match_stops=match_stops)

    def flush(self) -> str:
        """At finish: return everything held back (even a trailing partial character's U+FFFD)."""
        if self._finished:
            return ""
        tail = ""
        if len(self._ids) > self._read:
            tail = self._decode(self._ids[self._prefix :])[len(self._prefix_text) :]
        out, _ = self._emit(tail, final=True)
        self._finished = True
        return out

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self._skip_special)
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )

    def _detokenize(self) -> str:
        """Return the newly decoded text that is safe to emit (no partial character)."""
        ids = self._ids
        new_text = self._decode(ids[self._prefix :])
        if new_text.endswith(_FFFD):
            return self._forced_cut(new_text) if len(ids) - self._read > _MAX_HELD else ""
        delta = new_text[len(self._prefix_text) :]
        if delta or len(ids) - self._prefix > _MAX_HELD:
            self._prefix, self._read = self._read, len(ids)
            self._prefix_text = self._decode(ids[self._prefix : self._read])
        return delta

    def _forced_cut(self, new_text: str) -> str:
        """Emit the text before the last `_CUT_TAIL` tokens if no later token can change it.

        With >= 3 bytes after the cut, a character left open before it has already been completed
        (then the texts differ) or broken (then it stays U+FFFD), so equal texts make the cut final.
        """
        cut = len(self._ids) - _CUT_TAIL
        head = self._decode(self._ids[self._prefix : cut])
        tail = self._decode(self._ids[cut:])
        if len(tail) < _CUT_TAIL or head + tail != new_text:
            return ""
        if not head.startswith(self._prefix_text):
            return ""
        delta = head[len(self._prefix_text) :]
        self._prefix = self._read = cut
        self._prefix_text = ""
        return delta

    def _emit(self, new_text: str, final: bool, match_stops: bool = True) -> tuple[str, str | None]:
        """Apply stop strings to ``new_text``; record and return what is emitted now."""
        matched: str | None = None
        if not self._stops or not match_stops:
            out, self._pending = self._pending + new_text, ""
        elif not new_text and not final:
            return "", None
        else:
            buf = self._pending + new_text  # the only place a new match can be
            start, matched = self._find_stop(buf)
            if matched is not None:
                out = buf[: start + len(matched)] if self._include_stop else buf[:start]
                self._pending = ""
                self.matched_stop = matched
                self._finished = True
            else:
                keep = 0 if final else self._held_suffix_len(buf)
                out, self._pending = buf[: len(buf) - keep], buf[len(buf) - keep :]
        if out:
            self._chunks.append(out)
        return out, matched

    def _find_stop(self, buf: str) -> tuple[int, str | None]:
        best, matched = -1, None
        for stop in self._stops:
            i = buf.find(stop)
            if i >= 0 and (matched is None or i < best):
                best, matched = i, stop
        return best, matched

    def _held_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        for k in range(min(len(buf), self._max_held_chars), 0, -1):
            if buf[-k:] in self._stop_prefixes:
                return k
        return 0
