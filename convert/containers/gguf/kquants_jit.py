"""ggml's K-quant reference quantizers compiled with numba: the same bytes as kquants.py's numpy code, 2-5x faster.

A port of ggml-quants.c's C loops (quantize_row_<type>_ref, make_qx_quants, make_q3_quants, make_qkx2_quants;
convert/containers/gguf/kquants.py's docstring gives every rule and source): Q3_K and Q6_K line by line, one block
after another; Q4_K and Q5_K with make_qkx2_quants run on 64 sub-blocks side by side (see LANES), each lane's
arithmetic C's. The legacy types are in legacy_quants_jit.py. What keeps the bytes ggml's:
- float32 everywhere, in C's order. Every constant is an np.float32 global (numba would widen float32 * a Python
  float to float64), every int -> float conversion is written where C makes it (`w*l` is `w * F32(l)`), and
  sums accumulate one element at a time from +0.0.
- No fused multiply-add: fastmath is off, so LLVM has no licence to contract a*b + c (tests/test_kquants_jit.py
  reads the generated assembly of every kernel and finds no vfmadd/vfmsub/vfnmadd instruction).
- nearest_int is ggml's bit trick (add 12582912.f, keep the low 23 bits of the pattern, minus 2^22), fp32 -> fp16
  is ggml's scalar GGML_COMPUTE_FP32_TO_FP16 (round to nearest even, subnormals, overflow to inf), fp16 -> fp32
  is exact; the float <-> bits reinterpretations are LLVM bitcasts (_bits_of, _float_of).
- C's float -> small-int conversions: a float -> int64 truncation, then the modular wrap to 8 bits that gcc's
  `(int8_t)` / `(uint8_t)` gives on x86 (only values out of range, such as inf from a subnormal scale, wrap).

Each kernel takes (n_blocks, block values) float32 and fills (n_blocks, block bytes) uint8. They release the GIL
(nogil) so that threads quantizing different rows run in parallel, and are compiled on first use, once per
machine: cache=True keeps the machine code in __pycache__ next to this file or, when that is not writable, in
numba's per-user cache directory (NUMBA_CACHE_DIR, else ~/.cache/numba-style locations).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_JIT = {"nogil": True, "cache": True, "fastmath": False, "error_model": "numpy"}
_INLINE = {**_JIT, "inline": "always"}

F32 = np.float32
ZERO = F32(0.0)
ONE = F32(1.0)
MAGIC = F32(12582912.0)  # 1.5 * 2^23
GROUP_MAX_EPS = F32(1e-15)
FLT_MAX = F32(np.finfo(np.float32).max)
SCALE_TO_INF = F32(2.0**112)
SCALE_TO_ZERO = F32(2.0**-110)
TWO_POW_M24 = F32(2.0**-24)
HALF = F32(0.5)
F0_1 = F32(0.1)
F32_32 = F32(32.0)
F63 = F32(63.0)
QK_K = 256


# ---------------------------------------------------------------------------------------------------------------
# Scalar rules


@intrinsic
def _bits_of(typingctx, value):  # type: ignore[no-untyped-def]
    """The int32 bit pattern of a float32 (C's memcpy(&i, &f, 4))."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _float_of(typingctx, bits):  # type: ignore[no-untyped-def]
    """The float32 whose bit pattern is an int32."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(**_INLINE)
def _nearest_int(v: np.float32) -> int:
    """ggml's nearest_int: the low 23 bits of (v + 12582912.f), minus 2^22."""
    return (np.int64(_bits_of(v + MAGIC)) & 0x007FFFFF) - 0x00400000


@njit(**_INLINE)
def _fp16(f: np.float32) -> int:
    """GGML_COMPUTE_FP32_TO_FP16 (ggml-impl.h's scalar version): fp16 bits, round to nearest even."""
    base = (abs(f) * SCALE_TO_INF) * SCALE_TO_ZERO
    w = np.int64(_bits_of(f)) & 0xFFFFFFFF
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = _float_of(np.int32(((bias >> 1) + 0x07800000) & 0x7FFFFFFF)) + base
    bits = np.int64(_bits_of(base)) & 0xFFFFFFFF
    nonsign = ((bits >> 13) & 0x00007C00) + (bits & 0x00000FFF)
    return (sign >> 16) | (0x7E00 if shl1_w > 0xFF000000 else nonsign)


@njit(**_INLINE)
def _fp16_value(h: int) -> np.float32:
    """GGML_FP16_TO_FP32 (exact)."""
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent != 0:
        biased = 255 if exponent == 31 else exponent + 112  # inf and NaN stay inf and NaN
        return _float_of(np.int32(((h & 0x8000) << 16) | (biased << 23) | (mantissa << 13)))
    value = F32(mantissa) * TWO_POW_M24
    return -value if h & 0x8000 else value


@njit(**_INLINE)
def _put16(out: np.ndarray, at: int, h: int) -> None:
    out[at] = h & 0xFF
    out[at + 1] = (h >> 8) & 0xFF


@njit(**_INLINE)
def _to_int8(v: int) -> int:
    """C's conversion of an int to int8_t (modular)."""
    return ((v + 128) & 0xFF) - 128


@njit(**_INLINE)
def _trunc_int(f: np.float32) -> int:
    """C's float -> int conversion (toward zero)."""
    return np.int64(f)


@njit(**_INLINE)
def _signed_amax(x: np.ndarray, off: int, n: int) -> tuple[np.float32, np.float32]:
    """C's `if (ax > amax) { amax = ax; max = x[i]; }` from 0 over x[off:off+n]: the largest magnitude, and the
    first value that has it (signed)."""
    amax = ZERO
    vmax = ZERO
    for i in range(n):
        ax = abs(x[off + i])
        if ax > amax:
            amax = ax
            vmax = x[off + i]
    return amax, vmax


# ---------------------------------------------------------------------------------------------------------------
# Level searches (ggml-quants.c), over x[off:off+n]


@njit(**_JIT)
def _make_qx_quants_rmse1(x: np.ndarray, off: int, n: int, nmax: int, big_l: np.ndarray) -> np.float32:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL): levels into big_l[off:off+n], returns the scale."""
    amax, vmax = _signed_amax(x, off, n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            big_l[off + i] = 0
        return ZERO
    iscale = F32(-nmax) / vmax
    sumlx = ZERO
    suml2 = ZERO
    for i in range(n):
        xi = x[off + i]
        lv = max(-nmax, min(nmax - 1, _nearest_int(iscale * xi)))
        big_l[off + i] = lv + nmax
        w = xi * xi
        fl = F32(lv)
        sumlx += w * xi * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != ZERO else ZERO
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F0_1 * F32(step)) / vmax
        sumlx = ZERO
        suml2 = ZERO
        for i in range(n):
            xi = x[off + i]
            fl = F32(max(-nmax, min(nmax - 1, _nearest_int(iscale * xi))))
            w = xi * xi
            sumlx += w * xi * fl
            suml2 += w * fl * fl
        if suml2 > ZERO and sumlx * sumlx > best * suml2:
            for i in range(n):
                big_l[off + i] = nmax + max(-nmax, min(nmax - 1, _nearest_int(iscale * x[off + i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(**_JIT)
def _make_q3_quants_rmse(x: np.ndarray, off: int, n: int, nmax: int, big_l: np.ndarray) -> np.float32:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): levels into big_l[off:off+n], returns the scale."""
    amax, vmax = _signed_amax(x, off, n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            big_l[off + i] = 0
        return ZERO
    iscale = F32(-nmax) / vmax
    sumlx = ZERO
    suml2 = ZERO
    for i in range(n):
        xi = x[off + i]
        lv = max(-nmax, min(nmax - 1, _nearest_int(iscale * xi)))
        big_l[off + i] = lv
        w = xi * xi
        fl = F32(lv)
        sumlx += w * xi * fl
        suml2 += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            xi = x[off + i]
            w = xi * xi
            li = F32(big_l[off + i])
            slx = sumlx - w * xi * li
            if slx > ZERO:
                sl2 = suml2 - w * li * li
                new_l = max(-nmax, min(nmax - 1, _nearest_int(xi * sl2 / slx)))
                if new_l != big_l[off + i]:
                    fl = F32(new_l)
                    slx += w * xi * fl
                    sl2 += w * fl * fl
                    if sl2 > ZERO and slx * slx * suml2 > sumlx * sumlx * sl2:
                        big_l[off + i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        big_l[off + i] += nmax
    return sumlx / suml2 if suml2 > ZERO else ZERO


# ---------------------------------------------------------------------------------------------------------------
# K-quant kernels: blocks (n_blocks, 256) float32 -> out (n_blocks, block bytes) uint8


# Q4_K and Q5_K: make_qkx2_quants runs on LANES sub-blocks side by side (those of LANES // 8 blocks), each lane's
# arithmetic exactly C's; the loops over lanes have no dependence between iterations, so LLVM vectorizes them
# (8 float32 per AVX2 instruction) where C's single sub-block waits on each add of its sums.
LANES = 64
_STATE = 14  # per-lane float32 state of _make_qkx2_lanes


@njit(**_JIT)
def _make_qkx2_lanes(
    xt: np.ndarray,
    wt: np.ndarray,
    nmax: int,
    rmin: np.float32,
    rdelta: np.float32,
    nstep: int,
    big_l: np.ndarray,
    laux: np.ndarray,
    st: tuple[np.ndarray, ...],
) -> None:
    """make_qkx2_quants(32, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad=false) on each
    column of xt (32, LANES) with weights wt: levels into big_l, the scale into st[5], the min (-the_min) in st[0]."""
    lo, hi, sum_w, sum_x, iscale, scale, best, sum_l, sum_l2, sum_xl, this_scale, this_min, cur, live = st
    for g in range(LANES):
        lo[g] = xt[0, g]
        hi[g] = xt[0, g]
        sum_w[g] = wt[0, g]
        sum_x[g] = wt[0, g] * xt[0, g]
    for i in range(1, 32):
        for g in range(LANES):
            xi = xt[i, g]
            lo[g] = xi if xi < lo[g] else lo[g]
            hi[g] = xi if xi > hi[g] else hi[g]
            w = wt[i, g]
            sum_w[g] += w
            sum_x[g] += w * xi
    fmax = F32(nmax)
    for g in range(LANES):
        lo[g] = ZERO if lo[g] > ZERO else lo[g]
        iscale[g] = fmax / (hi[g] - lo[g])  # C returns before this when max == min: such a lane is never kept
        scale[g] = ONE / iscale[g]
        best[g] = ZERO
    for i in range(32):
        for g in range(LANES):
            xi = xt[i, g]
            lv = max(0, min(nmax, _nearest_int(iscale[g] * (xi - lo[g]))))
            big_l[i, g] = lv
            diff = scale[g] * F32(lv) + lo[g] - xi
            best[g] += wt[i, g] * (diff * diff)
    for step in range(nstep + 1):
        factor = rmin + rdelta * F32(step) + fmax
        for g in range(LANES):
            iscale[g] = factor / (hi[g] - lo[g])
            sum_l[g] = ZERO
            sum_l2[g] = ZERO
            sum_xl[g] = ZERO
        for i in range(32):
            for g in range(LANES):
                xi = xt[i, g]
                lv = max(0, min(nmax, _nearest_int(iscale[g] * (xi - lo[g]))))
                laux[i, g] = lv
                w = wt[i, g]
                fl = F32(lv)
                sum_l[g] += w * fl
                sum_l2[g] += w * fl * fl
                sum_xl[g] += w * fl * xi
        for g in range(LANES):
            det = sum_w[g] * sum_l2[g] - sum_l[g] * sum_l[g]
            ts = (sum_w[g] * sum_xl[g] - sum_x[g] * sum_l[g]) / det
            tm = (sum_l2[g] * sum_x[g] - sum_l[g] * sum_xl[g]) / det
            clamp = tm > ZERO
            this_scale[g] = sum_xl[g] / sum_l2[g] if clamp else ts
            this_min[g] = ZERO if clamp else tm
            live[g] = ONE if (det > ZERO and hi[g] != lo[g]) else ZERO  # C: `if (D > 0)`, and not flat
            cur[g] = ZERO
        for i in range(32):
            for g in range(LANES):
                diff = this_scale[g] * F32(laux[i, g]) + this_min[g] - xt[i, g]
                cur[g] += wt[i, g] * (diff * diff)
        for g in range(LANES):
            better = live[g] != ZERO and cur[g] < best[g]
            live[g] = ONE if better else ZERO
            best[g] = cur[g] if better else best[g]
            scale[g] = this_scale[g] if better else scale[g]
            lo[g] = this_min[g] if better else lo[g]
        for i in range(32):
            for g in range(LANES):
                big_l[i, g] = laux[i, g] if live[g] != ZERO else big_l[i, g]
    for g in range(LANES):
        if hi[g] == lo[g]:  # max == min (lo was never updated in such a lane): L = 0, scale 0, the_min = -min
            scale[g] = ZERO
            for i in range(32):
                big_l[i, g] = 0


@njit(**_JIT)
def _qkx_kernel(
    blocks: np.ndarray, out: np.ndarray, nmax: int, rmin: np.float32, rdelta: np.float32, nstep: int
) -> None:
    """quantize_row_q4_K_ref (nmax 15) / _q5_K_ref (nmax 31), LANES // 8 blocks at a time."""
    per_chunk = LANES // 8
    xt = np.empty((32, LANES), dtype=np.float32)
    wt = np.empty((32, LANES), dtype=np.float32)
    big_l = np.empty((32, LANES), dtype=np.int32)
    laux = np.empty((32, LANES), dtype=np.int32)
    st = (
        np.empty(LANES, np.float32), np.empty(LANES, np.float32), np.empty(LANES, np.float32),
        np.empty(LANES, np.float32), np.empty(LANES, np.float32), np.empty(LANES, np.float32),
        np.empty(LANES, np.float32), np.empty(LANES, np.float32), np.empty(LANES, np.float32),
        np.empty(LANES, np.float32), np.empty(LANES, np.float32), np.empty(LANES, np.float32),
        np.empty(LANES, np.float32), np.empty(LANES, np.float32),
    )  # fmt: skip
    sum_x2 = np.empty(LANES, dtype=np.float32)
    qh = np.empty(32, dtype=np.int64)
    for b0 in range(0, blocks.shape[0], per_chunk):
        n_here = min(per_chunk, blocks.shape[0] - b0)
        xt[:] = ZERO  # a last, partial chunk computes zero lanes whose results go nowhere
        for bb in range(n_here):
            for j in range(8):
                for i in range(32):
                    xt[i, 8 * bb + j] = blocks[b0 + bb, 32 * j + i]
        for g in range(LANES):
            sum_x2[g] = ZERO
        for i in range(32):
            for g in range(LANES):
                sum_x2[g] += xt[i, g] * xt[i, g]
        for g in range(LANES):
            sum_x2[g] = np.sqrt(sum_x2[g] / F32_32)  # av_x
        for i in range(32):
            for g in range(LANES):
                wt[i, g] = sum_x2[g] + abs(xt[i, g])
        _make_qkx2_lanes(xt, wt, nmax, rmin, rdelta, nstep, big_l, laux, st)
        scales = st[5]
        lows = st[0]
        for bb in range(n_here):
            x = blocks[b0 + bb]
            y = out[b0 + bb]
            max_scale = ZERO
            max_min = ZERO
            for j in range(8):
                if scales[8 * bb + j] > max_scale:
                    max_scale = scales[8 * bb + j]
                if -lows[8 * bb + j] > max_min:
                    max_min = -lows[8 * bb + j]
            inv_scale = F63 / max_scale if max_scale > ZERO else ZERO
            inv_min = F63 / max_min if max_min > ZERO else ZERO
            d = _fp16(max_scale / F63)
            dmin = _fp16(max_min / F63)
            _put16(y, 0, d)
            _put16(y, 2, dmin)
            d_value = _fp16_value(d)
            dmin_value = _fp16_value(dmin)
            y[4:16] = 0
            for j in range(8):
                g = 8 * bb + j
                ls = min(63, _nearest_int(inv_scale * scales[g]) & 0xFF)
                lm = min(63, _nearest_int(inv_min * -lows[g]) & 0xFF)
                if j < 4:
                    y[4 + j] = ls
                    y[8 + j] = lm
                else:
                    y[8 + j] = (ls & 0xF) | ((lm & 0xF) << 4)
                    y[j] |= (ls >> 4) << 6
                    y[4 + j] |= (lm >> 4) << 6
                sub_d = d_value * F32(ls)
                if sub_d == ZERO:
                    continue
                sub_m = dmin_value * F32(lm)
                for i in range(32):
                    big_l[i, g] = max(0, min(nmax, _nearest_int((x[32 * j + i] + sub_m) / sub_d)))
            if nmax == 15:  # Q4_K: qs[32*c + i] = L[64*c + i] | L[64*c + 32 + i] << 4
                for c in range(4):
                    for i in range(32):
                        y[16 + 32 * c + i] = big_l[i, 8 * bb + 2 * c] | (big_l[i, 8 * bb + 2 * c + 1] << 4)
                continue
            qh[:] = 0  # Q5_K: the fifth bits in qh (bits 2c and 2c+1), the low nibbles in qs
            for c in range(4):
                for i in range(32):
                    l1 = big_l[i, 8 * bb + 2 * c]
                    l2 = big_l[i, 8 * bb + 2 * c + 1]
                    qh[i] |= ((l1 >> 4) << (2 * c)) | ((l2 >> 4) << (2 * c + 1))
                    y[48 + 32 * c + i] = (l1 & 0xF) | ((l2 & 0xF) << 4)
            for i in range(32):
                y[16 + i] = qh[i]


@njit(**_JIT)
def q4_k_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    _qkx_kernel(blocks, out, 15, F32(-1.0), F0_1, 20)


@njit(**_JIT)
def q5_k_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    _qkx_kernel(blocks, out, 31, F32(-0.5), F0_1, 15)


@njit(**_JIT)
def q6_k_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    big_l = np.empty(QK_K, dtype=np.int64)
    scales = np.empty(16, dtype=np.float32)
    for b in range(blocks.shape[0]):
        x = blocks[b]
        y = out[b]
        max_scale = ZERO
        max_abs_scale = ZERO
        for ib in range(16):
            scale = _make_qx_quants_rmse1(x, 16 * ib, 16, 32, big_l)
            scales[ib] = scale
            if abs(scale) > max_abs_scale:
                max_abs_scale = abs(scale)
                max_scale = scale
        if max_abs_scale < GROUP_MAX_EPS:
            y[:] = 0
            continue
        iscale = F32(-128.0) / max_scale
        d = _fp16(ONE / iscale)
        d_value = _fp16_value(d)
        for j in range(16):
            sc = _to_int8(min(127, _nearest_int(iscale * scales[j])))
            y[192 + j] = sc & 0xFF
            sub_d = d_value * F32(sc)
            if sub_d == ZERO:
                continue
            for i in range(16):
                big_l[16 * j + i] = max(-32, min(31, _nearest_int(x[16 * j + i] / sub_d))) + 32
        _put16(y, 208, d)
        for half in range(2):
            lv = big_l[128 * half : 128 * half + 128]
            for i in range(32):
                y[64 * half + i] = (lv[i] & 0xF) | ((lv[i + 64] & 0xF) << 4)
                y[64 * half + 32 + i] = (lv[i + 32] & 0xF) | ((lv[i + 96] & 0xF) << 4)
                y[128 + 32 * half + i] = (
                    (lv[i] >> 4) | ((lv[i + 32] >> 4) << 2) | ((lv[i + 64] >> 4) << 4) | ((lv[i + 96] >> 4) << 6)
                )


@njit(**_JIT)
def q3_k_kernel(blocks: np.ndarray, out: np.ndarray) -> None:
    big_l = np.empty(QK_K, dtype=np.int64)
    scales = np.empty(16, dtype=np.float32)
    packed = np.empty(12, dtype=np.int64)
    for b in range(blocks.shape[0]):
        x = blocks[b]
        y = out[b]
        max_scale = ZERO
        amax = ZERO
        for j in range(16):
            scales[j] = _make_q3_quants_rmse(x, 16 * j, 16, 4, big_l)
            if abs(scales[j]) > amax:
                amax = abs(scales[j])
                max_scale = scales[j]
        packed[:] = 0
        d = 0
        if max_scale != ZERO:
            iscale = F32(-32.0) / max_scale
            for j in range(16):
                lv = max(-32, min(31, _to_int8(_nearest_int(iscale * scales[j])))) + 32
                if j < 8:
                    packed[j] = lv & 0xF
                else:
                    packed[j - 8] |= (lv & 0xF) << 4
                packed[j % 4 + 8] |= (lv >> 4) << (2 * (j // 4))
            d = _fp16(ONE / iscale)
        d_value = _fp16_value(d)
        for j in range(16):
            sc = packed[j] & 0xF if j < 8 else packed[j - 8] >> 4
            sc = (sc | (((packed[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
            sub_d = d_value * F32(sc)
            if sub_d == ZERO:
                continue
            for i in range(16):
                big_l[16 * j + i] = max(-4, min(3, _nearest_int(x[16 * j + i] / sub_d))) + 4
        for i in range(32):
            hm = 0
            for bit in range(8):
                if big_l[32 * bit + i] > 3:
                    hm |= 1 << bit
                    big_l[32 * bit + i] -= 4
            y[i] = hm
        for half in range(2):
            for i in range(32):
                at = 128 * half + i
                y[32 + 32 * half + i] = (
                    big_l[at] | (big_l[at + 32] << 2) | (big_l[at + 64] << 4) | (big_l[at + 96] << 6)
                ) & 0xFF
        for j in range(12):
            y[96 + j] = packed[j] & 0xFF
        _put16(y, 108, d)
