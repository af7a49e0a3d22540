"""params.json as Mistral ships it (the torrent's, and mistral-inference's for consolidated.safetensors): the
parameter dialect both Mistral containers (mistral_pth, mistral_safetensors) read and write.

dim, n_layers, ..., and moe: {num_experts, num_experts_per_tok}. Optional keys are written only when they carry
information, so the real Mixtral-8x7B gives the published line byte for byte (no rope_theta when it is the default
1e6, no max_seq_len when it is the published 32768).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

from convert.common.errors import ConvertError
from convert.model.params import (
    DEFAULT_EXPERTS_PER_TOKEN,
    DEFAULT_MAX_POSITIONS,
    DEFAULT_ROPE_THETA,
    IMPLIED_HEAD_DIM,
    JSON,
    Dialect,
    JsonType,
    Key,
    ModelParams,
    Reading,
    check_consistent,
    json_params,
    read_json_params,
    same_as,
    vocab_from_tensors,
)

INT, NUMBER, WINDOW = JsonType.INT, JsonType.NUMBER, JsonType.WINDOW


def _moe_object(reading: Reading) -> None:
    """moe is what makes the file a mixture of experts: its absence gets a message saying so, before any key."""
    moe = reading.source.get("moe")
    if moe is None:
        raise ConvertError(
            "missing required key 'moe' (an object with num_experts): not a mixture-of-experts model",
            file=reading.file,
        )
    if not isinstance(moe, dict):
        raise ConvertError(f"key 'moe' must be an object with num_experts, got {moe!r:.40}", file=reading.file)


# In the torrent's key order (the writer's); moe last, num_experts_per_tok first within it.
MISTRAL_PARAMS: Final = Dialect(
    name="params.json (Mistral)",
    syntax=JSON,
    keys=(
        Key("dim", ("dim",), INT),
        Key("n_layers", ("n_layers",), INT),
        Key("head_dim", ("head_dim",), INT, default=IMPLIED_HEAD_DIM),
        Key("hidden_dim", ("hidden_dim",), INT),
        Key("n_heads", ("n_heads",), INT),
        Key("n_kv_heads", ("n_kv_heads",), INT, default=same_as("n_heads")),
        Key("norm_eps", ("norm_eps",), NUMBER),
        # -1 was "set by the tokenizer" in old files: then the embedding says.
        Key("vocab_size", ("vocab_size",), INT, absent=(None, -1), fallback=vocab_from_tensors),
        Key("rope_theta", ("rope_theta",), NUMBER, default=DEFAULT_ROPE_THETA, omit=(DEFAULT_ROPE_THETA,)),
        Key("sliding_window", ("sliding_window",), WINDOW, required=False, omit=(None,)),
        Key(
            "max_position_embeddings",
            ("max_seq_len",),
            INT,
            required=False,
            omit=(None, DEFAULT_MAX_POSITIONS),
        ),
        Key("experts_per_tok", ("moe", "num_experts_per_tok"), INT, default=DEFAULT_EXPERTS_PER_TOKEN),
        Key("n_experts", ("moe", "num_experts"), INT),
    ),
    order=(
        _moe_object,
        "dim",
        "n_heads",
        "n_layers",
        "n_kv_heads",
        "head_dim",
        "hidden_dim",
        "n_experts",
        "experts_per_tok",
        "vocab_size",
        "norm_eps",
        "rope_theta",
        "sliding_window",
        "max_position_embeddings",
    ),
    check=check_consistent,
)


def read_mistral_params(path: Path, vocab_from_embedding: int | None) -> ModelParams:
    return read_json_params(MISTRAL_PARAMS, path, vocab_from_embedding)


def mistral_params_json(params: ModelParams) -> str:
    """One line, json.dumps' default spacing, as the torrent's."""
    return json.dumps(json_params(MISTRAL_PARAMS, params))
