"""Checking the CRC-32 the central directory of a torch zip gives for each record, in the pass that reads it.

torch.load does not check these CRCs (torch builds miniz without its reader's CRC checks), so a flipped bit in a
93 GB download loads silently; the converter checks them instead. A conversion reads a record's bytes in OUTPUT
order, in pieces: a megablocks stacked record one expert block at a time, possibly into different output files and
out of order; a transformed q/k piece whole. So each piece read leaves (offset, length, CRC-32) of its bytes;
neighbouring pieces are joined with crc32_combine (zlib's Python module has none; ISA-L's is used),
and a record is checked as soon as one run covers it. Whatever no piece read (a storage larger than its tensors,
the files a --resume skipped) is read and checked by finish(), which runs before the completion marker is written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from isal import isal_zlib

from convert.common.errors import ConvertError

if TYPE_CHECKING:
    from convert.fileio.streams import ByteStream

_READ = 8 * 2**20  # finish() and check_records() read uncovered bytes in pieces of this size

# CRC-32 of the zip (and zlib) polynomial, and zlib's crc32_combine, from ISA-L (python-isal): its folding CRC
# (PCLMULQDQ) ran 9.7-11 GiB/s a core here against 2.2-3.1 GiB/s for the zlib 1.2.13 Python links, and a torch
# zip's record check is a CRC-32 over every byte a conversion reads (17% of a conversion's CPU before). Both
# release the GIL like zlib's; the tests check them against zlib.crc32 of the whole.
crc32: Callable[..., int] = isal_zlib.crc32
crc32_combine: Callable[[int, int, int], int] = isal_zlib.crc32_combine


@dataclass(frozen=True, eq=False)
class CheckedRecord:
    """One stored record whose CRC-32 its container gives (a torch zip's storage record, from the central
    directory): where its bytes sit in the stream, and the tensors it holds (for messages). Compared by identity:
    one object per record."""

    entry: str
    stream: ByteStream
    offset: int  # absolute, of its first data byte
    size: int
    crc: int
    tensors: tuple[str, ...]
    container: str  # what the file is, for the message ("torch checkpoint")
    loader: str  # the loader that would not notice the damage ("torch.load")

    def failure(self, actual: int) -> ConvertError:
        names = self.tensors[0] if len(self.tensors) == 1 else f"{self.tensors[0]} (+{len(self.tensors) - 1} more)"
        return ConvertError(
            f"{self.container}: record {self.entry} fails its CRC-32 (the bytes give {actual:08x}, the zip says "
            f"{self.crc:08x}): the file is damaged; download it again ({self.loader} would not notice)",
            file=self.stream.label,
            tensor=names,
        )


class Checked(Protocol):
    """What the checks below take: a tensor record (convert.model.records) and the record holding it, if any."""

    @property
    def checked(self) -> CheckedRecord | None: ...


class SourceCrc:
    """Runs of checked bytes per record, from the pieces a conversion reads; thread-safe (readers of successive
    output files may overlap)."""

    def __init__(self) -> None:
        self._runs: dict[CheckedRecord, dict[int, tuple[int, int]]] = {}  # record -> start -> (end, crc), disjoint
        self._checked: set[CheckedRecord] = set()
        self._lock = threading.Lock()

    def update(self, record: Checked, offset: int, data: memoryview | bytes) -> int | None:
        """data was read at absolute offset of record's stream; a record fully covered is checked now. Returns
        data's CRC-32 when it computed one, so a zip output copying these bytes unchanged can extend its own
        CRC with crc32_combine instead of running crc32 over them a second time."""
        zipped = record.checked
        if zipped is None or zipped in self._checked or not data:
            return None
        crc = crc32(data)  # outside the lock: this is the part that costs
        with self._lock:
            if zipped not in self._checked:
                self._add(zipped, offset - zipped.offset, len(data), crc)
        return crc

    def _add(self, record: CheckedRecord, start: int, length: int, crc: int) -> None:
        end = start + length
        runs = self._runs.setdefault(record, {})
        if start < 0 or end > record.size or any(s < end and start < e for s, (e, _) in runs.items()):
            return  # bytes read twice (tensors sharing a storage): finish() reads what the runs miss
        following = runs.pop(end, None)
        if following is not None:
            end, crc = following[0], crc32_combine(crc, following[1], following[0] - start - length)
        previous = next((s for s, (e, _) in runs.items() if e == start), None)
        if previous is not None:
            _, before = runs.pop(previous)
            crc = crc32_combine(before, crc, end - start)
            start = previous
        runs[start] = (end, crc)
        if start == 0 and end == record.size:
            del self._runs[record]
            self._checked.add(record)
            if crc != record.crc:
                raise record.failure(crc)

    def finish(self, records: Iterable[Checked]) -> None:
        """Read and check every byte of these records' zip records that no piece covered."""
        for record in records:
            zipped = record.checked
            if zipped is None or zipped in self._checked:
                continue
            with self._lock:
                runs = sorted(self._runs.pop(zipped, {}).items())
            position, crc = 0, 0
            for start, (end, run_crc) in [*runs, (zipped.size, (zipped.size, 0))]:
                crc = _extend(zipped, crc, position, start)
                crc = crc32_combine(crc, run_crc, end - start)
                position = end
            self._checked.add(zipped)
            if crc != zipped.crc:
                raise zipped.failure(crc)


def _extend(record: CheckedRecord, crc: int, start: int, end: int) -> int:
    """crc continued over the record's bytes start..end, read from the stream."""
    buffer = bytearray(min(_READ, max(end - start, 0)))
    for at in range(start, end, _READ):
        view = memoryview(buffer)[: min(_READ, end - at)]
        record.stream.readinto(view, record.offset + at)
        crc = crc32(view, crc)
    return crc


def check_records(records: Iterable[Checked]) -> list[ConvertError]:
    """Every zip record under these tensors read whole and checked: what inspect and verify report."""
    problems = []
    seen: set[CheckedRecord] = set()
    for record in records:
        zipped = record.checked
        if zipped is None or zipped in seen:
            continue
        seen.add(zipped)
        crc = _extend(zipped, 0, 0, zipped.size)
        if crc != zipped.crc:
            problems.append(zipped.failure(crc))
    return problems
