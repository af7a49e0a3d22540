"""mlx and mlx-lm as the real client of the MLX layout: reading a folder's tensors with mx.load (dequantized with
mx.dequantize where quantized), the torrent tensors under mlx-lm's names (written from docs/formats.md, not from the
converter's tables), and logits from mlx_lm.load's model.

mlx's CPU backend runs the experts' gather-matmul (mx.gather_mm) in float32 only, so a float model is run after its
parameters are cast to float32; a quantized one runs as loaded (gather_qmm takes bf16/f16 activations).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # test_contract.py imports this module whether or not mlx is installed; the mlx tests skip without it
    import mlx.core as mx
except ImportError:  # pragma: no cover
    mx = None

MX_TO_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def to_torch(array: Any) -> torch.Tensor:
    """An mlx array as a torch tensor of the same dtype and bits."""
    name = str(array.dtype).removeprefix("mlx.core.")
    if name == "bfloat16":
        return torch.from_numpy(np.array(array.view(mx.uint16))).view(torch.bfloat16)
    if name == "uint32":
        return torch.from_numpy(np.array(array).view(np.int32))
    return torch.from_numpy(np.array(array))


def load_arrays(folder: Path) -> dict[str, Any]:
    """Every tensor of the folder's model*.safetensors, as mlx-lm's load_model reads them (mx.load)."""
    arrays: dict[str, Any] = {}
    for path in sorted(folder.glob("model*.safetensors")):
        arrays.update(mx.load(str(path)))
    return arrays


def read_mlx(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's tensors under their .weight names, a quantized one dequantized by mx.dequantize with the bits
    config.json's quantization block states and the group size the shapes then imply."""
    arrays = load_arrays(folder)
    quantization = json.loads((folder / "config.json").read_text()).get("quantization", {})
    out = {}
    for name, array in arrays.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name.removesuffix(".weight")
        if base + ".scales" in arrays:
            bits = quantization["bits"]
            scales = arrays[base + ".scales"]
            group = array.shape[-1] * 32 // bits // scales.shape[-1]
            array = mx.dequantize(array, scales, arrays[base + ".biases"], group_size=group, bits=bits)
        out[name] = to_torch(array)
    return out


def to_half_split(w: torch.Tensor, n: int) -> torch.Tensor:
    """formats.md's torrent -> transformers rotary row permutation for n heads (mlx-lm keeps transformers' rows)."""
    rows, cols = w.shape
    return w.view(n, rows // n // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def mlx_named(weights: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """The torrent's tensors as mlx_lm.convert saves a Mixtral: transformers' names and q/k rows, the experts of a
    layer stacked [experts, rows, cols] under switch_mlp (w1 gate_proj, w3 up_proj, w2 down_proj)."""
    out = {"model.embed_tokens.weight": weights["tok_embeddings.weight"]}
    n_layers = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("layers."))
    for layer in range(n_layers):
        t, m = f"layers.{layer}.", f"model.layers.{layer}."
        out[m + "self_attn.q_proj.weight"] = to_half_split(weights[t + "attention.wq.weight"], n_heads)
        out[m + "self_attn.k_proj.weight"] = to_half_split(weights[t + "attention.wk.weight"], n_kv_heads)
        out[m + "self_attn.v_proj.weight"] = weights[t + "attention.wv.weight"]
        out[m + "self_attn.o_proj.weight"] = weights[t + "attention.wo.weight"]
        out[m + "block_sparse_moe.gate.weight"] = weights[t + "feed_forward.gate.weight"]
        n_experts = len([k for k in weights if k.startswith(t + "feed_forward.experts.") and k.endswith(".w1.weight")])
        for w, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            experts = [weights[f"{t}feed_forward.experts.{e}.{w}.weight"] for e in range(n_experts)]
            out[f"{m}block_sparse_moe.switch_mlp.{theirs}.weight"] = torch.stack(experts)
        out[m + "input_layernorm.weight"] = weights[t + "attention_norm.weight"]
        out[m + "post_attention_layernorm.weight"] = weights[t + "ffn_norm.weight"]
    out["model.norm.weight"] = weights["norm.weight"]
    out["lm_head.weight"] = weights["output.weight"]
    return out


def to_interleaved(w: torch.Tensor, n: int) -> torch.Tensor:
    """formats.md's transformers -> torrent inverse permutation for n heads."""
    rows, cols = w.shape
    return w.view(n, 2, rows // n // 2, cols).transpose(1, 2).reshape(rows, cols)


def torrent_named(tensors: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """mlx_named's inverse: an MLX folder's (dequantized) tensors under the torrent's names, for the reference."""
    out = {"tok_embeddings.weight": tensors["model.embed_tokens.weight"]}
    n_layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("model.layers."))
    for layer in range(n_layers):
        t, m = f"layers.{layer}.", f"model.layers.{layer}."
        out[t + "attention.wq.weight"] = to_interleaved(tensors[m + "self_attn.q_proj.weight"], n_heads)
        out[t + "attention.wk.weight"] = to_interleaved(tensors[m + "self_attn.k_proj.weight"], n_kv_heads)
        out[t + "attention.wv.weight"] = tensors[m + "self_attn.v_proj.weight"]
        out[t + "attention.wo.weight"] = tensors[m + "self_attn.o_proj.weight"]
        out[t + "feed_forward.gate.weight"] = tensors[m + "block_sparse_moe.gate.weight"]
        for w, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            for e, matrix in enumerate(tensors[f"{m}block_sparse_moe.switch_mlp.{theirs}.weight"]):
                out[f"{t}feed_forward.experts.{e}.{w}.weight"] = matrix
        out[t + "attention_norm.weight"] = tensors[m + "input_layernorm.weight"]
        out[t + "ffn_norm.weight"] = tensors[m + "post_attention_layernorm.weight"]
    out["norm.weight"] = tensors["model.norm.weight"]
    out["output.weight"] = tensors["lm_head.weight"]
    return out


def sample_named(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mlx_named for the built-in sample (4 heads, 2 KV heads: convert.sample's SAMPLE_PARAMS)."""
    from convert.sample import SAMPLE_PARAMS

    return mlx_named(weights, SAMPLE_PARAMS["n_heads"], SAMPLE_PARAMS["n_kv_heads"])


def mlx_logits(folder: Path, tokens: torch.Tensor, *, as_float32: bool) -> torch.Tensor:
    """Logits [B, S, vocab] of mlx_lm.load(folder)'s model, as float32. as_float32: every float parameter cast to
    float32 first (a quantized layer is dequantized and replaced by a float32 one: nothing is left quantized)."""
    from mlx.utils import tree_map
    from mlx_lm.utils import dequantize_model, load

    model, _ = load(str(folder))
    if as_float32:
        model = dequantize_model(model)
        model.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                              model.parameters()))  # fmt: skip
    out = model(mx.array(tokens.numpy()))
    return torch.from_numpy(np.array(out.astype(mx.float32)))
