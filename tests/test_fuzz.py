"""Fuzzing the readers of untrusted input: the safetensors header parser, the restricted unpickler of torch zip
checkpoints, and the params.json / config.json readers.

The only allowed outcomes are success or convert.common.errors.ConvertError: anything else would reach the user as a
traceback. Successes are checked against the rules the readers promise. Known crashers are pinned with @example so
the tests fail deterministically rather than by luck. Bounded: the whole file runs in well under 60 s.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickletools
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import REPO
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pickle_ops import glob, uni

from convert.common.dtypes import ITEM_SIZE
from convert.common.errors import ConvertError
from convert.containers.hf_safetensors import read_hf_params
from convert.containers.mistral_params import read_mistral_params
from convert.containers.safetensors import open_safetensors
from convert.containers.torchzip.reader import read_torch_index
from convert.containers.torchzip.unpickler import ALLOWED
from convert.fileio.streams import ByteStream
from convert.model.params import ModelParams
from convert.planning.plan import EXPECTED_SLACK, EXPECTED_SLACK_TENSORS, check_source
from convert.planning.source import open_source
from convert.sample import SAMPLE_PARAMS, write_sample

pytestmark = pytest.mark.containers

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

_SCRATCH = Path(tempfile.mkdtemp(prefix="mixtral-convert-fuzz-"))


@pytest.fixture(scope="module", autouse=True)
def _clean_scratch() -> Iterator[None]:
    yield
    shutil.rmtree(_SCRATCH)


def _file(name: str, data: bytes) -> Path:
    path = _SCRATCH / name
    path.write_bytes(data)
    return path


def _only_convert_error(call: Callable[[], object]) -> object | None:
    """The call's result, or None if it raised ConvertError; any other exception propagates and fails the test.
    The error's line must be one line of printable characters, whatever names the input held."""
    try:
        return call()
    except ConvertError as exc:
        assert exc.line(), "a ConvertError must carry a message"
        assert exc.line().isprintable(), f"not one printable line: {exc.line()!r}"
        return None


# ---------------------------------------------------------------------------------------------------------------
# safetensors headers


def _safetensors(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _check_safetensors(data: bytes) -> None:
    path = _file("fuzz.safetensors", data)

    def parse() -> tuple:
        stream, records, metadata = open_safetensors(path)
        stream.close()
        return records, metadata

    parsed = _only_convert_error(parse)
    if parsed is None:
        return
    records, metadata = parsed
    # Accepted: the rules of docs/formats.md hold.
    (length,) = struct.unpack("<Q", data[:8])
    position = 8 + length
    assert length <= 100_000_000
    assert len({r.name for r in records}) == len(records)
    for record in records:
        assert record.offset == position, record
        assert record.nbytes == ITEM_SIZE[record.dtype] * math.prod(record.shape)
        position += record.nbytes
    assert position == len(data)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-3, max_value=300)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
DTYPES = st.sampled_from([*ITEM_SIZE, "Q7", "", "bf16", "BF16 "]) | JSON_VALUES
DIMS = st.lists(st.integers(min_value=0, max_value=6) | st.integers(min_value=-2, max_value=2**70), max_size=4)


