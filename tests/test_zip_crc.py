"""The CRC-32 arithmetic and bookkeeping behind the same-pass check of a torch zip source's records, against
zlib.crc32 of the whole bytes (the reference), on random data and random ways of reading it in pieces."""

from __future__ import annotations

import random
import zipfile
import zlib
from pathlib import Path

import pytest
from helpers import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from convert.common.errors import ConvertError
from convert.containers.torchzip.reader import CHECKED_AS
from convert.fileio.streams import ByteStream
from convert.integrity.crc32 import CheckedRecord, SourceCrc, check_records, crc32_combine
from convert.model.records import TensorRecord

pytestmark = pytest.mark.unit


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_crc32_combine_equals_the_crc_of_the_concatenation(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_crc32_combine_on_long_random_data() -> None:
    """Random lengths up to 200 KB, and a 64 MiB second part (a Mixtral expert block is 112 MiB): the long one is
    checked against zlib run over the same bytes in steps."""
    rng = random.Random(12)
    for _ in range(20):
        a, b = rng.randbytes(rng.randrange(0, 5000)), rng.randbytes(rng.randrange(1, 200_000))
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    head, block = rng.randbytes(100), rng.randbytes(2**20)
    crc_blocks, crc_whole = 0, zlib.crc32(head)
    for _ in range(64):
        crc_blocks = zlib.crc32(block, crc_blocks)
        crc_whole = zlib.crc32(block, crc_whole)
    assert crc32_combine(zlib.crc32(head), crc_blocks, 64 * 2**20) == crc_whole


def _record(tmp_path: Path, data: bytes, crc: int | None = None) -> tuple[ByteStream, TensorRecord]:
    """A 'record' of data at offset 7 of a file, as one tensor covering all of it."""
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 7 + data + b"tail")
    stream = ByteStream([path])
    expected = zlib.crc32(data) if crc is None else crc
    zipped = CheckedRecord("a/data/0", stream, 7, len(data), expected, ("t",), *CHECKED_AS)
    return stream, TensorRecord("t", "U8", (len(data),), stream, 7, len(data), zipped)


@pytest.mark.parametrize("seed", range(8))
def test_pieces_in_any_order_check_the_record_when_covered(tmp_path: Path, seed: int) -> None:
    """Pieces out of order, some overlapping (tensors sharing a storage), some bytes never read: the record is
    checked as soon as the pieces cover it, else by finish(); good bytes pass, one flipped bit fails either way."""
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(1, 50_000))
    cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(rng.randrange(0, 12)))})
    pieces = [(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)]
    rng.shuffle(pieces)
    skipped = pieces.pop() if seed % 2 and len(pieces) > 1 else None  # a storage larger than what tensors read
    if seed % 3 == 0:
        start = rng.randrange(len(data))
        pieces.insert(rng.randrange(len(pieces) + 1), (start, min(len(data), start + 100)))  # read twice
    for flip in (None, rng.randrange(len(data))):
        damaged = bytearray(data)
        if flip is not None:
            damaged[flip] ^= 0x04
        stream, record = _record(tmp_path, bytes(damaged), crc=zlib.crc32(data))
        try:
            tracker = SourceCrc()
            raised = None
            try:
                for begin, end in pieces:
                    tracker.update(record, 7 + begin, bytes(damaged[begin:end]))
                tracker.finish([record])
            except ConvertError as exc:
                raised = exc
            assert (raised is None) == (flip is None), (pieces, skipped, flip)
            if raised is not None:
                assert "record a/data/0 fails its CRC-32" in raised.line() and raised.tensor == "t"
            assert check_records([record]) == [] if flip is None else len(check_records([record])) == 1
        finally:
            stream.close()


def test_a_record_fully_read_fails_before_finish(tmp_path: Path) -> None:
    """The error comes from the piece that completes the record, not later: the conversion stops there."""
    data = random.Random(3).randbytes(10_000)
    stream, record = _record(tmp_path, data, crc=zlib.crc32(data) ^ 1)
    try:
        tracker = SourceCrc()
        tracker.update(record, 7 + 5000, data[5000:])
        with pytest.raises(ConvertError, match="fails its CRC-32"):
            tracker.update(record, 7, data[:5000])
    finally:
        stream.close()


def test_zip_to_zip_conversions_write_crcs_python_zipfile_accepts(tmp_path: Path) -> None:
    """torrent -> megablocks -> torrent copies records unchanged between two torch zips, so the output's CRC-32s
    come from the source check's (crc32_combine) rather than a second crc32: zipfile.testzip, which recomputes
    every member's CRC-32 from its bytes, is the judge."""
    run_cli("sample", tmp_path / "src")
    run_cli("convert", tmp_path / "src", tmp_path / "megablocks", "--to", "megablocks", "--no-progress")
    run_cli("convert", tmp_path / "megablocks", tmp_path / "torrent", "--to", "torrent", "--no-progress")
    checked = 0
    for folder in ("megablocks", "torrent"):
        for path in sorted((tmp_path / folder).iterdir()):
            if path.suffix in (".pt", ".pth") and zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    assert archive.testzip() is None, path
                checked += 1
    assert checked >= 2
