"""The megablocks output as its users read it: transformers' own convert_mixtral_weights_to_hf.py (4.36 to 4.45),
which opens consolidated.00.pt ... consolidated.07.pt whatever the depth and passes params.json's sliding_window
through int(); torch.load for every file, the empty ones included; and our reader, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

from convert.model.params import DEFAULT_MAX_POSITIONS

pytestmark = pytest.mark.clients

FILES = [f"consolidated.{i:02d}.pt" for i in range(8)]
# A site folder holding a transformers 4.x (pip install --target DIR transformers==4.45.2 ...), to run the script
# from a release that still ships it; the suite's own transformers is tried first.
TRANSFORMERS_4_ENV = "MIXTRAL_CONVERT_TRANSFORMERS_4"
SCRIPT = "transformers/models/mixtral/convert_mixtral_weights_to_hf.py"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-layer sample, its megablocks conversion, and its direct hf conversion."""
    root = tmp_path_factory.mktemp("megablocks")
    run_cli("sample", root / "torrent")
    run_cli("convert", root / "torrent", root / "megablocks", "--to", "megablocks")
    run_cli("convert", root / "torrent", root / "hf", "--to", "hf")
    return root


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(shard)
    return tensors


def test_eight_files_whatever_the_depth(outputs: Path) -> None:
    megablocks = outputs / "megablocks"
    assert sorted(p.name for p in megablocks.glob("consolidated.*")) == FILES
    loaded = [torch.load(megablocks / name, weights_only=True) for name in FILES]
    assert [bool(state) for state in loaded] == [True, True] + [False] * 6  # one layer a file, then empty ones
    assert all(state == {} for state in loaded[2:])
    assert "tok_embeddings.weight" in loaded[0] and "output.weight" in loaded[1]
    assert sum(len(state) for state in loaded) == 3 + 2 * 10
    # Our reader takes the empty files, and the round trip is exact, files included.
    run_cli("convert", megablocks, outputs / "mb-hf", "--to", "hf")
    run_cli("convert", outputs / "mb-hf", outputs / "mb-hf-mb", "--to", "megablocks")
    for name in [*FILES, "params.json"]:
        assert (outputs / "mb-hf-mb" / name).read_bytes() == (megablocks / name).read_bytes(), name
    for shard in (outputs / "hf").glob("*.safetensors"):
        assert (outputs / "mb-hf" / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert (outputs / "mb-hf" / "config.json").read_bytes() == (outputs / "hf" / "config.json").read_bytes()
    assert "verified:" in run_cli("verify", megablocks, "--against", outputs / "torrent").stdout


def test_params_json_as_the_script_reads_it(outputs: Path, tmp_path: Path) -> None:
    """Every key the script indexes, with the type it uses; sliding_window a string int() takes in both 4.36
    (key required) and 4.45 (key optional), as wide as the model's context: no window for any sequence."""
    params = json.loads((outputs / "megablocks" / "params.json").read_text())
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size", "num_local_experts", "intermediate_size",
                "vocab_size", "num_key_value_heads"):  # fmt: skip
        assert type(params[key]) is int, key
    assert type(params["rms_norm_eps"]) is float and type(params["rope_theta"]) is float
    assert params["rope_theta"] == 1e6  # the script's default would be 1e4
    assert isinstance(params["sliding_window"], str) and int(params["sliding_window"]) == DEFAULT_MAX_POSITIONS
    run_cli("convert", outputs / "megablocks", tmp_path / "hf", "--to", "hf")  # and we read it back as none
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["sliding_window"] is None


def _script() -> tuple[Path, dict[str, str]] | str:
    """(the script, the environment to run it in), or why it cannot be run."""
    import transformers

    own = Path(transformers.__file__).parent / "models/mixtral/convert_mixtral_weights_to_hf.py"
    if own.is_file():
        return own, dict(os.environ)
    site = os.environ.get(TRANSFORMERS_4_ENV)
    if site and (Path(site) / SCRIPT).is_file():
        return Path(site) / SCRIPT, dict(os.environ, PYTHONPATH=site)
    return (
        f"transformers {transformers.__version__} (the version the tests install) no longer ships "
        "models/mixtral/convert_mixtral_weights_to_hf.py (the 4.x releases did); set "
        f"{TRANSFORMERS_4_ENV} to a folder with transformers 4.36-4.45 installed (pip install --target) to run it"
    )


def test_transformers_script_reads_the_megablocks_output(outputs: Path) -> None:
    found = _script()
    if isinstance(found, str):
        pytest.skip(found)
    script, env = found
    out = outputs / "by-transformers"
    result = subprocess.run(
        [sys.executable, str(script), "--input_dir", str(outputs / "megablocks"), "--output_dir", str(out),
         "--safe_serialization", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    theirs, ours = hf_tensors(out), hf_tensors(outputs / "hf")
    assert theirs.keys() == ours.keys()
    for name, tensor in ours.items():
        assert theirs[name].dtype == tensor.dtype and torch.equal(theirs[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    window = config["sliding_window"]
    assert window is None or window >= config["max_position_embeddings"] >= DEFAULT_MAX_POSITIONS
