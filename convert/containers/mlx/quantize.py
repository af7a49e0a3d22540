"""MLX's element conversions, a slice at a time: float casts as mlx's astype rounds, and affine quantization
byte for byte as mx.quantize computes it on the CPU.

mx.quantize does not follow its documented formula (scale = (max - min) / (2^bits - 1), bias = min). Its CPU
kernel (mlx/backend/cpu/quantized.cpp, `quantize`, since mlx PR #1061) makes the group's edge of larger magnitude
exactly representable, so about half the scales come out negative. In float32, per group of group_size elements
along the last axis:

    n_bins = 2^bits - 1;  eps = 1e-7 (float32)
    scale = max((w_max - w_min) / n_bins, eps)
    scale, edge = (scale, w_min) if |w_min| > |w_max| else (-scale, w_max)
    q0 = rint(edge / scale)
    if q0 != 0: scale = edge / q0; bias = edge   else: bias = 0
    q = clip(rint((w - bias) / scale), 0, n_bins)          (rint: nearest, ties to even)

q is packed low bits first into little-endian uint32 words (32 / bits elements a word); scale and bias are
stored in the input's dtype (rounded to nearest even), while the elements were quantized with the float32 scale
and bias. docs/formats.md (MLX) has the source; tests/test_mlx_quantize.py compares with mx.quantize itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import numpy as np

from convert.common.dtypes import ITEM_SIZE
from convert.common.errors import ConvertError
from convert.common.jit import compile_in_child, in_cache, writable
from convert.containers.mlx.settings import FLOATS, SCALES, WEIGHT

_EPS = np.float32(1e-7)
_BF16_NAN = np.uint16(0x7FC0)  # mlx's float -> bfloat16 turns every NaN into this one quiet NaN


def as_float32(data: memoryview | bytes | np.ndarray, dtype: str) -> np.ndarray:
    """Little-endian BF16, F16 or F32 elements as float32 (exact for all three: bf16 is a float32's top half)."""
    if dtype == "BF16":
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return np.frombuffer(data, dtype="<f2").astype(np.float32)
    if dtype == "F32":
        return np.frombuffer(data, dtype="<f4")
    raise ValueError(f"no MLX conversion from {dtype}")


def from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values in dtype's bytes, rounded as mlx's casts round: to nearest, ties to even. bfloat16 as mlx's
    _MLX_BFloat16 constructor (mlx/types/bf16.h): NaN -> 0x7FC0, else the top half rounded; float16 as the C
    conversion (numpy's astype rounds the same way)."""
    if dtype == "F32":
        return values.astype("<f4", copy=False).view(np.uint8)
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return values.astype("<f2").view(np.uint8)
    if dtype == "BF16":
        bits = values.astype(np.float32, copy=False).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        return np.where(np.isnan(values), _BF16_NAN, rounded).astype("<u2").view(np.uint8)
    raise ValueError(f"no MLX conversion to {dtype}")


def affine_groups(values: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's float32 scale and bias of every group, and the groups as [groups, group_size] (see the module's
    docstring for the formula and its source)."""
    groups = values.reshape(-1, group_size)
    n_bins = np.float32(2**bits - 1)
    w_max = groups.max(axis=1)
    w_min = groups.min(axis=1)
    mask = np.abs(w_min) > np.abs(w_max)
    # Division by zero, 0/0 and overflow happen exactly where the kernel's float arithmetic has them too.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale = np.maximum((w_max - w_min) / n_bins, _EPS)
        scale = np.where(mask, scale, -scale)
        edge = np.where(mask, w_min, w_max)
        q0 = np.rint(edge / scale)
        nonzero = q0 != 0
        scale = np.where(nonzero, edge / np.where(nonzero, q0, np.float32(1)), scale)
    bias = np.where(nonzero, edge, np.float32(0))
    return groups, scale.astype(np.float32), bias.astype(np.float32)


def pack(groups: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int) -> np.ndarray:
    """The groups' elements quantized with their float32 scale and bias and packed into little-endian uint32
    words, low bits first, as bytes."""
    n_bins = np.float32(2**bits - 1)
    q = np.subtract(groups, bias[:, None], dtype=np.float32)  # one scratch array, the steps in place
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        np.divide(q, scale[:, None], out=q)
    np.rint(q, out=q)
    # The kernel clamps with std::min/std::max, whose NaN falls through to the lower bound: NaN -> 0 (only a NaN
    # input makes one; the casts refuse those before quantizing).
    np.clip(q, 0, n_bins, out=q)
    q[np.isnan(q)] = 0
    q = q.astype(np.uint8).reshape(-1)
    if bits == 8:
        return q  # four elements a word, the first in the low byte: little-endian uint32 words are these bytes
    if bits == 4:
        return q[0::2] | (q[1::2] << 4)  # two elements a byte, the first in the low nibble; words little-endian
    raise ValueError(f"no packing for {bits} bits")


class _Kernels(NamedTuple):
    bf16: Callable[..., int]
    f32: Callable[..., int]


@cache
def jit_kernels() -> _Kernels | None:
    """quantize_jit's kernels, or None when numba is not installed (or NUMBA_DISABLE_JIT is set, which would run
    them as plain Python). Imported on first use: numba takes a quarter of a second or more to import."""
    try:
        from numba.core import config

        from convert.containers.mlx.quantize_jit import quantize_bf16, quantize_f32
    except ImportError:
        return None
    return None if config.DISABLE_JIT else _Kernels(quantize_bf16, quantize_f32)


_PREPARED: set[str] = set()


def prepare(dtype: str) -> None:
    """Load the compiled kernel for dtype's elements into this process now, compiling it first (in a child
    process: convert/common/jit.py) where numba's cache has none. Called as a quantized part is planned, before
    the run's threads start, so that no worker compiles for a second holding the GIL. Nothing to do without
    numba."""
    kernels = jit_kernels()
    if kernels is None or dtype in _PREPARED or dtype not in FLOATS:  # another dtype is refused where it is read
        return
    # The kernel and the (writable) arrays quantize_groups passes it for one group; F16 is widened to float32.
    kernel, elements = (kernels.bf16, np.zeros(64, "<u2")) if dtype == "BF16" else (kernels.f32, np.zeros(64, "<f4"))
    one_group = (np.zeros(32, np.uint8), np.zeros(1, np.float32), np.zeros(1, np.float32))
    if not in_cache(kernel, (elements, 64, 4, *one_group)):
        compile_in_child(__name__, "_compile_here", dtype)
    _compile_here(dtype)  # from the cache; compiles here only if the child could not
    _PREPARED.add(dtype)


def _compile_here(dtype: str) -> None:
    """Quantize one group of dtype, which loads (or compiles and caches) its kernel. The child's entry point."""
    quantize_groups(bytes(64 * ITEM_SIZE[dtype]), dtype, 4, 64, backend="jit")