@st.composite
def header_and_data(draw: st.DrawFn) -> bytes:
    """A safetensors file from a header that is often nearly right: entries laid out contiguously, then some
    fields replaced by arbitrary JSON values, offsets nudged, names duplicated, the length field changed."""
    header: dict[str, object] = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3) | JSON_VALUES
        )
    position = 0
    for index in range(draw(st.integers(min_value=0, max_value=5))):
        dtype = draw(st.sampled_from(sorted(ITEM_SIZE)))
        shape = draw(st.lists(st.integers(min_value=0, max_value=5), max_size=3))
        size = ITEM_SIZE[dtype] * math.prod(shape)
        entry: dict[str, object] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + size]}
        position += size
        mutation = draw(st.sampled_from(["none", "none", "dtype", "shape", "offsets", "nudge", "extra", "drop"]))
        if mutation == "dtype":
            entry["dtype"] = draw(DTYPES)
        elif mutation == "shape":
            entry["shape"] = draw(DIMS | JSON_VALUES)
        elif mutation == "offsets":
            entry["data_offsets"] = draw(st.lists(st.integers(min_value=-2, max_value=2**65), max_size=3) | JSON_VALUES)
        elif mutation == "nudge":
            delta = draw(st.integers(min_value=-3, max_value=3))
            entry["data_offsets"] = [entry["data_offsets"][0] + delta, entry["data_offsets"][1] + delta]  # type: ignore[index]
        elif mutation == "extra":
            entry[draw(st.text(max_size=4))] = draw(JSON_VALUES)
        elif mutation == "drop":
            del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        header[draw(st.sampled_from(["a", "b", "c", f"t{index}", "__metadata__"]))] = (
            entry if draw(st.integers(0, 9)) else draw(JSON_VALUES)
        )
    raw = json.dumps(header).encode()
    raw += b" " * draw(st.integers(min_value=0, max_value=8))
    data = bytes(position) + draw(st.binary(max_size=3)) if draw(st.booleans()) else bytes(position)
    if draw(st.integers(0, 9)) == 0:
        data = data[: draw(st.integers(min_value=0, max_value=len(data)))]
    length = None
    if draw(st.integers(0, 9)) == 0:
        # near the true length, never below 0: the 8-byte length field is unsigned ('{}' is only 2 bytes long)
        length = draw(st.integers(min_value=0, max_value=2**64 - 1) | st.integers(max(0, len(raw) - 3), len(raw) + 3))
    return _safetensors(raw, data, length)


DTYPE_A_LIST = _safetensors({"a": {"dtype": ["U8"], "shape": [1], "data_offsets": [0, 1]}}, b"x")
# A tensor name with a newline and a forged second line, in an entry that is refused (F16 [1] needs 2 bytes)
NEWLINE_NAME = _safetensors(
    {"a\nmixtral-convert: ok, converted": {"dtype": "F16", "shape": [1], "data_offsets": [0, 1]}}, b"x"
)


@FUZZ
@given(header_and_data())
@example(DTYPE_A_LIST)  # TypeError: unhashable type: 'list'
@example(NEWLINE_NAME)  # the name printed raw: two lines
def test_safetensors_structured_headers(data: bytes) -> None:
    _check_safetensors(data)


@FUZZ
@given(st.binary(max_size=200))
def test_safetensors_random_bytes(data: bytes) -> None:
    _check_safetensors(data)


def _small_safetensors() -> bytes:
    from safetensors.torch import save

    return save(
        {"w": torch.arange(6, dtype=torch.bfloat16).view(2, 3), "n": torch.ones(3), "e": torch.zeros(0, 2)},
        metadata={"format": "pt"},
    )


SMALL_SAFETENSORS = _small_safetensors()


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """original with a few byte flips, overwrites, deletions, insertions or a truncation."""
    data = bytearray(original)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate"]))
        at = draw(st.integers(min_value=0, max_value=max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.sampled_from(b'{}[]",:0129 \xff\x00-eE.'))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:]
    return bytes(data)


@FUZZ
@given(mutated(SMALL_SAFETENSORS))
def test_safetensors_mutated_real_file(data: bytes) -> None:
    _check_safetensors(data)


# ---------------------------------------------------------------------------------------------------------------
# torch zip checkpoints: the restricted unpickler and the zip records


def _small_torch_zip() -> bytes:
    base = torch.arange(12, dtype=torch.bfloat16)
    buffer = io.BytesIO()
    torch.save({"a": base[:6].view(2, 3), "b": base, "c": torch.ones(2, 2, dtype=torch.float32)}, buffer)
    return buffer.getvalue()


SMALL_ZIP = _small_torch_zip()
with zipfile.ZipFile(io.BytesIO(SMALL_ZIP)) as _archive:
    ENTRIES = {info.filename: _archive.read(info) for info in _archive.infolist()}
PKL = next(name for name in ENTRIES if name.endswith("/data.pkl"))
REAL_PICKLE = ENTRIES[PKL]
# The allow-list's stand-ins, as they must stay: a pickle must never change them (BUILD on an allow-listed global
# would, for the rest of the process).
ALLOWED_BEFORE = {key: (repr(value), dict(getattr(value, "__dict__", {}))) for key, value in ALLOWED.items()}


