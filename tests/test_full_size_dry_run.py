"""A dry run on a FULL-SIZE Mixtral-8x7B source reproduces the published HF files' bytes and sizes.

The source is a `mistral`-layout folder whose consolidated.safetensors has a hand-written header for all 995 real
tensors and a sparse hole for the ~93 GB of data, so it costs no disk. The dry run must plan exactly the published
config.json and model.safetensors.index.json (by sha256) and the 19 published shard sizes, and write nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CliRunner

# From formats.md.
DIM, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, EXPERTS, VOCAB = 4096, 32, 32, 8, 128, 14336, 8, 32000
PARAMS_JSON = (
    '{"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8, '
    '"norm_eps": 1e-05, "vocab_size": 32000, "moe": {"num_experts_per_tok": 2, "num_experts": 8}}'
)
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


def torrent_shapes() -> dict[str, tuple[int, ...]]:
    """All 995 tensors of the Mistral-native layout with their real shapes."""
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (VOCAB, DIM)}
    for layer in range(LAYERS):
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


def can_make_sparse_files(folder: Path) -> str | None:
    """None if a 1 GiB truncate-extended file occupies (almost) no blocks here, else the reason it does not."""
    probe = folder / "sparse-probe"
    try:
        with open(probe, "wb") as f:
            f.write(b"x")
        os.truncate(probe, 1 << 30)
        blocks = os.stat(probe).st_blocks
    except OSError as exc:
        return f"cannot extend a file to 1 GiB here: {exc}"
    finally:
        probe.unlink(missing_ok=True)
    if blocks * 512 > (1 << 24):
        return f"filesystem does not make sparse files (1 GiB hole used {blocks * 512} bytes)"
    return None


@pytest.fixture
def full_size_source(tmp_path: Path) -> Iterator[Path]:
    """A full-size Layout C folder backed by a sparse consolidated.safetensors (deleted afterwards)."""
    reason = can_make_sparse_files(tmp_path)
    if reason:
        pytest.skip(reason)
    src = tmp_path / "src"
    src.mkdir()
    (src / "params.json").write_text(PARAMS_JSON)
    (src / "tokenizer.model").write_bytes(TOKENIZER)
    shapes = torrent_shapes()
    assert len(shapes) == 995
    head, data_size = safetensors_header(shapes)
    assert data_size == TOTAL_BYTES
    weights = src / "consolidated.safetensors"
    weights.write_bytes(head)
    try:
        os.truncate(weights, len(head) + data_size)
    except OSError as exc:
        pytest.skip(f"cannot make a {len(head) + data_size}-byte sparse file: {exc}")
    try:
        yield src
    finally:
        weights.unlink(missing_ok=True)  # don't leave a 93 GB apparent-size file in pytest's kept tmp dirs


def test_dry_run_reproduces_published_files(full_size_source: Path, tmp_path: Path, cli: CliRunner) -> None:
    """config.json and the index are byte-identical to the published ones; the 19 shard sizes match exactly."""
    dst = tmp_path / "dst"
    proc = cli(
        "convert", full_size_source, dst, "--to", "hf", "--from", "mistral", "--dry-run", "--json", "--no-progress",
        timeout=300,
    )  # fmt: skip
    assert not dst.exists(), "a dry run created the destination"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]

    plan = json.loads(proc.stdout)
    files = {f["name"]: f for f in plan["files"]}
    assert len(files) == len(plan["files"]), "a file is planned twice"

    def content(name: str) -> bytes:
        assert name in files, f"{name} not in the plan: {sorted(files)}"
        text = files[name].get("content")
        assert isinstance(text, str), f"{name} content should be the file's text, got {type(text).__name__}"
        return text.encode("utf-8")

    config = content("config.json")
    assert len(config) == CONFIG_BYTES and files["config.json"]["size"] == CONFIG_BYTES
    assert hashlib.sha256(config).hexdigest() == CONFIG_SHA256, config.decode()

    index = content("model.safetensors.index.json")
    assert len(index) == INDEX_BYTES and files["model.safetensors.index.json"]["size"] == INDEX_BYTES
    index_json = json.loads(index)
    assert index_json["metadata"]["total_size"] == TOTAL_BYTES
    assert len(index_json["weight_map"]) == 995
    assert hashlib.sha256(index).hexdigest() == INDEX_SHA256

    shards = sorted(n for n in files if n.startswith("model-") and n.endswith(".safetensors"))
    expected_names = [f"model-{i:05d}-of-00019.safetensors" for i in range(1, 20)]
    assert shards == expected_names
    assert [files[n]["size"] for n in shards] == SHARD_SIZES

    generation = json.loads(content("generation_config.json"))
    assert generation.get("bos_token_id") == 1 and generation.get("eos_token_id") == 2
    assert files.get("tokenizer.model", {}).get("size") == len(TOKENIZER), "tokenizer.model not planned as a copy"
    assert not [n for n in files if n.startswith("consolidated") or n == "params.json"]
