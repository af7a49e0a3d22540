"""Reading a torch zip checkpoint (.pt / .pth) as an index of byte ranges, without loading any storage.

The archive holds one */data.pkl pickle and one */data/<key> record per storage. The pickle is read by the
allow-list unpickler of convert/containers/torchzip/unpickler.py: nothing from the
file is ever imported or called, and there is no fallback to an unrestricted load.

The zip layer is read the way torch.load reads it (miniz: names found ignoring ASCII case, the first record's
folder as the archive name, sizes from the central directory) and refused wherever zipfile or another reader
could read it otherwise: duplicate names, local headers or data descriptors that disagree with the central
directory, gaps or overlaps between records, bytes around the archive, folder-marked records. torch.load checks
no CRC-32; the conversion does (convert/integrity/crc32.py), from the bytes it reads anyway.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass

from convert.common.dtypes import ITEM_SIZE, nbytes_of
from convert.common.errors import ConvertError
from convert.containers.torchzip.unpickler import (
    MAX_PICKLE,
    STORAGE_CLASS_OF,
    IndexUnpickler,
    Storage,
    TensorRef,
    prescan,
)
from convert.fileio.streams import ByteStream, StreamFile
from convert.integrity.crc32 import CheckedRecord
from convert.model.records import TensorRecord

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_END = struct.Struct("<4sHHHHIIH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_END = struct.Struct("<4sQHHIIQQQQ")
_DESCRIPTOR64 = struct.Struct("<4sIQQ")
_DESCRIPTOR_FLAG = 0x08  # CRC-32 and sizes follow the data
_UTF8 = 0x800
_DOS_DIRECTORY = 0x10  # in a central entry's external attributes: miniz then extracts nothing
_U32 = 0xFFFFFFFF
MAX_RECORDS = 2**16  # a record per storage: Mixtral-8x7B has 995, 8x22B about 1,700
MAX_DIRECTORY = 16 * 2**20  # Mixtral's central directory is about 100 KB
MAX_SMALL_RECORD = 2**20  # byteorder, version, serialization_id...: a few bytes each
MAX_FORMAT_VERSION = 10  # torch 2.13's kMaxSupportedFileFormatVersion; torch.save writes 3


def read_torch_index(stream: ByteStream) -> list[TensorRecord]:
    """Map each tensor of a torch zip checkpoint to its byte range; every record is checked, none is loaded."""
    label = stream.label
    end = _end_of_archive(stream)
    try:
        archive = zipfile.ZipFile(StreamFile(stream))
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as exc:
        raise ConvertError(f"torch checkpoint: not a readable zip archive ({exc})", file=label) from None
    with archive:
        entries = _entries(stream, archive, end)
        folder = archive.infolist()[0].filename.split("/")[0]  # torch.load's archive name: the first entry's folder
        pickle_name = f"{folder}/data.pkl"
        if pickle_name not in entries:
            raise ConvertError(f"torch checkpoint: {pickle_name} is missing (torch.load refuses it too)", file=label)
        _check_small_records(archive, entries, folder, label)
        try:
            if entries[pickle_name].size > MAX_PICKLE:
                raise pickle.UnpicklingError(
                    f"data.pkl is {entries[pickle_name].size} bytes, over the {MAX_PICKLE} allowed"
                )
            data = archive.read(pickle_name)
            prescan(data)
            state = IndexUnpickler(io.BytesIO(data)).load()
        except ConvertError:
            raise
        except Exception as exc:  # any malformed pickle: the message names what failed
            raise ConvertError(f"torch checkpoint: data.pkl refused: {exc}", file=label) from None

    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, TensorRef) for k, v in state.items()
    ):
        raise ConvertError("torch checkpoint: data.pkl must hold a flat dict of tensor names to tensors", file=label)

    storages = _storages(state, entries, f"{folder}/data/", label)
    records = []
    for name, ref in state.items():
        zipped = storages[ref.storage.key]
        item = ITEM_SIZE[ref.storage.dtype]
        if not _is_contiguous(ref.shape, ref.stride):
            raise ConvertError(
                f"torch checkpoint: tensor is not contiguous (stride {ref.stride})", file=label, tensor=name
            )
        nbytes = nbytes_of(ref.storage.dtype, ref.shape)
        if (ref.offset * item) + nbytes > ref.storage.numel * item:
            raise ConvertError("torch checkpoint: tensor runs past the end of its storage", file=label, tensor=name)
        offset = zipped.offset + ref.offset * item
        records.append(TensorRecord(name, ref.storage.dtype, ref.shape, stream, offset, nbytes, zipped))
    return records


def _storages(
    state: dict[str, TensorRef], entries: dict[str, _Entry], prefix: str, label: str
) -> dict[str, CheckedRecord]:
    """Each storage key's record, once every reference to it agrees with the others and with the record."""
    first: dict[str, tuple[str, Storage]] = {}
    tensors: dict[str, list[str]] = {}
    for name, ref in state.items():
        storage = ref.storage
        seen = first.setdefault(storage.key, (name, storage))
        if (seen[1].dtype, seen[1].numel) != (storage.dtype, storage.numel):
            raise ConvertError(
                f"torch checkpoint: storage {storage.key} is referenced as {_storage_text(seen[1])} by tensor "
                f"{seen[0]} and as {_storage_text(storage)}: two readings (torch.load takes the first for both; "
                "torch.save never writes this)",
                file=label,
                tensor=name,
            )
        tensors.setdefault(storage.key, []).append(name)
    storages = {}
    for key, (name, storage) in first.items():
        entry = entries.get(f"{prefix}{key}")
        if entry is None:
            raise ConvertError(
                f"torch checkpoint: storage record {prefix}{key} is missing (torch.load refuses it too)",
                file=label,
                tensor=name,
            )
        if entry.compressed:
            raise ConvertError(
                f"torch checkpoint: record {entry.name} is compressed; torch writes stored records", file=label
            )
        claimed = storage.numel * ITEM_SIZE[storage.dtype]
        if claimed != entry.size:
            raise ConvertError(
                f"torch checkpoint: storage {key} claims {claimed} bytes but its record has {entry.size} "
                "(torch.load refuses it too)",
                file=label,
                tensor=name,
            )
        record = CheckedRecord(
            entry.name, entry.stream, entry.data_offset, entry.size, entry.crc, tuple(tensors[key]), *CHECKED_AS
        )
        storages[key] = record
    return storages


