"""Ray custom resources as a config value: {name: amount}, checked where the YAML is loaded.

Names are those given to `ray start --resources` (e.g. {"node_b": 1}); a group or rank that asks
for a share of one only runs on a node that has it, which is how pools are pinned to nodes.
CPU, GPU and memory are Ray's own and have their own fields.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator

_RAY_OWN = ("CPU", "GPU", "memory", "object_store_memory")


def _check(value: dict[str, float]) -> dict[str, float]:
    for name, amount in value.items():
        if not name.strip():
            raise ValueError("a resource name is empty")
        if name in _RAY_OWN:
            raise ValueError(f"{name!r} is one of Ray's own resources: use its own field")
        if not math.isfinite(amount) or amount < 0:
            raise ValueError(
                f"resource {name!r}: amount must be a finite number >= 0, not {amount}"
            )
    return value


CustomResources = Annotated[dict[str, float], AfterValidator(_check)]
