"""verify at the speed of SHA-256: where manifest.json records a weights file's SHA-256 (file_sha256), SHA256SUMS
lists the same digest and the manifest is the one SHA256SUMS lists, a file whose bytes have that digest is hashed
with SHA-256 alone (two files at once); its tensors' digests are recomputed only when it fails, to name the tensor.

The passes are counted by wrapping the real hashing calls (FolderHasher.hash_file, sha256_files and the per-range
hash states), never by replacing them: every digest is computed as in a normal run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest
from helpers import REPO, flip_byte, run_cli

from convert.fileio.direct_io import READ_SIZE
from convert.fileio.workers import run_scope
from convert.integrity.manifest import FILE_SHA256
from convert.verify import hashing
from convert.verify.folder import verify_folder
from convert.verify.hashing import FolderHasher

pytestmark = pytest.mark.e2e

WEIGHTS = (".safetensors", ".pt", ".pth")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("verify-fast")
    run_cli("sample", root / "src")
    (root / "src" / "tokenizer.model").write_bytes(b"tokenizer \x00 bytes")
    run_cli("convert", root / "src", root / "hf", "--to", "hf", "--max-shard-size", "300KB")
    run_cli("convert", root / "src", root / "torrent", "--to", "torrent")
    return root


class Counts:
    """What one verify hashed: the files hashed with their tensors (hash_file), the files hashed with SHA-256
    alone (start_sha256_files), and how many per-tensor hash states were made."""

    def __init__(self) -> None:
        self.with_tensors: list[Path] = []
        self.sha256_only: list[Path] = []
        self.tensor_states = 0


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counts]:
    seen = Counts()
    hash_file, start_sha256_files, new_hasher = (
        FolderHasher.hash_file,
        FolderHasher.start_sha256_files,
        hashing.new_hasher,
    )

    def counted_hash_file(self: FolderHasher, path: Path, ranges: list, algorithms: list) -> object:
        if ranges:
            seen.with_tensors.append(path)
        else:
            seen.sha256_only.append(path)
        return hash_file(self, path, ranges, algorithms)

    def counted_start_sha256_files(self: FolderHasher, paths: list[Path]) -> Callable[[], dict[Path, str]]:
        seen.sha256_only.extend(paths)
        return start_sha256_files(self, paths)

    def counted_new_hasher(algorithm: str) -> object:
        seen.tensor_states += 1
        return new_hasher(algorithm)

    monkeypatch.setattr(FolderHasher, "hash_file", counted_hash_file)
    monkeypatch.setattr(FolderHasher, "start_sha256_files", counted_start_sha256_files)
    monkeypatch.setattr(hashing, "new_hasher", counted_new_hasher)
    yield seen


def _copy(outputs: Path, layout: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(outputs / layout, tmp_path / layout))


def _weights(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in WEIGHTS)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _failed(report: object) -> list[tuple[str, str | None, str | None]]:
    return [(r.check, r.file, r.tensor) for r in report.results if not r.ok]  # type: ignore[attr-defined]


def _verify(folder: Path, against: Path | None = None) -> object:
    return verify_folder(folder, against=against)


def _rewrite_sums_line(folder: Path, name: str) -> None:
    """SHA256SUMS's line for name made to match the file as it is now, as a forger (or a careless copy) would."""
    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    rewritten = [f"{digest}  {name}" if line.endswith(f"  {name}") else line for line in lines]
    (folder / "SHA256SUMS").write_text("".join(line + "\n" for line in rewritten))


def _rewrite_manifest(folder: Path, change: Callable[[dict], None]) -> None:
    """manifest.json changed, and its SHA256SUMS line made to match (as an older version would have written it)."""
    manifest = _manifest(folder)
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _rewrite_sums_line(folder, "manifest.json")


def _a_tensor(folder: Path, file: Path) -> dict:
    """A tensor entry of manifest.json in file with some bytes to flip."""
    return next(
        e for e in _manifest(folder)["tensors"] if e["file"] == file.name and e["offsets"][1] - e["offsets"][0] > 64
    )