def _zip_with_pickle(pkl: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in ENTRIES.items():
            archive.writestr(name, pkl if name == PKL else data)
    return buffer.getvalue()


def _restore_allow_list() -> list[str]:
    changed = []
    for key, value in ALLOWED.items():
        text, attributes = ALLOWED_BEFORE[key]
        if repr(value) != text or dict(getattr(value, "__dict__", {})) != attributes:
            changed.append(f"{key}: {value!r} (was {text})")
            if hasattr(value, "__dict__"):
                value.__dict__.clear()
                value.__dict__.update(attributes)
    return changed


def _memo_bomb(data: bytes) -> bool:
    """Whether the archive's data.pkl stores to a memo index beyond 2**20. The C unpickler grows its memo array to
    the index (LONG_BINPUT 2**31 costs ~32 GiB), so such inputs would take this test process down with them; the
    defect is tested through the command line with its RSS measured (test_faults) and by the atheris run below,
    under an address-space limit."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            pickles = [archive.read(name) for name in archive.namelist() if name.endswith("data.pkl")]
    except Exception:
        return False
    for pkl in pickles:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # pickletools on bad STRING escapes
                for opcode, argument, _ in pickletools.genops(pkl):
                    if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(argument) > 2**20:
                        return True
        except Exception:
            continue
    return False


def _check_torch_zip(data: bytes) -> None:
    assume(not _memo_bomb(data))
    path = _file("fuzz.pth", data)

    def parse() -> list:
        stream = ByteStream([path])
        try:
            return read_torch_index(stream)
        finally:
            stream.close()

    try:
        records = _only_convert_error(parse)
    finally:
        changed = _restore_allow_list()
    assert not changed, f"the pickle changed the allow-list's stand-ins: {changed}"
    for record in records or ():
        assert record.dtype in ITEM_SIZE
        assert record.offset >= 0 and record.offset + record.nbytes <= len(data)
        assert record.nbytes == ITEM_SIZE[record.dtype] * math.prod(record.shape)
    if records is not None:
        _agrees_with_torch_load(path, records)


_TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "I64": torch.int64, "F64": torch.float64,
}  # fmt: skip


def _agrees_with_torch_load(path: Path, records: list) -> None:
    """What the reader accepts, torch.load (the loader the format was made for) reads the same way: the same
    tensors, dtypes, shapes and bytes. Checked only for accepted archives, whose zip layer is then sane."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            loaded = torch.load(path, weights_only=True)
        except Exception as exc:  # any refusal of torch.load is a disagreement
            raise AssertionError(f"accepted, but torch.load refuses it: {exc}") from None
    assert isinstance(loaded, dict) and sorted(loaded) == sorted(r.name for r in records), "different tensors"
    raw = path.read_bytes()
    for record in records:
        tensor = loaded[record.name]
        assert tensor.dtype == _TORCH_DTYPES[record.dtype] and tuple(tensor.shape) == record.shape, record.name
        expected = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        assert raw[record.offset : record.offset + record.nbytes] == expected, f"{record.name}: different bytes"


def test_real_archive_is_accepted() -> None:
    """Control: the unmutated archive indexes to its three tensors."""
    path = _file("control.pth", _zip_with_pickle(REAL_PICKLE))
    stream = ByteStream([path])
    try:
        assert sorted(r.name for r in read_torch_index(stream)) == ["a", "b", "c"]
    finally:
        stream.close()


# Pickle program tokens: stack and container opcodes, the allow-listed globals, harmless globals that are not on the
# list, the pieces of a storage persistent id. Nothing here does harm if the unpickler were to let it through.
TOKENS = [
    b"(", b"t", b")", b"R", b"b", b"Q", b"}", b"]", b"s", b"u", b"e", b"a", b"0", b"2", b"1", b"N",
    b"\x88", b"\x89", b"\x85", b"\x86", b"\x87", b"\x81", b"o", b"\x93", b"q\x00", b"h\x00", b"K\x00", b"K\x02",
    b"K\x06", b"J\xff\xff\xff\xff", b"\x8a\x09" + b"\x00" * 8 + b"\x01", b"G" + struct.pack(">d", 1.5),
    uni("storage"), uni("0"), uni("1"), uni("cpu"), uni("a"), uni("dtype"), uni("BF16"), uni("evil"),
    uni("torch"), uni("BFloat16Storage"),
    glob("torch", "BFloat16Storage"), glob("torch", "FloatStorage"), glob("torch", "HalfStorage"),
    glob("torch._utils", "_rebuild_tensor_v2"), glob("torch._utils", "_rebuild_parameter"),
    glob("collections", "OrderedDict"), glob("builtins", "len"), glob("builtins", "getattr"),
]  # fmt: skip

# BUILD on the allow-listed storage stand-in: {"dtype": "evil"} is set on the shared object (left on the stack),
# followed by the real pickle: read_torch_index raised KeyError('evil') and the allow-list stayed poisoned.
BUILD_ON_ALLOWED = [glob("torch", "BFloat16Storage"), b"}", uni("dtype"), uni("evil"), b"s", b"b"]
# STACK_GLOBAL takes module and name from two strings: a newline in the module reached the message raw.
NEWLINE_GLOBAL = [uni("os\nmixtral-convert: ok, converted"), uni("system"), b"\x93"]


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=40), st.booleans())
@example(BUILD_ON_ALLOWED, True)
@example(NEWLINE_GLOBAL, False)
@example([b"(", b"0"], True)  # MARK, POP: Python's unpickler pops the mark; torch.load refuses POP altogether
# An empty APPENDS or SETITEMS on the integer 0: Python's unpickler has nothing to add and never looks at its target,
# torch.load refuses to extend anything but a list (or set items of anything but a dict).
@example([b"K\x00", b"(", b"e"], True)
@example([b"K\x00", b"(", b"u"], True)
@example([b"]", b"K\x00", b"a", b"(", b"K\x00", b"K\x02", b"u"], False)  # SETITEMS into a list: Python sets [0]
@example([b"}", b"K\x00", b"a"], False)  # APPEND to a dict
def test_pickle_programs(tokens: list[bytes], then_real: bool) -> None:
    """Sequences of opcodes that reach the allow-listed callables with arbitrary arguments; optionally followed by
    the real pickle (so that effects of the prefix on the allow-list show)."""
    body = b"".join(tokens)
    pkl = b"\x80\x02" + body + (REAL_PICKLE[2:] if then_real else b".")
    _check_torch_zip(_zip_with_pickle(pkl))


