"""verify's checksum pass hashes several files at once (convert/checksums.py hash_files): each file's digests must
be exactly those of hashing it alone (sha256sum's, blake3's), and a failure in any lane ends the run with its line."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import blake3
import pytest
from helpers import REPO, run_cli
from synthetic import DEFAULT, make_weights, write_torrent

from convert.checksums import READ_SIZE, FolderHasher, hash_files
from convert.faults import FAULT_ENV, FAULT_LOG_ENV
from convert.integrity import TensorEntry
from convert.workers import run_scope

MEDIUM = dataclasses.replace(DEFAULT, dim=256, head_dim=64, hidden_dim=2048, n_experts=8, vocab=32003)


def _ranges(name: str, size: int) -> list[TensorEntry]:
    """Three ranges of a file: its start, a middle stretch across a read boundary, and its end."""
    cuts = [(0, min(size, 100)), (size // 3, min(size, size // 3 + READ_SIZE)), (max(0, size - 4097), size)]
    return [TensorEntry(f"{name}:{n}", name, "U8", (end - begin,), begin, end) for n, (begin, end) in enumerate(cuts)]


def test_files_hashed_at_once_get_the_digests_of_each_hashed_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = [0, 1, 4097, READ_SIZE + 12345, 2 * READ_SIZE - 1]
    contents = {tmp_path / f"f{n}": os.urandom(size) for n, size in enumerate(sizes)}
    for path, data in contents.items():
        path.write_bytes(data)
    jobs = []
    for path in contents:
        ranges = _ranges(path.name, len(contents[path]))
        jobs.append((path, ranges, ["blake3", "sha256", "blake3"]))
    threads: set[str] = set()
    hash_file = FolderHasher.hash_file

    def recorded(self: FolderHasher, *args: object) -> object:
        threads.add(threading.current_thread().name)
        return hash_file(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(FolderHasher, "hash_file", recorded)
    with run_scope():
        hasher = FolderHasher()
        try:
            results = hash_files(hasher, jobs)
        finally:
            hasher.close()
    assert len(threads) >= 2, threads  # more than one file at a time
    assert set(results) == set(contents)
    for path, ranges, algorithms in jobs:
        data = contents[path]
        whole, digests = results[path]
        assert whole == hashlib.sha256(data).hexdigest(), path.name
        for entry, algorithm in zip(ranges, algorithms, strict=True):
            part = data[entry.begin : entry.end]
            want = blake3.blake3(part).hexdigest() if algorithm == "blake3" else hashlib.sha256(part).hexdigest()
            assert digests[entry.name] == want, entry.name


@pytest.mark.parametrize("kind", ["OSError", "RuntimeError"])
def test_a_read_failure_while_files_hash_at_once_ends_verify_with_one_line(tmp_path: Path, kind: str) -> None:
    """Three shards, so that two lanes read at once when the injected failure comes; exit 2 for an I/O error,
    3 for a bug, within a second of it, whichever lane it hit."""
    src, hf = tmp_path / "torrent", tmp_path / "hf"
    write_torrent(src, MEDIUM, make_weights(MEDIUM, seed=5))
    run_cli("convert", src, hf, "--to", "hf", "--max-shard-size", "30MB", "--no-progress")
    assert len(list(hf.glob("*.safetensors"))) >= 3
    log = tmp_path / "failed-at"
    env = dict(os.environ, **{FAULT_ENV: f"source-read:4:{kind}", FAULT_LOG_ENV: str(log)})
    result = subprocess.run(
        [sys.executable, "-m", "convert", "verify", hf], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    ended = time.time()
    status, prefix = (2, "mixtral-convert: error: ") if kind == "OSError" else (3, "mixtral-convert: internal error: ")
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and "injected" in lines[0], result.stderr
    assert ended - float(log.read_text()) < 1.5  # the interpreter's exit included
