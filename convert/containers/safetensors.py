"""The safetensors container: a strict header parser and a header writer byte-identical to safetensors' own.

File layout: 8-byte little-endian header length N, N bytes of JSON (an object, possibly padded with spaces),
then the data buffer. Rules enforced on read are those of docs/formats.md: no duplicate names, offsets
contiguous from 0 without gaps or overlaps, each range the size its dtype and shape say, and the file exactly
8 + N + the last end bytes long (a truncated download fails here).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from convert.common.dtypes import ITEM_SIZE, WRITE_RANK, nbytes_of
from convert.common.errors import ConvertError
from convert.fileio.streams import ByteStream
from convert.model.records import TensorRecord

# safetensors itself accepts headers up to 100 MB. Parsed, JSON costs many times its size (a 90 MB header of
# small tensor entries peaked above 1 GiB), and a Mixtral shard's header is about 30 KB (the mistral layout's
# single file, 995 tensors, about 100 KB): a header over 16 MiB is refused before it is parsed, which keeps every
# input within the memory bound. No checkpoint of this model comes near it.
MAX_HEADER = 16 * 2**20
HEADER_ALIGNMENT = 8


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate name {key!r}")
        seen[key] = value
    return seen


def read_header(stream: ByteStream) -> tuple[list[TensorRecord], dict[str, str]]:
    """Parse and validate a safetensors header; return the records in offset order and the metadata."""
    label = stream.label
    if stream.size < 8:
        raise ConvertError("safetensors: file shorter than the 8-byte header length", file=label)
    (length,) = struct.unpack("<Q", stream.read(8, 0))
    if length > MAX_HEADER:
        raise ConvertError(
            f"safetensors: header length {length} exceeds {MAX_HEADER} bytes (safetensors allows 100 MB, but no "
            "Mixtral checkpoint's header needs more than a few hundred KB; refused before parsing)",
            file=label,
        )
    if 8 + length > stream.size:
        raise ConvertError(f"safetensors: header length {length} runs past the end of the file", file=label)
    raw = stream.read(length, 8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConvertError(f"safetensors: header is not UTF-8 ({exc.reason} at byte {exc.start})", file=label) from None
    if not text.startswith("{"):
        raise ConvertError("safetensors: header is not a JSON object", file=label)
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates)
    except ValueError as exc:
        raise ConvertError(f"safetensors: header is not valid JSON: {exc}", file=label) from None
    except RecursionError:
        raise ConvertError("safetensors: header JSON is nested too deeply", file=label) from None
    if not isinstance(header, dict):
        raise ConvertError("safetensors: header is not a JSON object", file=label)

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ConvertError("safetensors: __metadata__ must map strings to strings", file=label)

    entries = []
    for name, info in header.items():
        entries.append(_parse_entry(name, info, label))
    entries.sort(key=lambda e: (e[3], e[4]))

    data_start = 8 + length
    records = []
    expected_begin = 0
    for name, dtype, shape, begin, end in entries:
        if begin != expected_begin:
            rule = "overlaps the previous tensor" if begin < expected_begin else "leaves a gap before it"
            raise ConvertError(f"safetensors: data_offsets [{begin}, {end}) {rule}", file=label, tensor=name)
        records.append(TensorRecord(name, dtype, shape, stream, data_start + begin, end - begin))
        expected_begin = end
    if data_start + expected_begin != stream.size:
        past_end = next((r.name for r in records if r.offset + r.nbytes > stream.size), None)
        raise ConvertError(
            f"safetensors: file is {stream.size} bytes but the header describes {data_start + expected_begin}"
            + (" (truncated download?)" if stream.size < data_start + expected_begin else ""),
            file=label,
            tensor=past_end,
        )
    return records, metadata


def _parse_entry(name: str, info: object, label: str) -> tuple[str, str, tuple[int, ...], int, int]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ConvertError(
            "safetensors: entry must have exactly dtype, shape and data_offsets", file=label, tensor=name
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEM_SIZE:
        raise ConvertError(f"safetensors: unknown dtype {dtype!r}", file=label, tensor=name)
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ConvertError("safetensors: shape must be a list of non-negative integers", file=label, tensor=name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise ConvertError("safetensors: data_offsets must be two non-negative integers", file=label, tensor=name)
    begin, end = offsets
    if end < begin:
        raise ConvertError(f"safetensors: data_offsets [{begin}, {end}) end before they begin", file=label, tensor=name)
    expected = nbytes_of(dtype, tuple(shape))  # exact: Python integers cannot overflow
    if end - begin != expected:
        raise ConvertError(
            f"safetensors: data_offsets span {end - begin} bytes but {dtype} {shape} needs {expected}",
            file=label,
            tensor=name,
        )
    return name, dtype, tuple(shape), begin, end


def open_safetensors(path: Path) -> tuple[ByteStream, list[TensorRecord], dict[str, str]]:
    stream = ByteStream([path])
    try:
        records, metadata = read_header(stream)
    except BaseException:
        stream.close()
        raise
    return stream, records, metadata


@dataclass(frozen=True)
class HeaderLayout:
    """A planned safetensors file: its header bytes and each tensor's absolute byte offset in the file."""

    header: bytes  # the 8-byte length and the padded JSON
    offsets: dict[str, int]
    size: int


def layout_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> HeaderLayout:
    """Lay out tensors as safetensors' writer does: by dtype rank then name, compact JSON, space padding to 8."""
    ordered = sorted(tensors, key=lambda t: (WRITE_RANK[t[1]], t[0]))
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    relative: dict[str, int] = {}
    position = 0
    for name, dtype, shape in ordered:
        size = nbytes_of(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + size]}
        relative[name] = position
        position += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    prefix = struct.pack("<Q", len(text)) + text
    return HeaderLayout(
        prefix, {name: len(prefix) + offset for name, offset in relative.items()}, len(prefix) + position
    )
