"""convert_elements' fast path (SUB_SLICE elements at a time, rounding by trunc(p + copysign(0.49999997, p)))
against the reference it replaces and against gguf-py's quantizers: the same bytes for every input, and the same
error line where the reference refuses one. Random bit patterns reach every float32 class (denormals, NaN
payloads, infinities); the adversarial blocks put x * (1/d) on exact ties, on 0.49999997, on negative zero, and
make d a denormal whose inverse is infinite."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convert.common.errors import ConvertError
from convert.containers.gguf import casts

pytestmark = pytest.mark.unit

RNG = np.random.default_rng(20240612)
TYPES = (T.F16, T.BF16, T.Q8_0)
NEAR_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))


@pytest.fixture(autouse=True)
def small_steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Several steps a slice (the last one short), so a step's scratch carries over and a refusal can come late."""
    monkeypatch.setattr(casts, "SUB_SLICE", 96)
    yield


def outcome(convert: object, data: bytes, src: str, dst: T) -> bytes | str:
    try:
        return convert(data, src, dst, tensor="t", file="f", first_element=7).tobytes()  # type: ignore[operator]
    except ConvertError as error:
        return str(error)


def assert_same(values: np.ndarray) -> None:
    """From F32, and from BF16/F16 where the values are theirs, every type: fast == reference == gguf-py."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    sources = {"F32": values.tobytes(), "BF16": (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()}
    with np.errstate(all="ignore"):
        sources["F16"] = values.astype(np.float16).tobytes()
    for src, data in sources.items():
        widened = casts._as_float32(data, src)
        for dst in TYPES:
            fast = outcome(casts.convert_elements, data, src, dst)
            assert fast == outcome(casts.convert_elements_reference, data, src, dst), (src, dst.name)
            if isinstance(fast, bytes):
                with np.errstate(all="ignore"):  # a denormal block: gguf-py's 1/d overflows as the reference's does
                    client = gguf.quants.quantize(widened.reshape(-1, 32), dst).tobytes()
                assert fast == client, (src, dst.name)


def adversarial() -> np.ndarray:
    """Blocks of 32 whose Q8_0 products land where a rounding shortcut goes wrong."""
    blocks = []
    ties = np.arange(-15.5, 16, 1.0, dtype=np.float32)  # max 15.5: d = 15.5/127, and x * (1/d) near k + 0.5
    blocks.append(ties)
    unit = np.zeros(32, np.float32)  # max 127: d = 1, 1/d = 1, so the products are the values themselves
    unit[:16] = [127, -127, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, NEAR_HALF, -NEAR_HALF, 126.5, -126.5, -0.0, 0.0,
                 np.nextafter(np.float32(1.5), np.float32(0)), np.nextafter(np.float32(-2.5), np.float32(0))]
    unit[16:] = np.arange(16, dtype=np.float32) + np.float32(0.5) + np.float32(2.0**-20)
    blocks.append(unit)
    for exponent in (-149, -140, -128, -127, -126, -125):  # denormal and smallest normal block maxima
        tiny = np.float32(2.0**exponent) * RNG.integers(-7, 8, 32).astype(np.float32)
        tiny[0] = np.float32(2.0**exponent) * 7
        blocks.append(tiny)
    blocks.append(np.full(32, -0.0, np.float32))
    blocks.append(np.zeros(32, np.float32))
    halves = np.float32(127 / 63.5) * (np.arange(32, dtype=np.float32) - np.float32(15.5))
    blocks.append(halves / np.float32(127 / 63.5))
    return np.concatenate(blocks)


def test_adversarial_blocks_match() -> None:
    values = adversarial()
    for block in values.reshape(-1, 32):  # alone: a denormal scale elsewhere would send the slice to the reference
        assert_same(block)
    assert_same(values)
    assert_same(values[::-1].copy())


def test_adversarial_blocks_take_the_fast_path() -> None:
    """The blocks whose scale has a finite inverse are the fast path's own (assert_same alone cannot tell)."""
    for block in adversarial().reshape(-1, 32):
        if np.abs(block).max() >= np.float32(2.0**-128) * 127:
            assert casts._convert_fast(block.tobytes(), "F32", T.Q8_0) is not None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 70000.0, 3.4e38])
def test_refusals_match_wherever_they_fall(bad: float) -> None:
    """A NaN/infinity (Q8_0's refusal), a float16 overflow, a bfloat16 overflow or a Q8_0 scale beyond float16,
    in the first, a middle and the last step, with an earlier step's other oddity: the reference's line."""
    for at, denormal in itertools.product((0, 150, 300, 383), (False, True)):
        values = RNG.standard_normal(384).astype(np.float32)
        values[at] = bad
        if denormal:
            values[200:232] = np.float32(2.0**-140)  # a denormal Q8_0 block maximum in another step
        assert_same(values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 2**32 - 1), min_size=32, max_size=32 * 7).map(lambda b: b[: len(b) // 32 * 32]))
def test_any_bit_pattern_matches(bits: list[int]) -> None:
    assert_same(np.array(bits, dtype=np.uint32).view(np.float32))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.floats(-130, 130, width=32), min_size=32, max_size=32 * 7).map(lambda b: b[: len(b) // 32 * 32]),
    st.sampled_from([1.0, 127.0, 2.0**-100, 2.0**-130, 3e4]),
)
def test_ordinary_weights_match(values: list[float], scale: float) -> None:
    """Finite weights at several magnitudes (a random bit pattern is mostly huge or tiny): the fast path itself."""
    assert_same(np.array(values, dtype=np.float32) * np.float32(scale))


def test_random_slices_take_the_fast_path() -> None:
    """Real-looking weights never fall back: the speed this path exists for is really had (and still exact)."""
    values = (RNG.standard_normal(32 * 1000) * 0.02).astype(np.float32)
    for src, data in (("F32", values.tobytes()), ("BF16", (values.view(np.uint32) >> 16).astype(np.uint16).tobytes())):
        for dst in TYPES:
            fast = casts._convert_fast(data, src, dst)
            assert fast is not None, (src, dst.name)
            assert fast.tobytes() == casts.convert_elements_reference(data, src, dst, tensor="t").tobytes()
