"""The NaN/Inf check works on raw words; torch makes the float bit patterns it must and must not flag."""

from __future__ import annotations

import pytest
import torch

from convert.finite import FiniteCheck
from convert.workers import CHUNK

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _flags(values: torch.Tensor, code: str) -> bool:
    chunk = torch.zeros(CHUNK // values.element_size(), dtype=values.dtype)
    chunk[-len(values) :] = values  # at the end: the whole chunk is looked at
    found: set[str] = set()
    FiniteCheck()(memoryview(chunk.view(torch.uint8).numpy()), code, "t", found)
    return bool(found)


@pytest.mark.parametrize("code", sorted(DTYPES))
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), -float("nan")])
def test_non_finite_values_are_flagged(code: str, value: float) -> None:
    assert _flags(torch.tensor([1.0, value], dtype=DTYPES[code]), code)


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
