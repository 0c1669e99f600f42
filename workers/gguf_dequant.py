"""Dequantize GGUF tensors: the simple block formats in torch, the rest with gguf-py.

gguf-py's numpy dequantizer works on 16 rows at a time, single-threaded: loading SmolLM2-135M
(Q4_1) spent 2.0 s of CPU in it, in every group replica a pool starts. Q4_0, Q4_1 and Q8_0
are decoded here in a few whole-tensor torch ops instead, with gguf-py's float32 arithmetic
(f16 scale -> f32, times the quant, plus Q4_1's minimum; the product of an f16 and a small
integer is exact, so the add is the one rounding either way): bit-identical values, which
tests/workers/test_gguf_dequant.py checks. Other types (the K-quants, F16, BF16 ...) go
through gguf-py unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

# type -> (bytes per block of 32 weights, bytes before the packed weights)
_BLOCKS = {T.Q4_0: (18, 2), T.Q4_1: (20, 4), T.Q8_0: (34, 2)}


def dequantize(data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of `shape` (HF order) from a GGUF tensor's raw data (gguf_file's view)."""
    layout = _BLOCKS.get(qtype)
    if layout is None:
        array = gguf_dequantize(data, qtype)
        if not array.flags.writeable:  # F32 comes back as a view of the read-only mmap
            array = array.copy()
        return torch.from_numpy(array.reshape(shape))
    block_bytes, header = layout
    # A copy of the raw bytes (a fraction of the output's size): the map is read-only.
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8).reshape(-1, block_bytes))
    scale = blocks[:, :2].contiguous().view(torch.float16).float()  # [blocks, 1]
    packed = blocks[:, header:]
    if qtype == T.Q8_0:
        out = packed.contiguous().view(torch.int8).float() * scale
    else:  # 16 bytes: weights 0-15 in the low nibbles, 16-31 in the high ones
        quants = torch.cat((packed & 0x0F, packed >> 4), dim=1)
        if qtype == T.Q4_0:
            out = scale * (quants.to(torch.int8) - 8).float()
        else:
            minimum = blocks[:, 2:4].contiguous().view(torch.float16).float()
            out = scale * quants.float() + minimum
    return out.reshape(shape)
