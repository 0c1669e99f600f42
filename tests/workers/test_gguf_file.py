"""workers.gguf_file against gguf-py's GGUFReader, the reference nobody here wrote.

* Files written with gguf-py's GGUFWriter (every scalar type, strings, arrays of strings,
  nested arrays, F32/F16/BF16/I8/I32/Q8_0/Q4_0/Q4_1/Q6_K tensors, a custom alignment, GGUF v3
  and the same bytes marked v2) and the shipped SmolLM2 GGUF: every metadata value and every
  tensor's name, type, shape, data and dequantized values equal the reader's.
* Bad magic, unsupported versions and files truncated anywhere fail with a ValueError naming
  the file.
* workers.gguf_loader gives the same config and tensors as it did on GGUFReader.
"""

from __future__ import annotations

import os
import re

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize, quantize
from test_loader import finish_gguf, tiny_model, write_gguf

from workers import gguf_loader
from workers.config import DEFAULT_MODEL
from workers.gguf_file import GGUFFile
from workers.model_path import resolve_model_path

# ---------------------------------------------------------------- comparing with GGUFReader


def flatten(value):
    # GGUFReader's contents() flattens nested arrays into one list.
    if isinstance(value, list):
        return [leaf for item in value for leaf in flatten(item)]
    return [value]


def assert_same_as_gguf_py(path: str, reference: GGUFReader | None = None) -> None:
    ref = reference if reference is not None else GGUFReader(path)
    full = GGUFFile(path, load_strings=True)
    lazy = GGUFFile(path)
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(full.fields) == list(lazy.fields) == list(ref_fields)
    assert full.version == ref.fields["GGUF.version"].contents()
    assert full.alignment == ref.alignment and full.data_offset == ref.data_offset

    for key, field in ref_fields.items():
        expected = field.contents()
        ours = full.fields[key]
        assert ours.type == field.types[0], key
        if ours.type == GGUFValueType.ARRAY:
            # An array's parts: key length, key, type, element type, count, elements...
            assert ours.item_type == GGUFValueType(int(field.parts[3][0])), key
            assert ours.length == int(field.parts[4][0]), key
            assert flatten(ours.value) == expected, key
        else:
            assert ours.value == expected and type(ours.value) is type(expected), key
        skipped = lazy.fields[key]
        if ours.type == GGUFValueType.ARRAY and ours.item_type == GGUFValueType.STRING:
            assert not skipped.loaded and skipped.value is None, key
            assert skipped.length == len(field.data) == len(expected), key
            with pytest.raises(ValueError, match=re.escape(key)):
                lazy.get(key)
        else:
            assert skipped == ours, key

    assert len(full.tensors) == len(lazy.tensors) == len(ref.tensors)
    for ours, theirs in zip(lazy.tensors, ref.tensors, strict=True):
        assert ours.name == theirs.name
        assert ours.tensor_type == theirs.tensor_type
        assert ours.shape == tuple(theirs.shape.tolist()), ours.name
        assert (ours.n_elements, ours.n_bytes) == (theirs.n_elements, theirs.n_bytes), ours.name
        assert ours.data_offset == theirs.data_offset, ours.name
        assert ours.data.dtype == theirs.data.dtype, ours.name
        assert ours.data.shape == theirs.data.shape, ours.name
        assert not ours.data.flags.writeable
        assert np.array_equal(ours.data, theirs.data, equal_nan=True), ours.name
        if ours.tensor_type in NOT_DEQUANTIZABLE:
            continue
        a = dequantize(ours.data, ours.tensor_type)
        b = dequantize(theirs.data, theirs.tensor_type)
        assert a.dtype == b.dtype and a.shape == b.shape, ours.name
        assert np.array_equal(a, b, equal_nan=True), ours.name


# gguf.quants.dequantize has no path for plain integer / f64 tensors.
NOT_DEQUANTIZABLE = {
    GGMLQuantizationType.I8,
    GGMLQuantizationType.I16,
    GGMLQuantizationType.I32,
    GGMLQuantizationType.I64,
    GGMLQuantizationType.F64,
}


