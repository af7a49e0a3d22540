"""Hyperparameters in every style they come in, and the config.json written from them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from full_size import CONFIG_SHA256, PARAMS, PARAMS_JSON

from convert.common.errors import ConvertError
from convert.containers.gguf.keys import GGUF_PARAMS, model_metadata, params_from_metadata
from convert.containers.hf_safetensors import CONFIG_PARAMS, hf_config_json, read_hf_params, release_metadata
from convert.containers.megablocks_pt import MEGABLOCKS_PARAMS, megablocks_params_json, read_megablocks_params
from convert.containers.mistral_params import MISTRAL_PARAMS, mistral_params_json, read_mistral_params
from convert.model.params import (
    FIELDS,
    JSON,
    Derived,
    Dialect,
    JsonType,
    Key,
    ModelParams,
    Reading,
    check_consistent,
    json_params,
    read_json_params,
    read_key,
    written_keys,
)

pytestmark = pytest.mark.unit

MISTRAL = PARAMS
HF_4 = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "max_position_embeddings": 32768,
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.json"
    path.write_text(json.dumps(data))
    return path


def test_missing_rope_theta_is_mistral_default(tmp_path: Path) -> None:
    params = read_mistral_params(_write(tmp_path, MISTRAL), None)
    assert params.rope_theta == 1e6
    assert params.sliding_window is None and params.head_dim_is_implied


def test_transformers_4_and_5_styles_agree(tmp_path: Path) -> None:
    four = read_hf_params(_write(tmp_path, HF_4))
    five_style = {k: v for k, v in HF_4.items() if k != "rope_theta"}
    five_style["rope_parameters"] = {"rope_theta": 1000000.0, "rope_type": "default"}
    five = read_hf_params(_write(tmp_path, five_style))
    assert four == five
    theta = five_style | {"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}
    assert read_hf_params(_write(tmp_path, theta)).rope_theta == 5e5


def test_hf_and_mistral_params_describe_the_same_model(tmp_path: Path) -> None:
    hf = read_hf_params(_write(tmp_path, {k: v for k, v in HF_4.items() if k != "max_position_embeddings"}))
    assert hf == read_mistral_params(_write(tmp_path, MISTRAL), None)


@pytest.mark.parametrize(("value", "window"), [("4096", 4096), ("null", None), (None, None), (4096, 4096)])
def test_megablocks_sliding_window_as_string(tmp_path: Path, value: object, window: int | None) -> None:
    assert read_hf_params(_write(tmp_path, HF_4 | {"sliding_window": value})).sliding_window == window


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dim": "4096"}, "key 'dim' must be a positive integer, got '4096'"),
        ({"n_layers": None}, "missing required key 'n_layers'"),
        ({"moe": None}, "missing required key 'moe' (an object with num_experts): not a mixture-of-experts model"),
        ({"n_kv_heads": 7}, "n_heads 32 is not a multiple of n_kv_heads 7"),
        ({"norm_eps": "tiny"}, "key 'norm_eps' must be a positive finite number, got 'tiny'"),
        ({"head_dim": 127}, "head_dim 127 must be even for rotary embeddings"),
    ],
)
def test_bad_params_name_file_and_key(tmp_path: Path, change: dict, message: str) -> None:
    data = {k: v for k, v in (MISTRAL | change).items() if v is not None}
    with pytest.raises(ConvertError) as caught:
        read_mistral_params(_write(tmp_path, data), None)
    assert caught.value.line() == f"{tmp_path / 'params.json'}: {message}"


def test_head_dim_written_only_when_not_implied(tmp_path: Path) -> None:
    defaults = dict(release_metadata()["config_defaults"])
    implied = json.loads(hf_config_json(read_mistral_params(_write(tmp_path, MISTRAL), None), "bfloat16", defaults))
    assert "head_dim" not in implied
    wide = read_mistral_params(_write(tmp_path, MISTRAL | {"head_dim": 256}), None)
    assert json.loads(hf_config_json(wide, "float32", defaults))["head_dim"] == 256
    assert json.loads(hf_config_json(wide, "float32", defaults))["torch_dtype"] == "float32"


def test_published_config_and_params_map_to_each_other_byte_for_byte(tmp_path: Path) -> None:
    """formats.md: the torrent's params.json line and the published config.json (720 bytes) describe one model."""
    import hashlib

    defaults = dict(release_metadata()["config_defaults"])
    params = read_mistral_params(_write(tmp_path, json.loads(PARAMS_JSON)), None)
    config = hf_config_json(params, "bfloat16", defaults)
    assert len(config.encode()) == 720
    assert hashlib.sha256(config.encode()).hexdigest() == CONFIG_SHA256
    config_path = tmp_path / "config.json"
    config_path.write_text(config)
    assert mistral_params_json(read_hf_params(config_path)) == PARAMS_JSON