def _storage_text(storage: Storage) -> str:
    return f"{STORAGE_CLASS_OF[storage.dtype]} of {storage.numel}"


# How a damaged record is named in the one line: what the file is, and the loader that would not notice.
CHECKED_AS = ("torch checkpoint", "torch.load")


@dataclass(frozen=True)
class _End:
    """What the end-of-central-directory records say (zip64 where present)."""

    entries: int
    directory_offset: int
    directory_size: int
    directory_end: int  # where the central directory must end: the zip64 end record, else the end record


def _end_of_archive(stream: ByteStream) -> _End:
    """The end records, which torch.save puts at the very end. zipfile and torch's miniz look for them
    differently when anything follows (a comment, trailing bytes) and zipfile alone shifts every offset when
    bytes precede the archive, so neither is accepted; the counts are bounded before zipfile builds anything."""
    label = stream.label
    if stream.size < _END.size:
        raise ConvertError("torch checkpoint: not a readable zip archive (too short)", file=label)
    end_at = stream.size - _END.size
    signature, disk, first_disk, on_disk, entries, size, offset, comment = _END.unpack(stream.read(_END.size, end_at))
    if signature != b"PK\x05\x06" or comment:
        raise ConvertError(
            "torch checkpoint: not a readable zip archive (the file does not end with the end of its central "
            "directory: truncated, or followed by a comment or other bytes, which torch.save never writes)",
            file=label,
        )
    directory_end = end_at
    locator_at = end_at - _ZIP64_LOCATOR.size
    locator = _ZIP64_LOCATOR.unpack(stream.read(_ZIP64_LOCATOR.size, locator_at)) if locator_at >= 0 else None
    if locator is not None and locator[0] == b"PK\x06\x07":
        _, zip64_disk, zip64_at, disks = locator
        if zip64_disk or disks != 1:
            raise ConvertError("torch checkpoint: a multi-disk zip archive is not a torch checkpoint", file=label)
        if zip64_at != locator_at - _ZIP64_END.size:
            raise ConvertError(
                "torch checkpoint: the zip64 end record is not where its locator says (bytes before the archive or "
                "inside it: zipfile and torch.load would read different offsets)",
                file=label,
            )
        fields = _ZIP64_END.unpack(stream.read(_ZIP64_END.size, zip64_at))
        if fields[0] != b"PK\x06\x06" or fields[1] != _ZIP64_END.size - 12:
            raise ConvertError("torch checkpoint: not a readable zip archive (bad zip64 end record)", file=label)
        disk, first_disk, on_disk, entries64, size64, offset64 = fields[4:]
        for narrow, wide, saturated in ((entries, entries64, 0xFFFF), (size, size64, _U32), (offset, offset64, _U32)):
            if narrow not in (wide, saturated):
                raise ConvertError(
                    "torch checkpoint: the zip64 end record and the end record disagree (two readings possible)",
                    file=label,
                )
        entries, size, offset, directory_end = entries64, size64, offset64, zip64_at
    if disk or first_disk or on_disk != entries:
        raise ConvertError("torch checkpoint: a multi-disk zip archive is not a torch checkpoint", file=label)
    if entries > MAX_RECORDS or size > MAX_DIRECTORY:
        raise ConvertError(
            f"torch checkpoint: {entries} records in a central directory of {size} bytes; a checkpoint has at most "
            f"{MAX_RECORDS} records in {MAX_DIRECTORY} bytes (Mixtral has about a thousand)",
            file=label,
        )
    if offset + size != directory_end:
        raise ConvertError(
            "torch checkpoint: the central directory does not end where the end records begin (bytes before the "
            "archive or inside it: zipfile and torch.load would read different offsets)",
            file=label,
        )
    return _End(entries, offset, size, directory_end)


