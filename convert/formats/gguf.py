"""GGUF, llama.cpp's container: what its own converter writes for Mixtral, and a strict reader of F32/F16/BF16 files.

Pure functions for the pipeline to call (no threads, no file writes): the GGML type of each tensor at each outtype,
element conversion of a slice of a tensor (so tensors stream in chunks), the metadata key/value list, the byte
layout of a file (header, tensor offsets, zero padding), gguf-split's sharding, and reading a GGUF back as a source.

Every fact is taken from llama.cpp's own code, read at ggml-org/llama.cpp (docs/formats.md, "GGUF", lists them):
- convert_hf_to_gguf.py / conversion/base.py ModelBase.prepare_tensors: which tensors stay F32, the F16 fallback of
  Q8_0, every tensor converted through float32 first; TextModel.set_gguf_parameters, LlamaModel.set_gguf_parameters
  (conversion/llama.py): the hyperparameter keys and their order; TextModel._set_vocab_sentencepiece /
  _create_vocab_sentencepiece and gguf-py's vocab.py SpecialVocab: the tokenizer keys.
- gguf-py gguf_writer.py GGUFWriter: header layout, value types of each add_* call, alignment 32, the padding of the
  header and after every tensor; quants.py: BF16 rounding and the Q8_0 reference quantizer.
- ggml/src/gguf.cpp gguf_init_from_reader: what a valid file is (the reader below refuses what it refuses);
  tools/gguf-split/gguf-split.cpp split_strategy: how files are split and which metadata each holds.

The `gguf` package (ggml-org's gguf-py) supplies the constants (key names, type ids, block sizes); it is imported
here only. The data path (conversion, quantization, layout, reading) is ours.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFType,
    GGUFValueType,
    Keys,
    LlamaFileType,
    TokenType,
)

from convert.errors import ConvertError, shown
from convert.files import MAX_TOKENIZER, is_present, read_small
from convert.formats.base import TOKENIZER, Format, OpenedWeights, OutputRequest, PlannedOutput, from_tokenizer, placed
from convert.formats.safetensors import TensorRecord
from convert.formats.streams import ByteStream
from convert.outputs import OutputFile
from convert.params import DEFAULT_MAX_POSITIONS, ModelParams
from convert.tokenizer import CHAT_TEMPLATE, SentencePieceModel, checked_model, read_model, special_ids

if TYPE_CHECKING:
    from convert.mapping import LayoutTable

ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA]  # Mixtral is the llama architecture with experts ("llama")
ALIGNMENT = GGUF_DEFAULT_ALIGNMENT  # 32; no general.alignment key is written, so readers use this default
F32, F16, BF16, Q8_0 = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                        GGMLQuantizationType.Q8_0)  # fmt: skip
Q8_BLOCK, Q8_BLOCK_BYTES = GGML_QUANT_SIZES[Q8_0]  # 32 elements -> fp16 scale + 32 int8 = 34 bytes

# --outtype -> general.file_type (convert_hf_to_gguf.py's --outtype choices map to these LlamaFileType members).
OUTTYPES: Mapping[str, LlamaFileType] = MappingProxyType(
    {
        "f32": LlamaFileType.ALL_F32,
        "f16": LlamaFileType.MOSTLY_F16,
        "bf16": LlamaFileType.MOSTLY_BF16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
    }
)
# The outtype that keeps a checkpoint's own element type (the default: no silent cast).
OUTTYPE_OF_DTYPE: Mapping[str, str] = MappingProxyType({"F32": "f32", "F16": "f16", "BF16": "bf16"})
_WIDE_TYPE = MappingProxyType({"f32": F32, "f16": F16, "bf16": BF16, "q8_0": Q8_0})

# Our dtype names <-> the GGML types a checkpoint's tensors can be read back from.
GGML_OF_DTYPE: Mapping[str, GGMLQuantizationType] = MappingProxyType({"F32": F32, "F16": F16, "BF16": BF16})
DTYPE_OF_GGML: Mapping[GGMLQuantizationType, str] = MappingProxyType({v: k for k, v in GGML_OF_DTYPE.items()})
_NUMPY_OF_DTYPE = MappingProxyType({"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")})


def file_type(outtype: str) -> int:
    """general.file_type for an outtype (f32 0, f16 1, q8_0 7, bf16 32)."""
    return int(_outtype(outtype))


def _outtype(outtype: str) -> LlamaFileType:
    try:
        return OUTTYPES[outtype]
    except KeyError:
        raise ConvertError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Tensor names and types


def tensor_name(kind: MODEL_TENSOR, layer: int | None = None) -> str:
    """A tensor's GGUF name, spelled by gguf-py (e.g. blk.3.ffn_gate_exps.weight)."""
    base = TENSOR_NAMES[kind]
    return (base.format(bid=layer) if layer is not None else base) + ".weight"


_GATE_INP = re.compile(re.escape(TENSOR_NAMES[MODEL_TENSOR.FFN_GATE_INP]).replace(r"\{bid\}", r"\d+") + r"\.weight")


def tensor_type(name: str, shape: tuple[int, ...], outtype: str) -> GGMLQuantizationType:
    """The GGML type llama.cpp's converter gives a Mixtral tensor (ModelBase.prepare_tensors):

    - 1-D tensors and names ending in _norm.weight: F32 ("most of the codebase ... only handles F32" for norms);
    - the router ffn_gate_inp: F32 (one of the tensors "always in float32", matching llama-quant's rules);
    - anything else: the outtype's type; for q8_0, a row (the innermost dimension, shape[-1] in torch order) that is
      not a whole number of 32-element blocks makes gguf.quants raise QuantError and the converter falls back to F16.
    token_embd and output get no special case at q8_0 (their override only applies to the TQ1_0/TQ2_0 outtypes).
    """
    wide = _WIDE_TYPE.get(outtype)
    if wide is None:
        _outtype(outtype)
    if len(shape) <= 1 or name.endswith("_norm.weight") or _GATE_INP.fullmatch(name):
        return F32
    assert wide is not None
    if wide == Q8_0 and shape[-1] % Q8_BLOCK:
        return F16
    return wide


