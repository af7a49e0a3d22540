"""GGUF's metadata: the key/value entries llama.cpp's converter writes for Mixtral (the llama.* keys are this
container's parameter dialect), the tokenizer's entries, and the model parameters read back from them.

Part of the GGUF container (convert/containers/gguf/): see its __init__ for the sources of every fact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import (
    GGML_QUANT_VERSION,
    GGUFType,
    GGUFValueType,
    Keys,
    TokenType,
)

from convert.common.errors import ConvertError
from convert.model.params import DEFAULT_MAX_POSITIONS, ModelParams
from convert.tokenizer.chat_template import CHAT_TEMPLATE
from convert.tokenizer.sentencepiece import SentencePieceModel, checked_model, special_ids

if TYPE_CHECKING:
    pass
from convert.containers.gguf.types import ARCH, file_type


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
    tokenizer.json and tokenizer_config.json as convert/tokenizer/ writes them), in its order:

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


