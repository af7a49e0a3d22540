"""What --resume trusts in DST, and what it knows of the source: one run at a time (a lock), nothing followed as a
symbolic link, a journal checked like any input, and a source fingerprint that a same-size, same-mtime
replacement does not fool. Every refusal is one line and exit 2; files outside DST stay byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_resume
from helpers import REPO, assert_one_line_error, run_cli
from test_resume import INDEX, SHARD_SIZE, killed_at, same_files

pytestmark = pytest.mark.e2e

JOURNAL = ".mixtral-convert-journal"
LOCK = ".mixtral-convert-lock"
STALL_AT = "model-00003-of-00005.safetensors"  # two shards finished, the third being written


# The built-in sample and its uninterrupted conversion, as the resume tests build it.
sample = test_resume.sample


@pytest.fixture(scope="module")
def interrupted(sample: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output killed while writing its third shard; tests change a copy of it."""
    dst = tmp_path_factory.mktemp("interrupted") / "hf"
    killed_at(sample[0], dst, STALL_AT)
    return dst


@pytest.fixture
def dst(interrupted: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "hf"
    shutil.copytree(interrupted, copy, symlinks=True)
    return copy


def resume(src: Path, dst: Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    return run_cli("convert", src, dst, "--to", "hf", "--max-shard-size", SHARD_SIZE, "--resume", check=check)


# Finding 11: a lock held for the whole run.


@pytest.fixture
def running(sample: tuple[Path, Path], tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A conversion stalled (alive) while writing its third shard."""
    dst = tmp_path / "hf"
    env = dict(os.environ, MIXTRAL_CONVERT_STALL_AT=STALL_AT)
    command = [sys.executable, "-m", "convert", "convert", sample[0], dst, "--to", "hf", "--max-shard-size", SHARD_SIZE]
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (dst / f"{STALL_AT}.partial").is_file():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    try:
        yield process, dst
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@pytest.mark.parametrize("how", ["--resume", "--force", "plain"])
def test_a_second_run_into_a_busy_folder_is_refused(
    sample: tuple[Path, Path], running: tuple[subprocess.Popen[bytes], Path], how: str
) -> None:
    src, reference = sample
    process, dst = running
    before = {p.name: p.read_bytes() for p in dst.iterdir() if p.is_file() and p.name != f"{STALL_AT}.partial"}
    flags = [] if how == "plain" else [how]
    second = run_cli("convert", src, dst, "--to", "hf", "--max-shard-size", SHARD_SIZE, *flags, check=False)
    assert second.returncode == 2
    assert_one_line_error(second, f"another mixtral-convert (pid {process.pid}) is writing to {dst}")
    for name, data in before.items():  # the second run removed and wrote nothing
        assert (dst / name).read_bytes() == data, name
    assert process.poll() is None
    process.send_signal(signal.SIGKILL)  # the kernel drops a dead holder's lock: --resume gets it
    process.wait(timeout=30)
    assert (dst / LOCK).exists()
    resume(src, dst, check=True)
    same_files(reference, dst)  # the lock file is gone too


# Finding 8: nothing in DST is followed as a symbolic link; nothing outside DST is written.


def test_a_symlinked_partial_is_refused_and_its_target_untouched(
    sample: tuple[Path, Path], dst: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not yours\n" * 1000)
    partial = dst / f"{STALL_AT}.partial"
    partial.unlink()
    partial.symlink_to(outside)
    result = resume(sample[0], dst)
    assert result.returncode == 2
    assert_one_line_error(result, str(partial), "is a symbolic link", "remove the link")
    assert outside.read_bytes() == b"not yours\n" * 1000
    assert partial.is_symlink()


@pytest.mark.parametrize("target", ["the-source-params", "another-file"])
def test_a_symlinked_journal_is_refused_and_its_target_untouched(
    sample: tuple[Path, Path], dst: Path, tmp_path: Path, target: str
) -> None:
    src = tmp_path / "src"
    shutil.copytree(sample[0], src)  # its own source: the test links into it
    victim = src / "params.json" if target == "the-source-params" else tmp_path / "other.txt"
    if target == "another-file":
        victim.write_text("someone else's\n")
    before = victim.read_bytes()
    (dst / JOURNAL).unlink()
    (dst / JOURNAL).symlink_to(victim)
    result = resume(src, dst)
    assert result.returncode == 2
    assert_one_line_error(result, str(dst / JOURNAL), "is a symbolic link")
    assert victim.read_bytes() == before
    plain = run_cli("convert", src, dst, "--to", "hf", "--max-shard-size", SHARD_SIZE, check=False)
    assert_one_line_error(plain, "--resume")
    assert victim.read_bytes() == before
    # --force starts over: the link itself is removed, never what it points to
    run_cli("convert", src, dst, "--to", "hf", "--max-shard-size", SHARD_SIZE, "--force")
    assert victim.read_bytes() == before
    assert not (dst / JOURNAL).exists() and (dst / INDEX).is_file()


def test_a_symlinked_finished_output_is_refused(sample: tuple[Path, Path], dst: Path, tmp_path: Path) -> None:
    shard = dst / "model-00001-of-00005.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(shard, outside)
    shard.unlink()
    shard.symlink_to(outside)
    result = resume(sample[0], dst)
    assert result.returncode == 2
    assert_one_line_error(result, str(shard), "is a symbolic link")


# Finding 9: the journal is input like any other.


def rewrite_entry(journal: Path, number: int, change: dict) -> None:
    lines = journal.read_text().splitlines(keepends=True)
    entry = json.loads(lines[number - 1])
    entry.update(change)
    lines[number - 1] = json.dumps(entry) + "\n"
    journal.write_text("".join(lines))


DAMAGE = {
    "invalid-utf8-line": (
        lambda j: j.write_bytes(j.read_bytes() + b"\xff\xfe\x00garbage\n"),
        "line 4 is not a line this tool writes",
    ),
    "invalid-utf8-tail": (lambda j: j.write_bytes(j.read_bytes() + b"\xff"), "line 4 is not a line this tool writes"),
    "sha256-null": (
        lambda j: rewrite_entry(j, 2, {"sha256": None}),
        "line 2 does not fit this conversion: sha256 of model-00001-of-00005.safetensors must be 64 hex digits, "
        "not null",
    ),
    "tensors-empty": (
        lambda j: rewrite_entry(j, 3, {"tensors": {}}),
        "line 3 does not fit this conversion: tensors of model-00002-of-00005.safetensors must map each of its",
    ),
    "file-a-list": (
        lambda j: rewrite_entry(j, 2, {"file": [1]}),
        "line 2 does not fit this conversion: file must be a file name, not [1]",
    ),
    "file-not-planned": (
        lambda j: rewrite_entry(j, 2, {"file": "../outside"}),
        'line 2 does not fit this conversion: file "../outside" is not one this conversion writes',
    ),
    "extra-key": (
        lambda j: rewrite_entry(j, 2, {"offset": 5}),
        "line 2 does not fit this conversion: must hold exactly file, sha256 and tensors",
    ),
    "fingerprint-not-an-object": (
        lambda j: j.write_text('{"fingerprint": 7}\n' + j.read_text().split("\n", 1)[1]),
        'line 1 must be {"fingerprint": ...}',
    ),
    "huge": (
        lambda j: os.truncate(j, 65 * 2**20),
        "the resume journal is 68,157,440 bytes, more than any conversion writes (67,108,864)",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_journal_is_one_line_and_exit_2(sample: tuple[Path, Path], dst: Path, damage: str) -> None:
    breaking, message = DAMAGE[damage]
    journal = dst / JOURNAL
    assert len(journal.read_text().splitlines()) == 3  # the fingerprint and two finished shards
    breaking(journal)
    result = resume(sample[0], dst)
    assert result.returncode == 2, result.stderr
    line = assert_one_line_error(result, str(journal), message)
    assert "start over with --force" in line


def test_a_journal_cut_by_a_crash_is_resumed(sample: tuple[Path, Path], dst: Path) -> None:
    """A last line cut short (a crash during an append) records nothing: its shard is redone, and the next
    append starts on a line of its own."""
    src, reference = sample
    journal = dst / JOURNAL
    data = journal.read_bytes()
    journal.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 40])
    kept = (dst / "model-00001-of-00005.safetensors").stat().st_mtime_ns
    resume(src, dst, check=True)
    same_files(reference, dst)
    assert (dst / "model-00001-of-00005.safetensors").stat().st_mtime_ns == kept


# Finding 10: a replaced source is noticed even with the same sizes and mtimes.


def test_a_source_replaced_with_same_size_and_mtime_is_refused(
    sample: tuple[Path, Path], interrupted: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    shutil.copytree(sample[0], src)
    dst = tmp_path / "hf"
    killed_at(src, dst, STALL_AT)
    other = tmp_path / "other"
    run_cli("sample", other, "--seed", "7")
    weights = src / "consolidated.00.pth"
    was = weights.stat()
    assert (other / "consolidated.00.pth").stat().st_size == was.st_size
    assert (other / "consolidated.00.pth").read_bytes() != weights.read_bytes()
    os.replace(other / "consolidated.00.pth", weights)
    os.utime(weights, ns=(was.st_atime_ns, was.st_mtime_ns))
    result = resume(src, dst)
    assert result.returncode == 2
    assert_one_line_error(result, "cannot resume", "source files differ", "consolidated.00.pth", "another inode")


def test_a_moved_source_is_refused(sample: tuple[Path, Path], dst: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(sample[0], moved)  # copytree keeps mtimes, like cp -a
    result = resume(moved, dst)
    assert_one_line_error(result, "cannot resume", f"started from the source folder {sample[0]}")


def test_the_sampled_digest_sees_bytes_that_size_and_mtime_do_not(tmp_path: Path) -> None:
    """Two files of one size whose bytes differ only in the middle: the sampled digest tells them apart."""
    from convert.run.fingerprint import file_fingerprint  # here, so that the other tests run on code without it

    size = 8 * 2**20
    middle = size // 9 * 4 // 4096 * 4096 + 100  # inside the fourth sampled range
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    data = bytearray(b"\x10" + bytes(7) + b"{" + b" " * 14 + b"}") + bytearray(size - 24)
    a.write_bytes(data)
    data[middle] ^= 1
    b.write_bytes(data)
    assert file_fingerprint(a)["sampled_sha256"] != file_fingerprint(b)["sampled_sha256"]
    data[middle] ^= 1
    data[size // 2] ^= 1  # between the fourth and fifth samples: only --hash-input or verify --against see it
    b.write_bytes(data)
    assert file_fingerprint(a)["sampled_sha256"] == file_fingerprint(b)["sampled_sha256"]
