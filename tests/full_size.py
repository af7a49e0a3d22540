"""Mixtral-8x7B at its real size, from formats.md: the published params.json line, names and shapes, and a
mistral-layout source whose data region is a sparse hole (made with truncate), so it costs no disk to read."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

DIM, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, EXPERTS, VOCAB = 4096, 32, 32, 8, 128, 14336, 8, 32000
PARAMS_JSON = (
    '{"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8, '
    '"norm_eps": 1e-05, "vocab_size": 32000, "moe": {"num_experts_per_tok": 2, "num_experts": 8}}'
)
PARAMS = json.loads(PARAMS_JSON)
TOTAL_BYTES = 93_405_585_408
CONFIG_SHA256 = "9d56d04b36d0fd12ff54ae4c5bac769cc176e254e64ff71144614b6318b40793"
CONFIG_BYTES = 720
INDEX_SHA256 = "a8f30ebfaf569d5cc6358a32009342a3e73d4553a340cc38a6319457d9dc13e6"
INDEX_BYTES = 92_658
SHARD_SIZES = [
    4_892_809_584, 4_983_004_016, 4_983_004_016, 4_899_035_200, 4_983_004_016, 4_983_004_016, 4_899_035_248,
    4_983_004_072, 4_983_004_072, 4_899_035_248, 4_983_004_072, 4_983_004_072, 4_983_004_072, 4_899_035_248,
    4_983_004_072, 4_983_004_072, 4_899_035_248, 4_983_004_072, 4_221_679_088,
]  # fmt: skip
TOKENIZER = b"stand-in for the SentencePiece model"


def torrent_shapes(layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    """All tensors of the Mistral-native layout with their real shapes (995 for 32 layers)."""
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (VOCAB, DIM)}
    for layer in range(layers):
        p = f"layers.{layer}."
        shapes[p + "attention.wq.weight"] = (HEADS * HEAD_DIM, DIM)
        shapes[p + "attention.wk.weight"] = (KV_HEADS * HEAD_DIM, DIM)
        shapes[p + "attention.wv.weight"] = (KV_HEADS * HEAD_DIM, DIM)
        shapes[p + "attention.wo.weight"] = (DIM, HEADS * HEAD_DIM)
        shapes[p + "attention_norm.weight"] = (DIM,)
        shapes[p + "ffn_norm.weight"] = (DIM,)
        shapes[p + "feed_forward.gate.weight"] = (EXPERTS, DIM)
        for e in range(EXPERTS):
            q = f"{p}feed_forward.experts.{e}."
            shapes[q + "w1.weight"] = (FFN, DIM)
            shapes[q + "w2.weight"] = (DIM, FFN)
            shapes[q + "w3.weight"] = (FFN, DIM)
    shapes["norm.weight"] = (DIM,)
    shapes["output.weight"] = (VOCAB, DIM)
    return shapes


def safetensors_header(shapes: dict[str, tuple[int, ...]]) -> tuple[bytes, int]:
    """(8-byte length + compact JSON header padded with spaces to a multiple of 8, data size), tensors contiguous."""
    header: dict[str, dict] = {}
    offset = 0
    for name in sorted(shapes):  # the reference writer's order for a single dtype
        nbytes = 2
        for n in shapes[name]:
            nbytes *= n
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def write_sparse_mistral(folder: Path, layers: int = LAYERS) -> int:
    """A mistral-layout folder of real dimensions whose tensor data is a hole; returns the weights' file size."""
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(PARAMS_JSON if layers == LAYERS else json.dumps(PARAMS | {"n_layers": layers}))
    (folder / "tokenizer.model").write_bytes(TOKENIZER)
    head, data_size = safetensors_header(torrent_shapes(layers))
    weights = folder / "consolidated.safetensors"
    weights.write_bytes(head)
    os.truncate(weights, len(head) + data_size)
    return len(head) + data_size