def converted_nbytes(n_elements: int, dst: GGMLQuantizationType) -> int:
    """Bytes that n_elements take in dst (for Q8_0, n_elements must be whole blocks)."""
    block, size = GGML_QUANT_SIZES[dst]
    if n_elements % block:
        raise ValueError(f"{n_elements} elements are not a whole number of {dst.name} blocks of {block}")
    return n_elements // block * size


def tensor_nbytes(shape: Sequence[int], dst: GGMLQuantizationType) -> int:
    return converted_nbytes(math.prod(shape), dst)


# ---------------------------------------------------------------------------------------------------------------
# Element conversion (a slice at a time)


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
    if dst in (F16, BF16, Q8_0) and src_dtype in _NUMPY_OF_DTYPE:
        fast = _convert_fast(data, src_dtype, dst)
        if fast is not None:
            return fast
    return convert_elements_reference(data, src_dtype, dst, tensor=tensor, file=file, first_element=first_element)


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


# ---------------------------------------------------------------------------------------------------------------
# Metadata


@dataclass(frozen=True)
class KV:
    """One metadata entry with the GGUF value type it is written with; item_type for arrays."""

    key: str
    type: GGUFValueType
    value: Any
    item_type: GGUFValueType | None = None


def _u32(key: str, value: int) -> KV:
    return KV(key, GGUFValueType.UINT32, int(value))


def _f32(key: str, value: float) -> KV:
    return KV(key, GGUFValueType.FLOAT32, float(value))


def _str(key: str, value: str) -> KV:
    return KV(key, GGUFValueType.STRING, value)


def _bool(key: str, value: bool) -> KV:
    return KV(key, GGUFValueType.BOOL, bool(value))


def _llm(key: str) -> str:
    return key.format(arch=ARCH)


def model_metadata(params: ModelParams, outtype: str, *, name: str) -> list[KV]:
    """The keys llama.cpp's converter writes for a Mixtral config.json, in its order and with its value types,
    up to general.quantization_version (tokenizer_metadata follows). The order: general.architecture (GGUFWriter's
    constructor), general.type and general.name (prepare_metadata), TextModel.set_gguf_parameters, then
    LlamaModel.set_gguf_parameters' vocab_size and rope.dimension_count, then the quantization version.

    Values as that converter reads them from our config.json: context_length is max_position_embeddings (32768
    when params have none); rope.freq_base is rope_theta (1e6 by default); key_length/value_length only when
    head_dim is not dim / n_heads (config.json then carries head_dim; transformers 5 leaves it None otherwise).
    No rope-scaling or sliding-window key: Mixtral's config has neither for llama.cpp."""
    entries = [
        _str(Keys.General.ARCHITECTURE, ARCH),
        _str(Keys.General.TYPE, GGUFType.MODEL),
        _str(Keys.General.NAME, name),
        _u32(_llm(Keys.LLM.BLOCK_COUNT), params.n_layers),
        _u32(_llm(Keys.LLM.CONTEXT_LENGTH), params.max_position_embeddings or DEFAULT_MAX_POSITIONS),
        _u32(_llm(Keys.LLM.EMBEDDING_LENGTH), params.dim),
        _u32(_llm(Keys.LLM.FEED_FORWARD_LENGTH), params.hidden_dim),
        _u32(_llm(Keys.Attention.HEAD_COUNT), params.n_heads),
        _u32(_llm(Keys.Attention.HEAD_COUNT_KV), params.n_kv_heads),
        _f32(_llm(Keys.Rope.FREQ_BASE), params.rope_theta),
        _f32(_llm(Keys.Attention.LAYERNORM_RMS_EPS), params.norm_eps),
        _u32(_llm(Keys.LLM.EXPERT_COUNT), params.n_experts),
        _u32(_llm(Keys.LLM.EXPERT_USED_COUNT), params.experts_per_tok),
    ]
    if not params.head_dim_is_implied:
        entries += [
            _u32(_llm(Keys.Attention.KEY_LENGTH), params.head_dim),
            _u32(_llm(Keys.Attention.VALUE_LENGTH), params.head_dim),
        ]
    entries += [
        _u32(Keys.General.FILE_TYPE, file_type(outtype)),
        _u32(_llm(Keys.LLM.VOCAB_SIZE), params.vocab_size),
        _u32(_llm(Keys.Rope.DIMENSION_COUNT), params.head_dim),
        _u32(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION),
    ]
    return entries


def tokenizer_metadata(model: bytes, *, vocab_size: int | None, instruct: bool, source: str) -> list[KV]:
    """The tokenizer keys llama.cpp's converter writes when run on our hf output (tokenizer.model,
    tokenizer.json and tokenizer_config.json as convert/tokenizer.py writes them), in its order:

    - _set_vocab_sentencepiece: tokenizer.ggml.model "llama", pre "default", then tokens, scores (FLOAT32) and
      token_type (INT32) arrays. Pieces keep SentencePiece's U+2581. Types are SentencePiece's (NORMAL, BYTE, ...),
      then every id tokenizer_config.json lists in added_tokens_decoder with special=true (ours: the UNKNOWN and
      CONTROL pieces, <unk> <s> </s>) becomes CONTROL with score -1000.0, <unk> included.
    - gguf-py SpecialVocab.add_to_gguf: bos/eos/unk (and pad when the model has one) token ids (UINT32), from
      tokenizer_config.json's names looked up in tokenizer.json's added_tokens; then the add_*_token flags in the
      order SpecialVocab meets them: add_bos_token true (the post-processor's leading <s>), add_sep_token false
      (its pair template has <s> between A and B, which is neither sep nor eos), add_eos_token false
      (tokenizer_config.json); then tokenizer.chat_template when instruct (CHAT_TEMPLATE, as tokenizer_config.json).
    """
    parsed = checked_model(model, vocab_size=vocab_size, instruct=instruct, source=source)
    return _tokenizer_entries(parsed, instruct=instruct)


