"""Every thread and every I/O call site of a real conversion fails once (convert/faults.py); the whole run must
end within a second of the failure with its one line and the right status, leave an output that does not look
complete, and `--resume` must then give the bytes of an uninterrupted run.

The source (about 84 MB) is large enough that the weights go through the O_DIRECT staged writer and its disk
writer thread, and the pooled reads in flight.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, differing_files, evict, run_cli
from synthetic import DEFAULT, make_weights, write_torrent

from convert.fileio.faults import FAULT_ENV, FAULT_LOG_ENV, SITES
from convert.run import writer as stream
from convert.run.resume import JOURNAL

pytestmark = pytest.mark.e2e

MEDIUM = dataclasses.replace(DEFAULT, dim=256, head_dim=64, hidden_dim=2048, n_experts=8, vocab=32003)
BOUND = 1.0  # seconds from the failure to the process's exit
INDEX = "model.safetensors.index.json"

# (site, the pass that fails, the direction): mid-stream passes where a site is passed often, so the failure
# comes with chunks in flight in every queue. A zip's CRC-32 is computed only for a torch-zip output.
# I/O sites: an OSError there is a real disk's error, and its line must name the file.
IO_SITES = {"source-read", "write", "disk-write", "fsync", "rename", "journal", "input-hash"}
CASES = [
    ("source-read", 5, "hf"),
    ("transform", 3, "hf"),
    ("crc", 4, "torrent"),
    ("deferred", 1, "torrent"),
    ("write", 3, "hf"),
    ("disk-write", 3, "hf"),
    ("file-hash", 7, "hf"),
    ("tensor-hash", 7, "hf"),
    ("finite", 5, "hf"),
    ("fsync", 1, "hf"),
    ("rename", 1, "hf"),
    ("journal", 2, "hf"),
    ("input-hash", 1, "hf"),
]
# What each kind of exception must come out as: bad input and I/O errors are status 2, anything else is a bug.
KINDS = {"OSError": (2, "mixtral-convert: error: "), "RuntimeError": (3, "mixtral-convert: internal error: ")}


def test_every_site_is_tested() -> None:
    assert sorted(site for site, _, _ in CASES) == sorted(SITES)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """For each direction: its source, and that source's uninterrupted conversion."""
    root = tmp_path_factory.mktemp("faults")
    torrent = root / "torrent"
    write_torrent(torrent, MEDIUM, make_weights(MEDIUM, seed=11))
    (torrent / "tokenizer.model").unlink()  # the synthetic stand-in draws a warning; stderr is the error alone
    assert (torrent / "consolidated.00.pth").stat().st_size > stream.DIRECT_MIN
    run_cli("convert", torrent, root / "hf", "--to", "hf", "--no-progress", "--hash-input")
    run_cli("convert", root / "hf", root / "back", "--to", "torrent", "--no-progress")
    return {"hf": (torrent, root / "hf"), "torrent": (root / "hf", root / "back")}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize(("site", "nth", "direction"), CASES, ids=[site for site, _, _ in CASES])
def test_a_failure_anywhere_ends_the_run_within_a_second(
    sources: dict[str, tuple[Path, Path]], tmp_path: Path, site: str, nth: int, direction: str, kind: str
) -> None:
    src, reference = sources[direction]
    for weights in [*src.glob("*.pth"), *src.glob("*.safetensors")]:
        evict(weights)  # read with O_DIRECT, as a source not in the page cache is
    dst, log = tmp_path / "out", tmp_path / "failed-at"
    extra = ["--hash-input"] if direction == "hf" else []
    command = [sys.executable, "-m", "convert", "convert", src, dst, "--to", direction, "--no-progress", *extra]
    env = dict(os.environ, **{FAULT_ENV: f"{site}:{nth}:{kind}", FAULT_LOG_ENV: str(log)})
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    exited = time.time()
    status, prefix = KINDS[kind]
    assert log.is_file(), f"the fault at {site} never fired (exit {result.returncode}): {result.stderr}"
    elapsed = exited - float(log.read_text())
    # the one line, besides the warning that the source has no tokenizer.model
    lines = [line for line in result.stderr.splitlines() if not line.endswith("the output will have no tokenizer")]
    assert result.returncode == status, result.stderr
    assert len(lines) == 1 and lines[0].startswith(prefix) and "injected" in lines[0], result.stderr
    if kind == "OSError" and site in IO_SITES:
        assert lines[0].startswith(prefix + "/"), f"an I/O error must name its file: {lines[0]}"
    print(f"{site} {kind}: {elapsed:.3f} s: {lines[0]}")
    assert elapsed < BOUND, f"{site}: {elapsed:.2f} s from the failure to the exit"
    marker = INDEX if direction == "hf" else "params.json"
    assert not (dst / marker).exists(), "a failed run left an output that looks complete"

    again = ["convert", src, dst, "--to", direction, "--no-progress", *extra]
    run_cli(*again, *(["--resume"] if (dst / JOURNAL).exists() else ["--force"]))
    assert differing_files(dst, reference) == []


@pytest.mark.parametrize(("kind", "status"), [("RuntimeError", 3), ("OSError", 2)])
def test_verify_json_reports_a_failure_of_the_tool_as_json(
    sources: dict[str, tuple[Path, Path]], kind: str, status: int
) -> None:
    """verify --json prints valid JSON whatever happens; a bug in a reading thread is exit 3 with an error entry."""
    _, hf = sources["hf"]
    command = [sys.executable, "-m", "convert", "verify", hf, "--json"]
    env = dict(os.environ, **{FAULT_ENV: f"source-read:2:{kind}"})
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout)
    assert result.returncode == status, result.stderr
    assert report["ok"] is False and report["error"]["exit"] == status
    assert "injected" in report["error"]["line"]
