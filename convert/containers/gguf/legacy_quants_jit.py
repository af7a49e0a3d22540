"""ggml's legacy 32-value quantizers (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) compiled with numba: the same bytes as
legacy_quants.py's numpy code. A port of quantize_row_<type>_ref under the rules of kquants_jit.py's docstring
(float32 in C's order, no fused multiply-add, C's float -> int conversions); kquants.py's docstring gives the
sources. Each kernel takes (n_blocks, 32) float32 and fills (n_blocks, block bytes) uint8.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from convert.containers.gguf.kquants_jit import (
    _INLINE,
    _JIT,
    F32,
    FLT_MAX,
    HALF,
    ONE,
    ZERO,
    _fp16,
    _put16,
    _signed_amax,
    _to_int8,
    _trunc_int,
)

F8_5 = F32(8.5)
F16_5 = F32(16.5)

# ---------------------------------------------------------------------------------------------------------------
# Legacy kernels: blocks (n_blocks, 32)


@njit(**_INLINE)
def _argmax_abs(x: np.ndarray) -> np.float32:
    """C's `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` from 0: the value of largest magnitude, first."""
    return _signed_amax(x, 0, x.shape[0])[1]


@njit(**_INLINE)
def _min_max(x: np.ndarray) -> tuple[np.float32, np.float32]:
    lo = FLT_MAX
    hi = -FLT_MAX
    for j in range(x.shape[0]):
        if x[j] < lo:
            lo = x[j]
        if x[j] > hi:
            hi = x[j]
    return lo, hi


@njit(**_JIT)
def q4_0_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    for b in range(blocks.shape[0]):
        x = blocks[b]
        y = out[b]
        d = _argmax_abs(x) / F32(-8.0)
        inv = ONE / d if d != ZERO else ZERO
        _put16(y, 0, _fp16(d))
        for j in range(16):
            lo = min(15, _to_int8(_trunc_int(x[j] * inv + F8_5)))
            hi = min(15, _to_int8(_trunc_int(x[j + 16] * inv + F8_5)))
            y[2 + j] = (lo | (hi << 4)) & 0xFF


@njit(**_JIT)
def q4_1_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    for b in range(blocks.shape[0]):
        x = blocks[b]
        y = out[b]
        lo, hi = _min_max(x)
        d = (hi - lo) / F32(15.0)
        inv = ONE / d if d != ZERO else ZERO
        _put16(y, 0, _fp16(d))
        _put16(y, 2, _fp16(lo))
        for j in range(16):
            q0 = min(15, _to_int8(_trunc_int((x[j] - lo) * inv + HALF)))
            q1 = min(15, _to_int8(_trunc_int((x[j + 16] - lo) * inv + HALF)))
            y[4 + j] = (q0 | (q1 << 4)) & 0xFF


@njit(**_INLINE)
def _put_q5(y: np.ndarray, at: int, q0: int, q1: int, j: int, qh: int) -> int:
    """Low nibbles of levels j and j+16 into qs[j]; returns qh with their fifth bits at j and j+16."""
    y[at + j] = ((q0 & 0x0F) | ((q1 & 0x0F) << 4)) & 0xFF
    return qh | (((q0 & 0x10) >> 4) << j) | (((q1 & 0x10) >> 4) << (j + 16))


@njit(**_JIT)
def q5_0_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    for b in range(blocks.shape[0]):
        x = blocks[b]
        y = out[b]
        d = _argmax_abs(x) / F32(-16.0)
        inv = ONE / d if d != ZERO else ZERO
        _put16(y, 0, _fp16(d))
        qh = 0
        for j in range(16):
            q0 = min(31, _to_int8(_trunc_int(x[j] * inv + F16_5))) & 0xFF
            q1 = min(31, _to_int8(_trunc_int(x[j + 16] * inv + F16_5))) & 0xFF
            qh = _put_q5(y, 6, q0, q1, j, qh)
        for k in range(4):
            y[2 + k] = (qh >> (8 * k)) & 0xFF


@njit(**_JIT)
def q5_1_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    for b in range(blocks.shape[0]):
        x = blocks[b]
        y = out[b]
        lo, hi = _min_max(x)
        d = (hi - lo) / F32(31.0)
        inv = ONE / d if d != ZERO else ZERO
        _put16(y, 0, _fp16(d))
        _put16(y, 2, _fp16(lo))
        qh = 0
        for j in range(16):
            q0 = min(31, _trunc_int((x[j] - lo) * inv + HALF) & 0xFF)
            q1 = min(31, _trunc_int((x[j + 16] - lo) * inv + HALF) & 0xFF)
            qh = _put_q5(y, 8, q0, q1, j, qh)
        for k in range(4):
            y[4 + k] = (qh >> (8 * k)) & 0xFF


@njit(**_JIT)
def q8_0_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    for b in range(blocks.shape[0]):
        x = blocks[b]
        y = out[b]
        amax = ZERO
        for j in range(32):
            a = abs(x[j])
            amax = amax if amax > a else a
        d = amax / F32(127.0)
        inv = ONE / d if d != ZERO else ZERO
        _put16(y, 0, _fp16(d))
        for j in range(32):
            v = x[j] * inv
            t = np.trunc(v)  # roundf: half away from zero
            if abs(v - t) >= HALF:
                t = t + (ONE if v > ZERO else -ONE)
            y[2 + j] = _trunc_int(t) & 0xFF
