"""workers.hf_config against transformers: the config a process reads from the cache has
transformers' values, for config.json files as people write them (defaults left out, legacy
rope fields), and what the model reads from it (LlamaArch, the rope tables) is the same."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from workers import hf_config
from workers.loader import CACHE_DIR_ENV, load_hf_config, load_tokenizer
from workers.models.llama import LlamaArch
from workers.models.rope import rope_tables

SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    vocab_size=128,
)
# config.json contents as found in the wild: most defaults omitted, rope in every spelling.
CONFIGS = {
    "llama-minimal": dict(model_type="llama", **SMALL),
    "llama-legacy-theta": dict(model_type="llama", rope_theta=500000.0, **SMALL),
    "llama3-scaled": dict(
        model_type="llama",
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
        **SMALL,
    ),
    "llama-linear-old-key": dict(
        model_type="llama", rope_scaling={"type": "linear", "factor": 2.0}, **SMALL
    ),
    "qwen2-sliding": dict(
        model_type="qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=2, **SMALL
    ),
    "qwen2-yarn": dict(
        model_type="qwen2",
        max_position_embeddings=1024,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
        **SMALL,
    ),
    "qwen3": dict(model_type="qwen3", head_dim=32, rope_theta=1000000.0, **SMALL),
    "mistral": dict(model_type="mistral", sliding_window=None, **SMALL),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, **SMALL),
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        num_experts=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        mlp_only_layers=[0],
        decoder_sparse_step=2,
        **SMALL,
    ),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, moe_intermediate_size=32, **SMALL),
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_config(directory, values: dict) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(values, f)
    return str(directory)


def assert_same_config(ours: hf_config.HFConfig, reference) -> None:
    """Every value transformers' config holds, and every alias its class declares."""
    expected = json.loads(reference.to_json_string(use_diff=False))
    assert ours.to_dict() == expected | {"_name_or_path": reference._name_or_path}
    for alias in type(reference).attribute_map:
        assert getattr(ours, alias) == getattr(reference, alias), alias


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_json_resolves_like_transformers(name, tmp_path, cache):
    path = write_config(tmp_path / name, CONFIGS[name])
    reference = AutoConfig.from_pretrained(path)

    first = load_hf_config(path)  # resolved by transformers, saved
    assert len(os.listdir(cache / "configs")) == 1
    second = load_hf_config(path)  # read back from the cache
    for ours in (first, second):
        assert_same_config(ours, reference)
        assert LlamaArch.from_hf(ours) == LlamaArch.from_hf(reference)
        arch = LlamaArch.from_hf(reference)
        for got, want in zip(
            rope_tables(ours, arch.head_dim, 64),
            rope_tables(reference, arch.head_dim, 64),
            strict=True,
        ):
            assert torch.equal(got, want)


def test_a_cached_config_is_not_resolved_again(tmp_path, cache, monkeypatch):
    path = write_config(tmp_path / "m", CONFIGS["mixtral"])
    load_hf_config(path)

    def resolve_again(config):
        raise AssertionError("resolved again")

    monkeypatch.setattr(hf_config, "_entry", resolve_again)
    assert load_hf_config(path).num_experts == 4  # the alias, read from the saved entry
    # the same config.json in another directory: the same entry, its own _name_or_path
    other = write_config(tmp_path / "copy", CONFIGS["mixtral"])
    assert load_hf_config(other)._name_or_path == other


def test_an_edited_config_json_is_resolved_afresh(tmp_path, cache):
    path = write_config(tmp_path / "m", CONFIGS["llama-minimal"])
    assert load_hf_config(path).num_key_value_heads == 4
    write_config(path, dict(CONFIGS["llama-minimal"], num_key_value_heads=2))
    assert load_hf_config(path).num_key_value_heads == 2


def test_an_unreadable_entry_is_resolved_and_rewritten(tmp_path, cache):
    path = write_config(tmp_path / "m", CONFIGS["qwen3"])
    load_hf_config(path)
    (entry,) = (cache / "configs").iterdir()
    entry.write_text("{not json")
    assert_same_config(load_hf_config(path), AutoConfig.from_pretrained(path))
    assert json.loads(entry.read_text())["values"]["head_dim"] == 32


def test_a_read_only_cache_still_gives_the_config(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache directory would go
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocked))
    path = write_config(tmp_path / "m", CONFIGS["qwen3"])
    assert_same_config(load_hf_config(path), AutoConfig.from_pretrained(path))


def test_pickles_and_round_trips_to_transformers(tmp_path, cache):
    path = write_config(tmp_path / "m", CONFIGS["qwen2_moe"])
    ours = load_hf_config(path)
    assert pickle.loads(pickle.dumps(ours)).to_dict() == ours.to_dict()
    assert_same_config(ours, ours.to_transformers())
    with pytest.raises(AttributeError, match="qwen2_moe config has no 'no_such_field'"):
        ours.no_such_field  # noqa: B018


def test_a_cached_config_loads_without_transformers(tmp_path, cache):
    """What a rank actor pays: with the entry cached, loading the config imports no
    transformers (its import is the seconds this module exists to save)."""
    path = write_config(tmp_path / "m", CONFIGS["llama3-scaled"])
    load_hf_config(path)
    code = (
        "import sys; from workers.loader import load_hf_config; "
        f"c = load_hf_config({path!r}); assert c.rope_parameters['rope_type'] == 'llama3'; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"
    )
    env = dict(os.environ, **{CACHE_DIR_ENV: str(cache)})
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_given_our_config_is_transformers_choice(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    reference = AutoTokenizer.from_pretrained(path)
    ours = load_tokenizer(path)
    assert type(ours) is type(reference)
    text = "Hello <|im_start|> wörld 🚀"
    assert ours.encode(text) == reference.encode(text)
    assert ours.chat_template == reference.chat_template
    assert ours.all_special_ids == reference.all_special_ids