def _tokenizer_entries(model: SentencePieceModel, *, instruct: bool) -> list[KV]:
    tokens = [piece.text for piece in model.pieces]
    scores = [float(np.float32(piece.score)) for piece in model.pieces]
    types = [int(piece.kind) for piece in model.pieces]
    for index in special_ids(model):  # what tokenizer_config.json's added_tokens_decoder marks special
        scores[index] = -1000.0
        types[index] = int(TokenType.CONTROL)
    T = Keys.Tokenizer
    entries = [
        _str(T.MODEL, "llama"),
        _str(T.PRE, "default"),
        KV(T.LIST, GGUFValueType.ARRAY, tokens, GGUFValueType.STRING),
        KV(T.SCORES, GGUFValueType.ARRAY, scores, GGUFValueType.FLOAT32),
        KV(T.TOKEN_TYPE, GGUFValueType.ARRAY, types, GGUFValueType.INT32),
        _u32(T.BOS_ID, model.bos_id),
        _u32(T.EOS_ID, model.eos_id),
        _u32(T.UNK_ID, model.unk_id),
    ]
    if model.pad_id >= 0:
        entries.append(_u32(T.PAD_ID, model.pad_id))
    entries += [_bool(T.ADD_BOS, True), _bool(T.ADD_SEP, False), _bool(T.ADD_EOS, False)]
    if instruct:
        entries.append(_str(T.CHAT_TEMPLATE, CHAT_TEMPLATE))
    return entries


# ---------------------------------------------------------------------------------------------------------------
# Serialization and layout

_SCALAR_FORMAT = MappingProxyType(
    {
        GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
        GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f",
        GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
        GGUFValueType.BOOL: "<?",
    }
)  # fmt: skip
_NUMPY_OF_VALUE = MappingProxyType(
    {
        GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
        GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4",
        GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
        GGUFValueType.BOOL: "<u1",
    }
)  # fmt: skip


def _string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: GGUFValueType, value: Any) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _string(value)
    return struct.pack(_SCALAR_FORMAT[vtype], value)


def _kv_bytes(entry: KV) -> bytes:
    """As GGUFWriter._pack_val: key string, uint32 type, then the value; an array is its item type, uint64 count
    and the items."""
    parts = [_string(entry.key), struct.pack("<I", entry.type)]
    if entry.type == GGUFValueType.ARRAY:
        if entry.item_type is None or entry.item_type == GGUFValueType.ARRAY:
            raise ValueError(f"array {entry.key} needs a scalar item type")
        items = entry.value
        parts.append(struct.pack("<IQ", entry.item_type, len(items)))
        if entry.item_type == GGUFValueType.STRING:
            parts.extend(_string(item) for item in items)
        else:
            parts.append(np.asarray(items, dtype=_NUMPY_OF_VALUE[entry.item_type]).tobytes())
    else:
        parts.append(_value(entry.type, entry.value))
    return b"".join(parts)


def _pad(n: int, alignment: int = ALIGNMENT) -> int:
    return -n % alignment


@dataclass(frozen=True)
class TensorInfo:
    """A tensor to place in a GGUF file: its name, GGML type and shape in torch order (outermost first)."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.ggml_type)


@dataclass(frozen=True)
class Piece:
    """One run of a planned file: the header, a tensor's data, or zeros."""

    kind: str  # "header", "tensor" or "zeros"
    offset: int
    size: int
    tensor: str | None = None


@dataclass(frozen=True)
class GGUFLayout:
    """A planned GGUF file. Every byte is in exactly one piece, in file order: the header (padded with zeros to the
    alignment, the padding inside `header`), then each tensor's data followed by its zero padding to the alignment
    (after the last tensor too, as GGUFWriter writes it)."""

    header: bytes
    offsets: Mapping[str, int]  # absolute offset of each tensor's data
    nbytes: Mapping[str, int]
    size: int
    pieces: tuple[Piece, ...] = field(repr=False)

    @property
    def zero_blobs(self) -> list[tuple[int, int]]:
        return [(p.offset, p.size) for p in self.pieces if p.kind == "zeros"]


def layout_gguf(metadata: Sequence[KV], tensors: Sequence[TensorInfo]) -> GGUFLayout:
    """GGUF v3, little-endian, as GGUFWriter writes it: magic, version, uint64 tensor count, uint64 key count, the
    key/value pairs in order, each tensor's info (name, uint32 n_dims, the dims innermost first, uint32 type,
    uint64 offset relative to the data section), zeros to a multiple of 32; then the tensors in the same order,
    each padded with zeros to a multiple of 32 (GGUFWriter.write_padding after every tensor, the last included)."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    keys = [e.key for e in metadata]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate metadata keys")
    parts = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(metadata))]
    parts.extend(_kv_bytes(entry) for entry in metadata)
    relative = 0
    placed: list[tuple[TensorInfo, int, int]] = []
    for info in tensors:
        size = info.nbytes
        parts.append(_string(info.name))
        parts.append(struct.pack("<I", len(info.shape)))
        parts.append(struct.pack(f"<{len(info.shape)}Q", *reversed(info.shape)))
        parts.append(struct.pack("<IQ", info.ggml_type, relative))
        placed.append((info, relative, size))
        relative += size + _pad(size)
    header = b"".join(parts)
    header += bytes(_pad(len(header)))
    pieces = [Piece("header", 0, len(header))]
    offsets: dict[str, int] = {}
    for info, rel, size in placed:
        start = len(header) + rel
        offsets[info.name] = start
        pieces.append(Piece("tensor", start, size, info.name))
        if _pad(size):
            pieces.append(Piece("zeros", start + size, _pad(size)))
    return GGUFLayout(
        header, MappingProxyType(offsets), MappingProxyType({i.name: i.nbytes for i in tensors}),
        len(header) + relative, tuple(pieces),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Splitting as gguf-split does


def split_file_name(stem: str, index: int, count: int) -> str:
    """llama_split_path's "%s-%05d-of-%05d.gguf" with the 1-based split number."""
    return f"{stem}-{index + 1:05d}-of-{count:05d}.gguf"


