"""Reading a torch zip checkpoint (.pt / .pth) as an index of byte ranges, without loading any storage.

The archive holds one */data.pkl pickle and one */data/<key> record per storage. The pickle is read by an
unpickler whose allow-list resolves the few globals torch.save emits to inert stand-ins: nothing from the
file is ever imported or called, and there is no fallback to an unrestricted load.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

from convert.dtypes import ITEM_SIZE, STORAGE_CLASS, nbytes_of
from convert.errors import ConvertError
from convert.formats.safetensors import TensorRecord
from convert.formats.streams import ByteStream, StreamFile

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"


def _refuse_build(self: object, _state: object) -> None:
    raise pickle.UnpicklingError(f"BUILD on {type(self).__name__.lstrip('_')} is not allowed")


def _sealed(cls: type) -> type:
    """Stand-ins are slotted (no __dict__ for BUILD to update) and refuse __setstate__, which a frozen slotted
    dataclass otherwise gets and which writes its slots: a file cannot rewrite what the allow-list hands out."""
    cls.__setstate__ = _refuse_build  # type: ignore[attr-defined]
    return cls


@_sealed
@dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: str


@_sealed
@dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@_sealed
@dataclass(frozen=True, slots=True)
class _Callable:
    function: Callable[..., object]

    def __call__(self, *args: object) -> object:
        return self.function(*args)


@_sealed
@dataclass(frozen=True, slots=True)
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _is_int_tuple(value: object) -> bool:
    return isinstance(value, tuple) and all(type(v) is int and v >= 0 for v in value)


def _rebuild_tensor_v2(storage: object, offset: object, size: object, stride: object, *_rest: object) -> _TensorRef:
    if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0:
        raise pickle.UnpicklingError("_rebuild_tensor_v2 called with a malformed storage or offset")
    if not _is_int_tuple(size) or not _is_int_tuple(stride) or len(size) != len(stride):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 called with a malformed size or stride")
    return _TensorRef(storage, offset, size, stride)  # type: ignore[arg-type]


def _rebuild_parameter(data: object, *_rest: object) -> object:
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("_rebuild_parameter called without a tensor")
    return data


_ALLOWED = MappingProxyType(
    {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _Callable(_rebuild_tensor_v2),
        ("torch._utils", "_rebuild_parameter"): _Callable(_rebuild_parameter),
        **{("torch", cls): _StorageType(dtype) for cls, dtype in STORAGE_CLASS.items()},
    }
)


MAX_PICKLE = 64 * 2**20  # Mixtral's data.pkl is about 100 KB
MAX_MEMO = 2**20  # the unpickler sizes its memo by the largest index: a few bytes could ask for gigabytes


def _prescan(data: bytes) -> None:
    """Refuse what the C unpickler would let cost memory before the allow-list sees anything."""
    if len(data) > MAX_PICKLE:
        raise pickle.UnpicklingError(f"data.pkl is {len(data)} bytes, over the {MAX_PICKLE} a checkpoint index needs")
    for opcode, argument, _ in pickletools.genops(data):
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"):
            index = int(argument)  # type: ignore[arg-type]
            if not 0 <= index < MAX_MEMO:
                raise pickle.UnpicklingError(f"memo index {index} is out of range")


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not on the allow-list") from None

    def persistent_load(self, pid: object) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        valid = isinstance(storage_type, _StorageType) and storage_type.dtype in ITEM_SIZE
        if not valid or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError("malformed storage reference")
        return _Storage(key, storage_type.dtype, numel)


def read_torch_index(stream: ByteStream) -> list[TensorRecord]:
    """Map each tensor of a torch zip checkpoint to its byte range; every record is checked, none is loaded."""
    label = stream.label
    try:
        archive = zipfile.ZipFile(StreamFile(stream))
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as exc:
        raise ConvertError(f"torch checkpoint: not a readable zip archive ({exc})", file=label) from None
    with archive:
        infos = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in infos if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise ConvertError(f"torch checkpoint: expected one <folder>/data.pkl, found {len(pickles)}", file=label)
        prefix = pickles[0][: -len("data.pkl")]
        try:
            info = archive.getinfo(pickles[0])
            if info.file_size > MAX_PICKLE:
                raise pickle.UnpicklingError(f"data.pkl is {info.file_size} bytes, over the {MAX_PICKLE} allowed")
            data = archive.read(pickles[0])
            _prescan(data)
            state = _IndexUnpickler(io.BytesIO(data)).load()
        except ConvertError:
            raise
        except Exception as exc:  # any malformed pickle: the message names what failed
            raise ConvertError(f"torch checkpoint: data.pkl refused: {exc}", file=label) from None

    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, _TensorRef) for k, v in state.items()
    ):
        raise ConvertError("torch checkpoint: data.pkl must hold a flat dict of tensor names to tensors", file=label)

    records = []
    storage_start: dict[str, tuple[int, int]] = {}
    for name, ref in state.items():
        key = ref.storage.key
        if key not in storage_start:
            storage_start[key] = _record_range(stream, infos, f"{prefix}data/{key}", label)
        start, record_size = storage_start[key]
        item = ITEM_SIZE[ref.storage.dtype]
        if ref.storage.numel * item > record_size:
            raise ConvertError(
                f"torch checkpoint: storage {key} claims {ref.storage.numel * item} bytes but its record has "
                f"{record_size}",
                file=label,
                tensor=name,
            )
        if not _is_contiguous(ref.shape, ref.stride):
            raise ConvertError(
                f"torch checkpoint: tensor is not contiguous (stride {ref.stride})", file=label, tensor=name
            )
        nbytes = nbytes_of(ref.storage.dtype, ref.shape)
        if (ref.offset * item) + nbytes > ref.storage.numel * item:
            raise ConvertError("torch checkpoint: tensor runs past the end of its storage", file=label, tensor=name)
        records.append(TensorRecord(name, ref.storage.dtype, ref.shape, stream, start + ref.offset * item, nbytes))
    return records


def _record_range(stream: ByteStream, infos: dict[str, zipfile.ZipInfo], entry: str, label: str) -> tuple[int, int]:
    """Absolute offset and size of a stored (uncompressed) zip record, cross-checked with its local header."""
    info = infos.get(entry)
    if info is None:
        raise ConvertError(f"torch checkpoint: storage record {entry} is missing", file=label)
    if info.compress_type != zipfile.ZIP_STORED:
        raise ConvertError(f"torch checkpoint: record {entry} is compressed; torch writes stored records", file=label)
    if info.header_offset + _LOCAL_HEADER.size > stream.size:
        raise ConvertError(f"torch checkpoint: record {entry} starts past the end of the file", file=label)
    fields = _LOCAL_HEADER.unpack(stream.read(_LOCAL_HEADER.size, info.header_offset))
    name_len, extra_len = fields[9], fields[10]
    local_name = stream.read(name_len, info.header_offset + _LOCAL_HEADER.size)
    if fields[0] != _LOCAL_SIGNATURE or local_name.decode("utf-8", "replace") != entry:
        raise ConvertError(
            f"torch checkpoint: local header of {entry} disagrees with the central directory", file=label
        )
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if start + info.file_size > stream.size:
        raise ConvertError(f"torch checkpoint: record {entry} runs past the end of the file (truncated?)", file=label)
    return start, info.file_size


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Row-major without holes; the stride of a dimension of size 1 never matters."""
    step = 1
    for dim, actual in zip(reversed(shape), reversed(stride), strict=True):
        if dim > 1 and actual != step:
            return False
        step *= dim
    return True
