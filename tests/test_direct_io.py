"""Direct I/O: aligned reads of unaligned ranges, the staged writer's tail and errors, and a conversion large
enough to go through both, proven by verify re-reading the output from the disk."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import random
import re
from bisect import bisect_right
from functools import partial
from pathlib import Path

import pytest
from helpers import assert_one_line_error, evict, run_cli, tmpfs
from synthetic import DEFAULT, make_weights, write_torrent

from convert.common.errors import ConvertError
from convert.fileio.direct_io import (
    ALIGN,
    BATCH,
    O_DIRECT,
    READ_AHEAD,
    READ_SIZE,
    STAGE,
    StagedWriter,
    aligned_buffer,
    open_direct,
)
from convert.fileio.residency import cached_fraction
from convert.fileio.streams import ByteStream
from convert.fileio.workers import CHUNK, BufferPool, Worker, run_scope
from convert.integrity.digests import Digests
from convert.planning.plan import build_plan
from convert.planning.source import open_source
from convert.run import writer as stream
from convert.run.reader import POOL_BUFFERS, _file_chunks, _moved, read_ahead_fits

pytestmark = pytest.mark.containers

# 2 layers of 8 experts at dim 256, FFN 2048 and a 32003 vocab: about 84 MB, so the weights file is written
# through the staged writer (stream.DIRECT_MIN) in more than one STAGE.
EMBED = "model.embed_tokens.weight"  # 32003 x 256 bf16: about 16 MB, two chunks
MEDIUM = dataclasses.replace(DEFAULT, dim=256, head_dim=64, hidden_dim=2048, n_experts=8, vocab=32003)


def _payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("stages", [2, 3 * BATCH + 1], ids=["few-blocks", "several-batches"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "page-cache"])
def test_staged_writer_writes_odd_chunks_and_cuts_the_tail(tmp_path: Path, direct: bool, stages: int) -> None:
    """Blocks queued while the disk writes go out as one pwritev of up to BATCH blocks: every batch boundary and
    the odd tail must land where they belong."""
    path = tmp_path / "out"
    payload = _payload(stages * STAGE + 3 * ALIGN + 17, seed=1)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd, is_open_direct = open_direct(path, flags) if direct else (os.open(path, flags, 0o644), False)
    if direct and not is_open_direct:
        pytest.skip("this file system refuses O_DIRECT")
    try:
        writer = StagedWriter(fd, path)
        rng = random.Random(2)
        start = 0
        while start < len(payload):
            size = rng.choice([1, 7, ALIGN - 1, ALIGN + 1, STAGE - 5, STAGE + 3])
            writer.write(memoryview(payload[start : start + size]))
            start += size
        writer.finish(len(payload))
    finally:
        os.close(fd)
    assert path.read_bytes() == payload


def test_staged_writer_refuses_a_size_it_was_not_given(tmp_path: Path) -> None:
    path = tmp_path / "out"
    fd, _ = open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        writer = StagedWriter(fd, path)
        writer.write(memoryview(b"x" * 100))
        with pytest.raises(ConvertError, match="staged 100 bytes but the file has 101"):
            writer.finish(101)
    finally:
        writer.close()
        os.close(fd)


def test_staged_writer_reports_a_full_disk_naming_the_file(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=20m") as mount:
        path = mount / "out.partial"
        fd, _ = open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            # The disk writer's error is the run's failure: run_scope raises it, whichever call saw it first.
            with pytest.raises(ConvertError, match="cannot write: No space left on device") as caught, run_scope():
                writer = StagedWriter(fd, path)
                try:
                    for _ in range(8):
                        writer.write(memoryview(bytes(STAGE)))
                    writer.finish(8 * STAGE)
                finally:
                    writer.close()
            assert caught.value.line().startswith(str(path))
        finally:
            os.close(fd)


def test_direct_reads_return_exactly_the_bytes_asked_for(tmp_path: Path) -> None:
    payload = _payload(5 * ALIGN + 1234, seed=3)
    (tmp_path / "f").write_bytes(payload)
    evict(tmp_path / "f")  # a file in the page cache is read from there, not directly
    source = ByteStream([tmp_path / "f"])
    buffer = aligned_buffer(len(payload) + 2 * ALIGN)
    rng = random.Random(4)
    ranges = [(0, len(payload)), (len(payload) - 1, 1), (ALIGN - 1, 2), (1, 0)]
    ranges += [(offset, rng.randrange(len(payload) - offset + 1)) for offset in rng.sample(range(len(payload)), 40)]
    try:
        for offset, size in ranges:
            view = source.read_direct(buffer, offset, size)
            if view is None:
                pytest.skip("this file system refuses O_DIRECT")
            assert bytes(view) == payload[offset : offset + size], (offset, size)
    finally:
        source.close()


def _smaps_entry(address: int) -> str:
    """This process's /proc/self/smaps lines for the mapping that holds address."""
    entry: list[str] = []
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: START-END PERMS ...
            start, end = (int(bound, 16) for bound in head.split("-"))
            inside = start <= address < end
        if inside:
            entry.append(line)
    return "\n".join(entry)