def split_tensors(tensors: Sequence[TensorInfo], max_size: int | None) -> list[list[TensorInfo]]:
    """Group tensors into files as gguf-split --split-max-size does (split_strategy): in order, counting only
    tensor data, each tensor padded to 32, a new file when the running size plus the next tensor would exceed
    max_size. One file when max_size is None. A tensor larger than max_size goes alone in a file (gguf-split does
    the same, except that it fails when that tensor is the very first)."""
    if max_size is None or not tensors:
        return [list(tensors)]
    if max_size <= 0:
        raise ValueError("max_size must be positive")
    groups: list[list[TensorInfo]] = [[]]
    current = 0
    for info in tensors:
        padded = info.nbytes + _pad(info.nbytes)
        if groups[-1] and current + padded > max_size:
            groups.append([])
            current = 0
        groups[-1].append(info)
        current += padded
    return groups


def split_metadata(metadata: Sequence[KV], index: int, count: int, n_tensors: int) -> list[KV]:
    """The metadata of split `index` of `count` as gguf-split writes it: the first file holds all of the model's
    keys, the others none; then split.no (UINT16), split.tensors.count (INT32, the total over all files) and
    split.count (UINT16) last: gguf-split sets split.count to a placeholder first and again once the count is
    known, and gguf.cpp's gguf_set_val_* removes a key and appends it."""
    S = Keys.Split
    if count > 0xFFFF or n_tensors > 0x7FFFFFFF:
        raise ConvertError(f"cannot split {n_tensors} tensors into {count} GGUF files (limits 65535 and 2^31-1)")
    base = list(metadata) if index == 0 else []
    return [
        *base,
        KV(S.LLM_KV_SPLIT_NO, GGUFValueType.UINT16, index),
        KV(S.LLM_KV_SPLIT_TENSORS_COUNT, GGUFValueType.INT32, n_tensors),
        KV(S.LLM_KV_SPLIT_COUNT, GGUFValueType.UINT16, count),
    ]


def layout_split(
    metadata: Sequence[KV], tensors: Sequence[TensorInfo], *, stem: str, max_size: int | None = None
) -> list[tuple[str, GGUFLayout]]:
    """The files of a GGUF model: [(f"{stem}.gguf", layout)] when it fits one file (no split keys, as
    convert_hf_to_gguf.py writes it), else gguf-split's NAME-0000i-of-0000N.gguf files."""
    groups = split_tensors(tensors, max_size)
    if len(groups) == 1:
        return [(f"{stem}.gguf", layout_gguf(metadata, groups[0]))]
    return [
        (split_file_name(stem, i, len(groups)), layout_gguf(split_metadata(metadata, i, len(groups), len(tensors)), g))
        for i, g in enumerate(groups)
    ]


# ---------------------------------------------------------------------------------------------------------------
# Reading GGUF as a source

# gguf.cpp accepts string and array lengths up to 1 GiB each (bounded by the bytes left in the file); for a source
# whose header is ours to hold in memory, the whole key/value and tensor-info region is capped instead. Mixtral's is
# under 1 MiB (32000 tokens, 995 tensors); 16 MiB, as for safetensors headers, is refused before it is parsed.
MAX_HEADER = 16 * 2**20
# Python holds each string as an object of ~50 bytes or more: the count of strings over all arrays is capped too, so
# that a crafted header of 2-byte strings cannot cost ten times its size (8x Mixtral's 32000 tokens).
MAX_STRINGS = 2**18
GGML_MAX_NAME = 64  # ggml.h: a tensor name must be shorter (gguf.cpp refuses >= 64 bytes)
GGML_MAX_DIMS = 4
_INT64_MAX = 2**63 - 1


@dataclass
class _Cursor:
    data: memoryview
    label: str
    file_size: int
    pos: int = 0
    strings: int = 0

    def fail(self, rule: str, tensor: str | None = None) -> ConvertError:
        return ConvertError(f"GGUF: {rule}", file=self.label, tensor=tensor)

    def take(self, n: int, what: str) -> memoryview:
        self.need(n, what)
        view = self.data[self.pos : self.pos + n]
        self.pos += n
        return view

    def need(self, n: int, what: str) -> None:
        """Refuse n more bytes that are not there, before anything of that size is allocated."""
        if n > len(self.data) - self.pos:
            if len(self.data) < self.file_size:
                raise self.fail(
                    f"{what} at byte {self.pos} runs past the first {MAX_HEADER} bytes: the metadata and tensor "
                    "infos of a Mixtral GGUF take under 1 MiB, refused before reading further"
                )
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file ends at {self.file_size}")

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("<Q", f"{what} length")
        raw = self.take(length, what)  # checked against the bytes left before anything is allocated
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} at byte {self.pos - length} is not UTF-8 ({exc.reason})") from None


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype == GGUFValueType.STRING:
        return cur.string(f"the value of {shown(key)}")
    fmt = _SCALAR_FORMAT.get(GGUFValueType(vtype))
    assert fmt is not None
    if vtype == GGUFValueType.BOOL:
        raw = cur.unpack("<B", f"the value of {shown(key)}")
        if raw > 1:
            raise cur.fail(f"key {shown(key)}: bool byte {raw} is neither 0 nor 1")
        return bool(raw)
    return cur.unpack(fmt, f"the value of {shown(key)}")


