"""Model hyperparameters: read from params.json (Mistral style), an HF-style params.json (megablocks) or
config.json (transformers 4.x top-level rope_theta, or 5.x rope_parameters), and written as config.json.

A missing rope_theta means 1e6, mistral-inference's default for Mixtral; other converters' 1e4 silently breaks
the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from convert.common.errors import ConvertError
from convert.fileio.regular import MAX_PARAMS_JSON, read_small

DEFAULT_ROPE_THETA = 1_000_000.0
DEFAULT_EXPERTS_PER_TOKEN = 2
DEFAULT_MAX_POSITIONS = 32768  # what config.json says when params.json is silent, as published


@dataclass(frozen=True)
class ModelParams:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    n_experts: int
    experts_per_tok: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    sliding_window: int | None
    max_position_embeddings: int | None

    @property
    def head_dim_is_implied(self) -> bool:
        return self.head_dim * self.n_heads == self.dim

    def shape_env(self) -> dict[str, int]:
        """The integer parameters, by the names canonical.toml's shapes use."""
        return {k: v for k, v in asdict(self).items() if type(v) is int}


def read_json_object(path: Path, limit: int = MAX_PARAMS_JSON) -> dict:
    """A JSON object from a regular file of at most limit bytes (checked before parsing: parsing costs many times
    the text's size)."""
    try:
        data = json.loads(read_small(path, limit, path.name))
    except FileNotFoundError:
        raise ConvertError("file is missing", file=path) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConvertError(f"not valid JSON: {exc}", file=path) from None
    except RecursionError:
        raise ConvertError("not valid JSON: nested too deeply", file=path) from None
    if not isinstance(data, dict):
        raise ConvertError("must hold a JSON object", file=path)
    return data


class _Fields:
    """Typed access to one JSON object, each failure naming the file and the key."""

    def __init__(self, data: dict, path: Path) -> None:
        self.data = data
        self.path = path

    def integer(self, key: str, default: int | None = None, *, required: bool = True) -> int | None:
        value = self.data.get(key)
        if value is None:  # absent, or null as transformers 5 writes an unset head_dim
            value = default
        if value is None:
            if required:
                raise ConvertError(f"missing required key {key!r}", file=self.path)
            return None
        if type(value) is not int or value <= 0:
            raise ConvertError(f"key {key!r} must be a positive integer, got {value!r}", file=self.path)
        return value

    def number(self, key: str, default: float | None = None) -> float:
        value = self.data.get(key)
        if value is None:
            value = default
        if value is None:
            raise ConvertError(f"missing required key {key!r}", file=self.path)
        try:
            number = float(value) if type(value) in (int, float) else math.nan
        except OverflowError:
            number = math.inf
        if not math.isfinite(number) or number <= 0:
            raise ConvertError(f"key {key!r} must be a positive finite number, got {value!r:.40}", file=self.path)
        return number

    def window(self, key: str) -> int | None:
        """A sliding window: absent or null means none; megablocks stores it as a string."""
        value = self.data.get(key)
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("", "null", "none"):
                return None
            if not (text.isascii() and text.isdigit()):
                raise ConvertError(f"key {key!r} must be an integer or null, got {value!r}", file=self.path)
            value = int(text)
        if value is None:
            return None
        if type(value) is not int or value <= 0:
            raise ConvertError(f"key {key!r} must be a positive integer or null, got {value!r}", file=self.path)
        return value


def _checked(params: ModelParams, path: Path) -> ModelParams:
    if params.n_heads % params.n_kv_heads:
        raise ConvertError(f"n_heads {params.n_heads} is not a multiple of n_kv_heads {params.n_kv_heads}", file=path)
    if params.head_dim % 2:
        raise ConvertError(f"head_dim {params.head_dim} must be even for rotary embeddings", file=path)
    if params.experts_per_tok > params.n_experts:
        raise ConvertError(
            f"experts per token {params.experts_per_tok} exceeds the {params.n_experts} experts", file=path
        )
    return params


