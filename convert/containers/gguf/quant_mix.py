"""Which GGML type each tensor of a Mixtral takes in a quantized GGUF: llama-quantize's choice, rule for rule.

llama-quantize (llama_model_quantize) does not give every tensor the type asked for: an `ftype` such as Q4_K_M is
a mix. For each tensor it decides (src/llama-quant.cpp of ggml-org/llama.cpp, read at the version llama-cpp-python
0.3.36 vendors, 0c1e57098; the rules for this architecture have not changed since Mixtral's release):

- tensor_allows_quantization: only names ending in "weight", of 2 or more dimensions, not `_norm.weight`, not
  the router `ffn_gate_inp.weight`. The others keep their type (F32 in llama.cpp's converter's output).
- llama_ftype_get_default_type: the ftype's base type (Q4_K_M -> Q4_K, Q5_K_S -> Q5_K, Q3_K_M -> Q3_K, ...).
- llama_tensor_get_type_impl, by category (tensor_get_category: substrings of the name, in that order):
  - output.weight: Q8_0 where its rows are not whole blocks of the base type, else Q6_K unless the base is Q8_0;
  - attn_v: Q3_K_M: Q5_K for the first two attn_v tensors met, then Q4_K; Q3_K_L: Q5_K; Q4_K_M and Q5_K_M: Q6_K
    where use_more_bits(i, n) over the attn_v tensors met; Q4_K_S: Q5_K for the first four; a 70B-type model
    (80 layers, grouped-query attention, not 8 experts) raises Q3_K/Q4_K to Q5_K; and with 8 experts, Q8_0 always.
    "Met" is the order llama-quantize visits tensors (llama_model_loader's weights_map, a std::map ordered by
    weight_name_comparer: the `blk.N.` number first, -1 for names without one, then the name as bytes), so the
    i-th attn_v met is layer i's.
  - attn_k: Q8_0 with 8 experts ("for the 8-expert model, bumping this to Q8_0 trades just ~128MB").
  - ffn_down (the layer parsed from `blk.N.` when there are experts): Q3_K_M: Q5_K below n/16, else Q4_K;
    Q3_K_L: Q5_K; Q4_K_M and Q5_K_M: Q6_K where use_more_bits(layer, n_layers); Q4_K_S: Q5_K below n/8.
  - attn_output with 8 experts: Q5_K for Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M; with other expert counts: Q3_K_M Q4_K,
    Q3_K_L Q5_K.
  - use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2, in C's integer arithmetic (division and
    remainder truncate toward zero: (i - n/8) % 3 is negative for no i here, since i >= n/8 when it is reached).
- tensor_type_fallback: a tensor whose rows (ne[0], the last dimension in our shapes) are not whole blocks of the
  chosen type takes Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (32-value blocks), a 32-value type keeps
  its type; and F16 if the rows are not whole 32-value blocks either.

The ftypes offered are those whose every chosen type has a byte-exact quantizer here (kquants.py): the K-quant
mixes Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K and the legacy Q4_0, Q4_1, Q5_0, Q5_1 (llama-quantize's Q8_0 is not
offered: `--outtype q8_0` is llama.cpp's converter's q8_0, a file of another order and keys). No importance
matrix: these are llama-quantize's choices and bytes without `--imatrix`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from convert.model.params import ModelParams

Q = GGMLQuantizationType
F = LlamaFileType

# --outtype -> (llama_ftype, its base type): llama_ftype_get_default_type.
MIXES: Mapping[str, tuple[LlamaFileType, GGMLQuantizationType]] = MappingProxyType(
    {
        "q4_0": (F.MOSTLY_Q4_0, Q.Q4_0),
        "q4_1": (F.MOSTLY_Q4_1, Q.Q4_1),
        "q5_0": (F.MOSTLY_Q5_0, Q.Q5_0),
        "q5_1": (F.MOSTLY_Q5_1, Q.Q5_1),
        "q3_k_s": (F.MOSTLY_Q3_K_S, Q.Q3_K),
        "q3_k_m": (F.MOSTLY_Q3_K_M, Q.Q3_K),
        "q3_k_l": (F.MOSTLY_Q3_K_L, Q.Q3_K),
        "q4_k_s": (F.MOSTLY_Q4_K_S, Q.Q4_K),
        "q4_k_m": (F.MOSTLY_Q4_K_M, Q.Q4_K),
        "q5_k_s": (F.MOSTLY_Q5_K_S, Q.Q5_K),
        "q5_k_m": (F.MOSTLY_Q5_K_M, Q.Q5_K),
        "q6_k": (F.MOSTLY_Q6_K, Q.Q6_K),
    }
)

# Every quantized type a mix can choose (the F16 fallback aside): what kquants.py must quantize byte for byte.
CHOSEN = frozenset({Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0})

_FALLBACK = MappingProxyType({Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0})
_LAYER = re.compile(r"blk\.(\d+)\.")


def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's use_more_bits, in C's int arithmetic (i, n >= 0, so // and % agree with C where used)."""
    eighth = n // 8
    return i < eighth or i >= 7 * n // 8 or (i - eighth) % 3 == 2


