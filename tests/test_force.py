"""--force makes the folder this output: whatever layout an earlier output had, the folder ends as exactly one
layout, `verify` passes, and files no layout defines are left alone.

In-process (convert_checkpoint, verify_folder, detect_layout: the functions the command line calls) to keep the
twelve ordered pairs fast; tests/test_cli.py drives --force through the command line.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from helpers import run_cli

from convert.model.tables import target_names
from convert.planning.plan import PlanOptions
from convert.planning.source import detect_layout
from convert.run.pipeline import convert_checkpoint
from convert.verify.folder import verify_folder

pytestmark = pytest.mark.e2e

SMALL_SHARDS = PlanOptions(max_shard_size=150_000)  # several hf shards, so stale ones would show
# What an hf output with a translatable tokenizer also holds (the sample's tokenizer is not one).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("force") / "src"
    run_cli("sample", folder)
    (folder / "tokenizer.model").write_bytes(b"tokenizer bytes \x00\x01")
    return folder


PAIRS = [(a, b) for a, b in itertools.permutations(target_names(), 2)]


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=[f"{a}-then-{b}" for a, b in PAIRS])
def test_force_leaves_exactly_the_new_layout(source: Path, tmp_path: Path, first: str, second: str) -> None:
    dst = tmp_path / "out"
    convert_checkpoint(source, dst, first, SMALL_SHARDS)
    if first == "hf":
        for name in HF_TOKENIZER_FILES:
            (dst / name).write_text("{}")
    (dst / "notes.txt").write_text("mine")
    (dst / "consolidated.00.pth.bak").write_bytes(b"also mine")  # like a layout's file, but none defines it

    plan = convert_checkpoint(source, dst, second, force=True)

    assert detect_layout(dst) == second
    report = verify_folder(dst)
    assert report.ok, [r.line() for r in report.results if not r.ok]
    assert report.layout == second
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        [*(f.name for f in plan.files), "notes.txt", "consolidated.00.pth.bak"]
    )
    assert (dst / "notes.txt").read_text() == "mine"
    assert (dst / "consolidated.00.pth.bak").read_bytes() == b"also mine"


def test_force_without_checksums_removes_the_stale_ones(source: Path, tmp_path: Path) -> None:
    """An earlier run's SHA256SUMS would list files this output does not hold: verify would fail on it."""
    dst = tmp_path / "out"
    convert_checkpoint(source, dst, "hf", SMALL_SHARDS)
    convert_checkpoint(source, dst, "mistral", PlanOptions(checksums=False), force=True)
    assert not (dst / "SHA256SUMS").exists() and not (dst / "manifest.json").exists()
    assert verify_folder(dst).ok
    assert detect_layout(dst) == "mistral"