def test_the_manifest_records_each_weights_files_sha256(outputs: Path) -> None:
    for layout in ("hf", "torrent"):
        folder = outputs / layout
        recorded = _manifest(folder)[FILE_SHA256]
        assert sorted(recorded) == sorted({e["file"] for e in _manifest(folder)["tensors"]})
        assert recorded == {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in recorded}
        sums = dict(reversed(line.split("  ", 1)) for line in (folder / "SHA256SUMS").read_text().splitlines())
        assert all(sums[name] == digest for name, digest in recorded.items())
    assert len(_manifest(outputs / "hf")[FILE_SHA256]) > 1  # several shards: both lanes used


@pytest.mark.parametrize("layout", ["hf", "torrent"])
def test_an_intact_folder_is_hashed_with_sha256_alone(outputs: Path, layout: str, counts: Counts) -> None:
    """(b) Everything matches: no file is hashed with its tensors and no tensor digest is computed; every file
    SHA256SUMS lists is hashed once, with SHA-256."""
    folder = outputs / layout
    report = _verify(folder)
    assert report.ok, _failed(report)  # type: ignore[attr-defined]
    assert counts.with_tensors == [] and counts.tensor_states == 0
    listed = [line.split("  ", 1)[1] for line in (folder / "SHA256SUMS").read_text().splitlines()]
    assert sorted(counts.sha256_only) == sorted(folder / name for name in listed)
    manifest_results = [r for r in report.results if r.check == "manifest"]  # type: ignore[attr-defined]
    assert {r.file for r in manifest_results} >= {str(p) for p in _weights(folder) if p.stat().st_size}


def test_a_flipped_byte_names_the_tensor(outputs: Path, tmp_path: Path, counts: Counts) -> None:
    """(a) One byte of a tensor changed: the file's sha256 fails, and the file alone is read again, with its
    tensors, to name the one that changed."""
    folder = _copy(outputs, "hf", tmp_path)
    shard = _weights(folder)[1]
    entry = _a_tensor(folder, shard)
    flip_byte(shard, entry["offsets"][0] + 17)
    report = _verify(folder)
    assert _failed(report) == [("sha256", str(shard), None), ("manifest", str(shard), entry["name"])]
    assert counts.with_tensors == [shard]
    assert counts.tensor_states == sum(e["file"] == shard.name for e in _manifest(folder)["tensors"])
    problem = next(r.problem for r in report.results if r.check == "manifest" and not r.ok)  # type: ignore[attr-defined]
    assert problem.startswith(f"blake3 of bytes [{entry['offsets'][0]}, {entry['offsets'][1]}) is ")


def test_a_rewritten_sums_line_still_fails_naming_the_tensor(outputs: Path, tmp_path: Path, counts: Counts) -> None:
    """(d) A tensor's byte changed and the file's SHA256SUMS line rewritten to match: SHA256SUMS now differs from
    the manifest's record, so that file is hashed with its tensors in the one read, and the tensor is named."""
    folder = _copy(outputs, "hf", tmp_path)
    shard = _weights(folder)[0]
    entry = _a_tensor(folder, shard)
    flip_byte(shard, entry["offsets"][1] - 1)
    _rewrite_sums_line(folder, shard.name)
    report = _verify(folder)
    assert _failed(report) == [("manifest", str(shard), entry["name"])]
    assert counts.with_tensors == [shard]  # once: the SHA-256 came from the same read
    assert shard not in counts.sha256_only
    result = run_cli("verify", folder, check=False)
    assert result.returncode == 1
    assert f"FAILED manifest: {shard}: tensor {entry['name']}: blake3 of bytes" in result.stdout, result.stdout


def test_a_rewritten_sums_line_under_against(outputs: Path, tmp_path: Path, counts: Counts) -> None:
    """The same with --against: the comparison names the tensor, and so does the manifest."""
    folder = _copy(outputs, "hf", tmp_path)
    shard = _weights(folder)[0]
    entry = _a_tensor(folder, shard)
    flip_byte(shard, entry["offsets"][0] + 3)
    _rewrite_sums_line(folder, shard.name)
    report = _verify(folder, against=outputs / "src")
    failed = _failed(report)
    assert ("manifest", str(shard), entry["name"]) in failed
    assert any(check == "against" and tensor == entry["name"] for check, _, tensor in failed)
    assert [check for check, _, _ in failed if check not in ("manifest", "against")] == []


