"""The peer baseline: how a torrent checkpoint is usually converted to the Hugging Face layout.

This is the approach of transformers' own convert_mixtral_weights_to_hf.py and most one-off scripts: load the
whole checkpoint with torch.load(weights_only=True), build the HF state dict in RAM (renames, plus the rotary
permutation of q with all heads and of k with the KV heads), then write it with safetensors' save_file, sharded
at 5e9 bytes the way save_pretrained shards (huggingface_hub's split_torch_state_dict_into_shards). It exists
only to be timed against mixtral-convert, so it does no checking beyond what the libraries do.

`python bench/peer_baseline.py SRC DST`
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

MAX_SHARD_SIZE = 5 * 10**9


def to_half_split(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Interleaved rotary rows (Mistral) to the half-split rows rotate_half expects (HF)."""
    rows, cols = weight.shape
    return weight.view(heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_dict(weights: dict[str, torch.Tensor], params: dict) -> dict[str, torch.Tensor]:
    """Rename every tensor, in HF module order, popping from weights so each source tensor is freed once used."""
    n_heads, n_kv_heads = params["n_heads"], params["n_kv_heads"]
    head_dim = params.get("head_dim", params["dim"] // n_heads)
    experts = params["moe"]["num_experts"]
    out = {"model.embed_tokens.weight": weights.pop("tok_embeddings.weight")}
    for layer in range(params["n_layers"]):
        src, dst = f"layers.{layer}.", f"model.layers.{layer}."
        q, k = weights.pop(src + "attention.wq.weight"), weights.pop(src + "attention.wk.weight")
        out[dst + "self_attn.q_proj.weight"] = to_half_split(q, n_heads, head_dim)  # all 32 query heads
        out[dst + "self_attn.k_proj.weight"] = to_half_split(k, n_kv_heads, head_dim)  # the 8 KV heads, not 32
        del q, k
        out[dst + "self_attn.v_proj.weight"] = weights.pop(src + "attention.wv.weight")
        out[dst + "self_attn.o_proj.weight"] = weights.pop(src + "attention.wo.weight")
        out[dst + "block_sparse_moe.gate.weight"] = weights.pop(src + "feed_forward.gate.weight")
        for e in range(experts):
            for w in ("w1", "w2", "w3"):
                key = f"block_sparse_moe.experts.{e}.{w}.weight"
                out[dst + key] = weights.pop(src + f"feed_forward.experts.{e}.{w}.weight")
        out[dst + "input_layernorm.weight"] = weights.pop(src + "attention_norm.weight")
        out[dst + "post_attention_layernorm.weight"] = weights.pop(src + "ffn_norm.weight")
    out["model.norm.weight"] = weights.pop("norm.weight")
    out["lm_head.weight"] = weights.pop("output.weight")
    if weights:
        raise SystemExit(f"unexpected tensors left over: {sorted(weights)[:5]}")
    return out


def config(params: dict) -> dict:
    """The config.json a user needs next to the weights (rope_theta 1e6: the torrent params.json omits it)."""
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
        "hidden_size": params["dim"], "intermediate_size": params["hidden_dim"],
        "num_attention_heads": params["n_heads"], "num_key_value_heads": params["n_kv_heads"],
        "num_hidden_layers": params["n_layers"], "num_local_experts": params["moe"]["num_experts"],
        "num_experts_per_tok": params["moe"]["num_experts_per_tok"], "rms_norm_eps": params["norm_eps"],
        "rope_theta": params.get("rope_theta", 1e6), "vocab_size": params["vocab_size"],
        "max_position_embeddings": 32768, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip


def convert(src: Path, dst: Path) -> None:
    params = json.loads((src / "params.json").read_text())
    weights = torch.load(src / "consolidated.00.pth", map_location="cpu", weights_only=True)
    state = hf_state_dict(weights, params)
    dst.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD_SIZE)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, dst / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (dst / "config.json").write_text(json.dumps(config(params), indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args(argv)
    convert(args.src, args.dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