def read_mistral_params(path: Path, vocab_from_tensors: int | None) -> ModelParams:
    """params.json as Mistral ships it (dim, n_layers, ..., moe: {num_experts, num_experts_per_tok})."""
    fields = _Fields(read_json_object(path), path)
    moe = fields.data.get("moe")
    if moe is None:
        raise ConvertError(
            "missing required key 'moe' (an object with num_experts): not a mixture-of-experts model", file=path
        )
    if not isinstance(moe, dict):
        raise ConvertError(f"key 'moe' must be an object with num_experts, got {moe!r:.40}", file=path)
    moe_fields = _Fields(moe, path)
    dim = fields.integer("dim")
    n_heads = fields.integer("n_heads")
    vocab = fields.data.get("vocab_size")
    return _checked(
        ModelParams(
            dim=dim,
            n_layers=fields.integer("n_layers"),
            n_heads=n_heads,
            n_kv_heads=fields.integer("n_kv_heads", n_heads),
            head_dim=fields.integer("head_dim", dim // n_heads),
            hidden_dim=fields.integer("hidden_dim"),
            n_experts=moe_fields.integer("num_experts"),
            experts_per_tok=moe_fields.integer("num_experts_per_tok", DEFAULT_EXPERTS_PER_TOKEN),
            # Old params.json files wrote vocab_size -1 (set by the tokenizer); then the embedding says.
            vocab_size=fields.integer("vocab_size") if vocab not in (None, -1) else _vocab(vocab_from_tensors, path),
            norm_eps=fields.number("norm_eps"),
            rope_theta=fields.number("rope_theta", DEFAULT_ROPE_THETA),
            sliding_window=fields.window("sliding_window"),
            max_position_embeddings=fields.integer("max_seq_len", required=False),
        ),
        path,
    )


def _vocab(vocab_from_tensors: int | None, path: Path) -> int:
    if not vocab_from_tensors:
        raise ConvertError("missing required key 'vocab_size' and no non-empty embedding to read it from", file=path)
    return vocab_from_tensors


def read_hf_params(path: Path, vocab_from_tensors: int | None = None, *, megablocks: bool = False) -> ModelParams:
    """HF-style keys: the megablocks params.json and config.json, 4.x (rope_theta) or 5.x (rope_parameters).

    megablocks: that params.json cannot say "no sliding window" in a way transformers' script reads (see
    hf_params_json), so a window no shorter than the longest sequence the model supports is read as none."""
    fields = _Fields(read_json_object(path), path)
    dim = fields.integer("hidden_size")
    n_heads = fields.integer("num_attention_heads")
    theta_source = fields
    rope_parameters = fields.data.get("rope_parameters")
    if rope_parameters is not None:
        if not isinstance(rope_parameters, dict):
            raise ConvertError("key 'rope_parameters' must be an object", file=path)
        if rope_parameters.get("rope_type", "default") != "default":
            raise ConvertError(f"rope_type {rope_parameters['rope_type']!r} is not Mixtral's default rotary", file=path)
        theta_source = _Fields(rope_parameters, path)
    window = fields.window("sliding_window")
    max_positions = fields.integer("max_position_embeddings", required=False)
    if megablocks and window is not None and window >= (max_positions or DEFAULT_MAX_POSITIONS):
        window = None
    return _checked(
        ModelParams(
            dim=dim,
            n_layers=fields.integer("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=fields.integer("num_key_value_heads", n_heads),
            head_dim=fields.integer("head_dim", dim // n_heads),
            hidden_dim=fields.integer("intermediate_size"),
            n_experts=fields.integer("num_local_experts"),
            experts_per_tok=fields.integer("num_experts_per_tok", DEFAULT_EXPERTS_PER_TOKEN),
            vocab_size=fields.integer("vocab_size")
            if "vocab_size" in fields.data
            else _vocab(vocab_from_tensors, path),
            norm_eps=fields.number("rms_norm_eps"),
            rope_theta=theta_source.number("rope_theta", DEFAULT_ROPE_THETA),
            sliding_window=window,
            max_position_embeddings=max_positions,
        ),
        path,
    )


def hf_config_json(params: ModelParams, torch_dtype: str, defaults: dict) -> str:
    """config.json exactly as transformers serializes it (indent 2, sorted keys, trailing newline)."""
    config = dict(defaults)
    config.update(
        hidden_size=params.dim,
        intermediate_size=params.hidden_dim,
        num_attention_heads=params.n_heads,
        num_experts_per_tok=params.experts_per_tok,
        num_hidden_layers=params.n_layers,
        num_key_value_heads=params.n_kv_heads,
        num_local_experts=params.n_experts,
        rms_norm_eps=params.norm_eps,
        rope_theta=params.rope_theta,
        sliding_window=params.sliding_window,
        torch_dtype=torch_dtype,
        vocab_size=params.vocab_size,
    )
    config["max_position_embeddings"] = params.max_position_embeddings or DEFAULT_MAX_POSITIONS
    if not params.head_dim_is_implied:
        config["head_dim"] = params.head_dim
    return json_text(config)


def json_text(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def mistral_params_json(params: ModelParams) -> str:
    """params.json in the torrent's key order and spacing; optional keys only when they carry information, so the
    real Mixtral-8x7B gives the published line byte for byte (no rope_theta when it is the default 1e6)."""
    data: dict[str, object] = {
        "dim": params.dim,
        "n_layers": params.n_layers,
        "head_dim": params.head_dim,
        "hidden_dim": params.hidden_dim,
        "n_heads": params.n_heads,
        "n_kv_heads": params.n_kv_heads,
        "norm_eps": params.norm_eps,
        "vocab_size": params.vocab_size,
    }
    if params.rope_theta != DEFAULT_ROPE_THETA:
        data["rope_theta"] = params.rope_theta
    if params.sliding_window is not None:
        data["sliding_window"] = params.sliding_window
    if params.max_position_embeddings not in (None, DEFAULT_MAX_POSITIONS):
        data["max_seq_len"] = params.max_position_embeddings
    data["moe"] = {"num_experts_per_tok": params.experts_per_tok, "num_experts": params.n_experts}
    return json.dumps(data)


def hf_params_json(params: ModelParams) -> str:
    """The megablocks upload's HF-style params.json, with the keys and value types transformers'
    convert_mixtral_weights_to_hf.py reads (4.36 to 4.45): it passes sliding_window through int(), 4.36 without
    checking that the key exists, so neither null nor "null" nor a missing key is read by both. "No sliding
    window" is written as a window of the model's whole context (max_position_embeddings, 32768 by default), in a
    string as uploaded: no token ever lies that far back, so the attention is the same for every sequence the model
    supports. Reading it back gives none (read_hf_params with megablocks)."""
    positions = params.max_position_embeddings or DEFAULT_MAX_POSITIONS
    window = positions if params.sliding_window is None else params.sliding_window
    data: dict[str, object] = {
        "hidden_size": params.dim,
        "intermediate_size": params.hidden_dim,
        "num_attention_heads": params.n_heads,
        "num_hidden_layers": params.n_layers,
        "num_key_value_heads": params.n_kv_heads,
        "num_local_experts": params.n_experts,
        "num_experts_per_tok": params.experts_per_tok,
        "vocab_size": params.vocab_size,
        "rms_norm_eps": params.norm_eps,
        "rope_theta": params.rope_theta,
        "sliding_window": str(window),
    }
    if not params.head_dim_is_implied:
        data["head_dim"] = params.head_dim
    if params.max_position_embeddings not in (None, DEFAULT_MAX_POSITIONS):
        data["max_position_embeddings"] = params.max_position_embeddings
    return json.dumps(data, indent=2) + "\n"
