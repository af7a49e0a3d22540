"""A dry run on a FULL-SIZE Mixtral-8x7B source reproduces the published HF files' bytes and sizes.

The source is a `mistral`-layout folder whose consolidated.safetensors has a hand-written header for all 995 real
tensors and a sparse hole for the ~93 GB of data, so it costs no disk. The dry run must plan exactly the published
config.json and model.safetensors.index.json (by sha256) and the 19 published shard sizes, and write nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CliRunner
from full_size import (
    CONFIG_BYTES,
    CONFIG_SHA256,
    INDEX_BYTES,
    INDEX_SHA256,
    SHARD_SIZES,
    TOKENIZER,
    TOTAL_BYTES,
    safetensors_header,
    torrent_shapes,
    write_sparse_mistral,
)

pytestmark = pytest.mark.e2e


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
    assert len(torrent_shapes()) == 995
    assert safetensors_header(torrent_shapes())[1] == TOTAL_BYTES
    try:
        write_sparse_mistral(src)
    except OSError as exc:
        pytest.skip(f"cannot make a full-size sparse file: {exc}")
    weights = src / "consolidated.safetensors"
    try:
        yield src
    finally:
        weights.unlink(missing_ok=True)  # don't leave a 93 GB apparent-size file in pytest's kept tmp dirs


def test_dry_run_reproduces_published_files(full_size_source: Path, tmp_path: Path, cli: CliRunner) -> None:
    """config.json and the index are byte-identical to the published ones; the 19 shard sizes match exactly."""
    dst = tmp_path / "dst"
    proc = cli(
        "convert", full_size_source, dst, "--to", "hf", "--from", "mistral", "--dry-run", "--json", "--no-progress"
    )
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


def test_the_gguf_sizes_docs_gguf_md_quotes(full_size_source: Path, tmp_path: Path, cli: CliRunner) -> None:
    """docs/gguf.md's table of which --outtype fits which machine quotes the full model's model.gguf size for every
    GGUF outtype (and bits per weight in its table): each must be what the dry run plans, so the docs cannot drift
    from the code."""
    from convert.containers import format_of
    from convert.model.tables import layout

    text = (Path(__file__).resolve().parents[1] / "docs" / "gguf.md").read_text()
    quoted = re.findall(r"`(\w+)`(?: \|)?\s+([\d.]+) GB(?: \| ([\d.]+) \|)?", text)
    by_outtype = {outtype: (float(gb), float(bits) if bits else None) for outtype, gb, bits in quoted}
    assert len(by_outtype) == len(quoted), "an outtype is quoted twice"
    outtypes = format_of(layout("gguf")).outtypes
    assert sorted(by_outtype) == sorted(outtypes), "docs/gguf.md should quote every GGUF outtype's size"
    parameters = sum(math.prod(shape) for shape in torrent_shapes().values())
    for outtype in outtypes:
        proc = cli("convert", full_size_source, tmp_path / "dst", "--to", "gguf", "--outtype", outtype,
                   "--dry-run", "--json")  # fmt: skip
        size = next(f["size"] for f in json.loads(proc.stdout)["files"] if f["name"] == "model.gguf")
        gb, bits = by_outtype[outtype]
        assert gb == round(size / 1e9, 1), f"{outtype}: docs say {gb} GB, the plan {size:,} bytes"
        if bits is not None:
            assert abs(bits - size * 8 / parameters) < 0.006, f"{outtype}: {bits} bits per weight quoted"
