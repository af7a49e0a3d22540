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

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from blake3 import blake3

from convert.common.dtypes import ITEM_SIZE
from convert.common.errors import ConvertError
from convert.containers.mlx.settings import SCALES, WEIGHT

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


def quantize(data: memoryview | bytes | np.ndarray, dtype: str, bits: int, group_size: int) -> tuple[bytes, ...]:
    """mx.quantize(w, group_size, bits) of a whole number of groups of dtype elements: the packed words, scales
    and biases as bytes (scales and biases in dtype)."""
    groups, scale, bias = affine_groups(as_float32(data, dtype), bits, group_size)
    return (
        pack(groups, scale, bias, bits).tobytes(),
        from_float32(scale, dtype).tobytes(),
        from_float32(bias, dtype).tobytes(),
    )


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


class _Groups:
    """The scales and biases the WEIGHT cast computed for a slice, kept for the SCALES and BIASES casts of the same
    slice (the parts of a matrix are written one after another, each from the same source elements), so that each
    group is measured once. Keyed by the slice's content (BLAKE3), so that a hit is the same computation; bounded,
    a miss computes again."""

    LIMIT = 64 * 2**20  # bytes kept: a stacked expert matrix of Mixtral needs 29 MB (4 bytes per 64 elements)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, list[bytes | None]] = OrderedDict()
        self._size = 0

    def put(self, key: tuple, scales: bytes, biases: bytes) -> None:
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = [scales, biases]
            self._size += len(scales) + len(biases)
            while self._size > self.LIMIT and self._entries:
                _, dropped = self._entries.popitem(last=False)
                self._size -= sum(len(b) for b in dropped if b is not None)

    def take(self, key: tuple, part: int) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[part - SCALES] is None:
                return None
            found = entry[part - SCALES]
            entry[part - SCALES] = None
            self._size -= len(found)
            if entry[0] is None and entry[1] is None:
                del self._entries[key]
            return found


_GROUPS = _Groups()


@dataclass(frozen=True)
class AffineCast:
    """One part (WEIGHT, SCALES or BIASES) of mx.quantize's output, a slice of whole groups at a time: each part
    of a quantized matrix is computed from the same source elements (Format.parts), so each slice is quantized
    wherever its part is written."""

    src_dtype: str
    part: int
    bits: int
    group_size: int

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
        key = (self.src_dtype, self.bits, self.group_size, blake3(data).digest())
        if self.part != WEIGHT:
            kept = _GROUPS.take(key, self.part)
            if kept is not None:  # the same elements, measured (and checked finite) by the WEIGHT cast
                return memoryview(kept)
        values = as_float32(data, self.src_dtype)
        if not np.isfinite(values).all():
            at = int(np.flatnonzero(~np.isfinite(values))[0])
            raise ConvertError(
                f"value {values[at]} at element {first + at} cannot be quantized: the checkpoint holds NaN or "
                "infinite weights",
                tensor=tensor,
            )
        groups, scale, bias = affine_groups(values, self.bits, self.group_size)
        scales, biases = from_float32(scale, self.src_dtype), from_float32(bias, self.src_dtype)
        if self.part == WEIGHT:
            _GROUPS.put(key, scales.tobytes(), biases.tobytes())
            return memoryview(pack(groups, scale, bias, self.bits))
        return memoryview(scales if self.part == SCALES else biases)
