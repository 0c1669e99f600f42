"""The form a prompt's KV takes between a prefill and a decode group: a numpy array (bf16 and
fp16 as their 16-bit patterns), which Ray's object store moves without pickling the bytes --
put is one copy into shared memory and the reader maps it in place (benchmarks/kv_transfer.py
measures it; a torch tensor went through pickle at a fraction of memcpy's speed).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def pack(token_ids: list[int], data: torch.Tensor) -> dict[str, Any]:
    dtype = data.dtype
    arr = data.view(_BITS[dtype]).numpy() if dtype in _BITS else data.numpy()
    return {"tokens": token_ids, "data": arr, "dtype": str(dtype).removeprefix("torch.")}


def unpack(msg: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
    """The tokens and a tensor over the received buffer (the importer only reads it)."""
    dtype = getattr(torch, msg["dtype"])
    with warnings.catch_warnings():  # the object store hands out read-only shared memory
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(msg["data"])
    return msg["tokens"], (t.view(dtype) if dtype in _BITS else t)
