"""--to mlx through the command line: from every layout to the same bytes, an MLX folder read back (one that
mlx_lm.convert wrote, too), a quantized one refused as a source but inspected and verified, --group-size, the
exact dry-run, and the refusals. mlx-lm itself reading our folders is tests/test_mlx_client.py; the quantizer
against mx.quantize is tests/test_mlx_quantize.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, flip_byte
from mlx_client import load_arrays, read_mlx, sample_named
from synthetic import HEAD_DIM_VARIANT, make_weights, write_torrent

from convert.planning.source import detect_layout

mx = pytest.importorskip("mlx.core")

pytestmark = pytest.mark.e2e

SOURCES = ("torrent", "mistral", "megablocks", "hf", "gguf")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlx")


@pytest.fixture(scope="module")
def sample(root: Path, cli) -> Path:
    cli("sample", root / "torrent")
    for layout in SOURCES[1:]:
        cli("convert", root / "torrent", root / layout, "--to", layout, "--no-progress")
    return root / "torrent"


def tensor_bytes(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    out = {}
    for name, array in load_arrays(folder).items():
        view = array.view(mx.uint16) if array.dtype == mx.bfloat16 else array
        out[name] = (str(array.dtype), tuple(array.shape), bytes(memoryview(__import__("numpy").array(view))))
    return out


@pytest.mark.parametrize("outtype", [None, "q4"])
def test_every_layout_gives_the_same_folder(root: Path, sample: Path, cli, outtype: str | None) -> None:
    """From each layout, the same tensors, config.json and weights file. GGUF stores the norms and the router
    widened to F32: they are restored to the checkpoint's bf16 first, also where they are quantized (the router's
    scales and biases are bf16 from every source)."""
    args = [] if outtype is None else ["--outtype", outtype]
    outputs = {}
    for layout in SOURCES:
        out = root / f"from-{layout}-{outtype}"
        cli("convert", root / layout, out, "--to", "mlx", *args, "--no-progress")
        outputs[layout] = out
    want = tensor_bytes(outputs["torrent"])
    config = (outputs["torrent"] / "config.json").read_bytes()
    for layout, out in outputs.items():
        got = tensor_bytes(out)
        assert got == want, layout
        assert (out / "config.json").read_bytes() == config, layout
        assert (out / "model.safetensors").read_bytes() == (outputs["torrent"] / "model.safetensors").read_bytes()


def test_mlx_folder_is_a_source(root: Path, sample: Path, cli) -> None:
    """An unquantized MLX folder (ours, and one mlx_lm.convert wrote from our hf output) is detected by what is
    inside (hf's file names, mlx's metadata) and converts back to the sample's tensors bit for bit."""
    mlx_lm_convert = pytest.importorskip("mlx_lm.convert")
    ours = root / "plain"
    cli("convert", sample, ours, "--to", "mlx", "--no-progress")
    theirs = root / "plain-mlx-lm"
    mlx_lm_convert.convert(str(root / "hf"), str(theirs))
    original = torch.load(sample / "consolidated.00.pth", weights_only=True)
    for folder in (ours, theirs):
        assert detect_layout(folder) == "mlx"
        assert "mlx" in cli("inspect", folder).stdout.splitlines()[0]
        back = root / f"back-{folder.name}"
        cli("convert", folder, back, "--to", "torrent", "--no-progress")
        got = torch.load(back / "consolidated.00.pth", weights_only=True)
        assert sorted(got) == sorted(original)
        for name, tensor in original.items():
            assert torch.equal(got[name].view(torch.int16), tensor.view(torch.int16)), name
    assert detect_layout(root / "hf") == "hf"  # hf's folders are still hf's


