"""Model hyperparameters and the mechanism every container's parameter dialect is described with.

A dialect is a file's way of spelling ModelParams: Mistral's params.json, megablocks' HF-style params.json,
config.json (transformers 4.x top-level rope_theta, or 5.x rope_parameters), GGUF's llama.* keys. Each container
owns its dialect as one table of Keys (convert/containers/); read_params and written_keys here are the one reader
and the one writer those tables drive, and JSON is the syntax of the JSON dialects (GGUF's lives beside its table).

A missing rope_theta means 1e6, mistral-inference's default for Mixtral; other converters' 1e4 silently breaks
the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Final

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


FIELDS: Final = tuple(f.name for f in fields(ModelParams))


def max_positions(params: ModelParams) -> int:
    """The context length a file that must state one states: 32768, as published, when params have none."""
    return params.max_position_embeddings or DEFAULT_MAX_POSITIONS


def head_dim_is_not_implied(params: ModelParams) -> bool:
    """Whether a dialect that leaves head_dim out when it is dim / n_heads must write it."""
    return not params.head_dim_is_implied


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


def json_text(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The description of a dialect.


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Final = _Absent()  # what a syntax's lookup gives for a key the file does not have (JSON null is a value)


@dataclass(frozen=True)
class Derived:
    """A default computed from the fields already read (n_kv_heads defaults to n_heads)."""

    of: Callable[[Mapping[str, Any]], Any]


def same_as(name: str) -> Derived:
    return Derived(lambda got: got[name])


IMPLIED_HEAD_DIM: Final = Derived(lambda got: got["dim"] // got["n_heads"])


@dataclass(frozen=True)
class Key:
    """One ModelParams field as a dialect spells it.

    path: the key, or the path of keys through nested objects (("moe", "num_experts")). kind: its type in the
    dialect's syntax (a JsonType, a GGUFValueType). Reading: a value in absent, or no key at all, takes default (a
    constant or Derived; None: none) or, when fallback is set, what fallback finds elsewhere (the embedding's rows);
    a key with no value and no default is an error when required, with missing as the message if set; decode
    maps the checked value to the field's. preferred: a path read instead of path when its parent object is there
    (transformers 5's rope_parameters). read=False: written only (GGUF's value_length repeats head_dim).
    Writing: encode gives the value (else the field's); the key is left out when when() is false or the value is
    in omit (a value the reader's default gives back)."""

    field: str
    path: tuple[str, ...]
    kind: Enum
    required: bool = True
    default: Any = None
    absent: tuple[Any, ...] = (None,)
    fallback: Callable[[Reading], Any] | None = None
    missing: str | None = None
    decode: Callable[[Any], Any] | None = None
    preferred: tuple[str, ...] | None = None
    read: bool = True
    encode: Callable[[ModelParams], Any] | None = None
    omit: tuple[Any, ...] = ()
    when: Callable[[ModelParams], bool] | None = None

    @property
    def name(self) -> str:
        """The key as messages name it: the last of its path."""
        return self.path[-1]


class Syntax:
    """How a dialect's file holds values: finding a key, checking a value of a kind, the missing-key message."""

    # JSON dialects check a default like a value (head_dim = dim // n_heads can be 0); llama.cpp's loader does not.
    checks_defaults: bool = True

    def lookup(self, source: Any, key: Key, file: Path | str) -> Any:
        raise NotImplementedError

    def check(self, key: Key, value: Any, file: Path | str) -> Any:
        raise NotImplementedError

    def missing(self, key: Key) -> str:
        raise NotImplementedError


@dataclass
class Reading:
    """One read in progress, for hooks: the parsed file, the fields read so far, and the embedding's row count."""

    dialect: Dialect
    source: Any
    file: Path | str
    vocab_from_tensors: int | None
    got: dict[str, Any] = field(default_factory=dict)


Step = Callable[[Reading], None]  # a hook run at its place in the read order (a nested object's own checks)


@dataclass(frozen=True)
class Dialect:
    """A container's parameter dialect: its keys in the order it writes them, the order it reads them in (field
    names, and hooks where the dialect needs code; the first broken rule is the one reported, so the order is part
    of the behaviour), the check of the whole, and the fields it cannot express (read as None)."""

    name: str
    syntax: Syntax
    keys: tuple[Key, ...]
    order: tuple[str | Step, ...]
    check: Callable[[ModelParams, Path | str], None]
    unset: tuple[str, ...] = ()

    def key(self, name: str) -> Key:
        """The key a field is read from."""
        return next(k for k in self.keys if k.field == name and k.read)


def read_key(reading: Reading, key: Key) -> Any:
    """One field's value from the file, by its key's rules (see Key)."""
    syntax = reading.dialect.syntax
    value = syntax.lookup(reading.source, key, reading.file)
    if value is ABSENT or value in key.absent:
        if key.fallback is not None:
            return key.fallback(reading)
        value = key.default.of(reading.got) if isinstance(key.default, Derived) else key.default
        if value is not None and not syntax.checks_defaults:
            return value
    if value is None:
        if key.required:
            raise ConvertError(key.missing or syntax.missing(key), file=reading.file)
        return None
    value = syntax.check(key, value, reading.file)
    return value if key.decode is None or value is None else key.decode(value)  # a window's "null" checks as None


def read_params(dialect: Dialect, source: Any, file: Path | str, vocab_from_tensors: int | None = None) -> ModelParams:
    """ModelParams from a parsed file in dialect: its order's fields and hooks in turn, then its check."""
    reading = Reading(dialect, source, file, vocab_from_tensors)
    for step in dialect.order:
        if isinstance(step, str):
            reading.got[step] = read_key(reading, dialect.key(step))
        else:
            step(reading)
    reading.got.update(dict.fromkeys(dialect.unset))
    params = ModelParams(**reading.got)
    dialect.check(params, file)
    return params


def written_keys(keys: Iterable[Key], params: ModelParams) -> list[tuple[Key, Any]]:
    """The keys a dialect writes for params, in the table's order, each with its value."""
    items = []
    for key in keys:
        if key.when is not None and not key.when(params):
            continue
        value = getattr(params, key.field) if key.encode is None else key.encode(params)
        if value not in key.omit:
            items.append((key, value))
    return items


# ---------------------------------------------------------------------------------------------------------------
# JSON, the syntax of params.json and config.json.


class JsonType(Enum):
    INT = "positive integer"
    NUMBER = "positive finite number"
    WINDOW = "sliding window"  # a positive integer or null; megablocks stores it as a string


def _walk(source: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(source, dict) or part not in source:
            return ABSENT
        source = source[part]
    return source


class _Json(Syntax):
    """Values as json.loads gives them; every failure names the file and the key."""

    def lookup(self, source: Any, key: Key, file: Path | str) -> Any:
        if key.preferred is not None and isinstance(_walk(source, key.preferred[:-1]), dict):
            return _walk(source, key.preferred)
        return _walk(source, key.path)

    def missing(self, key: Key) -> str:
        return f"missing required key {key.name!r}"

    def check(self, key: Key, value: Any, file: Path | str) -> Any:
        if key.kind is JsonType.INT:
            if type(value) is not int or value <= 0:
                raise ConvertError(f"key {key.name!r} must be a positive integer, got {value!r}", file=file)
            return value
        if key.kind is JsonType.NUMBER:
            try:
                number = float(value) if type(value) in (int, float) else math.nan
            except OverflowError:
                number = math.inf
            if not math.isfinite(number) or number <= 0:
                raise ConvertError(f"key {key.name!r} must be a positive finite number, got {value!r:.40}", file=file)
            return number
        return _window(key, value, file)


def _window(key: Key, value: Any, file: Path | str) -> int | None:
    """A sliding window: "null", "none" or "" as a string is none too (megablocks stores the window as a string)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "null", "none"):
            return None
        if not (text.isascii() and text.isdigit()):
            raise ConvertError(f"key {key.name!r} must be an integer or null, got {value!r}", file=file)
        value = int(text)
    if type(value) is not int or value <= 0:
        raise ConvertError(f"key {key.name!r} must be a positive integer or null, got {value!r}", file=file)
    return value


JSON: Final[Syntax] = _Json()


def read_json_params(dialect: Dialect, path: Path, vocab_from_tensors: int | None) -> ModelParams:
    return read_params(dialect, read_json_object(path), path, vocab_from_tensors)


def json_params(dialect: Dialect, params: ModelParams) -> dict[str, Any]:
    """The dialect's keys for params as a JSON object, nested along their paths, in the table's order."""
    data: dict[str, Any] = {}
    for key, value in written_keys(dialect.keys, params):
        node = data
        for part in key.path[:-1]:
            node = node.setdefault(part, {})
        node[key.name] = value
    return data


# ---------------------------------------------------------------------------------------------------------------
# What every JSON dialect shares: the vocabulary from the embedding, and the model's own consistency.


def vocab_from_tensors(reading: Reading) -> int:
    """vocab_size when the file is silent (old params.json files wrote -1, set by the tokenizer): the embedding's
    rows."""
    if not reading.vocab_from_tensors:
        raise ConvertError(
            "missing required key 'vocab_size' and no non-empty embedding to read it from", file=reading.file
        )
    return reading.vocab_from_tensors


def check_consistent(params: ModelParams, path: Path | str) -> None:
    if params.n_heads % params.n_kv_heads:
        raise ConvertError(f"n_heads {params.n_heads} is not a multiple of n_kv_heads {params.n_kv_heads}", file=path)
    if params.head_dim % 2:
        raise ConvertError(f"head_dim {params.head_dim} must be even for rotary embeddings", file=path)
    if params.experts_per_tok > params.n_experts:
        raise ConvertError(
            f"experts per token {params.experts_per_tok} exceeds the {params.n_experts} experts", file=path
        )