def test_non_default_theta_is_kept_in_params_json(tmp_path: Path) -> None:
    silent = {k: v for k, v in HF_4.items() if k != "max_position_embeddings"}  # the default is not written back
    params = read_hf_params(_write(tmp_path, silent | {"rope_theta": 10000.0}))
    assert json.loads(mistral_params_json(params))["rope_theta"] == 10000.0
    assert read_megablocks_params(_write(tmp_path, json.loads(megablocks_params_json(params)))) == params


# ---------------------------------------------------------------------------------------------------------------
# The dialect tables and the one reader and writer they drive.

JSON_DIALECTS = [MISTRAL_PARAMS, MEGABLOCKS_PARAMS, CONFIG_PARAMS]
ODD = ModelParams(
    dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=96, n_experts=4, experts_per_tok=1,
    vocab_size=500, norm_eps=1e-6, rope_theta=5e5, sliding_window=1024, max_position_embeddings=4096,
)  # fmt: skip  # nothing at its default: every key is written


@pytest.mark.parametrize("dialect", [*JSON_DIALECTS, GGUF_PARAMS], ids=lambda d: d.name)
def test_every_dialect_reads_every_field_once(dialect: Dialect) -> None:
    named = [step for step in dialect.order if isinstance(step, str)] + list(dialect.unset)
    assert sorted(named) == sorted(FIELDS)
    for name in named[: len(named) - len(dialect.unset)]:
        assert dialect.key(name).read


@pytest.mark.parametrize("dialect", JSON_DIALECTS, ids=lambda d: d.name)
@pytest.mark.parametrize("params", [ODD, dataclasses.replace(ODD, head_dim=16, rope_theta=1e6)])
def test_json_dialect_round_trips(tmp_path: Path, dialect: Dialect, params: ModelParams) -> None:
    path = _write(tmp_path, json_params(dialect, params))
    assert read_json_params(dialect, path, None) == params


def test_gguf_dialect_round_trips() -> None:
    for params in (dataclasses.replace(ODD, sliding_window=None), dataclasses.replace(ODD, head_dim=16)):
        metadata = {entry.key: entry for entry in model_metadata(params, "f16", name="x")}
        assert params_from_metadata(metadata, file="m.gguf") == dataclasses.replace(params, sliding_window=None)


def _required(dialect: Dialect) -> list[Key]:
    """The keys whose absence is an error: no default, no fallback, no hook that checks first."""
    return [k for k in dialect.keys if k.read and k.required and k.default is None and k.fallback is None]


@pytest.mark.parametrize("dialect", JSON_DIALECTS, ids=lambda d: d.name)
def test_missing_required_key_is_one_line(tmp_path: Path, dialect: Dialect) -> None:
    keys = _required(dialect)
    assert {k.field for k in keys} >= {"dim", "n_layers", "n_heads", "hidden_dim", "n_experts", "norm_eps"}
    for key in keys:
        data = json_params(dialect, ODD)
        parent = data
        for part in key.path[:-1]:
            parent = parent[part]
        del parent[key.name]
        with pytest.raises(ConvertError) as caught:
            read_json_params(dialect, _write(tmp_path, data), None)
        assert caught.value.line() == f"{tmp_path / 'params.json'}: missing required key {key.name!r}"


def test_gguf_missing_required_key_is_one_line() -> None:
    for key in _required(GGUF_PARAMS):
        metadata = {entry.key: entry for entry in model_metadata(ODD, "f16", name="x")}
        del metadata[key.name]
        with pytest.raises(ConvertError) as caught:
            params_from_metadata(metadata, file="m.gguf")
        expected = key.missing or f"GGUF: missing key {key.name}"
        assert caught.value.line() == f"m.gguf: {expected}"