@FUZZ
@given(st.binary(max_size=300))
@example(b"\x80\x02" + b"\x8f" * (2**20 + 1) + b".")  # EMPTY_SET past the opcode bound: 216 bytes each on the stack
def test_pickle_random_bytes(pkl: bytes) -> None:
    _check_torch_zip(_zip_with_pickle(pkl))


@FUZZ
@given(mutated(REAL_PICKLE))
def test_pickle_mutated_real(pkl: bytes) -> None:
    _check_torch_zip(_zip_with_pickle(pkl))


def _zip_version_123() -> bytes:
    """SMALL_ZIP whose first central directory entry says 'version needed to extract: 12.3'."""
    data = bytearray(SMALL_ZIP)
    data[data.index(b"PK\x01\x02") + 6] = 123
    return bytes(data)


def _archive(pairs: list[tuple[str, bytes]]) -> bytes:
    """A stored zip of these records in this order, duplicate names allowed."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name"
        for name, data in pairs:
            archive.writestr(name, data)
    return buffer.getvalue()


_BF16_REFERENCE = b"h\x03h\x04h\x05h\x06"  # tensor b's storage id: BINGETs of 'storage', BFloat16Storage, '0', 'cpu'
# Tensor b re-typed: its storage, shared with a (BFloat16Storage), referenced as torch.HalfStorage.
TYPED_TWICE = REAL_PICKLE.replace(_BF16_REFERENCE, b"h\x03" + glob("torch", "HalfStorage") + b"h\x05h\x06", 1)


def _central_patch(name: str, field: int, value: bytes) -> bytes:
    """SMALL_ZIP with bytes at field of the central directory entry of record name replaced."""
    data = bytearray(SMALL_ZIP)
    at = data.index(b"PK\x01\x02")
    while data[at + 46 : at + 46 + len(name)] != name.encode():
        at = data.index(b"PK\x01\x02", at + 1)
    data[at + field : at + field + len(value)] = value
    return bytes(data)


# Tensor a at offset 6 of its storage instead of 0 (the second half of b).
A_SHIFTED = REAL_PICKLE.replace(b"QK\x00K\x02K\x03\x86", b"QK\x06K\x02K\x03\x86", 1)
# Seeds of issue 12: archives that torch.load reads differently from a lenient reader (the oracle in
# _check_torch_zip compares with torch.load itself).
TWO_READINGS = {
    "storage record twice": _archive([*ENTRIES.items(), ("archive/data/1", bytes(len(ENTRIES["archive/data/1"])))]),
    "data.pkl twice": _archive([*ENTRIES.items(), (PKL, TYPED_TWICE)]),
    # torch's miniz finds names ignoring case: torch.load reads DATA.PKL here, zipfile data.pkl.
    "data.pkl and DATA.PKL": _archive(
        [(PKL, REAL_PICKLE), ("archive/DATA.PKL", A_SHIFTED), *list(ENTRIES.items())[1:]]
    ),
    "storage typed twice": _zip_with_pickle(TYPED_TWICE),
    "byteorder big": _archive([(n, b"big" if n.endswith("/byteorder") else d) for n, d in ENTRIES.items()]),
    # Found by this fuzzer with torch.load as the oracle: zipfile and torch's miniz read these differently.
    "data.pkl marked as a folder": _central_patch(PKL, 38, b"\x10"),  # miniz extracts no byte of it
    "entry on another disk": _central_patch(PKL, 34, b"\x04"),  # miniz refuses, zipfile ignores the field
    "last name runs past the directory": _central_patch("archive/.data/serialization_id", 28, b"\x3e"),
    "last extra field runs past the directory": _central_patch("archive/.data/serialization_id", 30, b"\x5d"),
    "serialization_id not UTF-8": _archive(
        [(n, b"\xb0" if n.endswith("serialization_id") else d) for n, d in ENTRIES.items()]
    ),
}


@FUZZ
@given(mutated(SMALL_ZIP))
@example(_zip_version_123())  # zipfile raises NotImplementedError("zip file version 12.3")
@example(TWO_READINGS["storage record twice"])
@example(TWO_READINGS["data.pkl twice"])
@example(TWO_READINGS["data.pkl and DATA.PKL"])
@example(TWO_READINGS["storage typed twice"])
@example(TWO_READINGS["byteorder big"])
@example(TWO_READINGS["data.pkl marked as a folder"])
@example(TWO_READINGS["entry on another disk"])
@example(TWO_READINGS["last name runs past the directory"])
@example(TWO_READINGS["last extra field runs past the directory"])
@example(TWO_READINGS["serialization_id not UTF-8"])
def test_torch_zip_mutated_archive(data: bytes) -> None:
    """Byte damage anywhere in the archive: local headers, central directory, end record, records."""
    _check_torch_zip(data)


# ---------------------------------------------------------------------------------------------------------------
# params.json / config.json

MISTRAL = {
    "dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-05,
    "vocab_size": 1003, "rope_theta": 1e6, "sliding_window": None, "max_seq_len": 4096,
    "moe": {"num_experts_per_tok": 2, "num_experts": 4},
}  # fmt: skip
HF = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 96, "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 1003,
    "rms_norm_eps": 1e-05, "rope_theta": 1e6, "sliding_window": "null", "head_dim": 16,
    "max_position_embeddings": 32768, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
}  # fmt: skip
PARAM_VALUES = (
    JSON_VALUES
    | st.integers(min_value=-2, max_value=200)
    | st.sampled_from(["null", "None", " 4096 ", "\u00b2", "\u0663", "-1", "4096", "default", "yarn", 10**400])
)


@st.composite
def fuzzed_object(draw: st.DrawFn, valid: dict) -> dict:
    """valid with keys dropped, replaced by arbitrary values or added; nested objects fuzzed likewise."""
    data: dict[str, object] = {}
    for key, value in valid.items():
        choice = draw(st.integers(0, 9))
        if choice == 0:
            continue
        if choice == 1:
            data[key] = draw(PARAM_VALUES)
        elif isinstance(value, dict) and choice == 2:
            data[key] = draw(fuzzed_object(value))
        else:
            data[key] = value
    for key in draw(st.lists(st.sampled_from([*valid, "extra", ""]), max_size=2)):
        data[key] = draw(PARAM_VALUES)
    return data


def _check_params(reader: Callable[[Path, int | None], ModelParams], text: bytes, vocab: int | None) -> None:
    path = _file("params.json", text)
    params = _only_convert_error(lambda: reader(path, vocab))
    if params is None:
        return
    assert isinstance(params, ModelParams)
    for name, value in params.shape_env().items():
        assert value > 0, (name, value)
    assert params.n_heads % params.n_kv_heads == 0 and params.head_dim % 2 == 0
    assert params.norm_eps > 0 and params.rope_theta > 0, params  # "must be a positive number": NaN is not


VOCAB = st.none() | st.integers(min_value=0, max_value=5000)  # the embedding's row count, if there is one


@FUZZ
@given(fuzzed_object(MISTRAL), VOCAB)
@example(MISTRAL | {"sliding_window": "\u00b2"}, None)  # str.isdigit() but not int(): ValueError
@example(MISTRAL | {"norm_eps": 10**400}, None)  # float(int) overflows: OverflowError
@example({k: v for k, v in MISTRAL.items() if k != "vocab_size"}, 0)  # an embedding of 0 rows: vocab_size 0 accepted
def test_mistral_params(data: dict, vocab: int | None) -> None:
    _check_params(read_mistral_params, json.dumps(data).encode(), vocab)


@FUZZ
@given(fuzzed_object(HF), VOCAB)
@example(HF | {"sliding_window": "\u00b2"}, None)
@example(HF | {"rope_parameters": {"rope_theta": 10**400}}, None)
def test_hf_params(data: dict, vocab: int | None) -> None:
    _check_params(read_hf_params, json.dumps(data).encode(), vocab)


@FUZZ
@given(mutated(json.dumps(MISTRAL).encode()) | st.binary(max_size=64), st.booleans())
def test_params_text(text: bytes, mistral: bool) -> None:
    _check_params(read_mistral_params if mistral else read_hf_params, text, None)


# ---------------------------------------------------------------------------------------------------------------
# The parameters against the tensors: whatever params.json says, check_source answers in time and memory
# proportional to the tensors present (it used to build a list per layer and expert first).

_SAMPLE = _SCRATCH / "sample"
SIZES = st.integers(min_value=1, max_value=6) | st.integers(min_value=1, max_value=10**15)


@settings(FUZZ, max_examples=40, deadline=10_000)
@given(SIZES, SIZES, SIZES, SIZES)
@example(10**6, 4, 64, 96)  # 19 million tensors: MemoryError
@example(2, 10**7, 64, 96)  # 60 million
@example(100_000, 4, 64, 96)  # 13.5 s and 1.4 GiB
@example(2, 4, 10**12, 96)
def test_check_source_is_bounded(n_layers: int, n_experts: int, dim: int, hidden_dim: int) -> None:
    if not _SAMPLE.exists():
        write_sample(_SAMPLE)
    params = json.loads(json.dumps(SAMPLE_PARAMS))
    params.update(n_layers=n_layers, dim=dim, hidden_dim=hidden_dim)
    params["moe"]["num_experts"] = n_experts
    (_SAMPLE / "params.json").write_text(json.dumps(params))

    def check() -> tuple[int, list[ConvertError]]:
        with open_source(_SAMPLE) as source:
            return len(source.records), check_source(source)

    checked = _only_convert_error(check)
    if checked is None:
        return
    present, problems = checked
    assert len(problems) <= present + EXPECTED_SLACK * present + EXPECTED_SLACK_TENSORS
    assert all(p.line().isprintable() for p in problems)


# ---------------------------------------------------------------------------------------------------------------
# Deep nesting: json.loads raises RecursionError (not a ValueError) past ~1000 levels. Plain tests rather than
# @example, so a failure report does not print 200 kB of brackets.

DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("reader", ["safetensors header", "params.json", "config.json"])
def test_deeply_nested_json(reader: str) -> None:
    if reader == "safetensors header":
        _check_safetensors(_safetensors(b'{"a":' + DEEP + b"}", b""))
    else:
        _check_params(read_mistral_params if reader == "params.json" else read_hf_params, DEEP, None)


# ---------------------------------------------------------------------------------------------------------------
# A short coverage-guided run with atheris (libFuzzer), a test dependency (the test skips, saying so, only where
# it is not installed). Each target gets a few seconds from a valid seed.

_ATHERIS_TARGET = """
import io, os, sys, tempfile, zipfile
from pathlib import Path
import torch  # not instrumented: only the converter's code is
import atheris

