"""verify --against reads each of the folder's weight files once: the comparison's reads are also what the
checksum pass hashes. Counted by the kernel (wait4's ru_inblock: the bytes the process had read from the disk,
O_DIRECT reads included), with the files evicted from the page cache before each run; and the results must be
those of the separate checksum pass, whether the folder follows the plan's order or not."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import blake3
import pytest
import torch
from helpers import REPO, evict, flip_byte, run_cli, start_held
from safetensors import safe_open
from synthetic import TinyConfig, make_weights, write_torrent

from convert.fileio.direct_io import ALIGN, aligned_buffer
from convert.fileio.faults import FAULT_ENV
from convert.fileio.streams import ByteStream
from convert.fileio.workers import CHUNK, BufferPool, Lease, run_scope
from convert.integrity.manifest import TensorEntry
from convert.verify.hashing import FolderHasher
from convert.verify.onepass import FileHashes, FolderFeed

pytestmark = pytest.mark.e2e

# Tensors bigger than one 8 MiB chunk (the embedding and output: 5000 x 1024 bf16), so a differing tensor leaves
# chunks the comparison skips; about 70 MB a side in all.
CONFIG = TinyConfig(dim=1024, n_layers=1, n_heads=8, n_kv_heads=2, head_dim=128, hidden_dim=1792, vocab=5000)
SHARD = "model-00001-of-00001.safetensors"
SECTOR = 512  # ru_inblock's unit


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("one-pass")
    write_torrent(root / "src", CONFIG, make_weights(CONFIG, seed=3))
    run_cli("convert", root / "src", root / "hf", "--to", "hf", "--no-progress")
    assert [p.name for p in (root / "hf").glob("*.safetensors")] == [SHARD]
    return root / "src", root / "hf"


def _evict(*folders: Path) -> None:
    """Out of the page cache, so every read of these files is a read from the disk that the kernel counts."""
    for folder in folders:
        for path in folder.iterdir():
            evict(path)


def _disk_bytes_read(*args: object) -> tuple[int, str]:
    """`python -m convert ARGS`: the bytes it read from the disk (wait4's ru_inblock), and its stdout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "convert", *map(str, args)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    out = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)  # reaped here: Popen's own wait would not return the usage
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, out
    return usage.ru_inblock * SECTOR, out


def _size(folder: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(suffix))


def test_verify_against_reads_each_folder_file_once(pair: tuple[Path, Path]) -> None:
    """verify alone reads the folder once; --against adds the source, and not the folder a second time."""
    src, hf = pair
    folder_bytes, source_bytes = _size(hf, ".safetensors"), _size(src, ".pth")
    _evict(src, hf)
    alone, out = _disk_bytes_read("verify", hf)
    assert out.strip().splitlines()[-1].startswith(f"verified: {hf} (hf)"), out
    if alone < 0.9 * folder_bytes:
        pytest.skip(f"this file system does not count the reads ({alone:,} bytes for {folder_bytes:,})")
    _evict(src, hf)
    against, out = _disk_bytes_read("verify", hf, "--against", src)
    assert out.strip().splitlines()[-1].startswith(f"verified: {hf} (hf)"), out
    added = against - alone
    print(f"folder {folder_bytes:,} source {source_bytes:,}: verify read {alone:,}, --against {against:,}")
    # Both sides read, and beyond verify alone's one read of the folder, one read of the source: the half folder
    # of slack is far above headers, readahead and metadata, and far below a second read of the folder. (Only
    # the first run can have library files to read from the disk: that makes `added` smaller, not larger.)
    assert against >= 0.95 * (source_bytes + folder_bytes), (alone, against)
    assert added < source_bytes + folder_bytes // 2, (alone, against)


def _verify_json(folder: Path, *args: object) -> dict:
    result = run_cli("verify", folder, "--json", *args, check=False)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def _checks_as_without_against(folder: Path, src: Path) -> list[dict]:
    """verify --against's results; those that are not its comparison must be exactly (same lines, same order)
    what verify alone, whose checksum pass reads every file itself, reports."""
    against = _verify_json(folder, "--against", src)["results"]
    alone = _verify_json(folder)["results"]
    assert [r for r in against if r["check"] != "against"] == alone
    return against


def _rewrite_sums(folder: Path) -> None:
    """SHA256SUMS made to match the files as they are now (the manifest first, if it changed)."""
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    names = [line.split("  ", 1)[1] for line in lines]
    digests = [hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names]
    (folder / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for d, n in zip(digests, names, strict=True)))