def test_an_intact_folder_under_against_computes_no_tensor_digest(outputs: Path, counts: Counts) -> None:
    report = _verify(outputs / "hf", against=outputs / "src")
    assert report.ok, _failed(report)  # type: ignore[attr-defined]
    assert counts.with_tensors == [] and counts.tensor_states == 0


def test_a_manifest_without_file_sha256_verifies_as_before(outputs: Path, tmp_path: Path, counts: Counts) -> None:
    """(c) A manifest written before file_sha256 (SHA256SUMS rewritten to match it): every tensor's digest is
    computed, in the read that hashes its file, and a flipped byte is still named."""
    folder = _copy(outputs, "hf", tmp_path)
    _rewrite_manifest(folder, lambda m: m.pop(FILE_SHA256))
    report = _verify(folder)
    assert report.ok, _failed(report)  # type: ignore[attr-defined]
    tensors = _manifest(folder)["tensors"]
    assert counts.tensor_states == len(tensors)
    assert sorted(counts.with_tensors) == sorted({folder / e["file"] for e in tensors})

    shard = _weights(folder)[1]
    entry = _a_tensor(folder, shard)
    flip_byte(shard, entry["offsets"][0] + 5)
    _rewrite_sums_line(folder, shard.name)
    assert _failed(_verify(folder)) == [("manifest", str(shard), entry["name"])]


def test_an_older_sha256_manifest_still_verifies(outputs: Path, tmp_path: Path) -> None:
    """(c) What versions before BLAKE3 wrote: no tensor_digest, no file_sha256, a "sha256" per tensor."""
    folder = _copy(outputs, "hf", tmp_path)

    def older(manifest: dict) -> None:
        del manifest["tensor_digest"], manifest[FILE_SHA256]
        for entry in manifest["tensors"]:
            data = (folder / entry["file"]).read_bytes()[entry["offsets"][0] : entry["offsets"][1]]
            del entry["blake3"]
            entry["sha256"] = hashlib.sha256(data).hexdigest()

    _rewrite_manifest(folder, older)
    assert _verify(folder).ok  # type: ignore[attr-defined]
    shard = _weights(folder)[0]
    entry = _a_tensor(folder, shard)
    flip_byte(shard, entry["offsets"][0] + 9)
    report = _verify(folder)
    assert _failed(report) == [("sha256", str(shard), None), ("manifest", str(shard), entry["name"])]


def test_a_manifest_sha256sums_does_not_vouch_for_is_not_trusted(outputs: Path, tmp_path: Path, counts: Counts) -> None:
    """file_sha256 edited (its SHA256SUMS line left as it was): the manifest's line fails, and its file
    SHA-256s are not used: every tensor digest is computed, and they all match."""
    folder = _copy(outputs, "hf", tmp_path)
    manifest = _manifest(folder)
    shard = _weights(folder)[0]
    manifest[FILE_SHA256][shard.name] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    report = _verify(folder)
    assert _failed(report) == [("sha256", str(folder / "manifest.json"), None)]
    assert counts.tensor_states == len(manifest["tensors"])


def test_a_stale_file_sha256_falls_back_to_the_tensor_digests(outputs: Path, tmp_path: Path, counts: Counts) -> None:
    """A manifest whose tensors' digests were regenerated for rewritten bytes but whose file_sha256 was not (a tool
    that knows only the older fields): SHA256SUMS differs from the record, so the tensors are hashed, and pass."""
    folder = _copy(outputs, "hf", tmp_path)
    shard = _weights(folder)[0]
    entry = _a_tensor(folder, shard)
    flip_byte(shard, entry["offsets"][0])

    def regenerated(manifest: dict) -> None:
        data = shard.read_bytes()
        for item in manifest["tensors"]:
            if item["name"] == entry["name"]:
                item["blake3"] = blake3.blake3(data[item["offsets"][0] : item["offsets"][1]]).hexdigest()

    _rewrite_manifest(folder, regenerated)
    _rewrite_sums_line(folder, shard.name)
    assert _verify(folder).ok  # type: ignore[attr-defined]
    assert counts.with_tensors == [shard]


