"""Reading GGUF as a source: a strict parser refusing what gguf.cpp refuses, and split sets.

Part of the GGUF container (convert/containers/gguf/): see its __init__ for the sources of every fact.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

from convert.common.errors import ConvertError, shown
from convert.containers.gguf.keys import KV, _get
from convert.containers.gguf.types import ALIGNMENT, DTYPE_OF_GGML, QUANTIZED, tensor_nbytes
from convert.containers.gguf.writer import _NUMPY_OF_VALUE, _SCALAR_FORMAT, _pad, split_file_name
from convert.fileio.streams import ByteStream
from convert.model.records import TensorRecord

# gguf.cpp accepts string and array lengths up to 1 GiB each (bounded by the bytes left in the file); for a source
# whose header is ours to hold in memory, the whole key/value and tensor-info region is capped instead. Mixtral's is
# under 1 MiB (32000 tokens, 995 tensors); 16 MiB, as for safetensors headers, is refused before it is parsed.
MAX_HEADER = 16 * 2**20
# Python holds each string as an object of ~50 bytes or more: the count of strings over all arrays is capped too, so
# that a crafted header of 2-byte strings cannot cost ten times its size (8x Mixtral's 32000 tokens).
MAX_STRINGS = 2**18
GGML_MAX_NAME = 64  # ggml.h: a tensor name must be shorter (gguf.cpp refuses >= 64 bytes)
GGML_MAX_DIMS = 4
_INT64_MAX = 2**63 - 1


@dataclass
class _Cursor:
    data: memoryview
    label: str
    file_size: int
    pos: int = 0
    strings: int = 0

    def fail(self, rule: str, tensor: str | None = None) -> ConvertError:
        return ConvertError(f"GGUF: {rule}", file=self.label, tensor=tensor)

    def take(self, n: int, what: str) -> memoryview:
        self.need(n, what)
        view = self.data[self.pos : self.pos + n]
        self.pos += n
        return view

    def need(self, n: int, what: str) -> None:
        """Refuse n more bytes that are not there, before anything of that size is allocated."""
        if n > len(self.data) - self.pos:
            if len(self.data) < self.file_size:
                raise self.fail(
                    f"{what} at byte {self.pos} runs past the first {MAX_HEADER} bytes: the metadata and tensor "
                    "infos of a Mixtral GGUF take under 1 MiB, refused before reading further"
                )
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file ends at {self.file_size}")

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("<Q", f"{what} length")
        raw = self.take(length, what)  # checked against the bytes left before anything is allocated
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} at byte {self.pos - length} is not UTF-8 ({exc.reason})") from None


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype == GGUFValueType.STRING:
        return cur.string(f"the value of {shown(key)}")
    fmt = _SCALAR_FORMAT.get(GGUFValueType(vtype))
    assert fmt is not None
    if vtype == GGUFValueType.BOOL:
        raw = cur.unpack("<B", f"the value of {shown(key)}")
        if raw > 1:
            raise cur.fail(f"key {shown(key)}: bool byte {raw} is neither 0 nor 1")
        return bool(raw)
    return cur.unpack(fmt, f"the value of {shown(key)}")


def _value_type(cur: _Cursor, raw: int, key: str, *, item: bool = False) -> GGUFValueType:
    try:
        vtype = GGUFValueType(raw)
    except ValueError:
        raise cur.fail(f"key {shown(key)} has unknown value type {raw}") from None
    if item and vtype == GGUFValueType.ARRAY:
        raise cur.fail(f"key {shown(key)} is an array of arrays, which gguf.cpp refuses")
    return vtype


def _read_kv(cur: _Cursor) -> KV:
    key = cur.string("a metadata key")
    if not key:
        raise cur.fail(f"empty metadata key before byte {cur.pos}")
    vtype = _value_type(cur, cur.unpack("<I", f"the type of {shown(key)}"), key)
    if vtype != GGUFValueType.ARRAY:
        return KV(key, vtype, _read_value(cur, vtype, key))
    item = _value_type(cur, cur.unpack("<I", f"the item type of {shown(key)}"), key, item=True)
    count = cur.unpack("<Q", f"the length of {shown(key)}")
    least = 8 if item == GGUFValueType.STRING else struct.calcsize(_SCALAR_FORMAT[item])
    cur.need(count * least, f"array {shown(key)} of {count} items")  # before allocating: they must fit
    if item == GGUFValueType.STRING:
        cur.strings += count
        if cur.strings > MAX_STRINGS:
            raise cur.fail(f"more than {MAX_STRINGS} strings in the metadata (array {shown(key)}); refused")
        return KV(key, vtype, [cur.string(f"item of {shown(key)}") for _ in range(count)], item)
    raw = cur.take(count * least, f"array {shown(key)}")
    values = np.frombuffer(raw, dtype=_NUMPY_OF_VALUE[item]).copy()
    if item == GGUFValueType.BOOL:
        if (values > 1).any():
            raise cur.fail(f"array {shown(key)} holds a bool byte that is neither 0 nor 1")
        values = values.astype(bool)
    return KV(key, vtype, values, item)


def read_gguf(stream: ByteStream, *, quantized: bool = False) -> tuple[dict[str, KV], list[TensorRecord]]:
    """Read a GGUF file's metadata and tensor records as gguf.cpp's gguf_init_from_reader does, refusing what it
    refuses (bad magic, version 0, 1 or above 3, a byte-swapped version, negative counts, empty or duplicate keys,
    unknown value types, arrays of arrays, general.alignment not a UINT32 power of two, tensor names of 64 bytes or
    more or repeated, over 4 dimensions, an element count that overflows int64, unknown GGML types, rows not a whole
    number of blocks, offsets that are not exactly the previous tensor's padded end) and more: offsets or sizes past
    the end of the file, trailing bytes after the last tensor's padding, bool bytes other than 0/1, invalid UTF-8,
    a header over MAX_HEADER. Tensors of any type other than F32, F16, BF16 are refused unless quantized is set:
    then every block-quantized type is indexed too, dtype its GGML name ("Q4_K"), so that a quantized GGUF can be
    re-laid as GGUF byte for byte (split, merged, its legacy per-expert tensors stacked), inspected and verified;
    converting one to another layout is refused (GgufFormat.checkpoint_dtype: quantized GGUF is one-way).

    Records carry our dtype names and the shape in torch order (outermost first); offsets are absolute. Every count
    is checked against the bytes that remain before anything of that size is allocated."""
    label = stream.label
    head = bytearray(min(stream.size, MAX_HEADER))
    stream.readinto(head, 0)
    cur = _Cursor(memoryview(head), label, stream.size)
    if stream.size < 4 or cur.unpack("<I", "the magic") != GGUF_MAGIC:
        raise cur.fail("not a GGUF file (the first 4 bytes are not 'GGUF')")
    version = cur.unpack("<I", "the version")
    if version & 0xFFFF == 0 and version:
        raise cur.fail(f"version {version:#x} is byte-swapped: a big-endian GGUF, which is not supported")
    if version not in (2, 3):
        raise cur.fail(f"version {version} is not supported (gguf.cpp reads versions 2 and 3)")
    n_tensors = cur.unpack("<q", "the tensor count")
    n_kv = cur.unpack("<q", "the key count")
    left = len(cur.data) - cur.pos
    # A key takes at least 8 + 1 + 4 + 1 bytes, a tensor info 8 + 4 + 4 + 8: checked before any list is sized.
    if not 0 <= n_kv <= left // 14:
        raise cur.fail(f"key count {n_kv} is impossible for a header of {left} more bytes")
    if not 0 <= n_tensors <= left // 24:
        raise cur.fail(f"tensor count {n_tensors} is impossible for a header of {left} more bytes")

    metadata: dict[str, KV] = {}
    for _ in range(n_kv):
        entry = _read_kv(cur)
        if entry.key in metadata:
            raise cur.fail(f"duplicate key {shown(entry.key)}")
        metadata[entry.key] = entry
    alignment = ALIGNMENT
    if (align := metadata.get(Keys.General.ALIGNMENT)) is not None:
        if align.type != GGUFValueType.UINT32 or align.value <= 0 or align.value & (align.value - 1):
            raise cur.fail(f"{Keys.General.ALIGNMENT} must be a UINT32 power of two, got {align.value!r}")
        alignment = align.value

    infos: list[tuple[str, GGMLQuantizationType, tuple[int, ...], int]] = []
    seen: set[str] = set()
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        if len(name.encode("utf-8")) >= GGML_MAX_NAME:
            raise cur.fail(f"tensor name is {len(name.encode())} bytes; ggml allows at most {GGML_MAX_NAME - 1}",
                           tensor=name)  # fmt: skip
        if name in seen:
            raise cur.fail("duplicate tensor name", tensor=name)
        seen.add(name)
        n_dims = cur.unpack("<I", "a tensor's dimension count")
        if n_dims > GGML_MAX_DIMS:
            raise cur.fail(f"{n_dims} dimensions; ggml allows at most {GGML_MAX_DIMS}", tensor=name)
        dims = [cur.unpack("<q", "a tensor dimension") for _ in range(n_dims)]
        if any(d < 0 for d in dims):
            raise cur.fail(f"negative dimension in {dims}", tensor=name)
        if math.prod(dims) > _INT64_MAX:
            raise cur.fail(f"shape {dims} has more elements than int64 can count", tensor=name)
        raw_type = cur.unpack("<I", "a tensor type")
        offset = cur.unpack("<Q", "a tensor offset")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise cur.fail(f"unknown GGML type {raw_type}", tensor=name) from None
        if ggml_type not in DTYPE_OF_GGML and not (quantized and ggml_type.name in QUANTIZED):
            rule = (
                f"is {ggml_type.name}: quantized GGUF is one-way, its weights cannot be restored; convert from the "
                "original checkpoint instead"
                if GGML_QUANT_SIZES.get(ggml_type, (2, 0))[0] > 1
                else f"is {ggml_type.name}, not a weight type of this model (F32, F16 or BF16)"
            )
            raise cur.fail(rule, tensor=name)
        infos.append((name, ggml_type, tuple(reversed(dims)), offset))

    data_start = cur.pos + _pad(cur.pos, alignment) if n_tensors else cur.pos
    records: list[TensorRecord] = []
    expected = 0
    for name, ggml_type, shape, offset in infos:
        if offset != expected:
            rule = "is not aligned" if offset % alignment else "is not where the previous tensor's padded data ends"
            raise cur.fail(f"data offset {offset} {rule} (expected {expected})", tensor=name)
        size = tensor_nbytes(shape, ggml_type)
        if data_start + offset + size > stream.size:
            raise cur.fail(
                f"data [{data_start + offset}, {data_start + offset + size}) runs past the end of the file "
                f"({stream.size} bytes; truncated download?)",
                tensor=name,
            )
        dtype = DTYPE_OF_GGML.get(ggml_type, ggml_type.name)
        records.append(TensorRecord(name, dtype, shape, stream, data_start + offset, size))
        expected = offset + size + _pad(size, alignment)
    end = data_start + expected if n_tensors else cur.pos + _pad(cur.pos, alignment)  # writers pad an empty one too
    if stream.size > end:
        raise cur.fail(f"{stream.size - end} bytes after the last tensor's data and padding")
    return metadata, records


_SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_paths(first: Path) -> list[Path]:
    """All files of a GGUF model given its first file: [first] for a single file, else every
    NAME-0000i-of-0000N.gguf beside it (llama.cpp's llama_split_prefix naming); a missing one is an error. A later
    split given as the source is refused: llama.cpp loads a split model from its first file."""
    match = _SPLIT_NAME.match(first.name)
    if match is None:
        return [first]
    number, count = int(match["no"]), int(match["count"])
    if number != 1 or count == 0:
        first_name = split_file_name(match["stem"], 0, count)
        raise ConvertError(f"is split {number} of {count}; give the first split ({first_name})", file=first)
    paths = [first.with_name(split_file_name(match["stem"], i, count)) for i in range(count)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ConvertError(f"split {missing[0]} is missing ({len(missing)} of {count} files)", file=first)
    return paths


def check_splits(paths: Sequence[Path], metadatas: Sequence[Mapping[str, KV]], n_tensors: int) -> None:
    """Check that each file's split.no / split.count / split.tensors.count agree with its place in the set and that
    the tensors over all files add up (what llama.cpp's loader checks: every split numbered, none missing)."""
    S = Keys.Split
    count = len(paths)
    for index, (path, metadata) in enumerate(zip(paths, metadatas, strict=True)):
        if count == 1 and S.LLM_KV_SPLIT_COUNT not in metadata:
            continue
        no = _get(metadata, S.LLM_KV_SPLIT_NO, GGUFValueType.UINT16, str(path))
        total = _get(metadata, S.LLM_KV_SPLIT_COUNT, GGUFValueType.UINT16, str(path))
        tensors = _get(metadata, S.LLM_KV_SPLIT_TENSORS_COUNT, GGUFValueType.INT32, str(path))
        if no != index or total != count:
            raise ConvertError(
                f"GGUF: split.no {no} of split.count {total}, but the file name makes it {index} of {count}",
                file=path,
            )
        if tensors != n_tensors:
            raise ConvertError(
                f"GGUF: split.tensors.count is {tensors} but the {count} files hold {n_tensors} tensors", file=path
            )


def metadata_values(metadata: Mapping[str, KV]) -> dict[str, Any]:
    """{key: value} with arrays as lists, for display and comparison."""
    return {k: (list(v.value.tolist()) if isinstance(v.value, np.ndarray) else v.value) for k, v in metadata.items()}


