"""A model's Hugging Face config, read without importing transformers in every process.

Resolving a config with transformers costs ~2-3 s of CPU per process (measured on a 2-core
EPYC): the model's config class imports transformers' model-loading stack (kernels hub,
torch.distributed.tensor, sympy) and `AutoConfig` scans the import structure of every model.
Every group replica and every rank actor reads the config, and so does each group a pool
scales up to, where that time is time before the group serves.

So transformers resolves each config once: its `to_dict()` (the class defaults applied, the
rope parameters standardized, `head_dim` and `layer_types` derived) is saved as JSON under
`$FLOTILLA_CACHE_DIR/configs/`, keyed by a hash of what it was resolved from (config.json's
bytes, or the fields read from a GGUF file) and the transformers version; later loads read the
JSON. The values are transformers' own, so there are no defaults here to drift from its.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from workers.model_path import config_cache_path, write_json_atomically


class HFConfig:
    """A resolved transformers config as attributes: its `to_dict()` values, plus the config
    class's attribute aliases (Mixtral's `num_experts` reads `num_local_experts`)."""

    def __init__(self, values: dict[str, Any], aliases: dict[str, str] | None = None):
        self.__dict__.update(values)
        self._aliases = dict(aliases or {})

    def __getattr__(self, name: str) -> Any:  # only reached when `name` is not a value
        target = self.__dict__.get("_aliases", {}).get(name)
        if target is None:
            raise AttributeError(f"{self.__dict__.get('model_type')} config has no {name!r}")
        return getattr(self, target)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_aliases"}

    def to_transformers(self):
        """The transformers config object (imports transformers): for the rope-init functions
        of scaled rope types, which call its methods. `from_dict` of a `to_dict()` is the
        round trip transformers itself makes through config.json."""
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return CONFIG_MAPPING[self.model_type].from_dict(self.to_dict())


def cached_config(source: bytes, name_or_path: str, resolve: Callable[[], Any]) -> HFConfig:
    """The config resolved from `source` (the bytes it is built from): read from the cache, or
    `resolve()`d by transformers and saved there first."""
    path = config_cache_path(source + b"\0transformers " + version("transformers").encode())
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
    except (OSError, ValueError):  # not there yet, or unreadable: resolve it again
        entry = _entry(resolve())
        try:
            write_json_atomically(path, entry)
        except OSError:
            pass  # an unwritable cache costs the next load's time; the config is returned
    values = dict(entry["values"], _name_or_path=name_or_path)
    return HFConfig(values, entry["aliases"])


def _entry(config) -> dict[str, Any]:
    # to_json_string: the JSON-safe form transformers writes to config.json (dtype as a name).
    values = json.loads(config.to_json_string(use_diff=False))
    return {"values": values, "aliases": dict(type(config).attribute_map)}