def _value_type(cur: _Cursor, raw: int, key: str, *, item: bool = False) -> GGUFValueType:
    try:
        vtype = GGUFValueType(raw)
    except ValueError:
        raise cur.fail(f"key {shown(key)} has unknown value type {raw}") from None
    if item and vtype == GGUFValueType.ARRAY:
        raise cur.fail(f"key {shown(key)} is an array of arrays, which gguf.cpp refuses")
    return vtype


def _read_kv(cur: _Cursor) -> KV:
    key = cur.string("a metadata key")
    if not key:
        raise cur.fail(f"empty metadata key before byte {cur.pos}")
    vtype = _value_type(cur, cur.unpack("<I", f"the type of {shown(key)}"), key)
    if vtype != GGUFValueType.ARRAY:
        return KV(key, vtype, _read_value(cur, vtype, key))
    item = _value_type(cur, cur.unpack("<I", f"the item type of {shown(key)}"), key, item=True)
    count = cur.unpack("<Q", f"the length of {shown(key)}")
    least = 8 if item == GGUFValueType.STRING else struct.calcsize(_SCALAR_FORMAT[item])
    cur.need(count * least, f"array {shown(key)} of {count} items")  # before allocating: they must fit
    if item == GGUFValueType.STRING:
        cur.strings += count
        if cur.strings > MAX_STRINGS:
            raise cur.fail(f"more than {MAX_STRINGS} strings in the metadata (array {shown(key)}); refused")
        return KV(key, vtype, [cur.string(f"item of {shown(key)}") for _ in range(count)], item)
    raw = cur.take(count * least, f"array {shown(key)}")
    values = np.frombuffer(raw, dtype=_NUMPY_OF_VALUE[item]).copy()
    if item == GGUFValueType.BOOL:
        if (values > 1).any():
            raise cur.fail(f"array {shown(key)} holds a bool byte that is neither 0 nor 1")
        values = values.astype(bool)
    return KV(key, vtype, values, item)


def read_gguf(stream: ByteStream, *, quantized: bool = False) -> tuple[dict[str, KV], list[TensorRecord]]:
    """Read a GGUF file's metadata and tensor records as gguf.cpp's gguf_init_from_reader does, refusing what it
    refuses (bad magic, version 0, 1 or above 3, a byte-swapped version, negative counts, empty or duplicate keys,
    unknown value types, arrays of arrays, general.alignment not a UINT32 power of two, tensor names of 64 bytes or
    more or repeated, over 4 dimensions, an element count that overflows int64, unknown GGML types, rows not a whole
    number of blocks, offsets that are not exactly the previous tensor's padded end) and more: offsets or sizes past
    the end of the file, trailing bytes after the last tensor's padding, bool bytes other than 0/1, invalid UTF-8,
    a header over MAX_HEADER. Tensors of any type other than F32, F16, BF16 are refused: quantized GGUF is one-way
    (with quantized, Q8_0 tensors are indexed, dtype "Q8_0", so that verify and inspect can read our own q8_0 files;
    converting from them is refused by GgufFormat.checkpoint_dtype).

    Records carry our dtype names and the shape in torch order (outermost first); offsets are absolute. Every count
    is checked against the bytes that remain before anything of that size is allocated."""
    label = stream.label
    head = bytearray(min(stream.size, MAX_HEADER))
    stream.readinto(head, 0)
    cur = _Cursor(memoryview(head), label, stream.size)
    if stream.size < 4 or cur.unpack("<I", "the magic") != GGUF_MAGIC:
        raise cur.fail("not a GGUF file (the first 4 bytes are not 'GGUF')")
    version = cur.unpack("<I", "the version")
    if version & 0xFFFF == 0 and version:
        raise cur.fail(f"version {version:#x} is byte-swapped: a big-endian GGUF, which is not supported")
    if version not in (2, 3):
        raise cur.fail(f"version {version} is not supported (gguf.cpp reads versions 2 and 3)")
    n_tensors = cur.unpack("<q", "the tensor count")
    n_kv = cur.unpack("<q", "the key count")
    left = len(cur.data) - cur.pos
    # A key takes at least 8 + 1 + 4 + 1 bytes, a tensor info 8 + 4 + 4 + 8: checked before any list is sized.
    if not 0 <= n_kv <= left // 14:
        raise cur.fail(f"key count {n_kv} is impossible for a header of {left} more bytes")
    if not 0 <= n_tensors <= left // 24:
        raise cur.fail(f"tensor count {n_tensors} is impossible for a header of {left} more bytes")

    metadata: dict[str, KV] = {}
    for _ in range(n_kv):
        entry = _read_kv(cur)
        if entry.key in metadata:
            raise cur.fail(f"duplicate key {shown(entry.key)}")
        metadata[entry.key] = entry
    alignment = ALIGNMENT
    if (align := metadata.get(Keys.General.ALIGNMENT)) is not None:
        if align.type != GGUFValueType.UINT32 or align.value <= 0 or align.value & (align.value - 1):
            raise cur.fail(f"{Keys.General.ALIGNMENT} must be a UINT32 power of two, got {align.value!r}")
        alignment = align.value

    infos: list[tuple[str, GGMLQuantizationType, tuple[int, ...], int]] = []
    seen: set[str] = set()
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        if len(name.encode("utf-8")) >= GGML_MAX_NAME:
            raise cur.fail(f"tensor name is {len(name.encode())} bytes; ggml allows at most {GGML_MAX_NAME - 1}",
                           tensor=name)  # fmt: skip
        if name in seen:
            raise cur.fail("duplicate tensor name", tensor=name)
        seen.add(name)
        n_dims = cur.unpack("<I", "a tensor's dimension count")
        if n_dims > GGML_MAX_DIMS:
            raise cur.fail(f"{n_dims} dimensions; ggml allows at most {GGML_MAX_DIMS}", tensor=name)
        dims = [cur.unpack("<q", "a tensor dimension") for _ in range(n_dims)]
        if any(d < 0 for d in dims):
            raise cur.fail(f"negative dimension in {dims}", tensor=name)
        if math.prod(dims) > _INT64_MAX:
            raise cur.fail(f"shape {dims} has more elements than int64 can count", tensor=name)
        raw_type = cur.unpack("<I", "a tensor type")
        offset = cur.unpack("<Q", "a tensor offset")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise cur.fail(f"unknown GGML type {raw_type}", tensor=name) from None
        if ggml_type not in DTYPE_OF_GGML and not (quantized and ggml_type == Q8_0):
            rule = (
                f"is {ggml_type.name}: quantized GGUF is one-way, its weights cannot be restored; convert from the "
                "original checkpoint instead"
                if GGML_QUANT_SIZES.get(ggml_type, (2, 0))[0] > 1
                else f"is {ggml_type.name}, not a weight type of this model (F32, F16 or BF16)"
            )
            raise cur.fail(rule, tensor=name)
        infos.append((name, ggml_type, tuple(reversed(dims)), offset))

    data_start = cur.pos + _pad(cur.pos, alignment) if n_tensors else cur.pos
    records: list[TensorRecord] = []
    expected = 0
    for name, ggml_type, shape, offset in infos:
        if offset != expected:
            rule = "is not aligned" if offset % alignment else "is not where the previous tensor's padded data ends"
            raise cur.fail(f"data offset {offset} {rule} (expected {expected})", tensor=name)
        size = tensor_nbytes(shape, ggml_type)
        if data_start + offset + size > stream.size:
            raise cur.fail(
                f"data [{data_start + offset}, {data_start + offset + size}) runs past the end of the file "
                f"({stream.size} bytes; truncated download?)",
                tensor=name,
            )
        dtype = DTYPE_OF_GGML.get(ggml_type, ggml_type.name)
        records.append(TensorRecord(name, dtype, shape, stream, data_start + offset, size))
        expected = offset + size + _pad(size, alignment)
    end = data_start + expected if n_tensors else cur.pos + _pad(cur.pos, alignment)  # writers pad an empty one too
    if stream.size > end:
        raise cur.fail(f"{stream.size - end} bytes after the last tensor's data and padding")
    return metadata, records


