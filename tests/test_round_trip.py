"""Any layout -> any other -> back returns every tensor bit for bit, for random small shapes and dtypes.

The start is a mistral-layout folder written by safetensors itself (tests/synthetic.py); tensors are compared
through the real loaders (torch.load with weights_only, safetensors' load_file), never through our readers.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from synthetic import TinyConfig, make_weights, write_mistral

from convert.common.errors import ConvertError
from convert.model.tables import target_names
from convert.run.pipeline import convert_checkpoint

pytestmark = pytest.mark.e2e

PAIRS = list(itertools.permutations(target_names(), 2))
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, by the real clients of each container."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            loaded = load_file(path)
        elif path.suffix in (".pt", ".pth"):  # torch reads our streamed zip mapped and not mapped alike
            loaded = torch.load(path, weights_only=True, mmap=True)
            plain = torch.load(path, weights_only=True, mmap=False)
            assert plain.keys() == loaded.keys() and all(torch.equal(plain[k], loaded[k]) for k in plain)
        else:
            continue
        assert not set(loaded) & set(tensors), path
        tensors |= loaded
    return tensors


@st.composite
def configs(draw: st.DrawFn) -> TinyConfig:
    n_kv_heads = draw(st.integers(1, 3))
    n_experts = draw(st.integers(1, 3))
    return TinyConfig(
        dim=draw(st.integers(2, 12)),
        n_layers=draw(st.integers(1, 2)),
        n_heads=n_kv_heads * draw(st.integers(1, 3)),  # includes KV heads = heads, and KV heads = 1
        n_kv_heads=n_kv_heads,
        head_dim=2 * draw(st.integers(1, 4)),
        hidden_dim=draw(st.integers(1, 9)),
        n_experts=n_experts,
        experts_per_tok=min(2, n_experts),
        vocab=draw(st.integers(1, 20)) * 2 + 1,  # odd
        rope_theta=draw(st.sampled_from([None, 10000.0, 500000.0])),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), pair=st.sampled_from(PAIRS), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_a_to_b_to_a_is_bit_exact(cfg: TinyConfig, pair: tuple[str, str], dtype: torch.dtype, seed: int) -> None:
    a, b = pair
    # mlx-lm's Mixtral derives head_dim from dim / n_heads: --to mlx refuses any other model, with one line.
    mlx_refuses = "mlx" in pair and cfg.head_dim * cfg.n_heads != cfg.dim
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_mistral(root / "origin", cfg, make_weights(cfg, seed, dtype))
        first = root / "origin" if a == "mistral" else root / "a"
        if mlx_refuses:
            with pytest.raises(ConvertError, match="mlx-lm's Mixtral cannot hold such a model"):
                convert_checkpoint(root / "origin", root / "mlx", "mlx")
            return
        if a != "mistral":
            convert_checkpoint(root / "origin", first, a)
        convert_checkpoint(first, root / "b", b)
        convert_checkpoint(root / "b", root / "a2", a)

        before, after = load_tensors(first), load_tensors(root / "a2")
        assert before.keys() == after.keys()
        for name, tensor in before.items():
            assert after[name].dtype == tensor.dtype == dtype, name
            assert torch.equal(after[name].view(torch.uint8), tensor.view(torch.uint8)), name
        integrity = {"SHA256SUMS", "manifest.json"}  # they name their own source, so they differ by design
        if a != "mistral":  # both written by us: every other file is identical
            for path in first.iterdir():
                if path.name not in integrity:
                    assert (root / "a2" / path.name).read_bytes() == path.read_bytes(), path.name
            tensors = json.loads((first / "manifest.json").read_text())["tensors"]
            assert json.loads((root / "a2" / "manifest.json").read_text())["tensors"] == tensors
        names = sorted(p.name for p in first.iterdir() if p.name not in integrity)
        assert names == sorted(p.name for p in (root / "a2").iterdir() if p.name not in integrity)
