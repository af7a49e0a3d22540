"""`--to gguf --outtype q4_k_m` (and every llama-quantize mix) against llama.cpp itself.

The claim: our one-pass output is the very file llama-quantize writes from llama.cpp's converter's f32 or bf16
GGUF of the same model (ours, proven identical to that converter's by tests/test_llama_cpp.py), byte for byte:
the keys and their order (general.quantization_version and general.file_type moved last), the tensor order
(llama-quantize's: layer, then name), each tensor's type (llama_tensor_get_type's mix) and bytes (ggml's reference
quantizers). Two models:

- 8 layers of 8 experts (Mixtral's expert count, so attn_k/attn_v take Q8_0 and attn_output Q5_K as for the real
  model; 8 layers, so use_more_bits picks layers 0, 3, 6 and 7 for ffn_down and not the others), rows of 256 (whole
  K-quant super-blocks) and ffn_down's rows of 288 (not: they fall back to the 32-value types);
- 2 layers of 4 experts with rows of 64 and 80 (every K type falls back; rows of 80 are not whole 32-value blocks
  either, so they fall back to F16), where the 8-expert rules do not apply;
- 2 layers of 8 experts, every row a whole number of super-blocks (nothing falls back).

Then llama.cpp loads our files of that last model and its logits stay within a per-type bound of the reference
forward pass (tests/reference.py, written from the architecture) run on our file's weights dequantized by gguf-py.
Not the 8-layer model: through 8 layers, llama.cpp's 8-bit activations flip enough expert choices (some at router
margins above 0.1) that a bound there would measure routing, not the weights.
"""

from __future__ import annotations

