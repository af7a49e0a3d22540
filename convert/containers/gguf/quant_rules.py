"""The scalar rules ggml's reference quantizers share, in float32 and C's order: nearest_int's rounding trick,
fp16 conversion (round to nearest even), sequential sums, first-of-ties argmax. Used by the K-quants
(convert/containers/gguf/kquants.py, whose docstring gives every source) and the legacy 32-value types
(legacy_quants.py).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
K_SCALE_SIZE = 12
GROUP_MAX_EPS = np.float32(1e-15)
F32 = np.float32
ZERO = np.float32(0.0)
MAGIC = np.float32(12582912.0)  # 1.5 * 2^23
# Values quantized per numpy pass: enough to amortize Python's per-operation cost, few enough that the temporaries
# (values x groups, float32) stay in cache.
CHUNK_VALUES = 1024 * QK_K


# ---------------------------------------------------------------------------------------------------------------
# Scalar rules shared by the quantizers


def nearest_int(v: np.ndarray) -> np.ndarray:
    """nearest_int of each float32: add 1.5 * 2^23 in float32, keep the low 23 bits of the pattern, minus 2^22."""
    biased = np.add(v, MAGIC, dtype=np.float32)
    return (biased.view(np.int32) & 0x007FFFFF) - 0x00400000


def nearest_int_into(v: np.ndarray, out: np.ndarray) -> None:
    """nearest_int(v) into the int32 array out, using v (float32, overwritten) as scratch."""
    np.add(v, MAGIC, out=v)
    np.bitwise_and(v.view(np.int32), 0x007FFFFF, out=out)
    np.subtract(out, 0x00400000, out=out)


def fp16_bits(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16: round to nearest even, as uint16 bit patterns."""
    with np.errstate(over="ignore"):  # beyond 65504: inf, as in C
        return np.asarray(v, dtype=np.float32).astype(np.float16).view(np.uint16).astype("<u2")


def fp16_value(bits: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32 of fp16 bit patterns (exact)."""
    return bits.view(np.float16).astype(np.float32)


def seq_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in C's order: acc = 0; acc += terms[0]; acc += terms[1]; ... (float32 throughout)."""
    acc = terms[0] + ZERO  # 0.0f + t0: t0 itself, except that -0.0 becomes +0.0 as in C
    for i in range(1, terms.shape[0]):
        acc += terms[i]
    return acc


def argmax_abs_first(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C's `if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` from amax = max = 0 over axis 0."""
    amax = np.zeros(x.shape[1:], dtype=np.float32)
    vmax = np.zeros(x.shape[1:], dtype=np.float32)
    for i in range(x.shape[0]):
        ax = np.abs(x[i])
        bigger = ax > amax
        amax = np.where(bigger, ax, amax)
        vmax = np.where(bigger, x[i], vmax)
    return amax, vmax


def bytes_of(*parts: np.ndarray) -> np.ndarray:
    """Concatenate per-block fields (each (n_blocks, k) of any dtype) into (n_blocks, total) bytes."""
    n = parts[0].shape[0]
    return np.concatenate([np.ascontiguousarray(p).view(np.uint8).reshape(n, -1) for p in parts], axis=1)