class GGUFPyFile:
    """GGUFFile's interface on top of gguf-py's GGUFReader: the loader as it was before."""

    class _Field:
        def __init__(self, field):
            self.length = len(field.data) if field.types[0] == GGUFValueType.ARRAY else None

    class _Tensor:
        def __init__(self, tensor):
            self.name, self.tensor_type, self.data = tensor.name, tensor.tensor_type, tensor.data
            self.shape = tuple(int(d) for d in tensor.shape.tolist())

    def __init__(self, reader: GGUFReader):
        self.reader = reader
        self.fields = {k: self._Field(f) for k, f in reader.fields.items()}
        self.tensors = [self._Tensor(t) for t in reader.tensors]

    def get(self, key, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()


def loader_outputs(path: str) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
    config = gguf_loader.read_gguf_config(path).to_dict()
    weights = list(gguf_loader.iter_gguf_weights(path, torch.float32))
    return config, weights


def assert_loader_unchanged(path: str, monkeypatch, reference: GGUFReader | None = None):
    ours = loader_outputs(path)
    reader = reference if reference is not None else GGUFReader(path)
    with monkeypatch.context() as m:
        m.setattr(gguf_loader, "GGUFFile", lambda p: GGUFPyFile(reader))
        before = loader_outputs(path)
    assert ours[0] == before[0]
    assert [n for n, _ in ours[1]] == [n for n, _ in before[1]]
    for (name, a), (_, b) in zip(ours[1], before[1], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name


# ---------------------------------------------------------------- small written files

QUANTIZED = [
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.BF16,
]


def write_mixed(path: str, alignment: int | None = None) -> None:
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 1e-5)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.true", True)
    writer.add_bool("t.false", False)
    writer.add_string("t.str", "naïve café 日本語 🚀")
    writer.add_string("t.empty", "")
    writer.add_array("t.strings", ["", "a", "b c", "ünï", "x" * 1000])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.25, 3e-8])
    writer.add_array("t.bools", [True, False, True])
    writer.add_key_value("t.u64s", [0, 2**64 - 1], GGUFValueType.ARRAY, GGUFValueType.UINT64)
    writer.add_key_value("t.f64s", [0.1, -2.5], GGUFValueType.ARRAY, GGUFValueType.FLOAT64)
    writer.add_array("t.nested", [[1, 2], [3, 4, 5], [6]])
    writer.add_array("t.nested_strings", [["a", "bc"], ["d"]])
    writer.add_array("t.bytes", b"\x00\x01\xff")
    writer.add_token_list([f"tok{i}" for i in range(300)])

    writer.add_tensor("f32", rng.standard_normal((3, 5), dtype=np.float32))
    writer.add_tensor("f16", rng.standard_normal((7,)).astype(np.float16))
    writer.add_tensor("i8", rng.integers(-128, 127, (2, 3, 4), dtype=np.int8))
    writer.add_tensor("i32", rng.integers(-(2**31), 2**31 - 1, (4, 2), dtype=np.int32))
    writer.add_tensor("scalar", np.array([3.5], dtype=np.float32))
    for qtype in QUANTIZED:
        data = rng.standard_normal((3, 64), dtype=np.float32)
        writer.add_tensor(qtype.name.lower(), quantize(data, qtype), raw_dtype=qtype)
    # No quantizer for K-quants in gguf-py: random blocks (dequantize handles any bytes).
    block, size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K]
    raw = rng.integers(0, 256, (2, size), dtype=np.uint8)
    writer.add_tensor("q6_k", raw, raw_dtype=GGMLQuantizationType.Q6_K)
    finish_gguf(writer)


def set_version(path: str, version: int) -> None:
    with open(path, "r+b") as f:
        f.seek(4)
        f.write(version.to_bytes(4, "little"))


@pytest.mark.parametrize("alignment", [None, 64])
def test_written_file_equals_gguf_py(tmp_path, alignment):
    path = str(tmp_path / "mixed.gguf")
    write_mixed(path, alignment)
    ours = GGUFFile(path)
    assert ours.version == 3 and ours.alignment == (alignment or 32)
    assert {t.tensor_type for t in ours.tensors} >= set(QUANTIZED) | {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.Q6_K,
    }
    assert ours.fields["tokenizer.ggml.tokens"].length == 300
    assert ours.get("t.nested") == [[1, 2], [3, 4, 5], [6]]
    assert ours.get("t.nested_strings") == [["a", "bc"], ["d"]]
    assert ours.get("t.u64") == 2**63 + 5 and ours.get("missing", "x") == "x"
    assert_same_as_gguf_py(path)