def _rewrite_manifest(folder: Path) -> None:
    """manifest.json's places and digests made to match the shards' headers and bytes as they are now."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["tensors"]:
        path = folder / entry["file"]
        data = path.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        begin, end = json.loads(data[8:header])[entry["name"]]["data_offsets"]
        entry["offsets"] = [header + begin, header + end]
        entry["blake3"] = blake3.blake3(data[header + begin : header + end]).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _tensor_place(path: Path, name: str) -> tuple[int, int]:
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:header])[name]["data_offsets"]
    return header + begin, header + end


def test_a_wrong_sha256sums_line_still_fails_under_against(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """The tensors match the source, but SHA256SUMS says another digest for the shard: the sha256 line fails."""
    src, hf = pair
    folder = Path(shutil.copytree(hf, tmp_path / "hf"))
    sums = (folder / "SHA256SUMS").read_text()
    right = hashlib.sha256((folder / SHARD).read_bytes()).hexdigest()
    wrong = f"{int(right[0], 16) ^ 1:x}{right[1:]}"
    (folder / "SHA256SUMS").write_text(sums.replace(f"{right}  {SHARD}", f"{wrong}  {SHARD}"))
    results = _checks_as_without_against(folder, src)
    failed = [r for r in results if not r["ok"]]
    assert failed == [
        {
            "check": "sha256",
            "file": str(folder / SHARD),
            "ok": False,
            "problem": f"sha256 is {right}, SHA256SUMS says {wrong}",
            "tensor": None,
        }
    ]
    assert any(r["check"] == "against" for r in results)


def test_changed_tensor_with_regenerated_checksums_still_fails_against(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """A byte of the embedding changed and SHA256SUMS and manifest.json regenerated to match: every checksum
    passes (hashed right, although the comparison skips the rest of that tensor once it differs), and the
    comparison names the tensor and the byte."""
    src, hf = pair
    folder = Path(shutil.copytree(hf, tmp_path / "hf"))
    begin, end = _tensor_place(folder / SHARD, "model.embed_tokens.weight")
    assert end - begin > 8 * 2**20  # more than one chunk: the rest of it is what the comparison skips
    flip_byte(folder / SHARD, begin + 1000)
    _rewrite_manifest(folder)
    _rewrite_sums(folder)
    results = _checks_as_without_against(folder, src)
    failed = [r for r in results if not r["ok"]]
    assert failed == [
        {
            "check": "against",
            "file": str(folder / SHARD),
            "ok": False,
            "problem": "differs from the converted source at byte 1000 of the tensor",
            "tensor": "model.embed_tokens.weight",
        }
    ]
    assert {r["check"] for r in results if r["ok"]} >= {"sha256", "manifest", "structure", "against"}


@pytest.mark.parametrize("flip", [False, True])
def test_a_folder_in_another_order_gives_the_same_results(pair: tuple[Path, Path], tmp_path: Path, flip: bool) -> None:
    """The shard rewritten by another writer, its tensors' bytes in reverse order (this tool and safetensors'
    save_file both sort them by name), SHA256SUMS and manifest.json made to match: the comparison would read it
    back to front, so the checksum pass reads it on its own and says what it always said; with a changed byte,
    the comparison fails and the regenerated checksums still pass."""
    src, hf = pair
    folder = Path(shutil.copytree(hf, tmp_path / "hf"))
    before = _file_order(folder / SHARD)
    _write_reversed(folder / SHARD)
    assert _file_order(folder / SHARD) == before[::-1]
    with safe_open(folder / SHARD, "pt") as handle, safe_open(hf / SHARD, "pt") as original:
        assert all(torch.equal(handle.get_tensor(n), original.get_tensor(n)) for n in before)
    if flip:
        begin, _ = _tensor_place(folder / SHARD, "lm_head.weight")
        flip_byte(folder / SHARD, begin + 3)
    _rewrite_manifest(folder)
    _rewrite_sums(folder)
    results = _checks_as_without_against(folder, src)
    failed = [(r["check"], r["tensor"], r["problem"]) for r in results if not r["ok"]]
    expected = [("against", "lm_head.weight", "differs from the converted source at byte 3 of the tensor")]
    assert failed == (expected if flip else [])


def _write_reversed(path: Path) -> None:
    """path rewritten as a safetensors file whose tensors' bytes come in reverse order, header keys in file order
    (the format puts no order on either)."""
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    header = json.loads(data[8:start])
    metadata = header.pop("__metadata__", None)
    names = sorted(header, key=lambda name: header[name]["data_offsets"][0], reverse=True)
    new_header: dict = {} if metadata is None else {"__metadata__": metadata}
    body = bytearray()
    for name in names:
        begin, end = header[name]["data_offsets"]
        new_header[name] = {**header[name], "data_offsets": [len(body), len(body) + end - begin]}
        body += data[start + begin : start + end]
    text = json.dumps(new_header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)


def _file_order(path: Path) -> list[str]:
    """The tensors of a safetensors file in the order of their bytes."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


