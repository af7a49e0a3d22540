"""Hyperparameters in every style they come in, and the config.json written from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from convert.common.errors import ConvertError
from convert.containers.hf_safetensors import release_metadata
from convert.model.params import (
    hf_config_json,
    hf_params_json,
    mistral_params_json,
    read_hf_params,
    read_mistral_params,
)
from full_size import CONFIG_SHA256, PARAMS, PARAMS_JSON

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
    assert read_hf_params(_write(tmp_path, json.loads(hf_params_json(params))), megablocks=True) == params