@dataclass(frozen=True)
class _Entry:
    name: str
    stream: ByteStream
    header_offset: int
    data_offset: int
    size: int  # uncompressed
    stored_size: int  # as stored (compressed or not)
    crc: int
    compressed: bool


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    return info.orig_filename.encode("utf-8" if info.flag_bits & _UTF8 else "cp437")


def _entries(stream: ByteStream, archive: zipfile.ZipFile, end: _End) -> dict[str, _Entry]:
    """Every record, once the zip layer has only one reading: one central entry per name as torch.load looks names
    up (miniz compares them ignoring ASCII case), all under one folder, local headers agreeing with the central
    directory, and records laid end to end from byte 0 to the central directory with no gap or overlap."""
    label = stream.label
    infos = archive.infolist()
    start_dir: int = archive.start_dir  # type: ignore[attr-defined]  (where zipfile read the directory)
    if start_dir != end.directory_offset:  # zipfile shifts every offset by bytes before the archive
        raise ConvertError(
            f"torch checkpoint: zipfile finds the central directory at byte {start_dir}, the end record says "
            f"{end.directory_offset} (two readings)",
            file=label,
        )
    if len(infos) != end.entries:
        raise ConvertError(
            f"torch checkpoint: the end record counts {end.entries} records but the central directory holds "
            f"{len(infos)} (torch.load reads the count, zipfile the directory: two readings)",
            file=label,
        )
    if not infos:
        raise ConvertError("torch checkpoint: the archive holds no records (torch.load refuses it too)", file=label)
    _walk_directory(stream, end, infos)
    folder = infos[0].filename.split("/")[0] + "/"
    seen: dict[bytes, int] = {}
    entries: dict[str, _Entry] = {}
    for index, info in enumerate(infos):
        name = info.orig_filename
        if info.filename != name or "\x00" in name:
            raise ConvertError(
                f"torch checkpoint: record name {name!r} holds a NUL byte or backslash, which zipfile and torch.load "
                "read differently",
                file=label,
            )
        if not name.startswith(folder) or "/" not in infos[0].filename:
            raise ConvertError(
                f"torch checkpoint: record {name!r} is not in the folder {folder!r} of the first record "
                "(torch.load refuses it too)",
                file=label,
            )
        if info.is_dir() or info.external_attr & _DOS_DIRECTORY:
            raise ConvertError(
                f"torch checkpoint: record {name!r} is marked as a folder: torch.load reads none of its bytes, zipfile "
                "reads them all (two readings)",
                file=label,
            )
        key = _raw_name(info).lower()  # miniz's lookup: byte names, ASCII case ignored
        if key in seen:
            other = infos[seen[key]].orig_filename
            also = "" if other == name else f" as {other!r}"
            raise ConvertError(
                f"torch checkpoint: record {name!r} appears twice in the central directory (entries {seen[key]}{also} "
                f"and {index}): zipfile reads the last, torch.load whichever its binary search over the case-folded "
                "names meets (it does not refuse the file); two readings",
                file=label,
            )
        seen[key] = index
        entries[name] = _local_entry(stream, info, label)
    _check_tiling(stream, entries, infos, end)
    return entries