def test_quantized_mlx_is_one_way_but_inspected_and_verified(root: Path, sample: Path, cli) -> None:
    out = root / "q8"
    cli("convert", sample, out, "--to", "mlx", "--outtype", "q8", "--no-progress")
    result = cli("convert", out, root / "q8-back", "--to", "hf", check=False)
    assert result.returncode == 2
    assert_one_line_error(result, "one-way", str(out / "model.safetensors"))
    assert not (root / "q8-back").exists() or not any((root / "q8-back").glob("*.safetensors"))
    inspected = cli("inspect", out)
    assert "problems: none" in inspected.stdout
    assert "U32" in inspected.stdout
    assert cli("verify", out).stdout.strip().splitlines()[-1].startswith(f"verified: {out} (mlx)")
    # Read by mlx, dequantized, the sample again within 8 bits in groups of 64 (w2, input 96, kept in bf16).
    got, want = read_mlx(out), sample_named(torch.load(sample / "consolidated.00.pth", weights_only=True))
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        bound = tensor.float().abs().max().item() * 4 / 255
        assert (got[name].float() - tensor.float()).abs().max().item() <= bound, name


@pytest.mark.parametrize(("outtype", "group"), [("q4", "32"), ("q8", "128"), ("q4", "64")])
def test_group_size_and_verify_against(root: Path, sample: Path, cli, outtype: str, group: str) -> None:
    """--group-size reaches config.json and the shapes; verify --against quantizes the source again with the
    settings the folder records, and names the file when one byte of a scale changes."""
    out = root / f"{outtype}-g{group}"
    dry = json.loads(cli("convert", sample, out, "--to", "mlx", "--outtype", outtype, "--group-size", group,
                         "--dry-run", "--json").stdout)  # fmt: skip
    cli("convert", sample, out, "--to", "mlx", "--outtype", outtype, "--group-size", group, "--no-progress")
    assert {f["name"]: f["size"] for f in dry["files"]} == {p.name: p.stat().st_size for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": int(group), "bits": int(outtype[1]), "mode": "affine"}
    arrays = load_arrays(out)
    scales = [n for n in arrays if n.endswith(".scales")]
    if group == "128":  # dim 64 and hidden 96: no matrix of the sample has an input dimension of 128's multiple
        assert not scales and all(a.dtype == mx.bfloat16 for a in arrays.values())
        return
    q = arrays["model.layers.0.self_attn.q_proj.scales"]
    assert q.shape == (64, 64 // int(group))
    assert cli("verify", out, "--against", sample).returncode == 0
    damaged = Path(shutil.copytree(out, root / f"damaged-{outtype}-{group}"))
    header = json.loads((damaged / "manifest.json").read_text())
    entry = next(t for t in header["tensors"] if t["name"] == "model.layers.1.self_attn.v_proj.scales")
    flip_byte(damaged / entry["file"], entry["offsets"][0])
    result = cli("verify", damaged, "--against", sample, check=False)
    assert result.returncode == 1
    assert "model.safetensors" in result.stdout and "v_proj.scales" in result.stdout


def test_refusals_are_one_line(tmp_path: Path, sample: Path, cli) -> None:
    result = cli("convert", sample, tmp_path / "a", "--to", "mlx", "--group-size", "32", check=False)
    assert result.returncode == 2
    assert_one_line_error(result, "--group-size goes with a quantized --outtype")
    result = cli("convert", sample, tmp_path / "b", "--to", "hf", "--outtype", "q4", check=False)
    assert result.returncode == 2
    assert_one_line_error(result, "--outtype q4")
    result = cli("convert", sample, tmp_path / "c", "--to", "mlx", "--outtype", "f16", "--group-size", "32",
                 check=False)  # fmt: skip
    assert result.returncode == 2
    assert_one_line_error(result, "--outtype f16-g32")
    odd = tmp_path / "head-dim-24"
    odd.mkdir()
    write_torrent(odd, HEAD_DIM_VARIANT, make_weights(HEAD_DIM_VARIANT, seed=3))
    result = cli("convert", odd, tmp_path / "d", "--to", "mlx", check=False)
    assert result.returncode == 2
    assert_one_line_error(result, "head_dim 24", "mlx-lm")
