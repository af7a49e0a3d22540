"""ggml's legacy 32-value block quantizers (Q4_0, Q4_1, Q5_0, Q5_1; Q8_0 is gguf-py's, byte-exact): the rules and
their sources are in convert/containers/gguf/kquants.py's docstring, whose public API calls these.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from convert.containers.gguf.quant_rules import (
    F32,
    ZERO,
    argmax_abs_first,
    bytes_of,
    fp16_bits,
)

# ---------------------------------------------------------------------------------------------------------------
# Legacy 32-value blocks (n_blocks, 32) -> bytes; Q8_0 is gguf-py's (see the module docstring).


def _min_max_first(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C's `min = FLT_MAX; max = -FLT_MAX; if (v < min) min = v; if (v > max) max = v;` over axis 0."""
    big = np.finfo(np.float32).max
    lo = np.full(x.shape[1:], big, dtype=np.float32)
    hi = np.full(x.shape[1:], -big, dtype=np.float32)
    for i in range(x.shape[0]):
        lo = np.where(x[i] < lo, x[i], lo)
        hi = np.where(x[i] > hi, x[i], hi)
    return lo, hi


def _inverse(d: np.ndarray) -> np.ndarray:
    """C's `id = d ? 1.0f/d : 0.0f`."""
    return np.where(d != 0, F32(1.0) / np.where(d != 0, d, F32(1.0)), ZERO)


def _truncate(v: np.ndarray) -> np.ndarray:
    """C's float -> integer conversion (toward zero) of values known to be in range."""
    return np.trunc(v).astype(np.int32)


def _pack_nibbles(levels: np.ndarray) -> np.ndarray:
    """(32, n_blocks) levels -> (n_blocks, 16): byte j = level j | level j+16 << 4 (low 4 bits of each)."""
    lv = (levels & 0xF).astype(np.uint8)
    return np.ascontiguousarray((lv[:16] | (lv[16:] << 4)).T)


def _pack_fifth_bits(levels: np.ndarray) -> np.ndarray:
    """(32, n_blocks) 5-bit levels -> (n_blocks,) uint32 qh: bit j = bit 4 of level j."""
    qh = np.zeros(levels.shape[1], dtype=np.uint32)
    for j in range(32):
        qh |= ((levels[j] >> 4) & 1).astype(np.uint32) << np.uint32(j)
    return qh.astype("<u4")


def _symmetric_legacy(blocks: np.ndarray, divisor: int, offset: float, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 / Q5_0: d = max/-divisor (max: largest magnitude, signed), levels min(top, trunc(x*id + offset))."""
    x = np.ascontiguousarray(blocks.T)
    _, vmax = argmax_abs_first(x)
    d = vmax / F32(-divisor)
    levels = np.minimum(_truncate(x * _inverse(d) + F32(offset)), top)
    return fp16_bits(d), levels


def _affine_legacy(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 / Q5_1: d = (max - min)/nmax, m = min, levels trunc((x - min)*id + 0.5) (at most nmax)."""
    x = np.ascontiguousarray(blocks.T)
    lo, hi = _min_max_first(x)
    d = (hi - lo) / F32(nmax)
    levels = np.minimum(_truncate((x - lo) * _inverse(d) + F32(0.5)), nmax)
    return fp16_bits(d), fp16_bits(lo), levels


def _q4_0_blocks(blocks: np.ndarray) -> np.ndarray:
    d, levels = _symmetric_legacy(blocks, 8, 8.5, 15)
    return bytes_of(d, _pack_nibbles(levels))


def _q4_1_blocks(blocks: np.ndarray) -> np.ndarray:
    d, m, levels = _affine_legacy(blocks, 15)
    return bytes_of(d, m, _pack_nibbles(levels))


def _q5_0_blocks(blocks: np.ndarray) -> np.ndarray:
    d, levels = _symmetric_legacy(blocks, 16, 16.5, 31)
    return bytes_of(d, _pack_fifth_bits(levels), _pack_nibbles(levels))


def _q5_1_blocks(blocks: np.ndarray) -> np.ndarray:
    d, m, levels = _affine_legacy(blocks, 31)
    return bytes_of(d, m, _pack_fifth_bits(levels), _pack_nibbles(levels))


def _q8_0_blocks(blocks: np.ndarray) -> np.ndarray:
    return gguf_quants.quantize(blocks, GGMLQuantizationType.Q8_0)


