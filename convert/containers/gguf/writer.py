"""Serializing metadata and laying out a GGUF file (header, tensor offsets, zero padding), and splitting it as
gguf-split does.

Part of the GGUF container (convert/containers/gguf/): see its __init__ for the sources of every fact.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from gguf import (
    GGUF_MAGIC,
    GGUF_VERSION,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

from convert.common.errors import ConvertError
from convert.containers.gguf.keys import KV
from convert.containers.gguf.types import ALIGNMENT, tensor_nbytes

_SCALAR_FORMAT = MappingProxyType(
    {
        GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
        GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f",
        GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
        GGUFValueType.BOOL: "<?",
    }
)  # fmt: skip
_NUMPY_OF_VALUE = MappingProxyType(
    {
        GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
        GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4",
        GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
        GGUFValueType.BOOL: "<u1",
    }
)  # fmt: skip


def _string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: GGUFValueType, value: Any) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _string(value)
    return struct.pack(_SCALAR_FORMAT[vtype], value)


def _kv_bytes(entry: KV) -> bytes:
    """As GGUFWriter._pack_val: key string, uint32 type, then the value; an array is its item type, uint64 count
    and the items."""
    parts = [_string(entry.key), struct.pack("<I", entry.type)]
    if entry.type == GGUFValueType.ARRAY:
        if entry.item_type is None or entry.item_type == GGUFValueType.ARRAY:
            raise ValueError(f"array {entry.key} needs a scalar item type")
        items = entry.value
        parts.append(struct.pack("<IQ", entry.item_type, len(items)))
        if entry.item_type == GGUFValueType.STRING:
            parts.extend(_string(item) for item in items)
        else:
            parts.append(np.asarray(items, dtype=_NUMPY_OF_VALUE[entry.item_type]).tobytes())
    else:
        parts.append(_value(entry.type, entry.value))
    return b"".join(parts)


def _pad(n: int, alignment: int = ALIGNMENT) -> int:
    return -n % alignment


@dataclass(frozen=True)
class TensorInfo:
    """A tensor to place in a GGUF file: its name, GGML type and shape in torch order (outermost first)."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.ggml_type)


@dataclass(frozen=True)
class Run:
    """One run of a planned file: the header, a tensor's data, or zeros."""

    kind: str  # "header", "tensor" or "zeros"
    offset: int
    size: int
    tensor: str | None = None


@dataclass(frozen=True)
class GGUFLayout:
    """A planned GGUF file. Every byte is in exactly one piece, in file order: the header (padded with zeros to the
    alignment, the padding inside `header`), then each tensor's data followed by its zero padding to the alignment
    (after the last tensor too, as GGUFWriter writes it)."""

    header: bytes
    offsets: Mapping[str, int]  # absolute offset of each tensor's data
    nbytes: Mapping[str, int]
    size: int
    runs: tuple[Run, ...] = field(repr=False)
    metadata: tuple[KV, ...] = field(default=(), repr=False)  # the key/value entries the header holds

    @property
    def zero_blobs(self) -> list[tuple[int, int]]:
        return [(p.offset, p.size) for p in self.runs if p.kind == "zeros"]