def test_io_buffers_may_be_backed_by_huge_pages() -> None:
    """The pool's and the staging blocks' memory must be eligible for transparent huge pages: with scattered
    4 KiB pages a direct request is cut at the disk's segment limit (about 1 MiB on a virtio disk), and the
    conversion ran at about 0.8x the speed it reaches with 4 MiB requests. mmap's default mapping is shared
    (shmem), which the kernel does not back with huge pages unless shmem_enabled says so."""
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not setting.is_file() or "[never]" in setting.read_text() or not Path("/proc/self/smaps").is_file():
        pytest.skip("this kernel offers no transparent huge pages (or no /proc/self/smaps to see them in)")
    buffer = aligned_buffer(STAGE)
    pointer = ctypes.c_char.from_buffer(buffer)
    try:
        entry = _smaps_entry(ctypes.addressof(pointer))
    finally:
        del pointer  # the mapping cannot close while a pointer into it is exported
        buffer.close()
    eligible = re.search(r"^THPeligible:\s+(\d)", entry, re.MULTILINE)
    assert eligible is not None and eligible.group(1) == "1", entry


def test_direct_reads_fall_back_across_split_parts_and_notice_truncation(tmp_path: Path) -> None:
    first, second = _payload(3 * ALIGN + 5, seed=5), _payload(2 * ALIGN, seed=6)
    (tmp_path / "a").write_bytes(first)
    (tmp_path / "b").write_bytes(second)
    evict(tmp_path / "a")
    source = ByteStream([tmp_path / "a", tmp_path / "b"])
    buffer = aligned_buffer(8 * ALIGN)
    try:
        assert source.read_direct(buffer, len(first) - 10, 20) is None  # the caller reads it through the cache
        if source.read_direct(buffer, 0, 10) is None:
            pytest.skip("this file system refuses O_DIRECT")
        os.truncate(tmp_path / "a", ALIGN)  # shorter than when the stream was opened
        with pytest.raises(ConvertError, match="unexpected end of file"):
            source.read_direct(buffer, 2 * ALIGN, 100)
    finally:
        source.close()


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("medium")
    write_torrent(folder, MEDIUM, make_weights(MEDIUM, seed=7))
    assert (folder / "consolidated.00.pth").stat().st_size > stream.DIRECT_MIN
    return folder


def test_a_large_conversion_written_directly_verifies_from_disk(medium: Path, tmp_path: Path) -> None:
    """verify re-reads every byte from the disk and compares it with the hashes taken from the stream, then
    with the mapped source: a wrong tail, stage or offset in the staged writer fails here."""
    hf, back = tmp_path / "hf", tmp_path / "torrent"
    evict(medium / "consolidated.00.pth")  # else, just written, it is in the page cache and read from there
    run_cli("convert", medium, hf, "--to", "hf", "--no-progress")
    (shard,) = hf.glob("model-*.safetensors")
    assert shard.stat().st_size > stream.DIRECT_MIN  # so it went through the staged writer
    run_cli("verify", hf, "--against", medium)
    run_cli("convert", hf, back, "--to", "torrent", "--no-progress")
    run_cli("verify", back, "--against", medium)