with atheris.instrument_imports(include=["convert"]):
    from convert.common.errors import ConvertError
    from convert.containers.safetensors import open_safetensors
    from convert.fileio.streams import ByteStream
    from convert.containers.torchzip.reader import read_torch_index

TARGET = os.environ["FUZZ_TARGET"]
SCRATCH = Path(tempfile.mkdtemp())
ENTRIES = {}
if TARGET == "torchzip":
    with zipfile.ZipFile(os.environ["FUZZ_ARCHIVE"]) as archive:
        ENTRIES = {info.filename: archive.read(info) for info in archive.infolist()}
PKL = next((name for name in ENTRIES if name.endswith("/data.pkl")), "")


def one_input(data: bytes) -> None:
    path = SCRATCH / "input"
    if TARGET == "torchzip":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, entry in ENTRIES.items():
                archive.writestr(name, data if name == PKL else entry)
        data = buffer.getvalue()
    path.write_bytes(data)
    try:
        if TARGET == "safetensors":
            stream, _, _ = open_safetensors(path)
            stream.close()
        else:
            stream = ByteStream([path])
            try:
                read_torch_index(stream)
            finally:
                stream.close()
    except ConvertError:
        pass


atheris.Setup(sys.argv, one_input)
atheris.Fuzz()
"""


def _limit_memory() -> None:
    """In the fuzzing child: at most 2 GiB of address space (the target needs ~0.6), so that an input that makes the
    reader allocate without bound (the memo index above) fails with MemoryError instead of taking the machine's
    memory. libFuzzer's own RSS limit is off (-rss_limit_mb=0): it reads ru_maxrss, which a forked child inherits
    from a large parent."""
    resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))


@pytest.mark.parametrize("target", ["safetensors", "torchzip"])
def test_atheris_short_run(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if target == "safetensors":
        (corpus / "seed").write_bytes(SMALL_SAFETENSORS)
    else:
        (corpus / "seed").write_bytes(REAL_PICKLE)
        (corpus / "typed-twice").write_bytes(TYPED_TWICE)  # issue 12's pickles: a storage typed two ways,
        (corpus / "empty-sets").write_bytes(b"\x80\x02" + b"\x8f" * 4096 + b".")  # objects built from 1-byte opcodes
        (tmp_path / "archive.pth").write_bytes(SMALL_ZIP)
    script = tmp_path / "target.py"
    script.write_text(_ATHERIS_TARGET)
    command = [
        sys.executable, str(script), "-runs=30000", "-max_total_time=4", "-rss_limit_mb=0",
        f"-artifact_prefix={tmp_path}/", str(corpus),
    ]  # fmt: skip
    env = {
        **os.environ,
        "FUZZ_TARGET": target,
        "FUZZ_ARCHIVE": str(tmp_path / "archive.pth"),
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory
    )
    assert result.returncode == 0, result.stderr[-3000:]


# Calls torch.load refuses, which the reader accepted until it checked torch._utils' arguments and the storage's
# device tag (found by test_pickle_mutated_real's random mutations, in 2 of 5 runs): each is refused by both now.
_OTHER_DEVICE = REAL_PICKLE.replace(b"X\x03\x00\x00\x00cpu", b"X\x03\x00\x00\x00bpu", 1)
_GRAD_AS_DICT = REAL_PICKLE.replace(b"\x89ccollections\nOrderedDict\n", b"}ccollections\nOrderedDict\n", 1)
_FIVE_ARGUMENTS = REAL_PICKLE.replace(b"\x89ccollections\nOrderedDict\n", b"ccollections\nOrderedDict\n", 1)
REFUSED_CALLS = {"device-bpu": _OTHER_DEVICE, "requires-grad-dict": _GRAD_AS_DICT, "five-arguments": _FIVE_ARGUMENTS}


@pytest.mark.parametrize("case", REFUSED_CALLS, ids=list(REFUSED_CALLS))
def test_a_call_torch_load_refuses_is_refused(case: str) -> None:
    pkl = REFUSED_CALLS[case]
    assert pkl != REAL_PICKLE
    path = _file(f"{case}.pth", _zip_with_pickle(pkl))
    with warnings.catch_warnings(), pytest.raises(Exception):  # noqa: B017 (whatever torch raises: it refuses)
        warnings.simplefilter("ignore")
        torch.load(path, weights_only=True)
    stream = ByteStream([path])
    try:
        with pytest.raises(ConvertError, match="torch checkpoint"):
            read_torch_index(stream)
    finally:
        stream.close()
