"""Element conversion a slice at a time (F32/F16/BF16/Q8_0), exactly as llama.cpp's converter computes it,
with a cache-sized fast path and the reference it falls back to.

Part of the GGUF container (convert/containers/gguf/): see its __init__ for the sources of every fact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from convert.common.errors import ConvertError
from convert.containers.gguf.kquants import quantize
from convert.containers.gguf.quant_mix import CHOSEN
from convert.containers.gguf.types import _NUMPY_OF_DTYPE, BF16, DTYPE_OF_GGML, F16, F32, Q8_0, Q8_BLOCK, Q8_BLOCK_BYTES


def _as_float32(data: Any, src_dtype: str) -> np.ndarray:
    """The slice's elements as float32: exact for all three types (bf16 is the top half of a float32)."""
    try:
        dtype = _NUMPY_OF_DTYPE[src_dtype]
    except KeyError:
        raise ValueError(f"no GGUF conversion from {src_dtype}") from None
    raw = np.frombuffer(data, dtype=dtype)
    if src_dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits as gguf-py's quants.BF16 (= ggml_compute_fp32_to_bf16): a NaN keeps its sign and top
    payload bits and is made quiet; everything else is rounded to nearest, ties to even."""
    bits = values.view(np.uint32)
    bits = np.where((bits & 0x7FFFFFFF) > 0x7F800000, (bits & np.uint32(0xFFFF0000)) | np.uint32(0x00400000), bits)
    rounded = (bits.astype(np.uint64) + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return rounded.astype(np.uint16)


def _round_half_away(values: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero, in float32 exactly as gguf-py's np_roundf (ggml's roundf)."""
    magnitude = np.abs(values)
    floored = np.floor(magnitude)
    return np.sign(values) * (floored + np.floor(2 * (magnitude - floored)))


def _quantize_q8_0(values: np.ndarray, tensor: str, file: str | None, first: int = 0) -> np.ndarray:
    """Q8_0 blocks as gguf-py's quants.Q8_0.quantize_blocks (bit-exact with ggml's reference quantize_row_q8_0):
    d = max|x| / 127 in float32, stored as float16; q = round(x * (1/d)), 0 where d = 0; 2 + 32 bytes a block."""
    blocks = values.reshape(-1, Q8_BLOCK)
    if not np.isfinite(blocks).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise ConvertError(
            f"value {values[bad]} at element {first + bad} cannot be quantized to Q8_0; the checkpoint holds "
            "NaN or infinite weights",
            file=file,
            tensor=tensor,
        )
    # A block whose largest magnitude is a float32 denormal has 1/d = inf, as in gguf-py and ggml's C reference:
    # the same operations give the same bytes, so the warnings numpy raises on the way are silenced.
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        scale = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
        inverse = np.where(scale == 0, np.float32(0), np.float32(1) / scale)
        quants = _round_half_away(blocks * inverse).astype(np.int8)
        scale16 = scale.astype(np.float16)
    if np.isinf(scale16).any():
        bad = int(np.flatnonzero(np.isinf(scale16))[0])
        raise ConvertError(
            f"a Q8_0 block's scale overflows float16 (max |x| = {float(scale[bad, 0]) * 127:g} in the block at "
            f"element {first + bad * Q8_BLOCK}); use --outtype f32 or bf16",
            file=file,
            tensor=tensor,
        )
    out = np.empty((blocks.shape[0], Q8_BLOCK_BYTES), dtype=np.uint8)
    out[:, :2] = scale16.view(np.uint8)
    out[:, 2:] = quants.view(np.uint8)
    return out.reshape(-1)