def test_version_2_reads_like_version_3(tmp_path):
    path = str(tmp_path / "v2.gguf")
    write_mixed(path)
    set_version(path, 2)
    assert GGUFFile(path).version == 2
    assert_same_as_gguf_py(path)


def test_load_strings_reads_only_the_keys_asked_for(tmp_path):
    path = str(tmp_path / "mixed.gguf")
    write_mixed(path)
    ours = GGUFFile(path, load_strings=["t.strings"])
    assert ours.get("t.strings") == ["", "a", "b c", "ünï", "x" * 1000]
    assert not ours.fields["tokenizer.ggml.tokens"].loaded
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.tokens.*300 strings.*load_strings"):
        ours.get("tokenizer.ggml.tokens")
    tokens = GGUFFile(path, load_strings=["tokenizer.ggml.tokens"]).get("tokenizer.ggml.tokens")
    assert tokens == [f"tok{i}" for i in range(300)]


@pytest.mark.parametrize(("kind", "tie"), [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_loader_unchanged_on_written_models(tmp_path, monkeypatch, kind, tie):
    path = str(tmp_path / f"tiny-{kind}.gguf")
    write_gguf(tiny_model(kind, tie), path)
    assert_same_as_gguf_py(path)
    assert_loader_unchanged(path, monkeypatch)


def test_vocab_size_from_the_token_count(tmp_path, monkeypatch):
    # No `llama.vocab_size`: the loader counts the (skipped) tokens array.
    path = str(tmp_path / "tokens.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in [
        (writer.add_block_count, 1),
        (writer.add_context_length, 64),
        (writer.add_embedding_length, 8),
        (writer.add_feed_forward_length, 16),
        (writer.add_head_count, 2),
    ]:
        add(value)
    writer.add_token_list([f"t{i}" for i in range(77)])
    writer.add_tensor("token_embd.weight", np.zeros((50, 8), dtype=np.float32))
    finish_gguf(writer)
    assert gguf_loader.read_gguf_config(path).vocab_size == 77
    assert_loader_unchanged(path, monkeypatch)


# ---------------------------------------------------------------- bad files


def test_bad_magic_and_versions_name_the_file(tmp_path):
    path = str(tmp_path / "mixed.gguf")
    write_mixed(path)
    good = open(path, "rb").read()

    bad = tmp_path / "bad-magic.gguf"
    bad.write_bytes(b"GGML" + good[4:])
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*not a GGUF file"):
        GGUFFile(str(bad))
    for version, message in [
        (1, "version 1 is not supported"),
        (4, "version 4"),
        (3 << 24, "big-endian"),
    ]:
        other = tmp_path / f"v{version}.gguf"
        other.write_bytes(good)
        set_version(str(other), version)
        with pytest.raises(ValueError, match=re.escape(str(other)) + ".*" + message):
            GGUFFile(str(other))


def test_truncated_files_name_the_file(tmp_path):
    path = str(tmp_path / "mixed.gguf")
    write_mixed(path)
    good = open(path, "rb").read()
    whole = GGUFFile(path)
    data_offset, last = whole.data_offset, whole.tensors[-1]
    tokens_at = good.index(b"tok150")
    # Empty, inside the header, inside a string, inside the skipped token array, inside the
    # tensor infos, before the data, and one byte short of the last tensor's end.
    cuts = [
        0,
        10,
        30,
        tokens_at,
        data_offset - 40,
        data_offset,
        last.data_offset + last.n_bytes - 1,
    ]
    for cut in cuts:
        short = tmp_path / f"cut-{cut}.gguf"
        short.write_bytes(good[:cut])
        with pytest.raises(ValueError, match=re.escape(str(short)) + ".*truncated"):
            GGUFFile(str(short))


# ---------------------------------------------------------------- the shipped SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm2() -> tuple[str, GGUFReader]:
    path = resolve_model_path(DEFAULT_MODEL)
    return path, GGUFReader(path)


@pytest.mark.slow
def test_smollm2_equals_gguf_py(smollm2):
    path, reference = smollm2
    assert os.path.basename(path) == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert_same_as_gguf_py(path, reference)


@pytest.mark.slow
def test_smollm2_loader_unchanged(smollm2, monkeypatch):
    path, reference = smollm2
    assert_loader_unchanged(path, monkeypatch, reference)
