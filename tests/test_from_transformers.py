"""A model that transformers itself made and saved, converted to the Mistral layouts, computes through the
independent reference forward pass (tests/reference.py) what transformers computes on the saved folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference import forward
from safetensors.torch import load_file
from synthetic import TinyConfig
from test_hf_equivalence import TOKENS, logit_tolerance, max_diff
from transformers import MixtralConfig, MixtralForCausalLM

from convert.run.pipeline import convert_checkpoint

pytestmark = pytest.mark.clients

VOCAB = 1003  # TOKENS use ids up to 1002


def saved_by_transformers(folder: Path, theta: float, head_dim: int | None, dtype: torch.dtype) -> torch.Tensor:
    """save_pretrained a tiny random Mixtral; return its logits on TOKENS computed by transformers from the folder."""
    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        rope_theta=theta,
    )
    torch.manual_seed(7)
    model = MixtralForCausalLM(config)
    with torch.no_grad():  # transformers' 0.02 init gives near-zero logits; scale so a wrong map shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.copy_(torch.randn_like(parameter) * parameter.shape[-1] ** -0.5)
    model.to(dtype).save_pretrained(folder)
    reloaded = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return reloaded.eval()(TOKENS).logits.float()


def hyper_from_params(path: Path) -> TinyConfig:
    p = json.loads(path.read_text())
    return TinyConfig(
        dim=p["dim"],
        n_layers=p["n_layers"],
        n_heads=p["n_heads"],
        n_kv_heads=p["n_kv_heads"],
        head_dim=p["head_dim"],
        hidden_dim=p["hidden_dim"],
        n_experts=p["moe"]["num_experts"],
        experts_per_tok=p["moe"]["num_experts_per_tok"],
        vocab=p["vocab_size"],
        norm_eps=p["norm_eps"],
        rope_theta=p.get("rope_theta"),
    )


@pytest.mark.parametrize(
    ("target", "theta", "head_dim", "dtype"),
    [
        ("torrent", 1e6, None, torch.float32),
        ("mistral", 1e6, None, torch.bfloat16),
        ("torrent", 5e5, 24, torch.bfloat16),
        ("mistral", 5e5, 24, torch.float32),
    ],
)
def test_reference_on_converted_equals_transformers(
    tmp_path: Path, target: str, theta: float, head_dim: int | None, dtype: torch.dtype
) -> None:
    expected = saved_by_transformers(tmp_path / "hf", theta, head_dim, dtype)
    convert_checkpoint(tmp_path / "hf", tmp_path / target, target)
    if target == "torrent":
        weights = torch.load(tmp_path / target / "consolidated.00.pth", weights_only=True, mmap=True)
    else:
        weights = load_file(tmp_path / target / "consolidated.safetensors")
    assert {t.dtype for t in weights.values()} == {dtype}
    cfg = hyper_from_params(tmp_path / target / "params.json")
    assert cfg.theta == theta and cfg.head_dim == (head_dim or 16)
    got = forward(weights, cfg, TOKENS)
    assert max_diff(got, expected) <= logit_tolerance(expected)
