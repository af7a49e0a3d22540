"""verify --against reads each of the folder's weight files once: the chunks the comparison reads from the folder
(convert/verify/compare.py) are also what the checksum pass hashes for SHA256SUMS and manifest.json.

The comparison reads a folder file's tensors in the plan's output order, which for a folder this tool wrote is the
order of the file itself. A FolderFeed follows each such file front to back: the bytes the comparison does not
read (the header, a torch zip's record headers, a tensor it skipped after its first difference, the end of the
file) are read here as they are reached, and every byte goes through convert/verify/hashing.py's RunningDigests on the
FolderHasher's two hasher threads, so the digests are exactly those of FolderHasher.hash_file.

A file whose ranges the comparison would not read front to back (a folder written by another tool, with its
tensors in another order or overlapping), whose stream is split parts, or which the comparison never reached, is
not followed: FolderHasher reads it on its own afterwards, as verify always did. Memory stays bounded: the
comparison's pooled buffers are leased to the hashers, and a gap is read a CHUNK at a time into a buffer the
hashers hold only while it waits in their short queues.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from convert.common.errors import ConvertError
from convert.fileio.faults import stall_point
from convert.fileio.streams import ByteStream
from convert.fileio.workers import CHUNK, Lease
from convert.integrity.manifest import TensorEntry
from convert.verify.hashing import FileHashes, FolderHasher, RunningDigests


@dataclass
class _Followed:
    stream: ByteStream
    running: RunningDigests
    started: bool = False


class FolderFeed:
    """The folder files wanted by the checksum pass (each with the ranges whose digests it wants, and their
    algorithms), hashed from the comparison's reads where the comparison reads them front to back."""

    def __init__(self, hasher: FolderHasher, wanted: Mapping[Path, Sequence[tuple[TensorEntry, str]]]) -> None:
        self._hasher = hasher
        self._wanted = wanted
        self._followed: dict[Path, _Followed] = {}

    def follow(self, reads: Iterable[tuple[ByteStream, int, int]]) -> None:
        """reads: the folder ranges [begin, end) the comparison will read, in its order. A wanted file is followed
        when its ranges come strictly front to back; the comparison may still skip some (they are read here)."""
        ends: dict[Path, int] = {}
        streams: dict[Path, ByteStream] = {}
        out_of_order: set[Path] = set()
        for stream, begin, end in reads:
            if len(stream.paths) != 1 or stream.paths[0] not in self._wanted:
                continue
            path = stream.paths[0]
            if begin < ends.get(path, 0):
                out_of_order.add(path)
            ends[path] = end
            streams[path] = stream
        for path, stream in streams.items():
            if path not in out_of_order:
                ranges = self._wanted[path]
                running = RunningDigests([r for r, _ in ranges], [a for _, a in ranges])
                self._followed[path] = _Followed(stream, running)

    def chunk(self, stream: ByteStream, offset: int, data: memoryview, lease: Lease) -> None:
        """data, the comparison's read of stream at offset, in the comparison's order. lease holds two for this
        feed (the file hasher's and the tensor hasher's), given back here when the file is not followed."""
        followed = self._followed.get(stream.paths[0]) if len(stream.paths) == 1 else None
        try:
            if followed is not None and followed.stream is stream and offset < followed.running.position:
                # Not front to back after all: FolderHasher reads this file on its own.
                del self._followed[stream.paths[0]]
                followed = None
            if followed is None or followed.stream is not stream:
                lease.release()
                lease.release()
                return
            if not followed.started:
                stall_point(stream.paths[0].name)  # where a test holds verify, as in FolderHasher.hash_file
                followed.started = True
            if not self._read_up_to(followed, offset):
                lease.release()
                lease.release()
                return
        except BaseException:
            lease.release_all()
            raise
        self._hasher.hash(followed.running, data, followed.running.split(data), lease)

    def finish(self) -> dict[Path, FileHashes]:
        """After the comparison: each followed file read to its end and hashed. A file the comparison never
        read from is left to FolderHasher, whose pooled reads are faster than reading it here."""
        done = {path: f for path, f in self._followed.items() if f.started}
        for followed in list(done.values()):
            self._read_up_to(followed, followed.stream.size)
        done = {path: f for path, f in done.items() if path in self._followed}
        self._hasher.join()
        return {path: followed.running.result() for path, followed in done.items()}

    def _read_up_to(self, followed: _Followed, end: int) -> bool:
        """Hash the bytes the comparison does not read, from where the file's hashing is up to end. A read that
        fails leaves the file to FolderHasher (False), whose own read then fails, or not, as it always did: an
        error in reading for the checksums is never reported as one of the comparison."""
        while (position := followed.running.position) < end:
            data = memoryview(bytearray(min(CHUNK, end - position)))
            try:
                followed.stream.readinto(data, position)
            except ConvertError:
                del self._followed[followed.stream.paths[0]]
                return False
            self._hasher.hash(followed.running, data, followed.running.split(data), None)
        return True
