"""GGUF's metadata: the key/value entries llama.cpp's converter writes for Mixtral (the llama.* keys are this
container's parameter dialect), the tokenizer's entries, and the model parameters read back from them.

Part of the GGUF container (convert/containers/gguf/): see its __init__ for the sources of every fact.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from gguf import (
    GGML_QUANT_VERSION,
    GGUFType,
    GGUFValueType,
    Keys,
    TokenType,
)

from convert.common.errors import ConvertError
from convert.containers.gguf.types import ARCH, file_type
from convert.model.params import (
    ABSENT,
    DEFAULT_MAX_POSITIONS,
    IMPLIED_HEAD_DIM,
    Dialect,
    Key,
    ModelParams,
    Reading,
    Syntax,
    head_dim_is_not_implied,
    max_positions,
    read_key,
    read_params,
    same_as,
    written_keys,
)
from convert.tokenizer.chat_template import CHAT_TEMPLATE
from convert.tokenizer.sentencepiece import SentencePieceModel, checked_model, special_ids

if TYPE_CHECKING:
    from pathlib import Path


@dataclass(frozen=True)
class KV:
    """One metadata entry with the GGUF value type it is written with; item_type for arrays."""

    key: str
    type: GGUFValueType
    value: Any
    item_type: GGUFValueType | None = None


def _normal(vtype: GGUFValueType, value: Any) -> Any:
    """A value as the file holds it, in plain JSON types: a FLOAT32 as the float32 it is written as (1e-05 reads
    back as 9.999999747378752e-06), integers and bools as Python's."""
    if vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        return float(np.float32(value)) if vtype == GGUFValueType.FLOAT32 else float(value)
    if vtype == GGUFValueType.BOOL:
        return bool(value)
    if vtype == GGUFValueType.STRING:
        return value if isinstance(value, str) else bytes(value).decode("utf-8", "surrogateescape")
    return int(value)


def key_record(entry: KV) -> dict[str, Any]:
    """What manifest.json records of one metadata entry, enough to name the key whose type or value changed: the
    type and value; for an array (the vocabulary's 32,000 tokens) its item type, length and the SHA-256 of its
    items as JSON."""
    if entry.type != GGUFValueType.ARRAY:
        return {"type": entry.type.name, "value": _normal(entry.type, entry.value)}
    assert entry.item_type is not None
    items = [_normal(entry.item_type, item) for item in entry.value]
    digest = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8", "surrogateescape")).hexdigest()
    return {"type": f"ARRAY[{entry.item_type.name}]", "count": len(items), "sha256": digest}


def key_records(entries: Iterable[KV]) -> dict[str, dict[str, Any]]:
    return {entry.key: key_record(entry) for entry in entries}


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


