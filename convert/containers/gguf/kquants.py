"""ggml's reference quantizers in numpy, byte for byte: Q3_K, Q4_K, Q5_K, Q6_K and the legacy Q4_0/Q4_1/Q5_0/Q5_1/Q8_0.

What llama-quantize writes for a tensor when it runs without an importance matrix, reproduced so that a quantized
GGUF from this converter can equal llama.cpp's to the byte. Pure functions over float32 arrays, no I/O.

Two backends give the same bytes: `quantize(rows, qtype)` runs numba-compiled ports of the C loops
(kquants_jit.py, legacy_quants_jit.py: ~3x ggml's reference speed per core for Q4_K, the GIL released so threads
add up; compiled on a type's first use, ~1-6 s, then loaded from numba's cache) when numba is installed (the
`fast` extra), and this module's vectorized numpy code otherwise (`backend="numpy"` asks for it; it is also the
second witness the tests compare the kernels with). bench/KQUANTS.md has the timings.

Sources (ggml-org/llama.cpp; read for the rules, written here in our own structure)
- ggml/src/ggml-quants.c:
  - quantize_q3_K / quantize_q4_K / quantize_q5_K / quantize_q6_K (and quantize_q4_0 ... quantize_q8_0): with no
    importance matrix (quant_weights == NULL) each runs its quantize_row_<type>_ref over the rows, block after
    block; blocks are independent, so how llama.cpp splits the rows between threads and chunks cannot show.
  - nearest_int: float -> int by adding 12582912.f (1.5 * 2^23) and keeping the low 23 bits of the sum's bit
    pattern, minus 2^22. For |v| <= 4194303 that is round half to even; beyond it the bits wrap, and that is what
    `_nearest_int` reproduces too (it emulates the trick, it is not np.rint).
  - make_qx_quants (Q6_K: 16 values, nmax 32, rmse_type 1, no weights, so w = x*x): symmetric levels
    -nmax..nmax-1 at iscale = -nmax/max (max: the value of largest magnitude, the first one on a tie), then a search
    over iscale = -(nmax + 0.1*is)/max for is in -9..9 (not 0) keeping the levels whose least-squares scale
    sumlx/suml2 gives the larger sumlx^2/suml2 (strict comparison sumlx^2 > best*suml2).
  - make_qkx2_quants (Q4_K: nmax 15, rmin -1, rdelta 0.1, nstep 20; Q5_K: nmax 31, rmin -0.5, rdelta 0.1, nstep 15;
    32 values, weights av_x + |x| with av_x = sqrt(sum x^2 / 32)): asymmetric levels 0..nmax over [min(0, min x),
    max x]; then for is in 0..nstep a least-squares fit of scale and min to the levels at iscale = (rmin +
    rdelta*is + nmax)/(max - min), the min clamped at 0 (then scale = sum_xl/sum_l2), kept when its weighted
    squared error is strictly smaller. `min` is updated in the loop when a step is kept, and later steps use the
    updated min both in iscale and in x - min. Returns scale and -min.
  - make_q3_quants (Q3_K: 16 values, nmax 4, do_rmse): symmetric levels -4..3 at iscale = -4/max, then up to 5
    passes that move one level at a time to nearest_int(x * suml2 / sumlx) (sums without that element) when that
    raises sumlx^2/suml2 (w = x*x). A pass that changes nothing would change nothing again, so running all five
    passes on every group gives the bytes of C's early exit.
  - quantize_row_q4_K_ref / _q5_K_ref: 8 sub-blocks of 32; scales and mins quantized to 6 bits against
    max_scale/63 and max_min/63 (inv = 63/max when max > 0, else 0; nearest_int, stored as uint8 so a negative
    wraps, then capped at 63), d = fp16(max_scale/63), dmin = fp16(max_min/63); then every value requantized as
    nearest_int((x + dmin_fp16*m)/(d_fp16*sc)) clamped to 0..nmax, except in a sub-block whose d_fp16*sc is 0,
    which keeps the levels make_qkx2_quants chose.
  - quantize_row_q6_K_ref: 16 sub-blocks of 16; a block whose largest |scale| is < 1e-15 (GROUP_MAX_EPS) is all
    zero bytes; otherwise iscale = -128/max_scale (the scale of largest magnitude, signed), d = fp16(1/iscale),
    int8 scales min(127, nearest_int(iscale*scale)), and requantization nearest_int(x/(d_fp16*sc)) clamped to
    -32..31 (+32), again skipped where d_fp16*sc is 0.
  - quantize_row_q3_K_ref: 16 sub-blocks of 16; iscale = -32/max_scale (signed, largest magnitude), 6-bit scales
    clamp(nearest_int(iscale*scale), -32, 31) + 32 (the int8 conversion wraps first), d = fp16(1/iscale) (0 when
    max_scale is 0); requantization nearest_int(x/(d_fp16*(sc-32))) clamped to -4..3 (+4), skipped where 0.
  - quantize_row_q4_0_ref ... _q8_0_ref: one fp16 scale (and min) per 32 values; levels by truncating
    x*id + 8.5 (Q4_0), (x-min)*id + 0.5 (Q4_1, Q5_1), x*id + 16.5 (Q5_0), roundf (half away from zero, Q8_0).
- ggml/src/ggml-common.h: QK_K = 256, K_SCALE_SIZE = 12 and the block structs (all little-endian, no padding):
  block_q3_K = hmask[32], qs[64], scales[12], d (110 bytes); block_q4_K = d, dmin, scales[12], qs[128] (144);
  block_q5_K = d, dmin, scales[12], qh[32], qs[128] (176); block_q6_K = ql[128], qh[64], int8 scales[16], d (210).
  The 12 scale bytes of q4_K/q5_K hold 8 six-bit scales and 8 six-bit mins (get_scale_min_k4): sub-blocks 0-3 in
  the low 6 bits of bytes 0-3 (scales) and 4-7 (mins), sub-blocks 4-7 in the nibbles of bytes 8-11 (scale low,
  min high) with their top 2 bits in the top 2 bits of bytes 0-3 (scales) and 4-7 (mins).
- ggml/src/ggml-impl.h: GGML_FP32_TO_FP16 rounds to nearest, ties to even (numpy's float32 -> float16 cast does
  the same, subnormals and overflow to inf included; GGML_FP16_TO_FP32 is exact).

What the bytes depend on: only the float32 values of each 256-value block (32 for the legacy types) and the order
of the arithmetic. Every step here is float32 in C's order: each sum over a sub-block accumulates element by
element, left to right, from 0 (np.sum's pairwise summation would round differently), products associate left to
right as C's `w*l*x` does, ints convert to float where C converts them, and nothing is fused into a multiply-add
(numpy never fuses; llama.cpp's libggml-base is built without FMA contraction in these functions). Rows are
independent, so the result does not depend on how the caller splits a tensor. Vectorized across sub-blocks: each
group's operations are the C loop's, only many groups run side by side.

Checked against the llama.cpp that llama-cpp-python 0.3.36 vendors (ggml-org/llama.cpp@0c1e57098), whose
libggml-base has no FMA instruction at all: tests/test_kquants.py compares with llama_model_quantize's output and
with ggml_quantize_chunk directly.

gguf-py (gguf.quants) has numpy quantizers for the legacy types. Its Q8_0 gives ggml's bytes and is used here as it
is; its Q4_0/Q4_1/Q5_0/Q5_1 differ from ggml's in the sign of a zero scale or min (np.argmax/np.min pick another
zero than C's first-strict scan: fp16 0x0000 where ggml writes 0x8000, or the reverse), so those four are
written here.

Not handled: NaN and infinities (the caller refuses non-finite tensors before quantizing; ggml's own results for
them are not reproduced). Signed zeros are (a sum starts at +0.0 as in C, minima and maxima use C's strict
comparisons), and so are values so small or large that the scales underflow or overflow in fp16. Where ggml's
nearest_int gets |v| > 4194303 it asserts (the llama-cpp-python build keeps asserts, so llama-quantize aborts):
for Q4_K/Q5_K a sub-block of values around 1e-36 or smaller, or 1e7 or larger, can get there. Such tensors have no
llama.cpp bytes to match; here they get the bit trick's result, as a build without asserts would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache, partial
from types import MappingProxyType

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from convert.common.jit import compile_in_child, in_cache, writable
from convert.containers.gguf.legacy_quants import _q4_0_blocks, _q4_1_blocks, _q5_0_blocks, _q5_1_blocks, _q8_0_blocks
from convert.containers.gguf.quant_rules import (
    CHUNK_VALUES,
    F32,
    GROUP_MAX_EPS,
    K_SCALE_SIZE,
    QK_K,
    ZERO,
    argmax_abs_first,
    bytes_of,
    fp16_bits,
    fp16_value,
    nearest_int,
    nearest_int_into,
    seq_sum,
)

# ---------------------------------------------------------------------------------------------------------------
# Level searches (ggml-quants.c's make_*_quants); x is (values, groups): one group per column


def _make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL): (scale per group, levels 0..2*nmax-1 as int32)."""
    amax, vmax = argmax_abs_first(x)
    zero = amax < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1.0), vmax)
    w = x * x
    wx = w * x

    def levels(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
        lf = lv.astype(np.float32)
        return lv, seq_sum(wx * lf), seq_sum(w * lf * lf)

    lv, sumlx, suml2 = levels(F32(-nmax) / safe_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, ZERO)
    best = scale * sumlx
    big_l = lv + nmax
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / safe_max
        lv, sumlx, suml2 = levels(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if not better.any():
            continue
        big_l = np.where(better, lv + nmax, big_l)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    scale = np.where(zero, ZERO, scale)
    big_l = np.where(zero, 0, big_l)
    return scale, big_l


def _make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants(n, nmax, x, weights, ..., rmin, rdelta, nstep, use_mad=false): (scale, the_min, levels).

    The (values, groups) temporaries of the search are allocated once and reused (out=): a fresh megabyte array
    per operation would cost more in page faults than the arithmetic."""
    lo = x[0].copy()
    hi = x[0].copy()
    sum_w = w[0].copy()
    sum_x = sum_w * x[0]
    for i in range(1, x.shape[0]):
        xi = x[i]
        lo = np.where(xi < lo, xi, lo)
        hi = np.where(xi > hi, xi, hi)
        sum_w += w[i]
        sum_x += w[i] * xi
    lo = np.where(lo > 0, ZERO, lo)
    flat = hi == lo
    fmax = F32(nmax)
    scaled = np.empty_like(x)
    big_l = np.empty(x.shape, dtype=np.int32)
    lv = np.empty(x.shape, dtype=np.int32)
    lf = np.empty_like(x)
    wl = np.empty_like(x)
    term = np.empty_like(x)

    def levels_at(iscale: np.ndarray, out: np.ndarray) -> None:
        """out = clamp(nearest_int(iscale*(x - lo)), 0, nmax) and lf = (float)out."""
        np.subtract(x, lo, out=scaled)
        np.multiply(scaled, iscale, out=scaled)
        nearest_int_into(scaled, out)
        np.clip(out, 0, nmax, out=out)
        np.copyto(lf, out)

    def weighted_error(scale: np.ndarray, the_min: np.ndarray) -> np.ndarray:
        """sum of w * (scale*l + min - x)^2 over the levels in lf, in C's order."""
        np.multiply(lf, scale, out=term)
        np.add(term, the_min, out=term)
        np.subtract(term, x, out=term)
        np.multiply(term, term, out=term)
        np.multiply(w, term, out=term)
        return seq_sum(term)

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = fmax / (hi - lo)
        scale = F32(1.0) / iscale
        levels_at(iscale, big_l)
        best = weighted_error(scale, lo)
        for step in range(nstep + 1):
            factor = F32(rmin) + F32(rdelta) * F32(step) + fmax
            levels_at(factor / (hi - lo), lv)
            np.multiply(w, lf, out=wl)
            sum_l = seq_sum(wl)
            np.multiply(wl, lf, out=term)
            sum_l2 = seq_sum(term)
            np.multiply(wl, x, out=term)
            sum_xl = seq_sum(term)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_min = np.where(clamp, ZERO, this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            cur = weighted_error(this_scale, this_min)
            better = (det > 0) & (cur < best) & ~flat
            if not better.any():
                continue
            np.copyto(big_l, lv, where=better)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    scale = np.where(flat, ZERO, scale)
    big_l[:, flat] = 0
    return scale, -lo, big_l


def _make_q3_quants_rmse(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): (scale per group, levels 0..2*nmax-1 as int32)."""
    amax, vmax = argmax_abs_first(x)
    zero = amax < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1.0), vmax)
    iscale = F32(-nmax) / safe_max
    levels = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = levels.astype(np.float32)
    sumlx = seq_sum(wx * lf)
    suml2 = seq_sum(w * lf * lf)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            changed = np.zeros(x.shape[1:], dtype=bool)
            for i in range(x.shape[0]):
                li = levels[i].astype(np.float32)
                slx = sumlx - wx[i] * li
                sl2 = suml2 - w[i] * li * li
                live = slx > 0
                new_l = np.clip(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1)
                moved = live & (new_l != levels[i])
                nf = new_l.astype(np.float32)
                slx = slx + wx[i] * nf
                sl2 = sl2 + w[i] * nf * nf
                accept = moved & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                levels[i] = np.where(accept, new_l, levels[i])
                sumlx = np.where(accept, slx, sumlx)
                suml2 = np.where(accept, sl2, suml2)
                changed |= accept
            if not changed.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, ZERO)
    scale = np.where(zero, ZERO, scale)
    levels = np.where(zero, 0, levels + nmax)
    return scale, levels


# ---------------------------------------------------------------------------------------------------------------
# Block quantizers: (n_blocks, 256) float32 -> (n_blocks, block bytes) uint8


def _groups(blocks: np.ndarray, size: int) -> np.ndarray:
    """(n_blocks, 256) -> (size, n_blocks * 256/size): sub-block g of block b is column b*(256/size) + g."""
    return np.ascontiguousarray(blocks.reshape(-1, size).T)


def _ungroup(levels: np.ndarray, n_blocks: int) -> np.ndarray:
    """Inverse of _groups for the levels: (size, groups) -> (n_blocks, 256)."""
    return np.ascontiguousarray(levels.T).reshape(n_blocks, QK_K)


def _running_max(values: np.ndarray) -> np.ndarray:
    """C's `m = 0; if (v > m) m = v;` over axis 1 of (n_blocks, k)."""
    m = np.zeros(values.shape[0], dtype=np.float32)
    for j in range(values.shape[1]):
        m = np.where(values[:, j] > m, values[:, j], m)
    return m


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 bytes of 8 six-bit scales and mins (quantize_row_q4_K_ref's packing, get_scale_min_k4's inverse)."""
    out = np.zeros((ls.shape[0], K_SCALE_SIZE), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _qkx_blocks(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[np.ndarray, ...]:
    """The part Q4_K and Q5_K share: (d bits, dmin bits, 12 scale bytes, levels (n_blocks, 256) 0..nmax)."""
    n = blocks.shape[0]
    x = _groups(blocks, 32)
    sum_x2 = seq_sum(x * x)
    av_x = np.sqrt(sum_x2 / F32(32))
    weights = av_x + np.abs(x)
    scales, mins, levels = _make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep)
    scales = scales.reshape(n, 8)
    mins = mins.reshape(n, 8)
    max_scale = _running_max(scales)
    max_min = _running_max(mins)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, ZERO)
        inv_min = np.where(max_min > 0, F32(63) / max_min, ZERO)
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d = fp16_bits(max_scale / F32(63))
    dmin = fp16_bits(max_min / F32(63))
    sub_d = (fp16_value(d)[:, None] * ls.astype(np.float32)).reshape(-1)
    sub_m = (fp16_value(dmin)[:, None] * lm.astype(np.float32)).reshape(-1)
    live = sub_d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int((x + sub_m) / sub_d), 0, nmax)
    levels = np.where(live, requant, levels)
    return d, dmin, _pack_scale_min_k4(ls, lm), _ungroup(levels, n)


def _q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, levels = _qkx_blocks(blocks, 15, -1.0, 0.1, 20)
    halves = levels.astype(np.uint8).reshape(-1, 4, 2, 32)
    qs = halves[:, :, 0, :] | (halves[:, :, 1, :] << 4)
    return bytes_of(d, dmin, scales, qs.reshape(-1, QK_K // 2))


def _q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, levels = _qkx_blocks(blocks, 31, -0.5, 0.1, 15)
    halves = levels.astype(np.uint8).reshape(-1, 4, 2, 32)  # (block, 64-chunk, low/high 32, lane)
    low = halves & 0xF
    qs = low[:, :, 0, :] | (low[:, :, 1, :] << 4)
    high = halves >> 4  # 0 or 1
    qh = np.zeros((halves.shape[0], 32), dtype=np.uint8)
    for chunk in range(4):
        qh |= high[:, chunk, 0, :] << (2 * chunk)
        qh |= high[:, chunk, 1, :] << (2 * chunk + 1)
    return bytes_of(d, dmin, scales, qh, qs.reshape(-1, QK_K // 2))


def _q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    x = _groups(blocks, 16)
    scales, levels = _make_qx_quants_rmse1(x, 32)
    scales = scales.reshape(n, 16)
    amax, max_scale = argmax_abs_first(scales.T)
    zero = amax < GROUP_MAX_EPS
    safe = np.where(zero, F32(1.0), max_scale)
    iscale = F32(-128) / safe
    d = fp16_bits(F32(1.0) / iscale)
    sc = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    sub_d = (fp16_value(d)[:, None] * sc.astype(np.float32)).reshape(-1)
    live = sub_d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int(x / sub_d), -32, 31) + 32
    levels = _ungroup(np.where(live, requant, levels), n).astype(np.uint8)
    q = levels.reshape(n, 2, 4, 32)  # (block, 128-half, quarter, lane)
    ql = np.empty((n, 2, 2, 32), dtype=np.uint8)
    ql[:, :, 0, :] = (q[:, :, 0, :] & 0xF) | ((q[:, :, 2, :] & 0xF) << 4)
    ql[:, :, 1, :] = (q[:, :, 1, :] & 0xF) | ((q[:, :, 3, :] & 0xF) << 4)
    qh = (q[:, :, 0, :] >> 4) | ((q[:, :, 1, :] >> 4) << 2) | ((q[:, :, 2, :] >> 4) << 4) | ((q[:, :, 3, :] >> 4) << 6)
    out = bytes_of(ql.reshape(n, 128), qh.reshape(n, 64), sc, d)
    out[zero] = 0
    return out


def _q3_k_blocks(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    x = _groups(blocks, 16)
    scales, levels = _make_q3_quants_rmse(x, 4)
    scales = scales.reshape(n, 16)
    _, max_scale = argmax_abs_first(scales.T)
    live_block = max_scale != 0
    safe = np.where(live_block, max_scale, F32(1.0))
    iscale = F32(-32) / safe
    l6 = np.clip(nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31).astype(np.int16) + 32
    l6 = np.where(live_block[:, None], l6, 0).astype(np.uint8)
    packed = np.zeros((n, K_SCALE_SIZE), dtype=np.uint8)
    packed[:, 0:8] = (l6[:, 0:8] & 0xF) | ((l6[:, 8:16] & 0xF) << 4)
    for j in range(16):
        packed[:, 8 + j % 4] |= (l6[:, j] >> 4) << (2 * (j // 4))
    d = np.where(live_block, fp16_bits(F32(1.0) / iscale), fp16_bits(ZERO))
    sc = l6.astype(np.float32) - F32(32)
    sc = np.where(live_block[:, None], sc, ZERO)  # C never reads the scales of a zero block: d is 0 there
    sub_d = (fp16_value(d)[:, None] * sc).reshape(-1)
    live = sub_d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int(x / sub_d), -4, 3) + 4
    levels = _ungroup(np.where(live, requant, levels), n).astype(np.uint8)
    high = levels > 3
    low = np.where(high, levels - 4, levels)
    hmask = np.zeros((n, 32), dtype=np.uint8)
    for bit in range(8):
        hmask |= high[:, 32 * bit : 32 * bit + 32].astype(np.uint8) << bit
    q = low.reshape(n, 2, 4, 32)
    qs = q[:, :, 0, :] | (q[:, :, 1, :] << 2) | (q[:, :, 2, :] << 4) | (q[:, :, 3, :] << 6)
    return bytes_of(hmask, qs.reshape(n, 64), packed, d)


# ---------------------------------------------------------------------------------------------------------------
# Public API: rows (2-D float32) -> block bytes

_BLOCK_FUNCTIONS: Mapping[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = MappingProxyType(
    {
        GGMLQuantizationType.Q4_0: _q4_0_blocks,
        GGMLQuantizationType.Q4_1: _q4_1_blocks,
        GGMLQuantizationType.Q5_0: _q5_0_blocks,
        GGMLQuantizationType.Q5_1: _q5_1_blocks,
        GGMLQuantizationType.Q8_0: _q8_0_blocks,
        GGMLQuantizationType.Q3_K: _q3_k_blocks,
        GGMLQuantizationType.Q4_K: _q4_k_blocks,
        GGMLQuantizationType.Q5_K: _q5_k_blocks,
        GGMLQuantizationType.Q6_K: _q6_k_blocks,
    }
)


def _check_rows(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """rows as a C-contiguous (n_blocks, block) float32 view, after the checks every backend shares."""
    block = GGML_QUANT_SIZES[qtype][0]
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ValueError(f"expected 2-D rows, got shape {rows.shape}")
    if rows.dtype != np.float32:
        raise TypeError(f"expected float32 rows, got {rows.dtype}")
    if rows.shape[1] % block:
        raise ValueError(f"row length {rows.shape[1]} is not a multiple of {qtype.name}'s block of {block}")
    return np.ascontiguousarray(rows).reshape(-1, block)


def _row_bytes(rows: np.ndarray, qtype: GGMLQuantizationType) -> int:
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    return np.shape(rows)[1] // block * block_bytes


def _quantize_rows_numpy(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """rows (n_rows, k) float32, k a multiple of qtype's block -> (n_rows, k/block*block_bytes) uint8."""
    blocks = _check_rows(rows, qtype)
    out = np.empty((blocks.shape[0], GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    step = CHUNK_VALUES // GGML_QUANT_SIZES[qtype][0]
    blocks_fn = _BLOCK_FUNCTIONS[qtype]
    # Overflow, 0/0 and the like happen in lanes C computes too (or in lanes masked out); IEEE gives both the
    # same values, so the warnings say nothing.
    with np.errstate(all="ignore"):
        for start in range(0, blocks.shape[0], step):
            out[start : start + step] = blocks_fn(blocks[start : start + step])
    return out.reshape(len(rows), _row_bytes(rows, qtype))


@cache
def jit_kernels() -> Mapping[GGMLQuantizationType, Callable[[np.ndarray, np.ndarray], None]] | None:
    """kquants_jit's kernels by type, or None when numba is not installed (or NUMBA_DISABLE_JIT is set, which
    would run them as plain Python). Imported on first use: numba takes ~0.5 s to import."""
    try:
        from numba.core import config

        from convert.containers.gguf.kquants_jit import q3_k_kernel, q4_k_kernel, q5_k_kernel, q6_k_kernel
        from convert.containers.gguf.legacy_quants_jit import (
            q4_0_kernel,
            q4_1_kernel,
            q5_0_kernel,
            q5_1_kernel,
            q8_0_kernel,
        )
    except ImportError:
        return None
    if config.DISABLE_JIT:
        return None
    return MappingProxyType(
        {
            GGMLQuantizationType.Q4_0: q4_0_kernel,
            GGMLQuantizationType.Q4_1: q4_1_kernel,
            GGMLQuantizationType.Q5_0: q5_0_kernel,
            GGMLQuantizationType.Q5_1: q5_1_kernel,
            GGMLQuantizationType.Q8_0: q8_0_kernel,
            GGMLQuantizationType.Q3_K: q3_k_kernel,
            GGMLQuantizationType.Q4_K: q4_k_kernel,
            GGMLQuantizationType.Q5_K: q5_k_kernel,
            GGMLQuantizationType.Q6_K: q6_k_kernel,
        }
    )


def _quantize_rows_jit(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The same bytes as _quantize_rows_numpy, from kquants_jit's compiled kernels (which release the GIL)."""
    kernels = jit_kernels()
    if kernels is None:
        raise RuntimeError("the jit backend needs numba (pip install numba)")
    blocks = writable(_check_rows(rows, qtype))
    out = np.empty((blocks.shape[0], GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    if blocks.shape[0]:
        kernels[qtype](blocks, out)
    return out.reshape(len(rows), _row_bytes(rows, qtype))


def _quantize_rows(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The jit backend when numba is there, else the numpy one: the same bytes either way."""
    if jit_kernels() is not None:
        return _quantize_rows_jit(rows, qtype)
    return _quantize_rows_numpy(rows, qtype)


BACKENDS: Mapping[str, Callable[[np.ndarray, GGMLQuantizationType], np.ndarray]] = MappingProxyType(
    {"auto": _quantize_rows, "numpy": _quantize_rows_numpy, "jit": _quantize_rows_jit}
)

# Each type's byte-exact quantizer (what llama-quantize writes for that type without an importance matrix): rows
# (n_rows, k) float32, k a multiple of the type's block -> (n_rows, k / block * block bytes) uint8.
QUANTIZERS: Mapping[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = MappingProxyType(
    {qtype: partial(_quantize_rows, qtype=qtype) for qtype in _BLOCK_FUNCTIONS}
)


def quantize(rows: np.ndarray, qtype: GGMLQuantizationType, *, backend: str = "auto") -> np.ndarray:
    """The block bytes ggml's reference quantizer of qtype writes for rows. backend: "jit" (numba, compiled
    kernels that release the GIL), "numpy" (the vectorized fallback) or "auto" (jit when numba imports)."""
    if qtype not in _BLOCK_FUNCTIONS:
        raise ValueError(f"no byte-exact quantizer for {GGMLQuantizationType(qtype).name}")
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown backend {backend!r}: one of {sorted(BACKENDS)}") from None
    return fn(rows, GGMLQuantizationType(qtype))


_PREPARED: set[GGMLQuantizationType] = set()


def prepare(qtype: GGMLQuantizationType) -> None:
    """Load qtype's compiled kernel into this process now, compiling it first where numba's cache has none. The
    plan calls this before the run's threads start: a worker busy compiling would not see a failure or a signal
    until it ends, where a run must stop within a second. A first compile runs in a child process
    (convert/common/jit.py); loading from the cache then takes a few tens of milliseconds. Nothing to do without
    numba."""
    kernels = jit_kernels()
    if kernels is None or qtype in _PREPARED:
        return
    block, size = GGML_QUANT_SIZES[qtype]
    if not in_cache(kernels[qtype], (np.zeros((1, block), np.float32), np.zeros((1, size), np.uint8))):
        compile_in_child(__name__, "_compile_here", qtype.name)
    _compile_here(qtype.name)  # from the cache; compiles here only if the child could not (then slowly, as before)
    _PREPARED.add(qtype)


def _compile_here(name: str) -> None:
    """Call qtype's kernel once, which loads (or compiles and caches) it. Also the child process's entry point."""
    qtype = GGMLQuantizationType[name]
    _quantize_rows_jit(np.zeros((1, GGML_QUANT_SIZES[qtype][0]), dtype=np.float32), qtype)