def convert_elements(
    data: Any,
    src_dtype: str,
    dst: GGMLQuantizationType,
    *,
    tensor: str,
    file: str | None = None,
    first_element: int = 0,
) -> np.ndarray:
    """convert_elements_reference's bytes, computed SUB_SLICE elements at a time in three scratch arrays reused
    for every step (in cache, no page faults for fresh temporaries) with fewer passes. Each call makes its own
    scratch (under 1 MiB), so the stream's workers can convert two slices of one tensor at once. Whatever the
    fast path does not handle exactly as the reference (NaN or infinity anywhere, a value that overflows, a Q8_0
    block whose scale is a denormal with an infinite inverse) sends the whole slice to the reference, so results
    and error lines are its own."""
    if dst in BLOCK_QUANTIZED:
        return _quantize_blocks(_as_float32(data, src_dtype), dst, tensor, file, first_element)
    if dst in (F16, BF16, Q8_0) and src_dtype in _NUMPY_OF_DTYPE:
        fast = _convert_fast(data, src_dtype, dst)
        if fast is not None:
            return fast
    return convert_elements_reference(data, src_dtype, dst, tensor=tensor, file=file, first_element=first_element)


# llama-quantize's types besides Q8_0 (which has the converter's path above): ggml's reference quantizers.
BLOCK_QUANTIZED = frozenset(CHOSEN - {Q8_0})


def _quantize_blocks(
    values: np.ndarray, dst: GGMLQuantizationType, tensor: str, file: str | None, first: int
) -> np.ndarray:
    """A slice of whole blocks quantized as llama-quantize does (kquants.py: ggml's reference quantizers, byte for
    byte). Blocks are independent, so slices are too. A NaN or infinity is refused naming the tensor: ggml's
    quantizers give such a block meaningless scales (or assert), and llama-quantize's validation would reject it."""
    block = GGML_QUANT_SIZES[dst][0]
    if values.size % block:
        raise ValueError(f"a {dst.name} slice must hold whole blocks of {block}, got {values.size} elements")
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ConvertError(
            f"value {values[bad]} at element {first + bad} cannot be quantized to {dst.name}; the checkpoint holds "
            "NaN or infinite weights",
            file=file,
            tensor=tensor,
        )
    return quantize(values.reshape(-1, block), dst).reshape(-1)


def convert_elements_reference(
    data: Any,
    src_dtype: str,
    dst: GGMLQuantizationType,
    *,
    tensor: str,
    file: str | None = None,
    first_element: int = 0,
) -> np.ndarray:
    """A slice of a tensor's source elements (little-endian F32, F16 or BF16 bytes) converted to dst, as a uint8
    array of converted_nbytes(n, dst) bytes. Every type goes through float32 as llama.cpp's converter does (it
    casts anything that is not f16/f32 to float32 first; f16 -> f32 is exact). F16 rounds as numpy's astype does
    (gguf.quants.quantize uses it), BF16 and Q8_0 as gguf-py's quantizers. For Q8_0 the slice must hold whole
    32-element blocks and start at a block boundary, so slices convert independently.

    A finite value that becomes infinite (beyond float16's 65504, or bfloat16's range for an F32 source) raises a
    ConvertError naming the tensor: a cast that silently loses a value is not allowed. So does a NaN or infinity
    to be quantized to Q8_0 (its block's scale would be meaningless), and a Q8_0 scale beyond float16. Messages
    count elements from first_element, the slice's position in the tensor."""
    values = _as_float32(data, src_dtype)
    if dst == F32:
        return values.view(np.uint8)
    if dst == F16:
        with np.errstate(over="ignore"):
            half = values.astype(np.float16)
        _check_overflow(values, np.isinf(half), "F16", tensor, file, first_element)
        return half.view(np.uint8)
    if dst == BF16:
        bits = _bf16_bits(values)
        _check_overflow(values, (bits & 0x7FFF) == 0x7F80, "BF16", tensor, file, first_element)
        return bits.view(np.uint8)
    if dst == Q8_0:
        if values.size % Q8_BLOCK:
            raise ValueError(f"a Q8_0 slice must hold whole blocks of {Q8_BLOCK}, got {values.size} elements")
        return _quantize_q8_0(values, tensor, file, first_element)
    raise ValueError(f"no conversion to {dst.name}")