def test_sha256_files_gives_each_files_digest(tmp_path: Path) -> None:
    """Files of several reads, of less than one, and empty, over both lanes: the digests sha256sum gives."""
    sizes = [2 * READ_SIZE + 12345, READ_SIZE, 4097, 0, READ_SIZE // 2 + 1]
    paths = []
    for number, size in enumerate(sizes):
        path = tmp_path / f"f{number}.bin"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    with run_scope():
        hasher = FolderHasher()
        try:
            got = hasher.sha256_files(paths)
        finally:
            hasher.close()
    assert got == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_a_missing_shard_still_fails_as_before(outputs: Path, tmp_path: Path) -> None:
    folder = _copy(outputs, "hf", tmp_path)
    shard = _weights(folder)[1]
    shard.unlink()
    report = _verify(folder)
    failed = _failed(report)
    assert ("sha256", str(shard), None) in failed


def test_verify_starts_hashing_before_importing_the_containers(outputs: Path) -> None:
    """verify's start-up is what it loses to a bare SHA-256 of a small folder: the SHA-256 pass must start before
    numpy and gguf-py (which every container imports) are. In a fresh interpreter, as the console script runs:
    the real start_sha256_files is wrapped to note what was imported when the pass began, and still runs."""
    probe = (
        "import sys\n"
        "from convert.verify.hashing import FolderHasher\n"
        "real = FolderHasher.start_sha256_files\n"
        "seen = []\n"
        "def start(self, paths):\n"
        "    seen.append(sorted(m for m in ('numpy', 'gguf', 'convert.planning.plan') if m in sys.modules))\n"
        "    return real(self, paths)\n"
        "FolderHasher.start_sha256_files = start\n"
        "from convert.cli import main\n"
        "code = main(['verify', sys.argv[1]])\n"
        "print('seen', seen)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(outputs / "hf")], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "verified:" in done.stdout
    assert "seen [[]" in done.stdout, done.stdout  # the first pass (the weights); later ones hash small files


# What a safetensors folder's verify has no use for: numpy and the GGUF and MLX containers' code (gguf-py, its
# yaml and sentencepiece), blake3 (the manifest's per-tensor digests, not recomputed for a file whose SHA-256
# matches). Each is a read from disk on a cold cache, and a thread loading one holds the GIL the SHA-256 lanes
# need, so verify's time over a bare SHA-256 of the folder grows with them (bench/verify-startup.md).
UNNEEDED = ("numpy", "gguf", "yaml", "sentencepiece", "blake3", "convert.containers.gguf.container",
            "convert.containers.mlx.quantize")  # fmt: skip


@pytest.mark.parametrize("layout", ["hf", "torrent"])
def test_verify_of_a_folder_without_gguf_loads_none_of_their_code(outputs: Path, layout: str) -> None:
    """In a fresh interpreter, as the console script runs: verify of an hf or torrent folder passes and loads
    none of UNNEEDED; the GGUF and MLX containers' packages are read for their MARKERS only."""
    probe = (
        "import sys\n"
        "from convert.cli import main\n"
        "code = main(['verify', sys.argv[1]])\n"
        f"print('loaded', sorted(m for m in {UNNEEDED!r} if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(outputs / layout)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert f"verified: {outputs / layout} ({layout})" in done.stdout
    assert "loaded []" in done.stdout, done.stdout


def test_the_sha256_pass_runs_with_short_gil_handoffs_and_restores_the_interval(
    outputs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the lanes hash, the main thread's checks must not hold them back by Python's default 5 ms switch
    interval per handoff (convert/verify/folder.py, HANDOFF_INTERVAL); afterwards the caller's interval is back."""
    from convert.verify.folder import HANDOFF_INTERVAL

    during: list[float] = []
    start = FolderHasher.start_sha256_files

    def noting(self: FolderHasher, paths: list[Path]) -> Callable[[], dict[Path, str]]:
        during.append(sys.getswitchinterval())
        return start(self, paths)

    monkeypatch.setattr(FolderHasher, "start_sha256_files", noting)
    before = sys.getswitchinterval()
    assert before > HANDOFF_INTERVAL
    assert verify_folder(outputs / "hf").ok
    assert during and during[0] == HANDOFF_INTERVAL
    assert sys.getswitchinterval() == before
