"""Independent reference forward pass of the ORIGINAL (Mistral-native) Mixtral, in float32.

Written from the architecture, not from any converter code: it consumes the torrent-named weights (Layout T, q/k rows
in the interleaved rotary layout) and applies rotary in the complex form mistral-inference uses, so agreement with
transformers after conversion proves the converter's renaming, q/k permutation, expert handling and config.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Hyper(Protocol):
    """The hyperparameters the forward pass needs (tests.synthetic.TinyConfig satisfies it)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    experts_per_tok: int
    norm_eps: float
    rope_theta: float | None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotary_factors(seq_len: int, head_dim: int, theta: float) -> torch.Tensor:
    """exp(i * pos * theta^(-2j/head_dim)) for pos < seq_len, j < head_dim/2, as complex64 [seq_len, head_dim/2]."""
    j = torch.arange(head_dim // 2, dtype=torch.float64)
    freqs = theta ** (-2.0 * j / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * freqs[None, :]
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rotary(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, head_dim]: consecutive pairs (0,1), (2,3), ... of each head are one complex number."""
    b, s, h, d = x.shape
    xc = torch.view_as_complex(x.float().reshape(b, s, h, d // 2, 2).contiguous())
    return torch.view_as_real(xc * factors[None, :, None, :]).reshape(b, s, h, d)


def attention(x: torch.Tensor, w: dict[str, torch.Tensor], p: str, cfg: Hyper, factors: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query self-attention with interleaved rotary on q and k."""
    b, s, _ = x.shape
    hd = cfg.head_dim
    q = (x @ w[p + "attention.wq.weight"].T).view(b, s, cfg.n_heads, hd)
    k = (x @ w[p + "attention.wk.weight"].T).view(b, s, cfg.n_kv_heads, hd)
    v = (x @ w[p + "attention.wv.weight"].T).view(b, s, cfg.n_kv_heads, hd)
    q, k = apply_rotary(q, factors), apply_rotary(k, factors)
    # Each KV head serves n_heads / n_kv_heads CONSECUTIVE query heads.
    rep = cfg.n_heads // cfg.n_kv_heads
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * hd**-0.5
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, cfg.n_heads * hd)
    return out @ w[p + "attention.wo.weight"].T


def moe(x: torch.Tensor, w: dict[str, torch.Tensor], p: str, cfg: Hyper) -> torch.Tensor:
    """Top-k routed SwiGLU experts: softmax over the k chosen router logits, expert(x) = w2(silu(w1 x) * w3 x)."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    logits = flat @ w[p + "feed_forward.gate.weight"].T
    top_logits, top_idx = logits.topk(cfg.experts_per_tok, dim=-1)
    top_w = top_logits.softmax(-1)
    out = torch.zeros_like(flat)
    for e in range(cfg.n_experts):
        q = f"{p}feed_forward.experts.{e}."
        y = (F.silu(flat @ w[q + "w1.weight"].T) * (flat @ w[q + "w3.weight"].T)) @ w[q + "w2.weight"].T
        gate = (top_w * (top_idx == e)).sum(-1, keepdim=True)  # 0 for tokens that did not choose e
        out = out + gate * y
    return out.reshape(shape)


@torch.no_grad()
def forward(weights: dict[str, torch.Tensor], cfg: Hyper, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, vocab] in float32 for token ids [B, S] (positions 0 .. S-1, no cache)."""
    w = {k: v.float() for k, v in weights.items()}
    theta = 1e6 if cfg.rope_theta is None else cfg.rope_theta
    factors = rotary_factors(tokens.shape[1], cfg.head_dim, theta)
    x = w["tok_embeddings.weight"][tokens]
    for layer in range(cfg.n_layers):
        p = f"layers.{layer}."
        x = x + attention(rms_norm(x, w[p + "attention_norm.weight"], cfg.norm_eps), w, p, cfg, factors)
        x = x + moe(rms_norm(x, w[p + "ffn_norm.weight"], cfg.norm_eps), w, p, cfg)
    x = rms_norm(x, w["norm.weight"], cfg.norm_eps)
    return x @ w["output.weight"].T


@torch.no_grad()
def router_margins(weights: dict[str, torch.Tensor], cfg: Hyper, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S]: over the layers, the smallest gap between the k-th and (k+1)-th largest router logit of each token.

    Where it is small, a tiny change of the layer's input (a lossy weight type) can swap the chosen experts and so
    move that position's output far more than the change itself: the near ties a lossy comparison must allow for.
    """
    w = {k: v.float() for k, v in weights.items()}
    theta = 1e6 if cfg.rope_theta is None else cfg.rope_theta
    factors = rotary_factors(tokens.shape[1], cfg.head_dim, theta)
    x = w["tok_embeddings.weight"][tokens]
    margin = torch.full(tokens.shape, float("inf"))
    for layer in range(cfg.n_layers):
        p = f"layers.{layer}."
        x = x + attention(rms_norm(x, w[p + "attention_norm.weight"], cfg.norm_eps), w, p, cfg, factors)
        h = rms_norm(x, w[p + "ffn_norm.weight"], cfg.norm_eps)
        ranked = (h @ w[p + "feed_forward.gate.weight"].T).sort(-1, descending=True).values
        k = cfg.experts_per_tok
        margin = torch.minimum(margin, ranked[..., k - 1] - ranked[..., k])
        x = x + moe(h, w, p, cfg)
    return margin