def _category(name: str) -> str:
    """tensor_get_category, for the names a llama-architecture GGUF has."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for category in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight",
                     "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):  # fmt: skip
        if category in name:
            return category.removesuffix(".weight")
    return "other"


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """tensor_allows_quantization for this architecture's names."""
    return (
        len(shape) >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name
    )


def tensor_order(name: str) -> tuple[int, bytes]:
    """The order llama-quantize visits and writes tensors in (weight_name_comparer): layer, then name bytes."""
    found = _LAYER.match(name)
    return (int(found[1]) if found else -1, name.encode())


def quantized_type(name: str, shape: tuple[int, ...], outtype: str, model: ModelParams) -> GGMLQuantizationType | None:
    """The type llama-quantize gives tensor name for outtype; None where it keeps the tensor's own type."""
    if not allows_quantization(name, shape):
        return None
    ftype, base = MIXES[outtype]
    chosen = _mix_rule(name, shape, ftype, base, model)
    return _fallback(chosen, shape[-1])


def _mix_rule(
    name: str, shape: tuple[int, ...], ftype: LlamaFileType, base: GGMLQuantizationType, model: ModelParams
) -> GGMLQuantizationType:
    category = _category(name)
    eight = model.n_experts == 8
    if category == "output":
        if shape[-1] % GGML_QUANT_SIZES[base][0]:
            return Q.Q8_0
        return base if base == Q.Q8_0 else Q.Q6_K
    if category in ("attn_v", "attn_qkv", "attn_kv_b"):
        chosen = base
        i, n = _layer(name), model.n_layers  # the i-th attn_v met (tensor_order) is layer i's
        if ftype == F.MOSTLY_Q3_K_M:
            chosen = Q.Q5_K if i < 2 else Q.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            chosen = Q.Q5_K
        elif ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(i, n):
            chosen = Q.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and i < 4:
            chosen = Q.Q5_K
        seventy_b = model.n_layers == 80 and model.n_heads != model.n_kv_heads  # llama.cpp's LLM_TYPE_70B
        if seventy_b and not eight and chosen in (Q.Q3_K, Q.Q4_K):
            chosen = Q.Q5_K
        return Q.Q8_0 if eight else chosen
    if category == "attn_k":
        return Q.Q8_0 if eight else base
    if category == "ffn_down":
        layer = _layer(name)
        n = model.n_layers
        if ftype == F.MOSTLY_Q3_K_M:
            return Q.Q5_K if layer < n // 16 else Q.Q4_K
        if ftype == F.MOSTLY_Q3_K_L:
            return Q.Q5_K
        if ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M):
            return Q.Q6_K if use_more_bits(layer, n) else base
        if ftype == F.MOSTLY_Q4_K_S and layer < n // 8:
            return Q.Q5_K
        return base
    if category == "attn_output":
        if eight:
            lifted = (F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M)
            return Q.Q5_K if ftype in lifted else base
        return {F.MOSTLY_Q3_K_M: Q.Q4_K, F.MOSTLY_Q3_K_L: Q.Q5_K}.get(ftype, base)
    return base


def _layer(name: str) -> int:
    """The layer of a blk.N. tensor (layer_info's sscanf; Mixtral's ffn_down tensors always have one)."""
    found = _LAYER.match(name)
    if found is None:
        raise ValueError(f"no layer number in {name!r}")
    return int(found[1])


def _fallback(chosen: GGMLQuantizationType, row: int) -> GGMLQuantizationType:
    """tensor_type_fallback: a type whose blocks do not tile the row falls back to a 32-value type, then F16."""
    block = GGML_QUANT_SIZES[chosen][0]
    if row % block == 0:
        return chosen
    fallback = _FALLBACK.get(chosen, chosen)
    return fallback if row % GGML_QUANT_SIZES[fallback][0] == 0 else Q.F16
