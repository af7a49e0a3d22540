"""Our safetensors files are byte for byte what safetensors' own writer makes, and the header reader is strict."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file, save_file

from convert.common.dtypes import ITEM_SIZE
from convert.common.errors import ConvertError
from convert.containers.safetensors import layout_header, open_safetensors

pytestmark = pytest.mark.containers

TORCH_DTYPE = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
}  # fmt: skip


def test_every_dtype_is_known_with_torchs_element_size() -> None:
    assert set(TORCH_DTYPE) == set(ITEM_SIZE)
    for code, dtype in TORCH_DTYPE.items():
        assert torch.empty((), dtype=dtype).element_size() == ITEM_SIZE[code], code


def test_header_layout_matches_save_file_for_every_dtype(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for index, (code, dtype) in enumerate(sorted(TORCH_DTYPE.items())):
        width = torch.empty((), dtype=dtype).element_size()
        raw = torch.randint(0, 256, (3 + index, 2 * width), dtype=torch.uint8, generator=generator)
        tensors[f"t{index % 3}.{code.lower()}"] = raw.view(dtype)
    tensors["a.empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    reference = tmp_path / "reference.safetensors"
    save_file(tensors, reference, metadata={"format": "pt"})

    planned = layout_header([(n, _code(t.dtype), tuple(t.shape)) for n, t in tensors.items()], {"format": "pt"})
    ours = bytearray(planned.size)
    ours[: len(planned.header)] = planned.header
    for name, tensor in tensors.items():
        data = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        ours[planned.offsets[name] : planned.offsets[name] + len(data)] = data
    assert bytes(ours) == reference.read_bytes()


def _code(dtype: torch.dtype) -> str:
    return next(code for code, candidate in TORCH_DTYPE.items() if candidate == dtype)


def test_converted_shards_equal_save_file_of_their_tensors(tmp_path: Path) -> None:
    run_cli("sample", tmp_path / "src")
    run_cli("convert", tmp_path / "src", tmp_path / "hf", "--to", "hf", "--max-shard-size", "200000")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) >= 3
    for shard in shards:
        again = tmp_path / "again.safetensors"
        save_file(load_file(shard), again, metadata={"format": "pt"})
        assert shard.read_bytes() == again.read_bytes(), shard.name


def _write(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _entry(begin: int, end: int, shape: list[int], dtype: str = "U8") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# case -> (header, data, header length written if not the true one, what the one-line error must say)
BAD_FILES = {
    "header too long": ({"a": _entry(0, 2, [2])}, b"xx", 100_000_001, "exceeds 16777216 bytes"),
    "header past end": ({"a": _entry(0, 2, [2])}, b"xx", 5000, "runs past the end of the file"),
    "not UTF-8": (b"{\xff\xfe}", b"", None, "header is not UTF-8"),
    "not JSON": (b"{not json}", b"", None, "header is not valid JSON"),
    "not an object": (b"[1, 2]", b"", None, "header is not a JSON object"),
    "duplicate": (
        b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
        b"xx",
        None,
        "duplicate name 'a'",
    ),
    "overlap": ({"a": _entry(0, 2, [2]), "b": _entry(1, 3, [2])}, b"xxx", None, "tensor b: "),
    "gap": ({"a": _entry(0, 2, [2]), "b": _entry(3, 5, [2])}, b"xxxxx", None, "leaves a gap"),
    "truncated": ({"a": _entry(0, 4, [4])}, b"xx", None, "(truncated download?)"),
    "unknown dtype": ({"a": _entry(0, 2, [2], "Q7")}, b"xx", None, "unknown dtype 'Q7'"),
    "shape vs range": ({"a": _entry(0, 2, [2, 2])}, b"xx", None, "span 2 bytes but U8 [2, 2] needs 4"),
    "metadata": ({"__metadata__": {"k": 1}, "a": _entry(0, 2, [2])}, b"xx", None, "__metadata__ must map strings"),
    "huge shape": ({"a": _entry(0, 2, [2**62, 2**62])}, b"xx", None, f"needs {2**124}"),
    "negative dim": ({"a": _entry(0, 2, [-2])}, b"xx", None, "non-negative integers"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_reader_rejects(tmp_path: Path, case: str) -> None:
    header, data, length, message = BAD_FILES[case]
    path = _write(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(ConvertError) as caught:
        open_safetensors(path)
    assert caught.value.line().startswith(f"{path}: ")
    assert message in caught.value.line()