# Elements a step of _convert_fast: its scratch (12 bytes an element) and the step's source and output stay
# within a core's 512 KiB L2 and the shared L3; smaller steps pay numpy's per-call overhead (measured 8K-128K).
SUB_SLICE = 65536
_ABS32 = np.uint32(0x7FFFFFFF)
_INF32 = 0x7F800000
_SIGN32 = np.uint32(0x80000000)
# The float32 just below 0.5: trunc(p + copysign(_NEAR_HALF, p)) is round half away from zero for |p| < 2**22
# (p + 0.5 itself rounds 0.49999997 up to 1.0); exactly ggml's roundf for every finite Q8_0 product.
_NEAR_HALF = np.float32(np.nextafter(np.float32(0.5), np.float32(0)))
_NEAR_HALF_BITS = np.uint32(_NEAR_HALF.view(np.uint32))


def _convert_fast(data: Any, src_dtype: str, dst: GGMLQuantizationType) -> np.ndarray | None:
    """convert_elements for finite values that fit, or None where the reference must decide (see there)."""
    raw = np.frombuffer(data, dtype=_NUMPY_OF_DTYPE[src_dtype])
    n = raw.size
    if not n or (dst == Q8_0 and n % Q8_BLOCK):
        return None  # the reference refuses a partial Q8_0 block
    sub = min(SUB_SLICE, n)
    # Scratch, reused for every step: the float32 values, their bits' magnitudes, and one float32 temporary.
    values = np.zeros(sub, dtype=np.uint32)  # a bf16 source writes only the high halves: the low ones stay 0
    magnitude = np.empty(sub, dtype=np.uint32)
    work = np.empty(sub, dtype=np.float32)
    shape = (n // Q8_BLOCK, Q8_BLOCK_BYTES) if dst == Q8_0 else (n,)
    out = np.empty(shape, dtype=np.uint8 if dst == Q8_0 else np.uint16)
    for start in range(0, n, sub):
        part = raw[start : start + sub]
        k = part.size
        bits = values[:k]
        if src_dtype == "BF16":
            bits.view(np.uint16)[1::2] = part  # little-endian: the bf16 bits are the float32's top half
        else:
            bits.view(np.float32)[:] = part  # F16 -> F32 is exact; F32 is copied
        x = bits.view(np.float32)
        mag = np.bitwise_and(bits, _ABS32, out=magnitude[:k])
        if dst == Q8_0:
            blocks = k // Q8_BLOCK
            # The block maxima of the magnitudes' bits: the largest |x| as the reference's np.abs().max() finds it,
            # and at or above +inf's bits where a block holds a NaN or an infinity (the reference's finiteness check).
            top = mag.reshape(blocks, Q8_BLOCK).max(axis=1)
            if int(top.max()) >= _INF32:
                return None
            with np.errstate(divide="ignore", over="ignore"):
                scale = top.view(np.float32) / np.float32(127)
                inverse = np.where(scale == 0, np.float32(0), np.float32(1) / scale)
                scale16 = scale.astype(np.float16)
            if not np.isfinite(inverse).all() or np.isinf(scale16).any():
                return None  # a denormal block maximum (1/d = inf, NaN quants) or a scale beyond float16
            product = np.multiply(x.reshape(blocks, Q8_BLOCK), inverse[:, None], out=work[:k].reshape(blocks, -1))
            # product + copysign(_NEAR_HALF, product), the sign taken from the bits (np.copysign is slower).
            half = np.bitwise_and(product.view(np.uint32).reshape(-1), _SIGN32, out=magnitude[:k])
            np.bitwise_or(half, _NEAR_HALF_BITS, out=half)
            np.add(product.reshape(-1), half.view(np.float32), out=product.reshape(-1))
            rows = out[start // Q8_BLOCK : start // Q8_BLOCK + blocks]
            rows[:, :2] = scale16.view(np.uint8).reshape(blocks, 2)
            # float32 -> int8 truncates toward zero, as the reference's astype does; through an int8 view, since a
            # negative float cast to an unsigned type is undefined in C (a SIMD cast may saturate it to 0).
            rows[:, 2:].view(np.int8)[...] = product
        elif dst == F16:
            if int(mag.max()) >= _INF32:
                return None
            half16 = out[start : start + k]
            with np.errstate(over="ignore"):
                half16.view(np.float16)[:] = x
            # An infinity in the result (the source has no NaN or infinity here) is an overflow the reference reports.
            if int(np.bitwise_and(half16, np.uint16(0x7FFF), out=magnitude.view(np.uint16)[:k]).max()) >= 0x7C00:
                return None
        else:  # BF16: round to nearest even, as _bf16_bits (no NaN here, so uint32 cannot overflow: -inf + 0x8000)
            if int(mag.max()) >= _INF32:
                return None
            rounded = np.right_shift(bits, 16, out=magnitude[:k])
            np.bitwise_and(rounded, np.uint32(1), out=rounded)
            np.add(rounded, np.uint32(0x7FFF), out=rounded)
            np.add(rounded, bits, out=rounded)
            np.right_shift(rounded, 16, out=rounded)
            out[start : start + k] = rounded
            if int(np.bitwise_and(out[start : start + k], np.uint16(0x7FFF)).max()) >= 0x7F80:
                return None  # an F32 value beyond bfloat16's range: the reference reports it
    return out.reshape(-1).view(np.uint8)


def _check_overflow(
    values: np.ndarray, infinite: np.ndarray, name: str, tensor: str, file: str | None, first: int = 0
) -> None:
    lost = infinite & np.isfinite(values)
    if lost.any():
        index = int(np.flatnonzero(lost)[0])
        raise ConvertError(
            f"value {float(values[index]):g} at element {first + index} overflows {name} (it would become infinite); "
            "choose an outtype that holds it (f32, or bf16 for a bf16 checkpoint)",
            file=file,
            tensor=tensor,
        )


def restore_elements(
    data: Any,
    src: GGMLQuantizationType,
    dst_dtype: str,
    *,
    tensor: str,
    first_element: int = 0,
    file: str | None = None,
) -> np.ndarray:
    """A slice of a GGUF tensor's elements (F32, F16 or BF16) back in the checkpoint's dtype, as uint8 bytes: only
    where every value is exactly representable (llama.cpp's F32 norms and router of a bf16 model hold bf16 values,
    so they go back bit for bit). Otherwise a ConvertError names the tensor and the first value that would change
    (first_element is the slice's position in the tensor, for that message). NaN payloads count as values."""
    src_dtype = DTYPE_OF_GGML.get(src)
    if src_dtype is None:
        raise ValueError(f"no conversion from {src.name}")
    if src_dtype == dst_dtype:
        return np.frombuffer(data, dtype=np.uint8)
    values = _as_float32(data, src_dtype)
    if dst_dtype == "F32":
        return values.view(np.uint8)
    if dst_dtype == "BF16":
        bits = values.view(np.uint32)
        out = (bits >> 16).astype(np.uint16)
        changed = (bits & 0xFFFF) != 0
    elif dst_dtype == "F16":
        with np.errstate(over="ignore"):
            out = values.astype(np.float16)
        back = out.astype(np.float32)
        changed = back.view(np.uint32) != values.view(np.uint32)
    else:
        raise ValueError(f"no conversion to {dst_dtype}")
    if changed.any():
        index = int(np.flatnonzero(changed)[0])
        raise ConvertError(
            f"value {float(values[index])!r} at element {first_element + index} is not exactly representable in "
            f"{dst_dtype}; convert to a layout with {src_dtype} tensors instead",
            file=file,
            tensor=tensor,
        )
    return out.view(np.uint8)