def _float32_decimal(value: float) -> float:
    """The shortest decimal that rounds to this float32 (1e-05, not 9.999999747378752e-06): params.json and
    config.json written from it read the same as the original's."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


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


class _Gguf(Syntax):
    """Metadata entries as llama.cpp's loader reads them: of the one type it requires, and positive. Floats are
    read back as the shortest decimal of their float32 (the dialect's rounding); defaults are taken as they are,
    unchecked, as the loader takes them."""

    checks_defaults = False

    def lookup(self, source: Any, key: Key, file: Path | str) -> Any:
        value = _get(source, key.name, key.kind, str(file), required=False)
        return ABSENT if value is None else value

    def missing(self, key: Key) -> str:
        return f"GGUF: missing key {key.name}"

    def check(self, key: Key, value: Any, file: Path | str) -> Any:
        if key.kind == GGUFValueType.FLOAT32:
            if not (math.isfinite(value) and value > 0):
                raise ConvertError(f"GGUF: key {key.name} must be a positive finite number, got {value}", file=file)
            return _float32_decimal(value)
        if value <= 0:
            raise ConvertError(f"GGUF: key {key.name} must be positive, got {value}", file=file)
        return value


GGUF: Final[Syntax] = _Gguf()
U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32


def _llama(field: str, key: str, kind: GGUFValueType, **rules: Any) -> Key:
    return Key(field, (_llm(key),), kind, **rules)


def _vocab_from_token_list(reading: Reading) -> int:
    """llama.vocab_size is optional: llama.cpp counts the token list then."""
    tokens = reading.source.get(Keys.Tokenizer.LIST)
    vocab = len(tokens.value) if tokens is not None and tokens.type == GGUFValueType.ARRAY else None
    if not vocab:
        raise ConvertError(f"GGUF: no {_llm(Keys.LLM.VOCAB_SIZE)} and no token list to count", file=reading.file)
    return vocab


# Written for head_dim; read only to check that they agree with it (_one_head_size).
_VALUE_LENGTH: Final = _llama(
    "head_dim",
    Keys.Attention.VALUE_LENGTH,
    U32,
    required=False,
    default=IMPLIED_HEAD_DIM,
    when=head_dim_is_not_implied,
    read=False,
)
_ROPE_DIMENSIONS: Final = _llama(
    "head_dim", Keys.Rope.DIMENSION_COUNT, U32, required=False, default=same_as("head_dim"), read=False
)

# What TextModel.set_gguf_parameters writes, in its order. context_length is max_position_embeddings (32768 when
# params have none), and 32768 reads back as "unset" (params.json omits it). No rope-scaling or sliding-window
# key: Mixtral's config has neither for llama.cpp.
_TEXT_MODEL_KEYS: Final = (
    _llama("n_layers", Keys.LLM.BLOCK_COUNT, U32),
    _llama(
        "max_position_embeddings",
        Keys.LLM.CONTEXT_LENGTH,
        U32,
        encode=max_positions,
        decode=lambda context: None if context == DEFAULT_MAX_POSITIONS else context,
    ),
    _llama("dim", Keys.LLM.EMBEDDING_LENGTH, U32),
    _llama("hidden_dim", Keys.LLM.FEED_FORWARD_LENGTH, U32),
    _llama("n_heads", Keys.Attention.HEAD_COUNT, U32),
    _llama("n_kv_heads", Keys.Attention.HEAD_COUNT_KV, U32, required=False, default=same_as("n_heads")),
    # llama.cpp's default when the key is absent is 10000, not Mixtral's 1e6.
    _llama("rope_theta", Keys.Rope.FREQ_BASE, F32, required=False, default=10000.0),
    _llama("norm_eps", Keys.Attention.LAYERNORM_RMS_EPS, F32),
    _llama(
        "n_experts",
        Keys.LLM.EXPERT_COUNT,
        U32,
        missing=f"GGUF: no {_llm(Keys.LLM.EXPERT_COUNT)}: not a mixture-of-experts model",
    ),
    _llama("experts_per_tok", Keys.LLM.EXPERT_USED_COUNT, U32),
    # key_length and value_length only when head_dim is not dim / n_heads: config.json then carries head_dim
    # (transformers 5 leaves it None otherwise).
    _llama(
        "head_dim",
        Keys.Attention.KEY_LENGTH,
        U32,
        required=False,
        default=IMPLIED_HEAD_DIM,
        when=head_dim_is_not_implied,
    ),
    _VALUE_LENGTH,
)
# What LlamaModel.set_gguf_parameters adds, after general.file_type.
_LLAMA_MODEL_KEYS: Final = (
    _llama("vocab_size", Keys.LLM.VOCAB_SIZE, U32, fallback=_vocab_from_token_list),
    _ROPE_DIMENSIONS,
)


def _llama_architecture(reading: Reading) -> None:
    arch = _get(reading.source, Keys.General.ARCHITECTURE, GGUFValueType.STRING, str(reading.file))
    if arch != ARCH:
        raise ConvertError(f"GGUF: architecture {arch!r} is not {ARCH!r} (Mixtral)", file=reading.file)


def _one_head_size(reading: Reading) -> None:
    """llama.cpp takes three head sizes (keys, values, rotary dimensions); Mixtral has one."""
    head_dim = reading.got["head_dim"]
    value_length, rope_dims = read_key(reading, _VALUE_LENGTH), read_key(reading, _ROPE_DIMENSIONS)
    if value_length != head_dim or rope_dims != head_dim:
        raise ConvertError(
            f"GGUF: key_length {head_dim}, value_length {value_length} and rope.dimension_count {rope_dims} differ; "
            "Mixtral uses one head size for all three",
            file=reading.file,
        )


def _consistent(params: ModelParams, file: Path | str) -> None:
    if params.n_heads % params.n_kv_heads or params.experts_per_tok > params.n_experts or params.head_dim % 2:
        raise ConvertError(
            f"GGUF: inconsistent hyperparameters (heads {params.n_heads}/{params.n_kv_heads}, experts "
            f"{params.experts_per_tok}/{params.n_experts}, head size {params.head_dim})",
            file=file,
        )


# The llama.* keys: this container's parameter dialect. Read in the order these keys have always been checked in
# (the first broken rule is the one reported).
GGUF_PARAMS: Final = Dialect(
    name="GGUF llama.*",
    syntax=GGUF,
    keys=_TEXT_MODEL_KEYS + _LLAMA_MODEL_KEYS,
    order=(
        _llama_architecture,
        "dim",
        "n_heads",
        "n_experts",
        "head_dim",
        _one_head_size,
        "vocab_size",
        "norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "n_layers",
        "n_kv_heads",
        "hidden_dim",
        "experts_per_tok",
    ),
    check=_consistent,
    unset=("sliding_window",),
)


def _entries(keys: tuple[Key, ...], params: ModelParams) -> list[KV]:
    return [(_u32 if key.kind == U32 else _f32)(key.name, value) for key, value in written_keys(keys, params)]


def model_metadata(params: ModelParams, outtype: str, *, name: str) -> list[KV]:
    """The keys llama.cpp's converter writes for a Mixtral config.json, in its order and with its value types,
    up to general.quantization_version (tokenizer_metadata follows). The order: general.architecture (GGUFWriter's
    constructor), general.type and general.name (prepare_metadata), TextModel.set_gguf_parameters, then
    LlamaModel.set_gguf_parameters' vocab_size and rope.dimension_count, then the quantization version. The
    llama.* keys and their values, as that converter reads them from our config.json, are GGUF_PARAMS'."""
    return [
        _str(Keys.General.ARCHITECTURE, ARCH),
        _str(Keys.General.TYPE, GGUFType.MODEL),
        _str(Keys.General.NAME, name),
        *_entries(_TEXT_MODEL_KEYS, params),
        _u32(Keys.General.FILE_TYPE, file_type(outtype)),
        *_entries(_LLAMA_MODEL_KEYS, params),
        _u32(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION),
    ]


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


# llama.cpp reads these keys of the architecture too; at these values they change nothing it computes (a linear
# rope scale of 1 is no scaling), so a file holding them is the model without them. At any other value the model
# is another one, which no target's parameters can say: refused below.
NEUTRAL: Final[Mapping[str, tuple[object, ...]]] = {
    _llm(Keys.Rope.SCALING_TYPE): ("none",),
    _llm(Keys.Rope.SCALING_FACTOR): (1.0,),
    f"{ARCH}.rope.scale_linear": (1.0,),  # llama-arch.cpp LLM_KV_ROPE_SCALE_LINEAR; gguf-py names no constant
}
MAPPED: Final = frozenset(key.name for key in GGUF_PARAMS.keys) | {_VALUE_LENGTH.name, _ROPE_DIMENSIONS.name}
# Written by convert.py of the per-expert era ("Meta AI original pth") and read by no llama.cpp loader (its saver
# has the key commented out): a label, whatever its value.
IGNORED: Final = frozenset({f"{ARCH}.tensor_data_layout"})


def check_unmapped(metadata: Mapping[str, KV], *, file: str) -> None:
    """Every key of the architecture (llama.*) is one this tool maps (GGUF_PARAMS), or one at a value that changes
    nothing (NEUTRAL). Any other (rope scaling, a sliding window, logit scaling, ...) changes what llama.cpp
    computes and has no place in params.json or config.json as this tool writes them: converting would make
    another model, so it is refused, naming the key. docs/formats.md lists both sets."""
    for key, entry in metadata.items():
        if not key.startswith(f"{ARCH}.") or key in MAPPED or key in IGNORED:
            continue
        if key in NEUTRAL and entry.value in NEUTRAL[key]:
            continue
        value = entry.value if entry.type != GGUFValueType.ARRAY else f"an array of {len(entry.value)}"
        raise ConvertError(
            f"GGUF: key {key} = {value!r:.60} changes what llama.cpp computes and this tool maps it to no layout's "
            "parameters; converting would make another model, so it is refused",
            file=file,
        )


def check_vocabulary(metadata: Mapping[str, KV], embedding_rows: int | None, *, file: str) -> ConvertError | None:
    """llama.cpp refuses a file whose token list is not as long as the embedding has rows (the embedding does not
    fit the vocabulary): so does this tool, naming both counts."""
    tokens = metadata.get(Keys.Tokenizer.LIST)
    if tokens is None or tokens.type != GGUFValueType.ARRAY or embedding_rows is None:
        return None
    if len(tokens.value) != embedding_rows:
        return ConvertError(
            f"GGUF: {Keys.Tokenizer.LIST} holds {len(tokens.value):,} tokens but the embedding has "
            f"{embedding_rows:,} rows: llama.cpp refuses such a file (the vocabulary does not fit the embedding)",
            file=file,
        )
    return None


def params_from_metadata(metadata: Mapping[str, KV], *, file: str) -> ModelParams:
    """ModelParams from a llama-architecture GGUF's keys (the inverse of model_metadata), read as llama.cpp's
    loader reads them (GGUF_PARAMS): head_count_kv defaults to head_count, key_length to embedding_length /
    head_count, rope.freq_base to 10000 (llama.cpp's default when the key is absent, not Mixtral's 1e6); vocab_size
    from the token list when llama.vocab_size is absent. A context length of 32768 reads as "unset"."""
    return read_params(GGUF_PARAMS, metadata, file)
