"""mx.quantize's CPU kernel compiled with numba: the same bytes as quantize.py's numpy code, several times faster.

Each group at a time: whether its elements are all finite and its min and max (for bf16, on the words ordered as
integers, which vectorizes), the kernel's scale and bias (quantize.py's docstring gives the formula and its
source), and, for the packed weight, its elements widened to float32, quantized and packed low bits first. The
numpy code makes a float32 copy of the slice, reduces it twice and runs five more whole-array passes; here a group
stays in the first-level cache.

What keeps the bytes mx.quantize's (tests/test_mlx_quantize.py compares both with mx.quantize itself):
- float32 everywhere: every constant is an np.float32 global or made from an int (numba would widen float32 * a
  Python float to float64), and each operation is the numpy code's, in its order.
- No fused multiply-add: fastmath is off, so LLVM has no licence to contract (tests/test_mlx_quantize_jit.py
  reads the kernels' assembly and finds no vfmadd/vfmsub instruction, and no float64 arithmetic).
- Division by zero and overflow are IEEE's (error_model="numpy"), as numpy's are; a NaN quotient is clamped to 0
  as the kernel's std::max does (only an overflowing `w - bias` makes one: non-finite inputs are refused).

The kernels release the GIL (nogil), so that the reader's threads quantize slices side by side, and are compiled
on first use, once per machine (cache=True: numba's cache beside this file or in its per-user directory).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = {"nogil": True, "cache": True, "fastmath": False, "error_model": "numpy"}
EPS = np.float32(1e-7)  # the kernel's least scale (quantize.py's _EPS)
ZERO = np.float32(0.0)


@njit(inline="always", **_JIT)
def _scale_bias(w_max: np.float32, w_min: np.float32, bits: int) -> tuple[np.float32, np.float32]:
    """The kernel's float32 scale and bias of a group from its largest and smallest element."""
    n_bins = np.float32((1 << bits) - 1)
    scale = (w_max - w_min) / n_bins
    if scale < EPS:
        scale = EPS
    if abs(w_min) > abs(w_max):
        edge = w_min
    else:
        scale = -scale
        edge = w_max
    q0 = np.rint(edge / scale)
    bias = ZERO
    if q0 != ZERO:
        scale = edge / q0
        bias = edge
    return scale, bias


@njit(inline="always", **_JIT)
def _pack(
    values: np.ndarray, scale: np.float32, bias: np.float32, bits: int, levels: np.ndarray, out: np.ndarray, g: int
) -> None:
    """Group g's float32 elements quantized with its scale and bias, packed into out low bits first (levels:
    scratch, one per element)."""
    n_bins = np.float32((1 << bits) - 1)
    for i in range(values.size):  # branch-free, so that LLVM vectorizes the divisions
        q = np.rint((values[i] - bias) / scale)
        q = q if q >= ZERO else ZERO  # below the range, or NaN: 0
        q = q if q <= n_bins else n_bins
        levels[i] = np.uint8(q)
    if bits == 8:
        base = g * values.size
        for i in range(values.size):
            out[base + i] = levels[i]
    else:
        base = g * (values.size // 2)
        for k in range(values.size // 2):
            out[base + k] = levels[2 * k] | (levels[2 * k + 1] << np.uint8(4))


@njit(inline="always", **_JIT)
def _ordered(word: int) -> int:
    """A bf16 word as an integer in the order of its value: positive values above negative ones, a larger
    magnitude further from the middle. -0.0 orders just below +0.0, which changes no scale or bias: a group
    whose largest or smallest element is a zero of either sign gets the same ones."""
    return word ^ 0x8000 if word < 0x8000 else word ^ 0xFFFF


@njit(inline="always", **_JIT)
def _word(key: int) -> int:
    """_ordered's inverse."""
    return key ^ 0x8000 if key >= 0x8000 else key ^ 0xFFFF


@njit(**_JIT)
def quantize_bf16(
    words: np.ndarray,
    group_size: int,
    bits: int,
    out: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
) -> int:
    """Little-endian BF16 words (uint16) in groups of group_size: fills the float32 scales and biases and, unless
    it is empty, out (packed bytes); the index of the first NaN or infinite element, or -1 (then all is filled).
    The largest and smallest element are found on the words ordered as integers (_ordered), which vectorizes
    where float comparisons, with their NaN rules, do not."""
    widened = np.empty(group_size, dtype=np.uint32)
    values = widened.view(np.float32)
    edges = np.empty(2, dtype=np.uint32)
    edge_values = edges.view(np.float32)
    levels = np.empty(group_size, dtype=np.uint8)
    for g in range(words.size // group_size):
        base = g * group_size
        special = False
        highest = 0
        lowest = 0xFFFF
        for i in range(group_size):
            word = np.int64(words[base + i])
            special |= word & 0x7F80 == 0x7F80  # every exponent bit set: NaN or infinity
            key = _ordered(word)
            highest = max(highest, key)
            lowest = min(lowest, key)
        if special:
            for i in range(group_size):
                if words[base + i] & 0x7F80 == 0x7F80:
                    return base + i
        edges[0] = np.uint32(_word(highest)) << np.uint32(16)
        edges[1] = np.uint32(_word(lowest)) << np.uint32(16)
        scale, bias = _scale_bias(edge_values[0], edge_values[1], bits)
        scales[g] = scale
        biases[g] = bias
        if out.size:
            for i in range(group_size):
                widened[i] = np.uint32(words[base + i]) << np.uint32(16)
            _pack(values, scale, bias, bits, levels, out, g)
    return -1


@njit(**_JIT)
def quantize_f32(
    elements: np.ndarray,
    group_size: int,
    bits: int,
    out: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
) -> int:
    """quantize_bf16 for float32 elements (F16 ones are widened by the caller: the conversion is exact)."""
    levels = np.empty(group_size, dtype=np.uint8)
    for g in range(elements.size // group_size):
        values = elements[g * group_size : (g + 1) * group_size]
        w_max = values[0]
        w_min = values[0]
        for i in range(group_size):
            v = values[i]
            if not np.isfinite(v):
                return g * group_size + i
            if v > w_max:
                w_max = v
            if v < w_min:
                w_min = v
        scale, bias = _scale_bias(w_max, w_min, bits)
        scales[g] = scale
        biases[g] = bias
        if out.size:
            _pack(values, scale, bias, bits, levels, out, g)
    return -1