def _walk_directory(stream: ByteStream, end: _End, infos: list[zipfile.ZipInfo]) -> None:
    """The central directory walked as torch's miniz walks it: entries exactly filling it, each on disk 0, with the
    names zipfile read. zipfile silently cuts a name or extra field that runs past the directory's end."""
    data = stream.read(end.directory_size, end.directory_offset)
    position = 0
    for info in infos:
        header = data[position : position + _CENTRAL.size]
        if len(header) < _CENTRAL.size or header[:4] != b"PK\x01\x02":
            break
        name_len, extra_len, comment_len, disk = struct.unpack_from("<HHHH", header, 28)
        name = data[position + _CENTRAL.size : position + _CENTRAL.size + name_len]
        position += _CENTRAL.size + name_len + extra_len + comment_len
        if disk or position > len(data) or name != _raw_name(info):
            break
    else:
        if position == len(data):
            return
    raise ConvertError(
        "torch checkpoint: the central directory's entries do not fill it exactly as zipfile read them (an entry "
        "runs past its end or names another disk: torch.load refuses such a file, zipfile reads it differently)",
        file=stream.label,
    )


def _local_entry(stream: ByteStream, info: zipfile.ZipInfo, label: str) -> _Entry:
    """The record's local header read and checked against its central entry: name, flags, method, CRC, sizes."""
    name = info.orig_filename
    if info.header_offset + _LOCAL_HEADER.size > stream.size:
        raise ConvertError(f"torch checkpoint: record {name} starts past the end of the file", file=label)
    fields = _LOCAL_HEADER.unpack(stream.read(_LOCAL_HEADER.size, info.header_offset))
    signature, _version, flags, method, _time, _date, crc, stored, size, name_len, extra_len = fields
    local_name = stream.read(
        min(name_len, stream.size - info.header_offset - _LOCAL_HEADER.size), info.header_offset + _LOCAL_HEADER.size
    )
    if signature != _LOCAL_SIGNATURE or local_name != _raw_name(info):
        raise ConvertError(f"torch checkpoint: local header of {name} disagrees with the central directory", file=label)
    described = flags & _DESCRIPTOR_FLAG
    crc_agrees = crc == info.CRC or (described and crc == 0)
    sizes_agree = all(
        value == actual or (described and value == 0) or (value == _U32 and actual >= _U32)
        for value, actual in ((stored, info.compress_size), (size, info.file_size))
    )
    if flags != info.flag_bits or method != info.compress_type or not crc_agrees or not sizes_agree:
        raise ConvertError(
            f"torch checkpoint: local header of {name} disagrees with the central directory on its flags, "
            "compression, CRC-32 or sizes (a streaming reader and torch.load would read different bytes)",
            file=label,
        )
    if flags & 1:
        raise ConvertError(f"torch checkpoint: record {name} is encrypted", file=label)
    data_offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if data_offset + info.compress_size > stream.size:
        raise ConvertError(f"torch checkpoint: record {name} runs past the end of the file (truncated?)", file=label)
    compressed = info.compress_type != zipfile.ZIP_STORED
    return _Entry(
        name, stream, info.header_offset, data_offset, info.file_size, info.compress_size, info.CRC, compressed
    )


