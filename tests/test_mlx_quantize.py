"""MLX's affine quantization, ours against mx.quantize itself (mlx's CPU kernel), bit for bit: bits 4 and 8, groups
of 32, 64 and 128, bfloat16, float16 and float32 inputs; random weights and the groups where the formula has its
edges (ties of rint, constant groups, zeros, groups of one sign, a tiny edge next to a large one, subnormals). And
the float casts against mlx's astype.
"""

from __future__ import annotations

import numpy as np
import pytest

from convert.containers.mlx.quantize import AffineCast, FloatCast, as_float32, from_float32, quantize
from convert.containers.mlx.settings import BIASES, SCALES, WEIGHT

mx = pytest.importorskip("mlx.core")

pytestmark = pytest.mark.unit

MX_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def to_mx(raw: np.ndarray, dtype: str, cols: int):
    """dtype's little-endian bytes as an mlx array of that dtype, [rows, cols]."""
    if dtype == "BF16":
        return mx.array(raw.view(np.uint16).reshape(-1, cols)).view(mx.bfloat16)
    if dtype == "F16":
        return mx.array(raw.view(np.float16).reshape(-1, cols))
    return mx.array(raw.view(np.float32).reshape(-1, cols))


def mx_bytes(array) -> bytes:
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.array(array).tobytes()


def adversarial(group: int, rng: np.random.Generator) -> np.ndarray:
    """Groups (float32) where the kernel's branches and roundings show."""
    rows = [
        np.zeros(group),  # all zero: scale = -eps, q0 = 0, bias 0
        np.full(group, 0.75),  # constant positive
        np.full(group, -0.3),  # constant negative
        -np.abs(rng.standard_normal(group)),  # negative only: the min is the edge
        np.abs(rng.standard_normal(group)),  # positive only
        np.linspace(-1, 1, group),  # |min| == |max|: mask false
        np.linspace(-1, 0.5, group),
        np.linspace(-0.5, 1, group),
        np.arange(group) % 16 - 7.5,  # half-integer steps: ties of rint
        (np.arange(group) % 256) - 128.0,
        np.where(np.arange(group) == 0, 1e-8, 1e-9),  # below eps: scale = eps
        np.where(np.arange(group) == 3, 1000.0, 1e-3),  # one large edge
        np.where(np.arange(group) == 5, -1000.0, 1e-3),
        rng.standard_normal(group) * 1e-30,  # float32 subnormals and zeros in f16/bf16
        np.clip(rng.standard_normal(group) * 30000.0, -65000, 65000),  # near f16's largest (finite)
        np.where(np.arange(group) % 2 == 0, -0.0, 0.0),  # zeros of both signs: the edges' sign of zero
        np.full(group, -0.0),
        np.where(np.arange(group) == 2, -0.0, -np.abs(rng.standard_normal(group))),  # -0.0 is the largest
        np.where(np.arange(group) == 4, -0.0, np.abs(rng.standard_normal(group))),  # -0.0 is the smallest
        np.where(np.arange(group) == 6, 0.0, -np.abs(rng.standard_normal(group))),  # +0.0 is the largest
        np.where(np.arange(group) == 1, 0.0, np.abs(rng.standard_normal(group))),  # +0.0 is the smallest
    ]
    return np.stack(rows).astype(np.float32)


def raw_values(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded into dtype, as bytes."""
    return from_float32(values.reshape(-1), dtype)


@pytest.mark.parametrize("backend", ["jit", "numpy"])
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_equals_mx_quantize(dtype: str, bits: int, group: int, backend: str) -> None:
    rng = np.random.default_rng(bits * 1000 + group)
    cols = group * 3
    random = (rng.standard_normal((40, cols)) * 0.05).astype(np.float32)
    edges = adversarial(group, rng).reshape(-1, cols)  # 21 groups: 7 rows of 3
    values = np.concatenate([random, edges])
    raw = raw_values(values, dtype)
    packed, scales, biases = quantize(raw, dtype, bits, group, backend)
    want = mx.quantize(to_mx(raw, dtype, cols), group_size=group, bits=bits)
    assert packed == mx_bytes(want[0])
    assert scales == mx_bytes(want[1])
    assert biases == mx_bytes(want[2])
    # The casts that stream it compute the same bytes from any slice of whole groups.
    for part, expected in ((WEIGHT, packed), (SCALES, scales), (BIASES, biases)):
        cast = AffineCast(dtype, part, bits, group)
        nbytes = len(raw)
        cut = (nbytes // 2) // cast.granule * cast.granule
        got = bytes(cast(memoryview(raw)[:cut], "t", 0)) + bytes(cast(memoryview(raw)[cut:], "t", 0))
        assert got == expected
        assert cast.out_nbytes(nbytes) == len(expected)
    # Scales and biases of a slice the weight's cast did not see are computed, not taken from what it kept.
    assert bytes(AffineCast(dtype, SCALES, bits, group)(memoryview(raw), "t", 0)) == scales
    assert bytes(AffineCast(dtype, BIASES, bits, group)(memoryview(raw), "t", 0)) == biases


@pytest.mark.parametrize("backend", ["jit", "numpy"])
@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_overflowing_groups_equal_mx_quantize(dtype: str, backend: str) -> None:
    """Near float32's largest value, max - min and w - bias overflow to infinity (and inf / inf is NaN, which the
    kernel's clamp makes 0): only bfloat16 and float32 weights reach there."""
    big = np.float32(3.3e38)
    rows = [
        np.where(np.arange(64) % 2 == 0, big, -big),
        np.where(np.arange(64) == 7, -big, np.float32(1.0)),
        np.where(np.arange(64) == 9, big, np.float32(-2.0)),
        np.linspace(-1, 1, 64, dtype=np.float32) * big,
    ]
    raw = raw_values(np.stack(rows).astype(np.float32), dtype)
    packed, scales, biases = quantize(raw, dtype, 4, 64, backend)
    want = mx.quantize(to_mx(raw, dtype, 64), group_size=64, bits=4)
    assert (packed, scales, biases) == (mx_bytes(want[0]), mx_bytes(want[1]), mx_bytes(want[2]))


def test_about_half_the_scales_are_negative() -> None:
    """What the documentation does not say: the edge of larger magnitude is made exact, so the sign of the scale
    follows which edge that is."""
    rng = np.random.default_rng(0)
    raw = raw_values(rng.standard_normal((64, 256)).astype(np.float32) * 0.02, "BF16")
    _, scales, _ = quantize(raw, "BF16", 4, 64)
    negative = (as_float32(scales, "BF16") < 0).mean()
    assert 0.3 < negative < 0.7


@pytest.mark.parametrize(("src", "dst"), [("BF16", "F16"), ("BF16", "F32"), ("F32", "BF16"), ("F32", "F16"),
                                          ("F16", "BF16"), ("F16", "F32")])  # fmt: skip
def test_float_casts_equal_astype(src: str, dst: str) -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate(
        [
            rng.standard_normal(4096).astype(np.float32) * 0.02,
            np.array([0.0, -0.0, 1e-8, 6e-5, 1.0 + 2**-9, 1.0 + 3 * 2**-9, -(1.0 + 2**-8), 60000.0], np.float32),
        ]
    )
    raw = raw_values(values, src)
    got = bytes(FloatCast(src, dst)(memoryview(raw), "t", 0))
    want = mx_bytes(to_mx(raw, src, raw.size // {"BF16": 2, "F16": 2, "F32": 4}[src]).astype(
        getattr(mx, MX_DTYPE[dst])))  # fmt: skip
    assert got == want
