"""A tiny random Mixtral in the torrent layout, built in, for the demo and for trying the tool.

Same architecture as Mixtral-8x7B (grouped-query attention, 2-of-N routed SwiGLU experts), tiny sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SAMPLE_PARAMS = {
    "dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 2,
    "norm_eps": 1e-05, "vocab_size": 1003, "moe": {"num_experts_per_tok": 2, "num_experts": 4},
}  # fmt: skip


def write_sample(folder: Path, seed: int = 0) -> Path:
    p = SAMPLE_PARAMS
    generator = torch.Generator().manual_seed(seed)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator) * cols**-0.5).to(torch.bfloat16)

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(p["dim"], generator=generator)).to(torch.bfloat16)

    dim, hidden, head_dim = p["dim"], p["hidden_dim"], p["head_dim"]
    weights = {"tok_embeddings.weight": matrix(p["vocab_size"], dim)}
    for layer in range(p["n_layers"]):
        prefix = f"layers.{layer}."
        weights[prefix + "attention.wq.weight"] = matrix(p["n_heads"] * head_dim, dim)
        weights[prefix + "attention.wk.weight"] = matrix(p["n_kv_heads"] * head_dim, dim)
        weights[prefix + "attention.wv.weight"] = matrix(p["n_kv_heads"] * head_dim, dim)
        weights[prefix + "attention.wo.weight"] = matrix(dim, p["n_heads"] * head_dim)
        weights[prefix + "feed_forward.gate.weight"] = matrix(p["moe"]["num_experts"], dim)
        for expert in range(p["moe"]["num_experts"]):
            weights[prefix + f"feed_forward.experts.{expert}.w1.weight"] = matrix(hidden, dim)
            weights[prefix + f"feed_forward.experts.{expert}.w2.weight"] = matrix(dim, hidden)
            weights[prefix + f"feed_forward.experts.{expert}.w3.weight"] = matrix(hidden, dim)
        weights[prefix + "attention_norm.weight"] = norm()
        weights[prefix + "ffn_norm.weight"] = norm()
    weights["norm.weight"] = norm()
    weights["output.weight"] = matrix(p["vocab_size"], dim)

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(weights, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(p) + "\n")
    return folder
