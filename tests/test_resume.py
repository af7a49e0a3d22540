"""Resume: kill a conversion with SIGKILL at chosen points, resume it, and get exactly an uninterrupted run's bytes.

The kill points are made deterministic by the writer's fault-injection hook (MIXTRAL_CONVERT_STALL_AT), which
stalls after the first chunk of the named file, so the test knows where the process was when it died.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, assert_one_line_error, differing_files, run_cli

pytestmark = pytest.mark.e2e

SHARD_SIZE = "150KB"  # the sample then has 5 shards
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The built-in sample and its uninterrupted conversion."""
    root = tmp_path_factory.mktemp("resume")
    run_cli("sample", root / "src")
    (root / "src" / "tokenizer.model").write_bytes(b"tok")
    run_cli("convert", root / "src", root / "reference", "--to", "hf", "--max-shard-size", SHARD_SIZE)
    return root / "src", root / "reference"


def killed_at(src: Path, dst: Path, stall_at: str, *extra: str) -> None:
    """Start a conversion, wait until it is writing stall_at, and SIGKILL it there."""
    env = dict(os.environ, MIXTRAL_CONVERT_STALL_AT=stall_at)
    command = [
        sys.executable,
        "-m",
        "convert",
        "convert",
        src,
        dst,
        "--to",
        "hf",
        "--max-shard-size",
        SHARD_SIZE,
        *extra,
    ]
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE)
    partial = dst / f"{stall_at}.partial"
    deadline = time.monotonic() + 60
    while not (partial.is_file() and partial.stat().st_size > 0):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.stderr else ""
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def same_files(a: Path, b: Path) -> None:
    assert differing_files(a, b) == []


@pytest.mark.parametrize(
    "stall_at",
    ["model-00001-of-00005.safetensors", "model-00003-of-00005.safetensors", "SHA256SUMS", INDEX],
    ids=["before-the-first-shard", "between-shards", "checksums", "writing-the-index"],
)
def test_killed_then_resumed_equals_uninterrupted(sample: tuple[Path, Path], tmp_path: Path, stall_at: str) -> None:
    src, reference = sample
    dst = tmp_path / "hf"
    killed_at(src, dst, stall_at)
    assert not (dst / INDEX).exists()  # an interrupted output never looks complete
    finished = {p.name: p.stat().st_mtime_ns for p in dst.glob("model-*.safetensors")}

    refused = run_cli("convert", src, dst, "--to", "hf", "--max-shard-size", SHARD_SIZE, check=False)
    assert_one_line_error(refused, "interrupted conversion", "--resume")

    run_cli("convert", src, dst, "--to", "hf", "--max-shard-size", SHARD_SIZE, "--resume")
    same_files(reference, dst)
    for name, mtime in finished.items():  # finished shards were kept, not rewritten
        assert (dst / name).stat().st_mtime_ns == mtime, name
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=dst).returncode == 0


def test_a_damaged_finished_shard_is_redone(sample: tuple[Path, Path], tmp_path: Path) -> None:
    src, reference = sample
    dst = tmp_path / "hf"
    killed_at(src, dst, "model-00003-of-00005.safetensors")
    shard = dst / "model-00001-of-00005.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(data)
    run_cli("convert", src, dst, "--to", "hf", "--max-shard-size", SHARD_SIZE, "--resume")
    same_files(reference, dst)


def test_resume_refuses_another_plan(sample: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = sample
    dst = tmp_path / "hf"
    killed_at(src, dst, "model-00002-of-00005.safetensors")
    other = run_cli("convert", src, dst, "--to", "hf", "--max-shard-size", "100KB", "--resume", check=False)
    assert_one_line_error(other, str(dst), "cannot resume", "other settings")
    os.utime(src / "params.json")
    changed = run_cli("convert", src, dst, "--to", "hf", "--max-shard-size", SHARD_SIZE, "--resume", check=False)
    assert_one_line_error(changed, "cannot resume", "source files differ")
    # A folder holding files but no journal: nothing of this run's to resume. (An empty or missing folder is a
    # plain run: tests/test_resume_idempotent.py.)
    other_files = tmp_path / "other"
    other_files.mkdir()
    (other_files / "notes.txt").write_text("not a conversion\n")
    nothing = run_cli("convert", src, other_files, "--to", "hf", "--resume", check=False)
    assert_one_line_error(nothing, "nothing to resume", "it holds no journal of an interrupted conversion")


def test_without_checksums_the_rest_is_identical_and_resumable(sample: tuple[Path, Path], tmp_path: Path) -> None:
    src, reference = sample
    dst = tmp_path / "hf"
    killed_at(src, dst, "model-00003-of-00005.safetensors", "--no-checksums")
    run_cli("convert", src, dst, "--to", "hf", "--max-shard-size", SHARD_SIZE, "--no-checksums", "--resume")
    names = sorted(p.name for p in dst.iterdir())
    assert names == sorted(p.name for p in reference.iterdir() if p.name not in ("SHA256SUMS", "manifest.json"))
    for name in names:
        assert (dst / name).read_bytes() == (reference / name).read_bytes(), name


def test_the_next_shard_streams_while_the_one_before_commits(sample: tuple[Path, Path], tmp_path: Path) -> None:
    """A finished file is synced and renamed on the committer thread while the next shard streams (a sync waits
    for the disk's cache, with no byte moving). Held in the first shard's commit, the run must already be writing
    the second; SIGINT there stops it within a second with one line, the held shard is not put in place, and
    --resume finishes the same bytes as an uninterrupted run."""
    src, reference = sample
    dst = tmp_path / "hf"
    first, second = "model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors"
    env = dict(os.environ, MIXTRAL_CONVERT_STALL_AT=f"commit:{first}")
    command = [sys.executable, "-m", "convert", "convert", src, dst, "--to", "hf", "--max-shard-size", SHARD_SIZE]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ((dst / f"{second}.partial").is_file() and (dst / f"{second}.partial").stat().st_size > 0):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the second shard never started while the first was committing"
            time.sleep(0.02)
        assert (dst / f"{first}.partial").is_file() and not (dst / first).exists()
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert process.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if not line.startswith("mixtral-convert: warning:")]
    assert len(lines) == 1 and lines[0].startswith("mixtral-convert: interrupted;"), stderr
    assert took < 1.5, f"took {took:.2f} s to stop after SIGINT"
    assert not (dst / first).exists() and not (dst / INDEX).exists()
    run_cli("convert", src, dst, "--to", "hf", "--max-shard-size", SHARD_SIZE, "--resume")
    same_files(reference, dst)
