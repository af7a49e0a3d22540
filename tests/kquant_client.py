"""ggml's own quantizers, called in process: the reference that convert/containers/gguf/kquants.py must equal.

Not a test file. Two ways in, both through the installed llama-cpp-python (the llama.cpp it was built from):

- `ggml_quantize`: ggml_quantize_chunk from the libggml-base shared library that ships inside the llama_cpp package
  (llama_cpp/lib), called through ctypes with no importance matrix. That is the very function llama-quantize calls
  for each tensor (llama_model_quantize -> ggml_quantize_chunk -> quantize_q4_K -> quantize_row_q4_K_ref ...), so
  any array can be compared quickly, without writing a model.
- `llama_quantize`: llama_model_quantize itself (what the llama-quantize tool runs) on a GGUF file, with
  params.pure so that every quantizable 2-D tensor gets the one type asked for.

`fp32_to_fp16` is ggml_fp32_to_fp16_row from the same library (GGML_FP32_TO_FP16 for each value).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

# llama_ftype for llama_model_quantize (llama.h's LLAMA_FTYPE_MOSTLY_*; the same numbers as gguf-py's LlamaFileType)
# and the one type that params.pure then gives every quantized tensor.
FTYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    GGMLQuantizationType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    GGMLQuantizationType.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    GGMLQuantizationType.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    GGMLQuantizationType.Q3_K: LlamaFileType.MOSTLY_Q3_K_S,
    GGMLQuantizationType.Q4_K: LlamaFileType.MOSTLY_Q4_K_S,
    GGMLQuantizationType.Q5_K: LlamaFileType.MOSTLY_Q5_K_S,
    GGMLQuantizationType.Q6_K: LlamaFileType.MOSTLY_Q6_K,
}


@functools.cache
def ggml_base() -> ctypes.CDLL:
    """libggml-base from the installed llama_cpp package (the library llama_cpp itself loads)."""
    import llama_cpp  # imported here: the tests skip when it is not installed

    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("ggml-base.*"))
    if not candidates:
        raise RuntimeError(f"no libggml-base in {lib_dir}")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start (element index)
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix (NULL: none)
    ]
    lib.ggml_fp32_to_fp16_row.restype = None
    lib.ggml_fp32_to_fp16_row.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def ggml_quantize(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """ggml_quantize_chunk(qtype, rows, no importance matrix): the block bytes, shape (n_rows, row bytes)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError("rows must be 2-D")
    n_rows, n_per_row = rows.shape
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise ValueError(f"row length {n_per_row} is not a multiple of {qtype.name}'s block of {block}")
    out = np.zeros((n_rows, n_per_row // block * block_bytes), dtype=np.uint8)
    written = ggml_base().ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None)
    if written != out.size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.size}")
    return out


def fp32_to_fp16(values: np.ndarray) -> np.ndarray:
    """ggml's fp32 -> fp16 conversion of each value, as uint16 bit patterns."""
    values = np.ascontiguousarray(values, dtype=np.float32).ravel()
    out = np.zeros(values.size, dtype=np.uint16)
    ggml_base().ggml_fp32_to_fp16_row(values.ctypes.data, out.ctypes.data, values.size)
    return out


def llama_quantize(src: Path, dst: Path, qtype: GGMLQuantizationType, *, nthread: int = 4) -> Path:
    """llama_model_quantize(src -> dst) with the ftype of qtype, pure (every quantized tensor that type), no imatrix."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(FTYPES[qtype])
    params.pure = True
    params.nthread = nthread
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {qtype.name}) returned {status}")
    return dst