def _entry(name: str, begin: int, end: int) -> TensorEntry:
    return TensorEntry(name, "f.bin", "U8", (end - begin,), begin, end)


def _fed(path: Path, ranges: list[TensorEntry], reads: list[tuple[int, int]]) -> dict[Path, FileHashes]:
    """What a FolderFeed makes of path when the comparison reads these ranges of it, in this order."""
    with run_scope():
        hasher = FolderHasher()
        stream = ByteStream([path])
        pool = BufferPool(1, partial(aligned_buffer, CHUNK + 2 * ALIGN))
        try:
            feed = FolderFeed(hasher, {path: [(r, "blake3") for r in ranges]})
            feed.follow((stream, begin, end) for begin, end in reads)
            for begin, end in reads:
                lease = Lease(pool, pool.take(), 3)  # the comparison's and the two hashers'
                feed.chunk(stream, begin, stream.read_bulk(lease.buffer, begin, end - begin), lease)
                lease.release()
            return feed.finish()
        finally:
            stream.close()
            hasher.close()


def test_a_feed_hashes_the_bytes_the_comparison_skips(tmp_path: Path) -> None:
    """Header, a tensor skipped after its first difference, the gap between records and the end of the file are
    read by the feed: the digests are those of the whole file and of each range, as sha256sum and blake3 say."""
    path = tmp_path / "f.bin"
    data = os.urandom(3 * CHUNK + 12345)
    path.write_bytes(data)
    end = len(data)
    ranges = [_entry("a", 100, CHUNK + 100), _entry("b", CHUNK + 100, 3 * CHUNK), _entry("c", 3 * CHUNK + 64, end)]
    reads = [(100, CHUNK + 100), (2 * CHUNK, 3 * CHUNK), (3 * CHUNK + 64, 3 * CHUNK + 4000)]
    whole, tensors = _fed(path, ranges, reads)[path]
    assert whole == hashlib.sha256(data).hexdigest()
    assert tensors == {r.name: blake3.blake3(data[r.begin : r.end]).hexdigest() for r in ranges}


def test_a_feed_leaves_a_file_read_out_of_order_to_the_checksum_pass(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(2 * CHUNK))
    assert _fed(path, [_entry("a", 0, CHUNK)], [(CHUNK, 2 * CHUNK), (0, CHUNK)]) == {}
    assert _fed(path, [_entry("a", 0, CHUNK)], [(0, CHUNK), (CHUNK // 2, CHUNK)]) == {}  # overlapping
    assert list(_fed(path, [_entry("a", 0, CHUNK)], [(0, CHUNK), (CHUNK, CHUNK + 10)])) == [path]


def test_a_signal_while_the_comparison_hashes_ends_verify_as_before(pair: tuple[Path, Path]) -> None:
    """Held where the comparison starts hashing the shard (the stall FolderHasher has at each file), a SIGTERM
    ends verify --against with the interrupt line and 130, as it ends verify alone."""
    src, hf = pair
    env = dict(os.environ, MIXTRAL_CONVERT_STALL_AT=SHARD)
    command = [sys.executable, "-m", "convert", "verify", hf, "--against", src]
    process = start_held(command, env, REPO)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 130, stderr
    said = "mixtral-convert: interrupted; verify did not finish; it changes nothing, run it again"
    # the stand-in tokenizer.model of the source draws a warning; besides it, exactly the one line
    assert [line for line in stderr.splitlines() if not line.startswith("mixtral-convert: warning:")] == [said]


def test_a_bug_in_a_read_while_the_comparison_hashes_is_exit_3(pair: tuple[Path, Path]) -> None:
    """An exception that is not an input error, in a read worker of verify --against (the reads that now also
    feed the hashers), is the run's failure: --json says so, exit 3."""
    src, hf = pair
    command = [sys.executable, "-m", "convert", "verify", hf, "--against", src, "--json"]
    env = dict(os.environ, **{FAULT_ENV: "source-read:4:RuntimeError"})
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout)
    assert result.returncode == 3, result.stderr
    assert report["ok"] is False and report["error"]["exit"] == 3 and "injected" in report["error"]["line"]
