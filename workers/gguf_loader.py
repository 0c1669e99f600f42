"""Read a llama.cpp GGUF file as a Hugging Face checkpoint: config and dequantized weights.

We do not go through transformers' GGUF integration for the weights because it materializes
the whole state dict at once; here every tensor is dequantized on demand, mapped to its HF name
(`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`) and handed to the caller
one at a time, so a rank can skip what it does not own before paying for the dequantization.

Supported architectures: `llama` (which is also how llama.cpp stores Mistral-style models),
`qwen2` (q/k/v biases) and `qwen3` (q/k RMS norms). Anything else raises ValueError.

llama.cpp's converter permutes the rows of q_proj / k_proj for the `llama` architecture so
its interleaved (GPT-J style) rope can be applied to HF's half-split (NeoX style) heads; we
undo that permutation, so the tensors we yield are the HF checkpoint's tensors. Qwen
architectures are stored unpermuted.

The file is read with `workers.gguf_file.GGUFFile`, which skips the tokenizer's string arrays
(gguf-py's `GGUFReader` spends seconds building numpy views of every one of their elements),
and dequantized by `workers.gguf_dequant`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

from workers.gguf_dequant import dequantize
from workers.gguf_file import GGUFFile
from workers.hf_config import HFConfig, cached_config

# GGUF `general.architecture` -> transformers `model_type`. llama.cpp writes Mistral-style
# models (no sliding window in GGUF metadata) as "llama"; a LlamaConfig describes exactly what
# llama.cpp runs. (transformers switches to MistralConfig when `general.name` is exactly
# "mistral", which brings MistralConfig's default 4096-token sliding window with it.)
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# Architectures whose q/k rows llama.cpp permuted at conversion time.
_PERMUTED_ARCHS = frozenset({"llama"})

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

_TENSOR_NAME = re.compile(r"(?:blk\.(?P<layer>\d+)\.)?(?P<base>\w+)\.(?P<kind>weight|bias)")

_TOKEN_ID_KEYS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
}


def gguf_to_hf_name(gguf_name: str) -> str:
    """Map a GGUF tensor name to the HF parameter name; ValueError for names we cannot load."""
    m = _TENSOR_NAME.fullmatch(gguf_name)
    if m is not None:
        layer, base, kind = m["layer"], m["base"], m["kind"]
        if layer is None and base in _TOP_LEVEL_NAMES:
            return f"{_TOP_LEVEL_NAMES[base]}.{kind}"
        if layer is not None and base in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[base]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent we can load")


def read_gguf_config(path: str) -> HFConfig:
    """Build the transformers config equivalent to the GGUF file's metadata (resolved by
    transformers once per set of fields, see workers.hf_config)."""
    reader = GGUFFile(path)
    arch = _architecture(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        # Llama 3.1-style per-dimension rope frequency factors change every position's
        # rotation; silently ignoring them (as transformers' GGUF loader does) gives a wrong model.
        raise ValueError(f"{path}: per-dimension rope frequency factors are not supported yet")

    hidden = _int(reader, f"{arch}.embedding_length", path)
    heads = _int(reader, f"{arch}.attention.head_count", path)
    head_dim = _field(reader, f"{arch}.attention.key_length")
    if head_dim is None and arch in _PERMUTED_ARCHS:
        head_dim = _field(reader, f"{arch}.rope.dimension_count")
    kwargs: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": _int(reader, f"{arch}.feed_forward_length", path),
        "num_hidden_layers": _int(reader, f"{arch}.block_count", path),
        "num_attention_heads": heads,
        "num_key_value_heads": _int(reader, f"{arch}.attention.head_count_kv", path, heads),
        "head_dim": head_dim if head_dim is not None else hidden // heads,
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": _int(reader, f"{arch}.context_length", path),
        "vocab_size": _vocab_size(reader, arch, tensors),
        "rope_parameters": _rope_parameters(reader, arch, path),
        # llama.cpp drops `output.weight` when the LM head shares the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    for key, attr in _TOKEN_ID_KEYS.items():
        if (value := _field(reader, key)) is not None:
            kwargs[attr] = value
    model_type = _MODEL_TYPES[arch]

    def resolve():
        from transformers import AutoConfig

        return AutoConfig.for_model(model_type, **kwargs)

    source = json.dumps([model_type, kwargs], sort_keys=True).encode()
    return cached_config(b"gguf\0" + source, path, resolve)


def iter_gguf_weights(
    path: str,
    dtype: torch.dtype,
    shard_filter: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for every tensor of the GGUF file, dequantized to `dtype`.

    The file's header is read and checked now (so a bad file fails at the call, not at the
    first `next`); tensors come later, in file order. `shard_filter(hf_name)` returning False
    skips a tensor before it is dequantized. Each tensor is a fresh copy, not a view of the
    memory-mapped file.
    """
    reader = GGUFFile(path)
    arch = _architecture(reader, path)
    heads = _int(reader, f"{arch}.attention.head_count", path)
    kv_heads = _int(reader, f"{arch}.attention.head_count_kv", path, default=heads)
    # llama.cpp permuted q/k rows per head; k has its own (GQA) head count.
    permuted_heads = {"q_proj": heads, "k_proj": kv_heads} if arch in _PERMUTED_ARCHS else {}
    return _dequantized(reader, dtype, shard_filter, permuted_heads)


