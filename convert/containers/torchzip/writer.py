"""Laying out a torch zip checkpoint that torch.load reads (mmap or not), for streaming into it.

torch.save needs the whole state dict in memory; this plans the same container instead: stored (uncompressed)
records whose data starts on a 64-byte boundary (padding in an "FB" extra field, as torch's writer does), each
followed by a data descriptor, then a zip64 central directory. Every offset is fixed by the plan; only the CRC-32
of each tensor record is known after its bytes are streamed, so its data descriptor, and the central directory,
are producers the writer calls when it reaches them.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

from convert.common.dtypes import STORAGE_CLASS, nbytes_of
from convert.integrity.crc32 import crc32
from convert.integrity.digests import Digests, Producer

ALIGNMENT = 64
_FLAGS = 0x0808  # bit 3: sizes and CRC in a data descriptor; bit 11: UTF-8 names (what torch writes)
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_DESCRIPTOR = struct.Struct("<4sIII")
_DESCRIPTOR64 = struct.Struct("<4sIQQ")
_ZIP64_END = struct.Struct("<4sQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_END = struct.Struct("<4sHHHHIIH")
_U32 = 0xFFFFFFFF
_STORAGE_CLASS_OF = {dtype: cls for cls, dtype in STORAGE_CLASS.items()}


@dataclass(frozen=True)
class _Record:
    entry: str  # the name inside the archive
    offset: int  # of its local header
    data_offset: int
    size: int
    crc: int | None  # known at plan time for the small records
    tensor: str | None  # for a tensor's storage: the tensor whose streamed CRC-32 it takes


@dataclass(frozen=True)
class TorchZipLayout:
    size: int
    blobs: tuple[tuple[int, bytes], ...]  # local headers, small records and their descriptors
    deferred: tuple[tuple[int, Producer], ...]  # tensor records' descriptors and the central directory
    tensor_offsets: Mapping[str, int]  # absolute offset of each tensor's data


def _record_crc(record: _Record, digests: Digests) -> int:
    return record.crc if record.tensor is None else digests.tensor_crc32[record.tensor]


def _central_directory(records: tuple[_Record, ...], offset: int, digests: Digests) -> bytes:
    central = bytearray()
    for record in records:
        central += _central_entry(record, _record_crc(record, digests))
    zip64_end = offset + len(central)
    count = len(records)
    central += _ZIP64_END.pack(b"PK\x06\x06", 44, 0x031E, 45, 0, 0, count, count, zip64_end - offset, offset)
    central += _ZIP64_LOCATOR.pack(b"PK\x06\x07", 0, zip64_end, 1)
    central += _END.pack(
        b"PK\x05\x06", 0, 0, min(count, 0xFFFF), min(count, 0xFFFF), min(zip64_end - offset, _U32), min(offset, _U32), 0
    )
    return bytes(central)


def _tensor_descriptor(record: _Record, digests: Digests) -> bytes:
    return _descriptor(_record_crc(record, digests), record.size)


def _descriptor(crc: int, size: int) -> bytes:
    if size >= _U32:
        return _DESCRIPTOR64.pack(b"PK\x07\x08", crc, size, size)
    return _DESCRIPTOR.pack(b"PK\x07\x08", crc, size, size)


def _central_entry(record: _Record, crc: int) -> bytes:
    name = record.entry.encode("utf-8")
    zip64 = b""
    size32, offset32 = record.size, record.offset
    if record.size >= _U32:
        zip64 += struct.pack("<QQ", record.size, record.size)
        size32 = _U32
    if record.offset >= _U32:
        zip64 += struct.pack("<Q", record.offset)
        offset32 = _U32
    extra = struct.pack("<HH", 1, len(zip64)) + zip64 if zip64 else b""
    header = _CENTRAL.pack(
        b"PK\x01\x02", 0, 0, _FLAGS, 0, 0, 0, crc, size32, size32, len(name), len(extra), 0, 0, 0, 0, offset32
    )
    return header + name + extra


def _local_header(name: str, offset: int) -> tuple[bytes, int]:
    """A local header whose "FB" padding puts the data on a 64-byte boundary; returns it and the data offset."""
    encoded = name.encode("utf-8")
    bare = offset + _LOCAL.size + len(encoded) + 4
    padding = -bare % ALIGNMENT
    extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
    header = _LOCAL.pack(b"PK\x03\x04", 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(encoded), len(extra)) + encoded + extra
    return header, offset + len(header)


def _descriptor_size(size: int) -> int:
    return _DESCRIPTOR64.size if size >= _U32 else _DESCRIPTOR.size


def state_dict_pickle(tensors: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """The data.pkl torch.save writes for a flat dict of contiguous tensors, storage key i for tensor i.

    Written opcode by opcode (protocol 2): the same globals torch.save emits and the allow-list accepts."""
    out = bytearray(b"\x80\x02}(")  # PROTO 2, EMPTY_DICT, MARK
    for key, (name, dtype, shape) in enumerate(tensors):
        count = 1
        for dim in shape:
            count *= dim
        strides = []
        step = 1
        for dim in reversed(shape):
            strides.append(step)
            step *= dim
        out += _unicode(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(("
        out += _unicode("storage") + f"ctorch\n{_STORAGE_CLASS_OF[dtype]}\n".encode()
        out += _unicode(str(key)) + _unicode("cpu") + _int(count) + b"tQ"  # TUPLE, BINPERSID
        out += _int(0) + _tuple(shape) + _tuple(tuple(reversed(strides)))
        out += b"\x89ccollections\nOrderedDict\n)R" + b"tR"  # NEWFALSE, OrderedDict(), TUPLE, REDUCE
    out += b"u."  # SETITEMS, STOP
    return bytes(out)


def _unicode(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    if 0 <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _tuple(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"


def layout_torch_zip(archive: str, tensors: list[tuple[str, str, tuple[int, ...]]]) -> TorchZipLayout:
    """Plan a torch checkpoint holding tensors (name, dtype, shape) in this order, one storage each."""
    pickled = state_dict_pickle(tensors)
    small = [
        ("data.pkl", pickled),
        (".format_version", b"1"),
        (".storage_alignment", str(ALIGNMENT).encode()),
        ("byteorder", b"little"),
    ]
    tail = [
        ("version", b"3\n"),
        (".data/serialization_id", str(int.from_bytes(hashlib.sha256(pickled).digest()[:16])).encode()),
    ]
    blobs: list[tuple[int, bytes]] = []
    deferred: list[tuple[int, Producer]] = []
    records: list[_Record] = []
    tensor_offsets: dict[str, int] = {}
    offset = 0

    def add(entry: str, size: int, data: bytes | None, tensor: str | None = None) -> int:
        nonlocal offset
        header, data_offset = _local_header(f"{archive}/{entry}", offset)
        blobs.append((offset, header))
        record = _Record(
            f"{archive}/{entry}", offset, data_offset, size, None if data is None else crc32(data), tensor
        )
        records.append(record)
        if data is not None:
            blobs.append((data_offset, data))
            blobs.append((data_offset + size, _descriptor(crc32(data), size)))
        else:
            deferred.append((data_offset + size, partial(_tensor_descriptor, record)))
        offset = data_offset + size + _descriptor_size(size)
        return data_offset

    for entry, data in small:
        add(entry, len(data), data)
    for key, (name, dtype, shape) in enumerate(tensors):
        tensor_offsets[name] = add(f"data/{key}", nbytes_of(dtype, shape), None, name)
    for entry, data in tail:
        add(entry, len(data), data)
    central = sum(_CENTRAL.size + len(r.entry.encode()) + _zip64_extra_size(r) for r in records)
    size = offset + central + _ZIP64_END.size + _ZIP64_LOCATOR.size + _END.size
    deferred.append((offset, partial(_central_directory, tuple(records), offset)))
    return TorchZipLayout(size, tuple(blobs), tuple(deferred), tensor_offsets)


def _zip64_extra_size(record: _Record) -> int:
    fields = (16 if record.size >= _U32 else 0) + (8 if record.offset >= _U32 else 0)
    return 4 + fields if fields else 0