def test_read_order_decides_which_error_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path, MISTRAL | {"n_layers": 0, "n_heads": 0})
    with pytest.raises(ConvertError, match="'n_heads'"):
        read_json_params(MISTRAL_PARAMS, path, None)
    layers_first = dataclasses.replace(MISTRAL_PARAMS, order=tuple(s for s in MISTRAL_PARAMS.order if s != "n_heads"))
    with pytest.raises(ConvertError, match="'n_layers'"):
        read_json_params(layers_first, path, None)


_TOY = Dialect("toy", JSON, (), (), check_consistent)


def _read(source: dict, key: Key, got: dict[str, Any] | None = None, vocab: int | None = None) -> Any:
    return read_key(Reading(_TOY, source, "toy.json", vocab, dict(got or {})), key)


def test_key_reading_rules() -> None:
    nested = Key("n_experts", ("moe", "num_experts"), JsonType.INT)
    assert _read({"moe": {"num_experts": 8}}, nested) == 8
    with pytest.raises(ConvertError, match=r"^toy.json: missing required key 'num_experts'$"):
        _read({"moe": {}}, nested)
    derived = Key("n_kv_heads", ("kv",), JsonType.INT, default=Derived(lambda got: got["n_heads"] // 2))
    assert _read({}, derived, {"n_heads": 8}) == 4
    assert _read({"kv": None}, derived, {"n_heads": 8}) == 4  # null is absent unless the key says otherwise
    with pytest.raises(ConvertError, match="key 'kv' must be a positive integer, got 0"):
        _read({}, derived, {"n_heads": 1})  # a JSON default is checked like a value
    vocab = Key("vocab_size", ("vocab",), JsonType.INT, absent=(None, -1), fallback=lambda reading: 7)
    assert (_read({"vocab": -1}, vocab), _read({}, vocab), _read({"vocab": 9}, vocab)) == (7, 7, 9)
    null_is_missing = Key("vocab_size", ("vocab",), JsonType.INT, absent=(), fallback=lambda reading: 7)
    with pytest.raises(ConvertError, match="missing required key 'vocab'"):
        _read({"vocab": None}, null_is_missing)
    theta = Key("rope_theta", ("theta",), JsonType.NUMBER, default=1e6, preferred=("rope", "theta"))
    assert _read({"theta": 5.0}, theta) == 5.0
    assert _read({"theta": 5.0, "rope": {}}, theta) == 1e6  # the nested object, when there, is the one read
    assert _read({"theta": 5.0, "rope": {"theta": 3}}, theta) == 3.0
    window = Key("sliding_window", ("w",), JsonType.WINDOW, required=False, decode=lambda w: w * 2)
    assert (_read({}, window), _read({"w": "null"}, window), _read({"w": " 12 "}, window)) == (None, None, 24)
    custom = Key("n_layers", ("layers",), JsonType.INT, missing="no layers at all")
    with pytest.raises(ConvertError, match=r"^toy.json: no layers at all$"):
        _read({}, custom)


def test_key_writing_rules() -> None:
    keys = (
        Key("rope_theta", ("theta",), JsonType.NUMBER, omit=(1e6,)),
        Key("head_dim", ("head_dim",), JsonType.INT, when=lambda p: not p.head_dim_is_implied),
        Key("sliding_window", ("w",), JsonType.WINDOW, encode=lambda p: str(p.sliding_window or 0)),
        Key("n_experts", ("moe", "n"), JsonType.INT),
    )
    implied = dataclasses.replace(ODD, head_dim=16, rope_theta=1e6, sliding_window=None)
    assert [(k.name, v) for k, v in written_keys(keys, implied)] == [("w", "0"), ("n", 4)]
    expected = [("theta", 5e5), ("head_dim", 32), ("w", "1024"), ("n", 4)]
    assert [(k.name, v) for k, v in written_keys(keys, ODD)] == expected
    assert json_params(Dialect("toy", JSON, keys, (), check_consistent), implied) == {"w": "0", "moe": {"n": 4}}
