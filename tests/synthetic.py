"""Builders of tiny synthetic Mixtral checkpoints in each source layout.

Written only from the layout facts in docs/formats.md, deliberately without importing anything from the
`convert` package: these files are the independent ground truth the converter is tested against.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

# Arbitrary bytes: the converter must copy tokenizer.model verbatim, so a NUL and every byte value make a
# byte-for-byte comparison meaningful (a text-mode copy or re-encoding would change them).
FAKE_TOKENIZER = b"fake sentencepiece model\x00\r\n" + bytes(range(256))


@dataclass(frozen=True)
class TinyConfig:
    """Hyperparameters of a tiny Mixtral (names as in the torrent params.json)."""

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query: 2 query heads share each KV head
    head_dim: int = 16
    hidden_dim: int = 96
    n_experts: int = 4
    experts_per_tok: int = 2
    vocab: int = 1003  # not a round number, so a vocab size taken from elsewhere shows
    norm_eps: float = 1e-5
    rope_theta: float | None = None  # None: absent from params.json, meaning 1e6

    @property
    def theta(self) -> float:
        """The effective rotary base (mistral-inference's default is 1e6 when params.json has none)."""
        return 1e6 if self.rope_theta is None else self.rope_theta

    @property
    def head_dim_is_default(self) -> bool:
        """Whether head_dim equals dim / n_heads (HF then needs no explicit head_dim)."""
        return self.head_dim * self.n_heads == self.dim


DEFAULT = TinyConfig()
# head_dim != dim / n_heads: q/k/v rows = n * 24 while dim = 64, as in later Mistral models.
HEAD_DIM_VARIANT = replace(DEFAULT, head_dim=24)


def make_weights(cfg: TinyConfig, seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights in the ORIGINAL torrent naming (Layout T), scaled so activations and logits stay O(1).

    Linear maps are randn / sqrt(fan_in), so attention scores are O(1) (rotary position then matters) and router
    logits are well separated; norm weights are 1 +- 0.1.
    """
    gen = torch.Generator().manual_seed(seed)

    def lin(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen) / cols**0.5).to(dtype)

    def norm(n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=gen)).to(dtype)

    d, hd = cfg.dim, cfg.head_dim
    w: dict[str, torch.Tensor] = {"tok_embeddings.weight": torch.randn(cfg.vocab, d, generator=gen).to(dtype)}
    for layer in range(cfg.n_layers):
        p = f"layers.{layer}."
        w[p + "attention.wq.weight"] = lin(cfg.n_heads * hd, d)
        w[p + "attention.wk.weight"] = lin(cfg.n_kv_heads * hd, d)
        w[p + "attention.wv.weight"] = lin(cfg.n_kv_heads * hd, d)
        w[p + "attention.wo.weight"] = lin(d, cfg.n_heads * hd)
        w[p + "attention_norm.weight"] = norm(d)
        w[p + "ffn_norm.weight"] = norm(d)
        # Router scaled up a little so the top-k choice is far from ties.
        w[p + "feed_forward.gate.weight"] = (2.0 * lin(cfg.n_experts, d).float()).to(dtype)
        for e in range(cfg.n_experts):
            q = f"{p}feed_forward.experts.{e}."
            w[q + "w1.weight"] = lin(cfg.hidden_dim, d)
            w[q + "w2.weight"] = lin(d, cfg.hidden_dim)
            w[q + "w3.weight"] = lin(cfg.hidden_dim, d)
    w["norm.weight"] = norm(d)
    w["output.weight"] = lin(cfg.vocab, d)
    return w


def torrent_params(cfg: TinyConfig) -> dict:
    """params.json of Layouts T and C, in the published key order (rope_theta only when set)."""
    params: dict = {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "head_dim": cfg.head_dim,
        "hidden_dim": cfg.hidden_dim,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "norm_eps": cfg.norm_eps,
        "vocab_size": cfg.vocab,
        "moe": {"num_experts_per_tok": cfg.experts_per_tok, "num_experts": cfg.n_experts},
    }
    if cfg.rope_theta is not None:
        params["rope_theta"] = cfg.rope_theta
    return params


def _write_common(folder: Path, params: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "tokenizer.model").write_bytes(FAKE_TOKENIZER)


def _split_points(total: int, parts: int, seed: int) -> list[int]:
    """Uneven cut points 0 < c1 < ... < c_{parts-1} < total (every part non-empty)."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [0, *cuts, total]


def write_torrent(
    folder: Path, cfg: TinyConfig, weights: dict[str, torch.Tensor], split_parts: int | None = None
) -> None:
    """Layout T: consolidated.00.pth (torch.save) + params.json + tokenizer.model.

    With split_parts=k the torch.save bytes are cut into k uneven parts consolidated.00.pth-split0 ... -split{k-1}
    (no consolidated.00.pth); k >= 12 so that lexicographic order (split10 before split2) would corrupt the stream.
    """
    _write_common(folder, torrent_params(cfg))
    buf = io.BytesIO()
    torch.save(weights, buf)
    data = buf.getvalue()
    if split_parts is None:
        (folder / "consolidated.00.pth").write_bytes(data)
        return
    if split_parts < 12:
        raise ValueError("use >= 12 parts so numeric and lexicographic part order differ")
    cuts = _split_points(len(data), split_parts, seed=split_parts)
    for i in range(split_parts):
        (folder / f"consolidated.00.pth-split{i}").write_bytes(data[cuts[i] : cuts[i + 1]])


def write_mistral(folder: Path, cfg: TinyConfig, weights: dict[str, torch.Tensor]) -> None:
    """Layout C: consolidated.safetensors + params.json + tokenizer.model (names and q/k layout as Layout T)."""
    _write_common(folder, torrent_params(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "consolidated.safetensors"))


def megablocks_params(cfg: TinyConfig, sliding_window: str) -> dict:
    """HF-style params.json of Layout M: sliding_window stored as a string, rope_theta omitted."""
    params: dict = {
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_attention_heads": cfg.n_heads,
        "num_hidden_layers": cfg.n_layers,
        "num_key_value_heads": cfg.n_kv_heads,
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.experts_per_tok,
        "rms_norm_eps": cfg.norm_eps,
        "sliding_window": sliding_window,
        "vocab_size": cfg.vocab,
    }
    if not cfg.head_dim_is_default:
        params["head_dim"] = cfg.head_dim
    if cfg.rope_theta is not None:
        params["rope_theta"] = cfg.rope_theta
    return params


def megablocks_weights(cfg: TinyConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Torrent-named weights restacked megablocks-style (Layout M).

    layers.L.block_sparse_moe.w1 / w3: [E*ffn, dim], expert E at rows E*ffn ...; w2: [E*ffn, dim] whose expert-E row
    block is the TRANSPOSE of that expert's [dim, ffn] w2; router at layers.L.block_sparse_moe.gate.weight.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if ".feed_forward." not in name:
            out[name] = t.clone()
    for layer in range(cfg.n_layers):
        src = f"layers.{layer}.feed_forward."
        dst = f"layers.{layer}.block_sparse_moe."
        out[dst + "gate.weight"] = weights[src + "gate.weight"].clone()
        for k in ("w1", "w2", "w3"):
            blocks = []
            for e in range(cfg.n_experts):
                t = weights[f"{src}experts.{e}.{k}.weight"]
                blocks.append(t.t() if k == "w2" else t)
            out[dst + k] = torch.cat(blocks, dim=0).contiguous()
    return out


def write_megablocks(
    folder: Path,
    cfg: TinyConfig,
    weights: dict[str, torch.Tensor],
    n_files: int = 8,
    sliding_window: str = "null",
) -> None:
    """Layout M: consolidated.00.pt ... consolidated.0{n-1}.pt, keys dealt round robin (layers scattered)."""
    _write_common(folder, megablocks_params(cfg, sliding_window))
    stacked = megablocks_weights(cfg, weights)
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(n_files)]
    # Reverse-sorted round robin: every file holds pieces of several layers, in no meaningful order.
    for i, name in enumerate(sorted(stacked, reverse=True)):
        parts[i % n_files][name] = stacked[name]
    for i, part in enumerate(parts):
        torch.save(part, folder / f"consolidated.{i:02d}.pt")