def _check_tiling(stream: ByteStream, entries: dict[str, _Entry], infos: list[zipfile.ZipInfo], end: _End) -> None:
    """Records from byte 0, each (local header, data, data descriptor) starting where the previous one ends, the
    last ending where the central directory starts: no byte belongs to two records or to none, as torch.save
    writes them. The bytes between a record's data and the next record are exactly its data descriptor."""
    label = stream.label
    ordered = sorted(((entries[i.orig_filename], i) for i in infos), key=lambda pair: pair[0].header_offset)
    position = 0
    for number, (entry, info) in enumerate(ordered):
        if entry.header_offset != position:
            what = "overlaps the record before it" if entry.header_offset < position else "leaves a gap before it"
            raise ConvertError(
                f"torch checkpoint: record {entry.name} at byte {entry.header_offset} {what} (which ends at "
                f"{position}); torch.save lays records end to end",
                file=label,
            )
        data_end = entry.data_offset + entry.stored_size
        following = ordered[number + 1][0].header_offset if number + 1 < len(ordered) else end.directory_offset
        gap = following - data_end
        if gap < 0:
            other = f"record {ordered[number + 1][0].name}" if number + 1 < len(ordered) else "the central directory"
            raise ConvertError(
                f"torch checkpoint: record {entry.name} (bytes {entry.header_offset}..{data_end}) overlaps {other} "
                f"at byte {following}: two names for the same bytes; torch.save lays records end to end",
                file=label,
            )
        if gap > _DESCRIPTOR64.size or not _is_descriptor(stream.read(gap, data_end), info):
            raise ConvertError(
                f"torch checkpoint: the {gap} bytes after record {entry.name} are not its data descriptor (which must "
                "match the central directory); torch.save lays records end to end",
                file=label,
            )
        position = following


def _is_descriptor(data: bytes, info: zipfile.ZipInfo) -> bool:
    """Whether data is exactly the record's data descriptor: with or without its signature, 32- or 64-bit sizes."""
    if not info.flag_bits & _DESCRIPTOR_FLAG:
        return not data
    if len(data) in (16, 24):
        if data[:4] != b"PK\x07\x08":
            return False
        data = data[4:]
    if len(data) == 12:
        values = struct.unpack("<III", data)
    elif len(data) == 20:
        values = struct.unpack("<IQQ", data)
    else:
        return False
    return values == (info.CRC, info.compress_size, info.file_size)


def _check_small_records(archive: zipfile.ZipFile, entries: dict[str, _Entry], folder: str, label: str) -> None:
    """Every record but data.pkl and the storages, read (zipfile checks each one's CRC-32) and checked as torch.load
    reads those that change what it loads or whether it loads: byteorder (a big-endian file is byte-swapped on
    load, which this converter does not do), the version it requires, .storage_alignment and serialization_id."""
    contents: dict[str, bytes] = {}
    for name, entry in entries.items():
        if name == f"{folder}/data.pkl" or name.startswith(f"{folder}/data/"):
            continue
        if entry.size > MAX_SMALL_RECORD:
            raise ConvertError(
                f"torch checkpoint: record {name} is {entry.size} bytes; torch.save writes no such record over "
                f"{MAX_SMALL_RECORD}",
                file=label,
            )
        try:
            contents[name.removeprefix(f"{folder}/")] = archive.read(name)
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError, zlib.error) as exc:
            raise ConvertError(f"torch checkpoint: record {name}: {exc}", file=label) from None
    byteorder = contents.get("byteorder", b"little")
    if byteorder != b"little":
        raise ConvertError(
            f"torch checkpoint: byteorder is {byteorder!r}; torch.load byte-swaps a big-endian checkpoint (and "
            "refuses anything else), and this converter reads little-endian ones only",
            file=label,
        )
    version = contents.get(".data/version", contents.get("version"))
    text = version.decode("ascii", "replace").strip() if version is not None else ""
    if not text.isdecimal() or not 1 <= int(text) <= MAX_FORMAT_VERSION:
        raise ConvertError(
            f"torch checkpoint: version record {'missing' if version is None else repr(version)}; torch.load "
            f"requires one from 1 to {MAX_FORMAT_VERSION} and refuses the file",
            file=label,
        )
    try:
        int(contents.get(".storage_alignment", b"64"))
        contents.get(".data/serialization_id", b"").decode("utf-8")
    except ValueError as exc:  # UnicodeDecodeError is one
        raise ConvertError(
            f"torch checkpoint: .storage_alignment or .data/serialization_id is malformed ({exc}); torch.load "
            "refuses the file",
            file=label,
        ) from None


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Row-major without holes; the stride of a dimension of size 1 never matters."""
    step = 1
    for dim, actual in zip(reversed(shape), reversed(stride), strict=True):
        if dim > 1 and actual != step:
            return False
        step *= dim
    return True
