"""workers.gguf_dequant against gguf-py's numpy dequantizer (llama.cpp's own Python package):
bit-identical float32 for every block format, including the ones it hands to gguf-py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as reference

from workers.gguf_dequant import dequantize

ROWS, COLS = 48, 256


def raw_tensor(qtype: GGMLQuantizationType, seed: int) -> np.ndarray:
    """Random blocks as gguf_file hands them over: read-only uint8 rows. Scales are finite
    f16 values of every magnitude (subnormals, signed zeros included); quants any bytes."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (ROWS, COLS // block, size), dtype=np.uint8)
    if qtype in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0):
        halves = 2 if qtype == GGMLQuantizationType.Q4_1 else 1  # Q4_1: scale and minimum
        scales = rng.choice([-1, 1], (ROWS, COLS // block, halves)) * np.exp2(
            rng.uniform(-26, 8, (ROWS, COLS // block, halves))
        )
        scales[0, :2] = 0.0
        scales[1, :2] = -0.0
        raw[..., : 2 * halves] = scales.astype(np.float16).view(np.uint8)
    array = np.frombuffer(raw.tobytes(), dtype=np.uint8).reshape(ROWS, -1)
    assert not array.flags.writeable
    return array


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0", "Q6_K", "F16"])
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # Q6_K: random bytes, NaN scales
def test_bit_identical_to_gguf_py(name):
    qtype = GGMLQuantizationType[name]
    for seed in range(3):
        if name == "F16":
            values = np.random.default_rng(seed).standard_normal((ROWS, COLS))
            data = np.frombuffer(values.astype(np.float16).tobytes(), np.float16).reshape(ROWS, -1)
        else:
            data = raw_tensor(qtype, seed)
        ours = dequantize(data, qtype, (ROWS, COLS))
        expected = torch.from_numpy(reference(data, qtype).reshape(ROWS, COLS).copy())
        assert ours.dtype == torch.float32 and ours.shape == (ROWS, COLS)
        assert torch.equal(ours.view(torch.int32), expected.view(torch.int32)), name


def test_a_vector_and_a_3d_shape():
    qtype = GGMLQuantizationType.Q4_1
    data = raw_tensor(qtype, 7)
    flat = dequantize(data, qtype, (ROWS * COLS,))
    cube = dequantize(data, qtype, (ROWS // 2, 2, COLS))
    assert torch.equal(flat.reshape(ROWS // 2, 2, COLS), cube)