def layout_gguf(metadata: Sequence[KV], tensors: Sequence[TensorInfo]) -> GGUFLayout:
    """GGUF v3, little-endian, as GGUFWriter writes it: magic, version, uint64 tensor count, uint64 key count, the
    key/value pairs in order, each tensor's info (name, uint32 n_dims, the dims innermost first, uint32 type,
    uint64 offset relative to the data section), zeros to a multiple of 32; then the tensors in the same order,
    each padded with zeros to a multiple of 32 (GGUFWriter.write_padding after every tensor, the last included)."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    keys = [e.key for e in metadata]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate metadata keys")
    parts = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(metadata))]
    parts.extend(_kv_bytes(entry) for entry in metadata)
    relative = 0
    placed: list[tuple[TensorInfo, int, int]] = []
    for info in tensors:
        size = info.nbytes
        parts.append(_string(info.name))
        parts.append(struct.pack("<I", len(info.shape)))
        parts.append(struct.pack(f"<{len(info.shape)}Q", *reversed(info.shape)))
        parts.append(struct.pack("<IQ", info.ggml_type, relative))
        placed.append((info, relative, size))
        relative += size + _pad(size)
    header = b"".join(parts)
    header += bytes(_pad(len(header)))
    runs = [Run("header", 0, len(header))]
    offsets: dict[str, int] = {}
    for info, rel, size in placed:
        start = len(header) + rel
        offsets[info.name] = start
        runs.append(Run("tensor", start, size, info.name))
        if _pad(size):
            runs.append(Run("zeros", start + size, _pad(size)))
    return GGUFLayout(
        header, MappingProxyType(offsets), MappingProxyType({i.name: i.nbytes for i in tensors}),
        len(header) + relative, tuple(runs), tuple(metadata),
    )  # fmt: skip



def split_file_name(stem: str, index: int, count: int) -> str:
    """llama_split_path's "%s-%05d-of-%05d.gguf" with the 1-based split number."""
    return f"{stem}-{index + 1:05d}-of-{count:05d}.gguf"


def split_tensors(tensors: Sequence[TensorInfo], max_size: int | None) -> list[list[TensorInfo]]:
    """Group tensors into files as gguf-split --split-max-size does (split_strategy): in order, counting only
    tensor data, each tensor padded to 32, a new file when the running size plus the next tensor would exceed
    max_size. One file when max_size is None. A tensor larger than max_size goes alone in a file (gguf-split does
    the same, except that it fails when that tensor is the very first)."""
    if max_size is None or not tensors:
        return [list(tensors)]
    if max_size <= 0:
        raise ValueError("max_size must be positive")
    groups: list[list[TensorInfo]] = [[]]
    current = 0
    for info in tensors:
        padded = info.nbytes + _pad(info.nbytes)
        if groups[-1] and current + padded > max_size:
            groups.append([])
            current = 0
        groups[-1].append(info)
        current += padded
    return groups


def split_metadata(metadata: Sequence[KV], index: int, count: int, n_tensors: int) -> list[KV]:
    """The metadata of split `index` of `count` as gguf-split writes it: the first file holds all of the model's
    keys, the others none; then split.no (UINT16), split.tensors.count (INT32, the total over all files) and
    split.count (UINT16) last: gguf-split sets split.count to a placeholder first and again once the count is
    known, and gguf.cpp's gguf_set_val_* removes a key and appends it."""
    S = Keys.Split
    if count > 0xFFFF or n_tensors > 0x7FFFFFFF:
        raise ConvertError(f"cannot split {n_tensors} tensors into {count} GGUF files (limits 65535 and 2^31-1)")
    base = list(metadata) if index == 0 else []
    return [
        *base,
        KV(S.LLM_KV_SPLIT_NO, GGUFValueType.UINT16, index),
        KV(S.LLM_KV_SPLIT_TENSORS_COUNT, GGUFValueType.INT32, n_tensors),
        KV(S.LLM_KV_SPLIT_COUNT, GGUFValueType.UINT16, count),
    ]


def layout_split(
    metadata: Sequence[KV], tensors: Sequence[TensorInfo], *, stem: str, max_size: int | None = None
) -> list[tuple[str, GGUFLayout]]:
    """The files of a GGUF model: [(f"{stem}.gguf", layout)] when it fits one file (no split keys, as
    convert_hf_to_gguf.py writes it), else gguf-split's NAME-0000i-of-0000N.gguf files."""
    groups = split_tensors(tensors, max_size)
    if len(groups) == 1:
        return [(f"{stem}.gguf", layout_gguf(metadata, groups[0]))]
    return [
        (split_file_name(stem, i, len(groups)), layout_gguf(split_metadata(metadata, i, len(groups), len(tensors)), g))
        for i, g in enumerate(groups)
    ]


