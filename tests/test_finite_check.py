"""The NaN/Inf check works on raw words; torch makes the float bit patterns it must and must not flag."""

from __future__ import annotations

import pytest
import torch

from convert.fileio.workers import CHUNK
from convert.integrity.finite import BLOCK, FiniteCheck

pytestmark = pytest.mark.unit

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _flags(values: torch.Tensor, code: str, at: int | None = None) -> bool:
    """Whether the check flags values placed at element at of a whole chunk (default: its end)."""
    chunk = torch.zeros(CHUNK // values.element_size(), dtype=values.dtype)
    at = len(chunk) - len(values) if at is None else at
    chunk[at : at + len(values)] = values
    found: set[str] = set()
    FiniteCheck()(memoryview(chunk.view(torch.uint8).numpy()), code, "t", found)
    return bool(found)


@pytest.mark.parametrize("code", sorted(DTYPES))
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), -float("nan")])
def test_non_finite_values_are_flagged(code: str, value: float) -> None:
    assert _flags(torch.tensor([1.0, value], dtype=DTYPES[code]), code)


@pytest.mark.parametrize("code", sorted(DTYPES))
@pytest.mark.parametrize("where", ["first", "last-of-a-block", "first-of-the-next", "last"])
def test_a_single_non_finite_value_is_found_anywhere_in_the_chunk(code: str, where: str) -> None:
    """The chunk is checked BLOCK bytes at a time: a value on either side of a block boundary, or at either end,
    must be seen."""
    per_block = BLOCK // torch.tensor([], dtype=DTYPES[code]).element_size()
    at = {"first": 0, "last-of-a-block": per_block - 1, "first-of-the-next": per_block, "last": None}[where]
    assert _flags(torch.tensor([float("nan")], dtype=DTYPES[code]), code, at)


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_extreme_finite_values_are_not(code: str) -> None:
    info = torch.finfo(DTYPES[code])
    values = torch.tensor([info.max, -info.max, info.tiny, -info.tiny, -0.0], dtype=DTYPES[code])
    assert not _flags(values, code)


def test_other_dtypes_and_empty_chunks_are_skipped() -> None:
    found: set[str] = set()
    check = FiniteCheck()
    check(memoryview(b"\xff" * 16), "I32", "t", found)
    check(memoryview(b""), "BF16", "t", found)
    assert not found