def test_a_full_disk_during_a_direct_write_is_one_line(medium: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=40m") as mount:
        result = run_cli("convert", medium, mount / "out", "--to", "hf", "--no-progress", check=False)
        assert_one_line_error(result, "model-00001-of-00001.safetensors.partial", "No space left on device")
        assert not (mount / "out" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("length", [0, 1, ALIGN, 3 * ALIGN, 3 * ALIGN + 1])
def test_chunks_read_ahead_covers_the_file_in_order(tmp_path: Path, length: int) -> None:
    payload = _payload(length, seed=length)
    (tmp_path / "f").write_bytes(payload)
    evict(tmp_path / "f")  # a file in the page cache is read from there, not directly
    source = ByteStream([tmp_path / "f"])
    try:
        pieces = [bytes(piece) for piece in source.chunks(ALIGN)]
    finally:
        source.close()
    assert b"".join(pieces) == payload
    assert all(len(piece) == ALIGN for piece in pieces[:-1])


def test_verify_against_names_a_byte_flipped_deep_inside_a_large_tensor(medium: Path, tmp_path: Path) -> None:
    """The byte lies in the embedding's second 8 MiB chunk: found by the pooled compare, at its exact place."""
    hf = tmp_path / "hf"
    run_cli("convert", medium, hf, "--to", "hf", "--no-progress")
    (shard,) = hf.glob("model-*.safetensors")
    entry = next(e for e in json.loads((hf / "manifest.json").read_text())["tensors"] if e["name"] == EMBED)
    begin, end = entry["offsets"]
    assert end - begin > CHUNK + 4096  # more than one chunk
    at = CHUNK + 4093  # not aligned to anything the reader uses
    with open(shard, "r+b") as handle:
        handle.seek(begin + at)
        byte = handle.read(1)
        handle.seek(begin + at)
        handle.write(bytes([byte[0] ^ 0x10]))
    result = run_cli("verify", hf, "--against", medium, check=False)
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED against")]
    assert failed == [f"FAILED against: {shard}: tensor {EMBED}: differs from the converted source at byte {at} of "
                      "the tensor"], result.stdout  # fmt: skip


def test_a_cached_source_is_read_through_the_cache_and_an_evicted_one_directly(tmp_path: Path) -> None:
    """The decision, not its timing: mincore says which pages are resident, and the stream follows it."""
    path = tmp_path / "source.bin"
    path.write_bytes(_payload(8 * 2**20 + 123, seed=9))
    evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        evicted = cached_fraction(fd, path.stat().st_size)
        path.read_bytes()  # now all of it is in the page cache
        cached = cached_fraction(fd, path.stat().st_size)
    finally:
        os.close(fd)
    assert evicted is not None and evicted < 0.1 and cached == 1.0, (evicted, cached)

    stream = ByteStream([path])
    try:
        assert not stream.reads_directly()  # fully cached: through the cache
        buffer = aligned_buffer(CHUNK + 2 * ALIGN)
        assert bytes(stream.read_bulk(buffer, 4096 * 3 + 5, 1000)) == path.read_bytes()[4096 * 3 + 5 : 4096 * 3 + 1005]
    finally:
        stream.close()
    evict(path)
    stream = ByteStream([path])
    try:
        if not O_DIRECT:
            pytest.skip("no O_DIRECT on this platform")
        assert stream.reads_directly()  # evicted: around the cache
    finally:
        stream.close()


def _noting_reads(submitted: list[int]) -> list[Worker]:
    """The run's read workers, each call noted in submitted (the source offset it reads from) as it is submitted."""
    reads = [Worker(f"read-{n}", depth=1) for n in range(READ_AHEAD)]
    for worker in reads:
        original = worker.submit

        def noting(call, release=None, original=original):  # type: ignore[no-untyped-def]
            submitted.append(call.args[1])
            return original(call, release)

        worker.submit = noting  # type: ignore[method-assign]
    return reads


def _pool() -> BufferPool:
    return BufferPool(POOL_BUFFERS, partial(aligned_buffer, READ_SIZE + 2 * ALIGN))


def test_reads_run_ahead_across_the_pieces_of_a_stacked_tensor(medium: Path) -> None:
    """mlx stacks each layer's 8 experts into one tensor: 8 pieces copied back to back. The reads must not drain at
    every piece's end (that left the disk writer idle half a second of a 2-layer run, bench/profiles.md): when the
    first chunk of an expert is handed on, the next expert's read is already under way. The chunks still come in
    file order, each exactly the source's bytes."""
    with run_scope(), open_source(medium) as opened:
        plan = build_plan(opened, "mlx")
        (weights,) = [f for f in plan.files if f.pieces]
        pieces = {p.dst_offset: p for p in weights.pieces}
        stacked = [p for p in weights.pieces if "switch_mlp.gate_proj" in p.tensor and "layers.0." in p.tensor]
        assert len(stacked) == 8 and all(p.cast is None and not p.steps for p in stacked)
        submitted: list[int] = []  # the source offset of every read, as it is submitted
        reads = _noting_reads(submitted)
        try:
            seen_ahead = []
            position = 0
            for offset, data, tensor, lease in _file_chunks(weights, Digests(), _pool(), reads):
                assert offset == position
                position += len(data)
                if tensor is not None and offset in pieces and pieces[offset] in stacked[:-1]:
                    following = stacked[stacked.index(pieces[offset]) + 1]
                    seen_ahead.append(following.src_offset in submitted)
                if lease is not None:
                    for _ in range(3):
                        lease.release()
            assert position == weights.size
            assert seen_ahead == [True] * 7
        finally:
            for worker in reads:
                worker.close()


def test_q_and_k_are_moved_in_the_pool_while_the_reads_stay_in_flight(medium: Path) -> None:
    """A q/k matrix (its rows reordered to mlx's rotary order) was read whole on the reader's thread into fresh
    memory, and every read drained around it: twice a layer (bench/profiles.md). Now it is one read among the
    others, moved into a buffer of the pool: its chunks hold a lease, and when its first chunk is handed on, the
    reads of the pieces after it are under way. Its bytes are those of the whole-piece transform, and every read
    of the file, while its chunks are handed on, has READ_AHEAD reads in flight after it."""
    with run_scope(), open_source(medium) as opened:
        plan = build_plan(opened, "mlx")
        (weights,) = [f for f in plan.files if f.pieces]
        moved = {p.dst_offset: p for p in weights.pieces if p.steps}
        assert {p.tensor.split(".")[-2] for p in moved.values()} == {"q_proj", "k_proj"}
        assert all(read_ahead_fits(p, READ_SIZE) for p in weights.pieces)  # one run of reads, as starts assumes
        # Where each read of the file lands, in the order they are made (every piece is one run, as asserted).
        starts = [p.dst_offset + at for p in weights.pieces for at in range(0, p.nbytes, READ_SIZE)]
        assert starts == sorted(starts)
        submitted: list[int] = []
        reads = _noting_reads(submitted)
        try:
            position, checked, behind = 0, 0, []
            for offset, data, _tensor, lease in _file_chunks(weights, Digests(), _pool(), reads):
                assert offset == position
                position += len(data)
                piece = moved.get(offset)
                if piece is not None:
                    assert lease is not None  # in the pool, not fresh memory
                    whole = _moved(piece, Digests())
                    assert bytes(data) == bytes(whole[: len(data)])
                    checked += 1
                if lease is not None and len(submitted) < len(starts):
                    # Reads submitted so far, against the reads up to this chunk's own plus READ_AHEAD more.
                    behind.append(len(submitted) - bisect_right(starts, offset) - READ_AHEAD)
                if lease is not None:
                    for _ in range(3):
                        lease.release()
            assert position == weights.size and checked == len(moved)
            assert behind and min(behind) >= 0, f"reads drained while chunks were handed on: {sorted(set(behind))}"
        finally:
            for worker in reads:
                worker.close()
