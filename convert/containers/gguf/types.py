"""GGUF's tensor names, GGML types and sizes, and the outtypes: which type each tensor takes.

Part of the GGUF container (convert/containers/gguf/): see its __init__ for the sources of every fact.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    LlamaFileType,
)

from convert.common.errors import ConvertError
from convert.containers.gguf.quant_mix import MIXES, quantized_type
from convert.model.params import ModelParams

ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA]  # Mixtral is the llama architecture with experts ("llama")
ALIGNMENT = GGUF_DEFAULT_ALIGNMENT  # 32; no general.alignment key is written, so readers use this default
F32, F16, BF16, Q8_0 = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                        GGMLQuantizationType.Q8_0)  # fmt: skip
Q8_BLOCK, Q8_BLOCK_BYTES = GGML_QUANT_SIZES[Q8_0]  # 32 elements -> fp16 scale + 32 int8 = 34 bytes

# --outtype -> general.file_type: convert_hf_to_gguf.py's --outtype choices (f32, f16, bf16, q8_0), then
# llama-quantize's mixes (quant_mix.MIXES: what llama-quantize writes from an f32 or bf16 GGUF of the model).
OUTTYPES: Mapping[str, LlamaFileType] = MappingProxyType(
    {
        "f32": LlamaFileType.ALL_F32,
        "f16": LlamaFileType.MOSTLY_F16,
        "bf16": LlamaFileType.MOSTLY_BF16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
        **{outtype: ftype for outtype, (ftype, _) in MIXES.items()},
    }
)
# The outtype that keeps a checkpoint's own element type (the default: no silent cast).
OUTTYPE_OF_DTYPE: Mapping[str, str] = MappingProxyType({"F32": "f32", "F16": "f16", "BF16": "bf16"})
_WIDE_TYPE = MappingProxyType({"f32": F32, "f16": F16, "bf16": BF16, "q8_0": Q8_0})

# The block-quantized GGML types, by name (the dtype our records give them): blocks run along a row (ggml's ne0),
# so a tensor's rows, and an expert's block of rows, are whole byte ranges that can be moved without decoding.
QUANTIZED: Mapping[str, GGMLQuantizationType] = MappingProxyType(
    {t.name: t for t, (block, _) in GGML_QUANT_SIZES.items() if block > 1}
)

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



def tensor_name(kind: MODEL_TENSOR, layer: int | None = None) -> str:
    """A tensor's GGUF name, spelled by gguf-py (e.g. blk.3.ffn_gate_exps.weight)."""
    base = TENSOR_NAMES[kind]
    return (base.format(bid=layer) if layer is not None else base) + ".weight"


_GATE_INP = re.compile(re.escape(TENSOR_NAMES[MODEL_TENSOR.FFN_GATE_INP]).replace(r"\{bid\}", r"\d+") + r"\.weight")


def tensor_type(
    name: str, shape: tuple[int, ...], outtype: str, params: ModelParams | None = None
) -> GGMLQuantizationType:
    """The GGML type llama.cpp's converter gives a Mixtral tensor (ModelBase.prepare_tensors):

    - 1-D tensors and names ending in _norm.weight: F32 ("most of the codebase ... only handles F32" for norms);
    - the router ffn_gate_inp: F32 (one of the tensors "always in float32", matching llama-quant's rules);
    - anything else: the outtype's type; for q8_0, a row (the innermost dimension, shape[-1] in torch order) that is
      not a whole number of 32-element blocks makes gguf.quants raise QuantError and the converter falls back to F16.
    token_embd and output get no special case at q8_0 (their override only applies to the TQ1_0/TQ2_0 outtypes).

    For llama-quantize's mixes (q4_k_m ...), quant_mix's rules, which depend on the model's layer and expert counts
    (params); a tensor they leave unquantized is F32, as it is in the converter's f32 or bf16 GGUF they start from.
    """
    if outtype in MIXES:
        if params is None:
            raise ValueError(f"--outtype {outtype}: the type of {name} depends on the model's parameters")
        return quantized_type(name, shape, outtype, params) or F32
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