# ---------------------------------------------------------------------------------------------------------------
# Model parameters back from metadata


def _get(metadata: Mapping[str, KV], key: str, vtype: GGUFValueType, file: str, *, required: bool = True) -> Any:
    entry = metadata.get(key)
    if entry is None:
        if required:
            raise ConvertError(f"GGUF: missing key {key}", file=file)
        return None
    if entry.type != vtype:
        # llama.cpp's loader (llama_model_loader::get_key) refuses a key of another type.
        raise ConvertError(f"GGUF: key {key} is {entry.type.name}, llama.cpp requires {vtype.name}", file=file)
    return entry.value


def _float32_decimal(value: float) -> float:
    """The shortest decimal that rounds to this float32 (1e-05, not 9.999999747378752e-06): params.json and
    config.json written from it read the same as the original's."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def params_from_metadata(metadata: Mapping[str, KV], *, file: str) -> ModelParams:
    """ModelParams from a llama-architecture GGUF's keys (the inverse of model_metadata), read as llama.cpp's
    loader reads them: head_count_kv defaults to head_count, key_length to embedding_length / head_count,
    rope.freq_base to 10000 (llama.cpp's default when the key is absent, not Mixtral's 1e6); vocab_size from the
    token list when llama.vocab_size is absent. A context length of 32768 reads as "unset" (params.json omits it)."""
    U32, F = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    arch = _get(metadata, Keys.General.ARCHITECTURE, GGUFValueType.STRING, file)
    if arch != ARCH:
        raise ConvertError(f"GGUF: architecture {arch!r} is not {ARCH!r} (Mixtral)", file=file)

    def u32(key: str, *, required: bool = True) -> int | None:
        value = _get(metadata, _llm(key), U32, file, required=required)
        if value is not None and value <= 0:
            raise ConvertError(f"GGUF: key {_llm(key)} must be positive, got {value}", file=file)
        return value

    def f32(key: str) -> float | None:
        value = _get(metadata, _llm(key), F, file, required=False)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConvertError(f"GGUF: key {_llm(key)} must be a positive finite number, got {value}", file=file)
        return None if value is None else _float32_decimal(value)

    dim, n_heads = u32(Keys.LLM.EMBEDDING_LENGTH), u32(Keys.Attention.HEAD_COUNT)
    assert dim is not None and n_heads is not None
    n_experts = u32(Keys.LLM.EXPERT_COUNT, required=False)
    if n_experts is None:
        raise ConvertError(f"GGUF: no {_llm(Keys.LLM.EXPERT_COUNT)}: not a mixture-of-experts model", file=file)
    head_dim = u32(Keys.Attention.KEY_LENGTH, required=False) or dim // n_heads
    value_length = u32(Keys.Attention.VALUE_LENGTH, required=False) or dim // n_heads
    rope_dims = u32(Keys.Rope.DIMENSION_COUNT, required=False) or head_dim
    if value_length != head_dim or rope_dims != head_dim:
        raise ConvertError(
            f"GGUF: key_length {head_dim}, value_length {value_length} and rope.dimension_count {rope_dims} differ; "
            "Mixtral uses one head size for all three",
            file=file,
        )
    vocab = u32(Keys.LLM.VOCAB_SIZE, required=False)
    if vocab is None:
        tokens = metadata.get(Keys.Tokenizer.LIST)
        vocab = len(tokens.value) if tokens is not None and tokens.type == GGUFValueType.ARRAY else None
    if not vocab:
        raise ConvertError(f"GGUF: no {_llm(Keys.LLM.VOCAB_SIZE)} and no token list to count", file=file)
    norm_eps = f32(Keys.Attention.LAYERNORM_RMS_EPS)
    if norm_eps is None:
        raise ConvertError(f"GGUF: missing key {_llm(Keys.Attention.LAYERNORM_RMS_EPS)}", file=file)
    rope_theta = f32(Keys.Rope.FREQ_BASE)
    context = u32(Keys.LLM.CONTEXT_LENGTH)
    params = ModelParams(
        dim=dim,
        n_layers=u32(Keys.LLM.BLOCK_COUNT),  # type: ignore[arg-type]
        n_heads=n_heads,
        n_kv_heads=u32(Keys.Attention.HEAD_COUNT_KV, required=False) or n_heads,
        head_dim=head_dim,
        hidden_dim=u32(Keys.LLM.FEED_FORWARD_LENGTH),  # type: ignore[arg-type]
        n_experts=n_experts,
        experts_per_tok=u32(Keys.LLM.EXPERT_USED_COUNT),  # type: ignore[arg-type]
        vocab_size=vocab,
        norm_eps=norm_eps,
        rope_theta=10000.0 if rope_theta is None else rope_theta,
        sliding_window=None,
        max_position_embeddings=None if context == DEFAULT_MAX_POSITIONS else context,
    )
    if params.n_heads % params.n_kv_heads or params.experts_per_tok > params.n_experts or params.head_dim % 2:
        raise ConvertError(
            f"GGUF: inconsistent hyperparameters (heads {params.n_heads}/{params.n_kv_heads}, experts "
            f"{params.experts_per_tok}/{params.n_experts}, head size {params.head_dim})",
            file=file,
        )
    return params


# ---------------------------------------------------------------------------------------------------------------
# Split sources

_SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_paths(first: Path) -> list[Path]:
    """All files of a GGUF model given its first file: [first] for a single file, else every
    NAME-0000i-of-0000N.gguf beside it (llama.cpp's llama_split_prefix naming); a missing one is an error. A later
    split given as the source is refused: llama.cpp loads a split model from its first file."""
    match = _SPLIT_NAME.match(first.name)
    if match is None:
        return [first]
    number, count = int(match["no"]), int(match["count"])
    if number != 1 or count == 0:
        first_name = split_file_name(match["stem"], 0, count)
        raise ConvertError(f"is split {number} of {count}; give the first split ({first_name})", file=first)
    paths = [first.with_name(split_file_name(match["stem"], i, count)) for i in range(count)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ConvertError(f"split {missing[0]} is missing ({len(missing)} of {count} files)", file=first)
    return paths


def check_splits(paths: Sequence[Path], metadatas: Sequence[Mapping[str, KV]], n_tensors: int) -> None:
    """Check that each file's split.no / split.count / split.tensors.count agree with its place in the set and that
    the tensors over all files add up (what llama.cpp's loader checks: every split numbered, none missing)."""
    S = Keys.Split
    count = len(paths)
    for index, (path, metadata) in enumerate(zip(paths, metadatas, strict=True)):
        if count == 1 and S.LLM_KV_SPLIT_COUNT not in metadata:
            continue
        no = _get(metadata, S.LLM_KV_SPLIT_NO, GGUFValueType.UINT16, str(path))
        total = _get(metadata, S.LLM_KV_SPLIT_COUNT, GGUFValueType.UINT16, str(path))
        tensors = _get(metadata, S.LLM_KV_SPLIT_TENSORS_COUNT, GGUFValueType.INT32, str(path))
        if no != index or total != count:
            raise ConvertError(
                f"GGUF: split.no {no} of split.count {total}, but the file name makes it {index} of {count}",
                file=path,
            )
        if tensors != n_tensors:
            raise ConvertError(
                f"GGUF: split.tensors.count is {tensors} but the {count} files hold {n_tensors} tensors", file=path
            )


def metadata_values(metadata: Mapping[str, KV]) -> dict[str, Any]:
    """{key: value} with arrays as lists, for display and comparison."""
    return {k: (list(v.value.tolist()) if isinstance(v.value, np.ndarray) else v.value) for k, v in metadata.items()}


# ---------------------------------------------------------------------------------------------------------------
# The container: what plan, source, verify and inspect call

STEM = "model"  # the output is model.gguf, or model-0000i-of-0000N.gguf when split


class _Cast:
    """Element conversion while streaming (outputs.Cast): a write to a GGUF type (convert_elements), or a GGUF
    source's tensor back to the checkpoint's dtype (restore_elements, exact or refused)."""

    def __init__(self, src_dtype: str, dst_dtype: str, *, restore: bool) -> None:
        self.src_dtype = src_dtype
        self.dst_dtype = dst_dtype
        self._restore = restore
        self._item = np.dtype(_NUMPY_OF_DTYPE[src_dtype]).itemsize
        self._dst = GGMLQuantizationType[dst_dtype]
        self.granule = self._item * GGML_QUANT_SIZES[self._dst][0]  # Q8_0: whole blocks of 32 elements

    def out_nbytes(self, nbytes: int) -> int:
        return converted_nbytes(nbytes // self._item, self._dst)

    def __call__(self, data: memoryview, tensor: str, first: int) -> memoryview:
        if self._restore:
            converted = restore_elements(data, GGML_OF_DTYPE[self.src_dtype], self.dst_dtype, tensor=tensor,
                                         first_element=first)  # fmt: skip
        else:
            converted = convert_elements(data, self.src_dtype, self._dst, tensor=tensor, first_element=first)
        return memoryview(np.ascontiguousarray(converted)).cast("B")


def _one_model(folder: Path) -> Path:
    """The first file of the one GGUF model in folder. Several models (two files, or a file beside a split set)
    are two readings of the folder: refused, as llama.cpp is always given one file."""
    found = sorted(p for p in folder.glob("*.gguf") if p.is_file())
    firsts = [p for p in found if not (m := _SPLIT_NAME.match(p.name)) or int(m["no"]) == 1]
    if not found:
        raise ConvertError("no .gguf file", file=folder)
    if len(firsts) != 1:
        names = ", ".join(shown(p.name) for p in (firsts or found)[:4])
        raise ConvertError(
            f"holds {len(firsts) or 'no first file of'} GGUF models ({names}): llama.cpp loads the one it is given, "
            "this tool would have to guess; keep one model (its split files together) in the folder",
            file=folder,
        )
    paths = split_paths(firsts[0])
    strays = sorted(set(found) - set(paths))
    if strays:
        raise ConvertError(
            f"{shown(strays[0].name)} is not part of the GGUF model {shown(firsts[0].name)}; remove it", file=folder
        )
    return firsts[0]


class GgufFormat(Format):
    container = "gguf"
    markers = ("*.gguf",)
    replaces = ("*.gguf",)
    chat_template = True
    outtypes = tuple(OUTTYPES)

    def open(
        self, folder: Path, table: LayoutTable, streams: list[ByteStream], ambiguities: list[ConvertError]
    ) -> OpenedWeights:
        paths = split_paths(_one_model(folder))
        metadatas = []
        records: list[TensorRecord] = []
        for path in paths:
            stream = ByteStream([path])
            streams.append(stream)
            metadata, found = read_gguf(stream, quantized=True)
            metadatas.append(metadata)
            records += found
        check_splits(paths, metadatas, len(records))
        params = params_from_metadata(metadatas[0], file=str(paths[0]))
        _check_beside_tokenizer(folder, metadatas[0], ambiguities)
        return OpenedWeights(records, paths, paths[0], params, _written_outtype(metadatas[0]))

    def tensor_dtype(self, name: str, shape: tuple[int, ...], dtype: str, outtype: str | None) -> str:
        ggml_type = tensor_type(name, shape, outtype or _default_outtype(dtype, name))
        return DTYPE_OF_GGML.get(ggml_type, ggml_type.name)

    def checkpoint_dtype(self, record: TensorRecord, main: str) -> str:
        if record.dtype not in GGML_OF_DTYPE:
            raise ConvertError(
                f"is {record.dtype}: quantized GGUF is one-way, its weights cannot be restored; convert from the "
                "original checkpoint instead",
                file=record.stream.label,
                tensor=record.name,
            )
        forced = main in OUTTYPE_OF_DTYPE and tensor_type(record.name, record.shape, OUTTYPE_OF_DTYPE[main]) == F32
        return main if record.dtype == "F32" and forced else record.dtype

    def cast(self, src: str, dst: str) -> _Cast | None:
        if src in GGML_OF_DTYPE and dst in (*GGML_OF_DTYPE, Q8_0.name):
            return _Cast(src, dst, restore=False)
        return None

    def restore(self, src: str, dst: str) -> _Cast | None:
        if src in GGML_OF_DTYPE and dst in GGML_OF_DTYPE:
            return _Cast(src, dst, restore=True)
        return None

    def plan(self, request: OutputRequest) -> PlannedOutput:
        outtype = request.outtype or _default_outtype(request.dtype, "the weights")
        metadata = [*model_metadata(request.params, outtype, name=MODEL_NAME), *_vocabulary(request)]
        infos = [TensorInfo(t.name, GGMLQuantizationType[t.dtype], t.shape) for t in request.tensors]
        by_name = {t.name: t for t in request.tensors}
        files = []
        for name, layout in layout_split(metadata, infos, stem=STEM, max_size=request.max_shard_size):
            blobs = [(0, layout.header), *((offset, bytes(size)) for offset, size in layout.zero_blobs)]
            pieces = tuple(p for t in layout.offsets for p in placed(by_name[t], layout.offsets[t]))
            files.append(OutputFile(name, layout.size, blobs=tuple(blobs), pieces=pieces))
        return PlannedOutput(files, [], None)


MODEL_NAME = "Mixtral"  # general.name; llama.cpp's converter takes it from the folder's name or model card


def _vocabulary(request: OutputRequest) -> list[KV]:
    """The tokenizer keys from tokenizer.model. As for hf's tokenizer.json, a tokenizer that cannot be translated is
    a warning (the weights are still right, but llama.cpp needs the vocabulary to load the file), and an error when
    --instruct asked for the chat template; no tokenizer.model was warned about already."""
    built = from_tokenizer(request, tokenizer_metadata, "the GGUF has no vocabulary (llama.cpp will not load it)")
    return built or []


def _written_outtype(metadata: Mapping[str, KV]) -> str | None:
    """general.file_type as an outtype name (what verify --against converts the original with)."""
    entry = metadata.get(Keys.General.FILE_TYPE)
    by_value = {int(v): k for k, v in OUTTYPES.items()}
    return by_value.get(int(entry.value)) if entry is not None and entry.type == GGUFValueType.UINT32 else None


def _default_outtype(dtype: str, what: str) -> str:
    """No silent cast: without --outtype a GGUF holds the checkpoint's own element type."""
    outtype = OUTTYPE_OF_DTYPE.get(dtype)
    if outtype is None:
        raise ConvertError(f"{what}: {dtype} has no GGUF type; choose one with --outtype ({', '.join(OUTTYPES)})")
    return outtype


def _check_beside_tokenizer(folder: Path, metadata: Mapping[str, KV], ambiguities: list[ConvertError]) -> None:
    """A tokenizer.model beside the GGUF is copied into other layouts; one whose pieces are not the GGUF's
    vocabulary would make the converted model tokenize differently from the GGUF: two readings."""
    path = folder / TOKENIZER
    tokens = metadata.get(Keys.Tokenizer.LIST)
    if not is_present(path) or tokens is None:
        return
    try:
        pieces = [p.text for p in read_model(read_small(path, MAX_TOKENIZER, TOKENIZER), str(path)).pieces]
    except ConvertError as error:
        ambiguities.append(error)
        return
    if pieces != list(tokens.value):
        ambiguities.append(
            ConvertError(
                f"its pieces are not the GGUF's tokenizer.ggml.tokens ({len(pieces)} vs {len(tokens.value)}): the "
                "converted model would tokenize differently from the GGUF; remove it or put the matching one",
                file=path,
            )
        )


FORMAT = GgufFormat()
