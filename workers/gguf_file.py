"""A small reader for llama.cpp's GGUF container: header, metadata, tensor infos, tensor data.

gguf-py's `GGUFReader` builds numpy views for every part of every metadata value, which for a
49k-token vocabulary (`tokenizer.ggml.tokens`, `tokenizer.ggml.merges`) takes seconds. Loading
a model needs a few scalar keys and the tensors, so here arrays of strings are skipped (only
their length is kept) unless their keys are asked for; everything else is read with `struct`
from one memory map of the file.

Layout (little-endian; versions 2 and 3 are identical, version 1 had 32-bit counts):

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x  (string key, u32 value_type, value)
    tensor_count x  (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    padding to `general.alignment` (u32, default 32) | tensor data (offsets are relative here)

A string is a u64 byte length and UTF-8 bytes; an array is a u32 element type, a u64 count and
the elements (arrays may nest). Dimensions are ggml's `ne`, fastest-varying first.

Tensor data come as read-only numpy views of the memory map, with gguf-py's `ReaderTensor.data`
dtype and shape (F16/F32/F64/I8/I16/I32/I64 as those dtypes in row-major shape `reversed(dims)`,
every other type as uint8 bytes per row), so `gguf.quants.dequantize(t.data, t.tensor_type)`
works on them unchanged.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_HEADER = struct.Struct("<4sIQQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# Scalar value types: their struct format and the numpy dtype an array of them is read as.
_SCALARS: dict[GGUFValueType, tuple[struct.Struct, np.dtype]] = {
    vtype: (struct.Struct("<" + fmt), np.dtype("<" + fmt if fmt != "?" else "?"))
    for vtype, fmt in (
        (GGUFValueType.UINT8, "B"),
        (GGUFValueType.INT8, "b"),
        (GGUFValueType.UINT16, "H"),
        (GGUFValueType.INT16, "h"),
        (GGUFValueType.UINT32, "I"),
        (GGUFValueType.INT32, "i"),
        (GGUFValueType.FLOAT32, "f"),
        (GGUFValueType.BOOL, "?"),
        (GGUFValueType.UINT64, "Q"),
        (GGUFValueType.INT64, "q"),
        (GGUFValueType.FLOAT64, "d"),
    )
}

# ggml types whose data gguf-py exposes as plain numbers (the rest as bytes).
_PLAIN_TENSOR_DTYPES = {
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F64: np.dtype("<f8"),
    GGMLQuantizationType.I8: np.dtype("i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"),
    GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}


class _Truncated(Exception):
    """Internal: the file ends before the structure being read (turned into ValueError)."""


@dataclass(frozen=True)
class GGUFField:
    """One metadata key/value.

    `value` is a Python scalar, a str, or a (possibly nested) list; for a top-level array of
    strings that was not asked for it is None and `loaded` is False (its `length` is known).
    """

    name: str
    type: GGUFValueType
    item_type: GGUFValueType | None  # element type of an array; None for a scalar
    length: int | None  # element count of an array; None for a scalar
    value: Any
    loaded: bool = True


class GGUFTensor(NamedTuple):
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml `ne`: fastest-varying dimension first
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file
    data: np.ndarray  # read-only view of the file's memory map (see the module docstring)


class GGUFFile:
    """The metadata and tensors of a GGUF file.

    `load_strings` names the keys whose arrays of strings are read in full (True: all of
    them); other arrays of strings are skipped, their `GGUFField.length` still counted.
    Raises ValueError naming the file for anything but a well-formed little-endian GGUF v2/v3.
    """

    def __init__(self, path: str | os.PathLike[str], load_strings: Collection[str] | bool = ()):
        self.path = os.fspath(path)
        self._load_strings = load_strings
        with open(self.path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            if self.size < _HEADER.size:
                raise self._error(f"truncated GGUF file ({self.size} bytes, no complete header)")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        magic, version, tensor_count, kv_count = _HEADER.unpack_from(self._map, 0)
        if magic != MAGIC:
            raise self._error(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0:
                raise self._error("big-endian GGUF files are not supported")
            raise self._error(
                f"GGUF version {version} is not supported (supported: "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        self.version: int = version
        self.fields: dict[str, GGUFField] = {}
        self.tensors: list[GGUFTensor] = []
        self._offset = _HEADER.size
        try:
            for _ in range(kv_count):
                self._read_field()
            infos = [self._read_tensor_info() for _ in range(tensor_count)]
        except (_Truncated, struct.error) as e:
            raise self._error(
                f"truncated GGUF file ({self.size} bytes; metadata runs past the end "
                f"near byte {self._offset})"
            ) from e
        except UnicodeDecodeError as e:
            raise self._error(f"invalid UTF-8 near byte {self._offset}: {e}") from e
        self.alignment = self._alignment()
        self.data_offset = -(-self._offset // self.alignment) * self.alignment
        names: set[str] = set()
        for info in infos:
            if info[0] in names:
                raise self._error(f"duplicate tensor {info[0]!r}")
            names.add(info[0])
            self.tensors.append(self._tensor(*info))

    # ------------------------------------------------------------------ public

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata `key` (`default` when absent), like gguf-py's `contents()`."""
        field = self.fields.get(key)
        if field is None:
            return default
        if not field.loaded:
            raise ValueError(
                f"{self.path}: GGUF metadata {key!r} (an array of {field.length} strings) was "
                "skipped; pass it in load_strings to read it"
            )
        return field.value

    # ------------------------------------------------------------------ parsing

    def _error(self, message: str) -> ValueError:
        return ValueError(f"{self.path}: {message}")

    def _need(self, nbytes: int) -> None:
        if self._offset + nbytes > self.size:
            raise _Truncated

    def _u32(self) -> int:
        (value,) = _U32.unpack_from(self._map, self._offset)
        self._offset += 4
        return value

    def _u64(self) -> int:
        (value,) = _U64.unpack_from(self._map, self._offset)
        self._offset += 8
        return value

    def _str(self) -> str:
        n = self._u64()
        self._need(n)
        start = self._offset
        self._offset += n
        return self._map[start : self._offset].decode("utf-8")

    def _value_type(self, raw: int, where: str) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self._error(f"{where}: unknown GGUF value type {raw}") from None

    def _read_field(self) -> None:
        key = self._str()
        vtype = self._value_type(self._u32(), f"metadata {key!r}")
        if key in self.fields:
            raise self._error(f"duplicate metadata key {key!r}")
        if vtype != GGUFValueType.ARRAY:
            field = GGUFField(key, vtype, None, None, self._scalar(vtype, key))
        else:
            item_type = self._value_type(self._u32(), f"metadata {key!r}")
            length = self._u64()
            wanted = self._load_strings is True or (
                self._load_strings is not False and key in self._load_strings
            )
            if item_type == GGUFValueType.STRING and not wanted:
                self._skip_strings(length)
                field = GGUFField(key, vtype, item_type, length, None, loaded=False)
            else:
                field = GGUFField(
                    key, vtype, item_type, length, self._array(item_type, length, key)
                )
        self.fields[key] = field

    def _scalar(self, vtype: GGUFValueType, key: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self._str()
        if vtype == GGUFValueType.ARRAY:
            item_type = self._value_type(self._u32(), f"metadata {key!r}")
            return self._array(item_type, self._u64(), key)
        fmt = _SCALARS[vtype][0]
        (value,) = fmt.unpack_from(self._map, self._offset)
        self._offset += fmt.size
        return value

    def _array(self, item_type: GGUFValueType, length: int, key: str) -> list[Any]:
        scalar = _SCALARS.get(item_type)
        if scalar is None:  # strings or nested arrays: one element at a time
            return [self._scalar(item_type, key) for _ in range(length)]
        dtype = scalar[1]
        self._need(length * dtype.itemsize)
        values = np.frombuffer(self._map, dtype, length, self._offset)
        self._offset += length * dtype.itemsize
        return values.tolist()

    def _skip_strings(self, length: int) -> None:
        # Every string takes at least its 8-byte length: reject absurd counts before looping.
        self._need(length * 8)
        unpack, buf, offset = _U64.unpack_from, self._map, self._offset
        for _ in range(length):
            offset += 8 + unpack(buf, offset)[0]
        self._offset = offset
        self._need(0)

    def _read_tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._str()
        n_dims = self._u32()
        self._need(n_dims * 8)
        dims = struct.unpack_from(f"<{n_dims}Q", self._map, self._offset)
        self._offset += n_dims * 8
        raw_type = self._u32()
        return name, dims, raw_type, self._u64()

    def _alignment(self) -> int:
        field = self.fields.get("general.alignment")
        if field is None:
            return DEFAULT_ALIGNMENT
        if field.type != GGUFValueType.UINT32:
            raise self._error(f"general.alignment must be a uint32, got {field.type.name}")
        alignment = field.value
        if alignment == 0 or alignment & (alignment - 1):
            raise self._error(f"general.alignment {alignment} is not a power of two")
        return alignment

    def _tensor(self, name: str, dims: tuple[int, ...], raw_type: int, offset: int) -> GGUFTensor:
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise self._error(f"tensor {name!r} has unknown ggml type {raw_type}") from None
        n_elements = 1
        for d in dims:
            n_elements *= d
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = n_elements * type_size // block_size
        start = self.data_offset + offset
        if start + n_bytes > self.size:
            raise self._error(
                f"truncated GGUF file ({self.size} bytes): tensor {name!r} needs bytes "
                f"{start}..{start + n_bytes}"
            )
        row_major = tuple(reversed(dims))
        dtype = _PLAIN_TENSOR_DTYPES.get(ggml_type)
        if dtype is None:
            dtype = np.dtype(np.uint8)
            try:
                row_major = quant_shape_to_byte_shape(row_major, ggml_type)
            except ValueError as e:
                raise self._error(f"tensor {name!r}: {e}") from None
        count = n_bytes // dtype.itemsize
        data = np.frombuffer(self._map, dtype, count, start).reshape(row_major)
        return GGUFTensor(name, ggml_type, dims, n_elements, n_bytes, start, data)
