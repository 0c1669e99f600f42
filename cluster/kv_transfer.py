"""The form a prompt's KV takes between a prefill and a decode group: its raw bytes (bf16 and
fp16 as their 16-bit patterns) with dtype and shape beside them, sent as one frame on the
decode group's own connection to the prefill group's data plane (cluster/wire.py `take_kv`).
The sender hands the socket a view of the tensor's memory (no serialization of the values);
the receiver maps a tensor over the received bytes and copies it into its blocks once.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def pack(token_ids: list[int], data: torch.Tensor) -> dict[str, Any]:
    dtype = data.dtype
    data = data.contiguous()
    arr = data.view(_BITS[dtype]).numpy() if dtype in _BITS else data.numpy()
    return {
        "tokens": list(token_ids),
        "dtype": str(dtype).removeprefix("torch."),
        "shape": list(arr.shape),
        "data": memoryview(arr.reshape(-1)).cast("B"),
    }


def unpack(msg: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
    """The tokens and a tensor over the received buffer (the importer only reads it)."""
    dtype = getattr(torch, msg["dtype"])
    np_dtype = np.int16 if dtype in _BITS else torch.empty(0, dtype=dtype).numpy().dtype
    arr = np.frombuffer(msg["data"], dtype=np_dtype).reshape(msg["shape"])
    with warnings.catch_warnings():  # bytes are immutable; the importer only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(arr)
    return msg["tokens"], (t.view(dtype) if dtype in _BITS else t)