def _kernel_elements(data: memoryview, dtype: str) -> np.ndarray:
    """data as the kernel for dtype takes it: BF16 words as they are, other dtypes widened to float32; writable
    (the kind prepare() compiles)."""
    if dtype == "BF16":
        return writable(np.frombuffer(data, "<u2"))
    return writable(np.ascontiguousarray(as_float32(data, dtype)))


def quantize_groups(
    data: memoryview | bytes, dtype: str, bits: int, group_size: int, backend: str = "auto", *, packs: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """mx.quantize's float32 scale and bias of every group of data (a whole number of groups of dtype elements)
    and, where packs, its elements packed, as bytes (else empty); and the index of the first NaN or infinite
    element, or -1 (where there is one, nothing else is meaningful). backend: "jit" (quantize_jit's kernels),
    "numpy" (affine_groups and pack, the fallback and the kernels' witness in the tests) or "auto" (jit where
    numba imports)."""
    kernels = jit_kernels() if backend != "numpy" else None
    if backend == "jit" and kernels is None:
        raise ValueError("the jit backend needs numba")
    if kernels is None:
        values = as_float32(data, dtype)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            return np.empty(0, np.uint8), np.empty(0, np.float32), np.empty(0, np.float32), int(bad[0])
        groups, scale, bias = affine_groups(values, bits, group_size)
        return pack(groups, scale, bias, bits) if packs else np.empty(0, np.uint8), scale, bias, -1
    elements = len(data) // ITEM_SIZE[dtype]
    packed = np.empty(elements * bits // 8 if packs else 0, np.uint8)
    scale = np.empty(elements // group_size, np.float32)
    bias = np.empty(elements // group_size, np.float32)
    kernel = kernels.bf16 if dtype == "BF16" else kernels.f32
    bad = kernel(_kernel_elements(memoryview(data), dtype), group_size, bits, packed, scale, bias)
    return packed, scale, bias, bad


def quantize(
    data: memoryview | bytes | np.ndarray, dtype: str, bits: int, group_size: int, backend: str = "auto"
) -> tuple[bytes, ...]:
    """mx.quantize(w, group_size, bits) of a whole number of groups of dtype elements: the packed words, scales
    and biases as bytes (scales and biases in dtype)."""
    packed, scale, bias, bad = quantize_groups(memoryview(data).cast("B"), dtype, bits, group_size, backend)
    if bad >= 0:
        raise ValueError(f"element {bad} is NaN or infinite")
    return packed.tobytes(), from_float32(scale, dtype).tobytes(), from_float32(bias, dtype).tobytes()


@dataclass(frozen=True)
class FloatCast:
    """BF16/F16/F32 to another of them, a slice at a time, as mlx's astype rounds (mlx_lm.convert --dtype)."""

    src_dtype: str
    dst_dtype: str

    @property
    def granule(self) -> int:
        return ITEM_SIZE[self.src_dtype]

    def out_nbytes(self, nbytes: int) -> int:
        return nbytes // ITEM_SIZE[self.src_dtype] * ITEM_SIZE[self.dst_dtype]

    def __call__(self, data: memoryview, tensor: str, first: int) -> memoryview:
        values = as_float32(data, self.src_dtype)
        out = from_float32(values, self.dst_dtype)
        if self.dst_dtype != "F32":
            # A finite weight that does not fit the narrower type would silently become infinite: refused.
            wide = out.view("<u2").astype(np.uint32) << 16 if self.dst_dtype == "BF16" else None
            converted = wide.view(np.float32) if wide is not None else out.view("<f2")
            lost = np.isinf(converted) & np.isfinite(values)
            if lost.any():
                at = int(np.flatnonzero(lost)[0])
                raise ConvertError(
                    f"value {values[at]} at element {first + at} does not fit {self.dst_dtype}; use --outtype f32",
                    tensor=tensor,
                )
        return memoryview(out)


@dataclass(frozen=True)
class AffineCast:
    """One part (WEIGHT, SCALES or BIASES) of mx.quantize's output, a slice of whole groups at a time: each part
    of a quantized matrix is computed from the same source elements (Format.parts), so each slice is measured
    wherever its part is written (mlx's file order puts .biases and .scales before .weight), and packed for the
    weight. Measuring a group again costs less than keeping its result for the next part would (a digest of the
    slice to find it), and keeps nothing between parts."""

    src_dtype: str
    part: int
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        prepare(self.src_dtype)  # made as the plan is, before the run's threads start

    @property
    def dst_dtype(self) -> str:
        return "U32" if self.part == WEIGHT else self.src_dtype

    @property
    def granule(self) -> int:
        # One group; for 4 bits 8 elements make a word, and every group size is a multiple of 8.
        return self.group_size * ITEM_SIZE[self.src_dtype]

    def out_nbytes(self, nbytes: int) -> int:
        elements = nbytes // ITEM_SIZE[self.src_dtype]
        if self.part == WEIGHT:
            return elements * self.bits // 8
        return elements // self.group_size * ITEM_SIZE[self.src_dtype]

    def __call__(self, data: memoryview, tensor: str, first: int) -> memoryview:
        # The scales and biases parts measure the groups only; the weight's measures them again as it packs.
        packs = self.part == WEIGHT
        packed, scale, bias, bad = quantize_groups(data, self.src_dtype, self.bits, self.group_size, packs=packs)
        if bad >= 0:
            size = ITEM_SIZE[self.src_dtype]
            value = as_float32(data[bad * size : (bad + 1) * size], self.src_dtype)[0]
            raise ConvertError(
                f"value {value} at element {first + bad} cannot be quantized: the checkpoint holds NaN or "
                "infinite weights",
                tensor=tensor,
            )
        if packs:
            return memoryview(packed)
        kept = scale if self.part == SCALES else bias
        return memoryview(from_float32(kept, self.src_dtype))