import ctypes
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CliRunner
from reference import forward, router_margins
from synthetic import DEFAULT, make_weights, write_torrent

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make setup` installs it)")

from gguf import GGUFReader, LlamaFileType  # noqa: E402
from gguf.quants import dequantize  # noqa: E402
from llama_client import load, logits  # noqa: E402
from test_tokenizer import train  # noqa: E402

from convert.containers.gguf.quant_mix import MIXES  # noqa: E402

pytestmark = pytest.mark.clients

MODELS = {
    "experts8": replace(DEFAULT, dim=256, n_layers=8, n_experts=8, hidden_dim=288, n_heads=4, n_kv_heads=2,
                        head_dim=64),
    "experts4": replace(DEFAULT, dim=64, n_layers=2, n_experts=4, hidden_dim=80),
    "shallow8": replace(DEFAULT, dim=256, n_layers=2, n_experts=8, hidden_dim=512, n_heads=4, n_kv_heads=2,
                        head_dim=64),
}  # fmt: skip
LOGITS_MODEL = "shallow8"
SEED = 11
TOKENS = [
    [1, 5, 1002, 17, 300, 999, 42, 8, 700, 3, 64, 1001],
    [1, 900, 2, 77, 77, 512, 13, 1000, 250, 6, 31, 400],
    [1, 33, 610, 610, 87, 4, 999, 120, 58, 801, 9, 266],
    [1, 444, 16, 702, 35, 35, 35, 190, 870, 12, 513, 27],
]
# llama.cpp's logits against the float32 forward pass of our file's weights dequantized (LOGITS_MODEL), relative to
# the largest reference logit, at positions whose routing is not a near tie. The weights are the same on both sides,
# so what remains is llama.cpp's own arithmetic: it rounds activations to 8 bits for quantized matrix products, and
# that moves some expert choices. Measured (the largest error over the clear positions): q4_0 0.011, q4_1 0.012,
# q5_0 0.047, q5_1 0.013, q3_k_s 0.044, q3_k_m 0.046, q3_k_l 0.017, q4_k_s 0.013, q4_k_m 0.013, q5_k_s 0.015,
# q5_k_m 0.013, q6_k 0.032: not ordered by the weights' precision, so one bound for all, about 2x the largest.
# A wrong block layout or scale gives errors of order 1.
LOGIT_BOUND = 0.1
# Positions whose expert choice is a near tie in some layer may route otherwise (llama.cpp's 8-bit activations move
# the router's inputs): left out.
ROUTER_MARGIN = 0.1
MIN_CLEAR = 24  # of the 48 positions


def llama_quantize(source: Path, out: Path, outtype: str) -> Path:
    """llama.cpp's llama_model_quantize (what llama-quantize runs): no importance matrix, default mix, 2 threads."""
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(MIXES[outtype][0])
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, cli: CliRunner) -> dict[str, Path]:
    """Per model: the bf16 torrent, and our f32 and bf16 GGUF of it (what llama-quantize is given)."""
    root = tmp_path_factory.mktemp("quantized")
    found = {}
    for name, cfg in MODELS.items():
        write_torrent(root / name / "src", cfg, make_weights(cfg, SEED))
        (root / name / "src" / "tokenizer.model").write_bytes(train(vocab_size=cfg.vocab))
        found[name] = root / name / "src"
        for wide in ("f32", "bf16"):
            cli("convert", found[name], root / name / wide, "--to", "gguf", "--outtype", wide, "--no-progress")
            found[f"{name}-{wide}"] = root / name / wide / "model.gguf"
    return found


@pytest.fixture(scope="module")
def ours(sources: dict[str, Path], cli: CliRunner, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Our direct output for every model and mix, from the torrent."""
    root = tmp_path_factory.mktemp("ours")
    out = {}
    for model in MODELS:
        for outtype in MIXES:
            folder = root / f"{model}-{outtype}"
            cli("convert", sources[model], folder, "--to", "gguf", "--outtype", outtype, "--no-progress")
            out[f"{model}-{outtype}"] = folder
    return out


@pytest.mark.parametrize("outtype", MIXES)
@pytest.mark.parametrize("model", MODELS)
def test_the_file_llama_quantize_writes(
    sources: dict[str, Path], ours: dict[str, Path], tmp_path: Path, model: str, outtype: str
) -> None:
    """Byte for byte the file llama_model_quantize writes from our f32 GGUF and from our bf16 GGUF (the naming
    keys included: llama-quantize copies them from its input, which is ours)."""
    mine = (ours[f"{model}-{outtype}"] / "model.gguf").read_bytes()
    for wide in ("f32", "bf16"):
        theirs = llama_quantize(sources[f"{model}-{wide}"], tmp_path / f"{wide}.gguf", outtype).read_bytes()
        if mine != theirs:
            first = next(i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b)
            pytest.fail(f"{model} {outtype}: differs from llama-quantize of the {wide} GGUF at byte {first} "
                        f"(sizes {len(mine)} and {len(theirs)})")  # fmt: skip


def test_the_mix_for_mixtral(ours: dict[str, Path]) -> None:
    """What llama-quantize's rules give an 8-layer, 8-expert Mixtral at Q4_K_M, tensor by tensor (they are the
    rules of docs/formats.md; the byte comparison above is the proof, this names the outcome)."""
    types = {t.name: t.tensor_type.name for t in GGUFReader(ours["experts8-q4_k_m"] / "model.gguf").tensors}
    for layer in range(8):
        assert types[f"blk.{layer}.attn_k.weight"] == "Q8_0"
        assert types[f"blk.{layer}.attn_v.weight"] == "Q8_0"
        assert types[f"blk.{layer}.attn_output.weight"] == "Q5_K"
        assert types[f"blk.{layer}.attn_q.weight"] == "Q4_K"
        assert types[f"blk.{layer}.ffn_gate_exps.weight"] == "Q4_K"
        # use_more_bits(i, 8): layers 0, 3, 6, 7 want Q6_K; rows of 288 are not whole 256-blocks: Q6_K falls back
        # to Q8_0, Q4_K to Q5_0.
        assert types[f"blk.{layer}.ffn_down_exps.weight"] == ("Q8_0" if layer in (0, 3, 6, 7) else "Q5_0")
        assert types[f"blk.{layer}.ffn_gate_inp.weight"] == "F32"
        assert types[f"blk.{layer}.attn_norm.weight"] == "F32"
    assert types["output.weight"] == "Q6_K"
    assert types["token_embd.weight"] == "Q4_K"
    print("experts8 q4_k_m:", dict(Counter(types.values())))


def test_general_keys(ours: dict[str, Path]) -> None:
    for outtype, (ftype, _) in MIXES.items():
        reader = GGUFReader(ours[f"experts8-{outtype}"] / "model.gguf")
        keys = [k for k in reader.fields if not k.startswith("GGUF.")]
        assert keys[-2:] == ["general.quantization_version", "general.file_type"]
        assert reader.fields["general.file_type"].contents() == int(ftype)
        assert reader.fields["general.quantization_version"].contents() == 2
    assert int(LlamaFileType.MOSTLY_Q4_K_M) == 15 and int(LlamaFileType.MOSTLY_Q5_K_M) == 17


def _dequantized_torrent_weights(path: Path, n_experts: int) -> dict[str, torch.Tensor]:
    """Our file's tensors dequantized by gguf-py, under the torrent's names (the reference forward pass's)."""
    simple = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
              "attn_output": "attention.wo", "ffn_gate_inp": "feed_forward.gate", "attn_norm": "attention_norm",
              "ffn_norm": "ffn_norm"}  # fmt: skip
    experts = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}
    model = {"token_embd": "tok_embeddings.weight", "output": "output.weight", "output_norm": "norm.weight"}
    weights = {}
    for tensor in GGUFReader(path).tensors:
        value = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        name = tensor.name.removesuffix(".weight")
        if name in model:
            weights[model[name]] = value
            continue
        _, layer, kind = name.split(".", 2)
        if kind in simple:
            weights[f"layers.{layer}.{simple[kind]}.weight"] = value
            continue
        for expert in range(n_experts):
            weights[f"layers.{layer}.feed_forward.experts.{expert}.{experts[kind]}.weight"] = value[expert]
    return weights


@pytest.mark.parametrize("outtype", MIXES)
def test_llama_cpp_runs_it_with_the_reference_logits(ours: dict[str, Path], outtype: str) -> None:
    path = ours[f"{LOGITS_MODEL}-{outtype}"] / "model.gguf"
    model = load(path)
    try:
        got = np.stack([logits(model, sequence) for sequence in TOKENS])
    finally:
        model.close()
    cfg = MODELS[LOGITS_MODEL]
    weights = _dequantized_torrent_weights(path, cfg.n_experts)
    tokens = torch.tensor(TOKENS)
    reference = forward(weights, cfg, tokens).numpy()
    clear = (router_margins(weights, cfg, tokens) >= ROUTER_MARGIN).numpy()
    assert clear.sum() >= MIN_CLEAR, "too many near-tie routings for the comparison to mean anything"
    error = float((np.abs(got - reference).max(-1) / np.abs(reference).max())[clear].max())
    print(f"{outtype}: llama.cpp's logits vs the dequantized reference: relative error {error:.3g}")
    assert error < LOGIT_BOUND, f"{outtype}: {error:.3g} (bound {LOGIT_BOUND})"


@pytest.mark.parametrize("outtype", ["q4_k_m", "q5_0"])
def test_dry_run_sizes_verify_and_against(
    sources: dict[str, Path], ours: dict[str, Path], cli: CliRunner, outtype: str
) -> None:
    folder = ours[f"experts8-{outtype}"]
    planned = cli("convert", sources["experts8"], folder.parent / "dry", "--to", "gguf", "--outtype", outtype,
                  "--dry-run", "--json")  # fmt: skip
    sizes = {f["name"]: f["size"] for f in json.loads(planned.stdout)["files"]}
    assert sizes == {name: (folder / name).stat().st_size for name in sizes}
    assert "verified" in cli("verify", folder).stdout
    assert "verified" in cli("verify", folder, "--against", sources["experts8"]).stdout
