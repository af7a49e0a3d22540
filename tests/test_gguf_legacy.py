"""Quantized GGUF re-laid without requantizing, and the legacy per-expert Mixtral GGUFs upgraded (issue 23).

GGUF files made between December 2023 and April 2024 store each expert as its own tensor; llama.cpp stopped
loading them in build b3990. Quantized blocks run along a row, so stacking experts is placing rows: the upgrade
copies bytes and never requantizes. The files here are llama.cpp's own: our f32 GGUF of a tiny model whose rows
are whole 256-element super-blocks (dim 256, FFN 512), quantized by llama.cpp's llama_model_quantize to Q4_K_M and
Q8_0, then laid out per expert as that era's writer did (tests/legacy_gguf.py, with gguf-py). Proved here:

- llama.cpp refuses the legacy file; ours detects it by the tensors inside, upgrades it, and llama.cpp loads the
  result and computes exactly the logits of llama-quantize's own modern file, within a stated bound of the
  reference forward pass of the dequantized weights (tests/reference.py, written from the architecture);
- every upgraded tensor's bytes are the legacy file's rows, its keys the legacy file's, verify --against passes;
- a quantized file split with --max-shard-size loads in llama.cpp, and merged again is llama-quantize's file byte
  for byte; a quantized file re-laid as one file is that file byte for byte;
- experts of one layer in different types (llama-quantize before PR #4927) are refused, since stacking them would
  need requantizing; --outtype on a quantized source is refused; quantized GGUF to another layout stays refused;
- an unquantized legacy file converts to every layout (back to the torrent bit for bit).
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CliRunner
from reference import forward, router_margins
from synthetic import DEFAULT, make_weights, write_torrent

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make setup` installs it)")

from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize  # noqa: E402
from legacy_gguf import legacy_from  # noqa: E402
from llama_client import load, logits  # noqa: E402
from test_tokenizer import train  # noqa: E402

pytestmark = pytest.mark.clients

# Rows of 256 and 512 elements: whole K-quant super-blocks, so Q4_K_M really uses Q4_K, Q5_K and Q6_K here.
CFG = replace(DEFAULT, dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, head_dim=64)
SEED = 7
FTYPES = {"q4_k_m": 15, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M and _Q8_0
TOKENS = [
    [1, 5, 1002, 17, 300, 999, 42, 8, 700, 3, 64, 1001],
    [1, 900, 2, 77, 77, 512, 13, 1000, 250, 6, 31, 400],
]
# llama.cpp against the float32 forward pass of the same dequantized weights: it rounds activations to 8 bits for
# quantized matrix products. Measured here: q4_k_m 1.9e-2, q8_0 1.2e-2 (relative to the logit scale); bounds ~2.5x.
BOUNDS = {"q4_k_m": 5e-2, "q8_0": 3e-2}
ROUTER_MARGIN = 0.1  # positions whose expert choice is a near tie in some layer may route otherwise: left out
GGUF_TO_TORRENT = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate_inp": "feed_forward.gate", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}  # fmt: skip
EXPERT_KINDS = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}
MODEL_TENSORS = {"token_embd": "tok_embeddings.weight", "output": "output.weight", "output_norm": "norm.weight"}


def quantize(source: Path, out: Path, ftype: int) -> Path:
    """llama.cpp's own quantizer (llama-quantize's llama_model_quantize), no importance matrix, 2 threads."""
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, cli: CliRunner) -> dict[str, Path]:
    """modern-T and legacy-T (one folder each) for T in FTYPES, and the f32 GGUF they were quantized from."""
    root = tmp_path_factory.mktemp("legacy")
    write_torrent(root / "src", CFG, make_weights(CFG, SEED))
    (root / "src" / "tokenizer.model").write_bytes(train(vocab_size=CFG.vocab))
    cli("convert", root / "src", root / "f32", "--to", "gguf", "--outtype", "f32", "--no-progress")
    found = {"src": root / "src", "f32": root / "f32"}
    for name, ftype in FTYPES.items():
        modern = quantize(root / "f32" / "model.gguf", root / f"modern-{name}" / "model.gguf", ftype)
        (root / f"legacy-{name}").mkdir()
        legacy_from(modern, root / f"legacy-{name}" / "model.gguf")
        found[f"modern-{name}"], found[f"legacy-{name}"] = modern.parent, root / f"legacy-{name}"
    return found


@pytest.fixture(scope="module")
def upgraded(files: dict[str, Path], cli: CliRunner) -> dict[str, Path]:
    out = {}
    for name in FTYPES:
        folder = files[f"legacy-{name}"].parent / f"upgraded-{name}"
        result = cli("convert", files[f"legacy-{name}"], folder, "--to", "gguf", "--no-progress")
        assert result.stderr == "", result.stderr  # the vocabulary is in the file: no tokenizer.model needed
        out[name] = folder
    return out


def llama_logits(path: Path) -> np.ndarray:
    model = load(path)
    try:
        return np.stack([logits(model, sequence) for sequence in TOKENS])
    finally:
        model.close()


def dequantized_torrent_weights(path: Path) -> dict[str, torch.Tensor]:
    """The legacy file's tensors dequantized by gguf-py, under the torrent's names (the reference's)."""
    weights = {}
    for tensor in GGUFReader(path).tensors:
        value = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        name = tensor.name.removesuffix(".weight")
        if name in MODEL_TENSORS:
            weights[MODEL_TENSORS[name]] = value
            continue
        _, layer, rest = name.split(".", 2)
        if rest in GGUF_TO_TORRENT:
            weights[f"layers.{layer}.{GGUF_TO_TORRENT[rest]}.weight"] = value
        else:
            kind, expert = rest.split(".")
            weights[f"layers.{layer}.feed_forward.experts.{expert}.{EXPERT_KINDS[kind]}.weight"] = value
    return weights


def tensors(path: Path) -> dict[str, tuple[int, tuple[int, ...], bytes]]:
    """Each tensor's GGML type, shape (ggml's order) and bytes, as gguf-py reads them."""
    return {
        t.name: (int(t.tensor_type), tuple(int(d) for d in t.shape), t.data.tobytes()) for t in GGUFReader(path).tensors
    }


@pytest.mark.parametrize("name", FTYPES)
def test_llama_cpp_refuses_the_legacy_file(files: dict[str, Path], name: str) -> None:
    """The problem: today's llama.cpp does not load the per-expert layout (missing tensor blk.0.ffn_down_exps)."""
    with pytest.raises(ValueError, match="Failed to load model"):
        load(files[f"legacy-{name}"] / "model.gguf")


@pytest.mark.parametrize("name", FTYPES)
def test_the_legacy_layout_is_told_apart_by_its_tensors(files: dict[str, Path], cli: CliRunner, name: str) -> None:
    import json

    report = json.loads(cli("inspect", files[f"legacy-{name}"], "--json").stdout)
    assert report["layout"] == "gguf_legacy" and report["problems"] == []
    assert json.loads(cli("inspect", files[f"modern-{name}"], "--json").stdout)["layout"] == "gguf"


@pytest.mark.parametrize("name", FTYPES)
def test_every_upgraded_tensor_is_the_legacy_rows(
    files: dict[str, Path], upgraded: dict[str, Path], name: str
) -> None:
    legacy = tensors(files[f"legacy-{name}"] / "model.gguf")
    new = tensors(upgraded[name] / "model.gguf")
    stacked = 0
    for tensor, (ggml_type, shape, data) in new.items():
        if "_exps." in tensor:
            stacked += 1
            layer, kind = tensor.split(".")[1], tensor.split(".")[2].removesuffix("_exps")
            parts = [legacy[f"blk.{layer}.{kind}.{e}.weight"] for e in range(CFG.n_experts)]
            assert {p[0] for p in parts} == {ggml_type}, tensor  # the type is kept, not converted
            assert shape == (*parts[0][1], CFG.n_experts), tensor  # ggml order: experts outermost, last
            assert data == b"".join(p[2] for p in parts), tensor  # expert E's rows are the E-th block
        else:
            assert legacy[tensor] == (ggml_type, shape, data), tensor
    assert stacked == 3 * CFG.n_layers
    assert len(new) + (CFG.n_experts - 1) * 3 * CFG.n_layers == len(legacy)
    kinds = {v[0] for v in new.values()}
    # Q4_K_M mixes Q4_K and Q6_K (ffn_down on the "more bits" layers) here, and F32 norms and router
    assert len(kinds) >= (3 if name == "q4_k_m" else 2), kinds
    def keys(path: Path) -> list[tuple[str, object]]:  # in file order; GGUF.* are the reader's header fields
        return [(k, f.contents()) for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")]

    assert keys(files[f"legacy-{name}"] / "model.gguf") == keys(upgraded[name] / "model.gguf")  # carried as they are


@pytest.mark.parametrize("name", FTYPES)
def test_the_upgraded_file_runs_in_llama_cpp(files: dict[str, Path], upgraded: dict[str, Path], name: str) -> None:
    got = llama_logits(upgraded[name] / "model.gguf")
    theirs = llama_logits(files[f"modern-{name}"] / "model.gguf")
    assert np.array_equal(got, theirs)  # the same weights as llama-quantize's own modern file: the same logits
    weights = dequantized_torrent_weights(files[f"legacy-{name}"] / "model.gguf")
    tokens = torch.tensor(TOKENS)
    reference = forward(weights, CFG, tokens).numpy()
    clear = (router_margins(weights, CFG, tokens) >= ROUTER_MARGIN).numpy()
    assert clear.mean() > 0.6, "too many near-tie routings for the comparison to mean anything"
    per_position = np.abs(got - reference).max(-1) / np.abs(reference).max()
    error = float(per_position[clear].max())
    print(f"{name}: upgraded file's logits vs the dequantized reference: relative error {error:.3g}")
    assert error < BOUNDS[name], f"{name}: {error:.3g} relative (bound {BOUNDS[name]})"


@pytest.mark.parametrize("name", FTYPES)
def test_the_upgrade_verifies_against_the_legacy_file(
    files: dict[str, Path], upgraded: dict[str, Path], cli: CliRunner, name: str
) -> None:
    result = cli("verify", upgraded[name], "--against", files[f"legacy-{name}"], check=False)
    assert result.returncode == 0, result.stdout


def test_a_quantized_file_splits_and_merges_back_to_itself(
    files: dict[str, Path], cli: CliRunner, tmp_path: Path
) -> None:
    modern = files["modern-q4_k_m"]
    cli("convert", modern, tmp_path / "same", "--to", "gguf", "--no-progress")
    assert (tmp_path / "same" / "model.gguf").read_bytes() == (modern / "model.gguf").read_bytes()
    cli("convert", modern, tmp_path / "split", "--to", "gguf", "--max-shard-size", "1MB", "--no-progress")
    parts = sorted((tmp_path / "split").glob("model-*-of-*.gguf"))
    assert len(parts) >= 2
    assert np.array_equal(llama_logits(parts[0]), llama_logits(modern / "model.gguf"))  # llama.cpp loads the set
    cli("convert", tmp_path / "split", tmp_path / "merged", "--to", "gguf", "--no-progress")
    merged = (tmp_path / "merged" / "model.gguf").read_bytes()
    assert hashlib.sha256(merged).digest() == hashlib.sha256((modern / "model.gguf").read_bytes()).digest()
    assert cli("verify", tmp_path / "merged", "--against", tmp_path / "split", check=False).returncode == 0


def test_the_outtype_a_file_already_has_re_lays_it(files: dict[str, Path], cli: CliRunner, tmp_path: Path) -> None:
    """--outtype q8_0 on a Q8_0 file asks for no new type: it is re-laid as without --outtype, byte for byte, and
    verify --against (which asks for the folder's own outtype) agrees."""
    modern = files["modern-q8_0"]
    cli("convert", modern, tmp_path / "same", "--to", "gguf", "--outtype", "q8_0", "--no-progress")
    assert (tmp_path / "same" / "model.gguf").read_bytes() == (modern / "model.gguf").read_bytes()
    assert cli("verify", tmp_path / "same", "--against", modern, check=False).returncode == 0


def test_experts_of_one_layer_in_different_types_are_refused(
    files: dict[str, Path], cli: CliRunner, tmp_path: Path
) -> None:
    (tmp_path / "mixed").mkdir()
    legacy_from(files["modern-q4_k_m"] / "model.gguf", tmp_path / "mixed" / "model.gguf", mixed_layer=1)
    result = cli("convert", tmp_path / "mixed", tmp_path / "out", "--to", "gguf", check=False)
    assert result.returncode == 2
    assert "tensor blk.1.ffn_down_exps.weight: cannot stack experts of different dtypes" in result.stderr


def test_outtype_and_other_layouts_are_refused_for_a_quantized_source(
    files: dict[str, Path], cli: CliRunner, tmp_path: Path
) -> None:
    legacy = files["legacy-q4_k_m"]
    requantize = cli("convert", legacy, tmp_path / "a", "--to", "gguf", "--outtype", "q8_0", check=False)
    assert requantize.returncode == 2 and "--outtype q8_0 would requantize it" in requantize.stderr
    other = cli("convert", files["legacy-q8_0"], tmp_path / "b", "--to", "hf", check=False)
    assert other.returncode == 2 and "quantized GGUF is one-way" in other.stderr
    legacy_target = cli("convert", files["src"], tmp_path / "c", "--to", "gguf_legacy", check=False)
    assert legacy_target.returncode == 2 and "invalid choice: 'gguf_legacy'" in legacy_target.stderr


def test_an_unquantized_legacy_file_converts_to_every_layout(
    files: dict[str, Path], cli: CliRunner, tmp_path: Path
) -> None:
    cli("convert", files["src"], tmp_path / "bf16", "--to", "gguf", "--no-progress")
    (tmp_path / "legacy").mkdir()
    legacy_from(tmp_path / "bf16" / "model.gguf", tmp_path / "legacy" / "model.gguf")
    shutil.copy(files["src"] / "tokenizer.model", tmp_path / "legacy")
    for target in ("torrent", "mistral", "megablocks", "hf", "gguf"):
        cli("convert", tmp_path / "legacy", tmp_path / target, "--to", target, "--no-progress")
        assert cli("verify", tmp_path / target, "--against", tmp_path / "legacy", check=False).returncode == 0
    original = torch.load(files["src"] / "consolidated.00.pth", weights_only=True)
    back = torch.load(tmp_path / "torrent" / "consolidated.00.pth", weights_only=True)
    assert original.keys() == back.keys()
    for name, tensor in original.items():  # bit for bit, as stored (bf16 as 16-bit words)
        assert back[name].dtype == tensor.dtype and torch.equal(back[name].view(torch.int16), tensor.view(torch.int16))