def _dequantized(
    reader: GGUFFile,
    dtype: torch.dtype,
    shard_filter: Callable[[str], bool] | None,
    permuted_heads: dict[str, int],
) -> Iterator[tuple[str, torch.Tensor]]:
    for tensor in reader.tensors:
        name = gguf_to_hf_name(tensor.name)
        if shard_filter is not None and not shard_filter(name):
            continue
        # GGUF lists dimensions fastest-first (ggml `ne`); HF shapes are slowest-first.
        weight = dequantize(tensor.data, tensor.tensor_type, tuple(reversed(tensor.shape)))
        projection = name.split(".")[-2]
        if projection in permuted_heads:
            weight = unpermute_rope_rows(weight, permuted_heads[projection])
        yield name, weight.to(dtype)


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    llama.cpp stores each head's rows as interleaved rotary pairs `(x0, x1), (x2, x3), ...`
    (viewed as `[heads, head_dim / 2, 2]`); HF keeps the two rotary halves apart
    (`[heads, 2, head_dim / 2]`). Swapping the last two axes back restores the HF row order.
    Works for weights `[rows, in]` and biases `[rows]`.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads) != 0:
        raise ValueError(f"cannot unpermute {rows} rows over {num_heads} heads of even size")
    half = rows // num_heads // 2
    pairs = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return pairs.transpose(1, 2).reshape(weight.shape)


def _architecture(reader: GGUFFile, path: str) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in _MODEL_TYPES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: "
            f"{', '.join(sorted(_MODEL_TYPES))})"
        )
    return arch


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.get(key, default)


def _int(reader: GGUFFile, key: str, path: str, default: int | None = None) -> int:
    value = _field(reader, key, default)
    if not isinstance(value, int):
        raise ValueError(f"{path}: GGUF metadata {key!r} must be one integer, got {value!r}")
    return value


def _vocab_size(reader: GGUFFile, arch: str, tensors: dict[str, Any]) -> int:
    size = _field(reader, f"{arch}.vocab_size")
    if size is not None:
        return size
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and tokens.length is not None:
        return tokens.length  # counted; the strings themselves are skipped, not read
    return int(tensors["token_embd.weight"].shape[1])  # ne = [hidden, vocab]


def _rope_parameters(reader: GGUFFile, arch: str, path: str) -> dict[str, Any]:
    params: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
    }
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling == "none":
        return params
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if scaling == "linear" and factor is not None:
        return params | {"rope_type": "linear", "factor": factor}
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if scaling == "yarn" and factor is not None and original is not None:
        return params | {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original,
        }
    raise ValueError(f"{path}: rope scaling {scaling!r} (factor {factor!r}) is not supported")
