"""verify's checksum pass at the pace of one O_DIRECT read: each file is read once, front to back, into pooled
aligned buffers by READ_AHEAD read workers, and each chunk is handed to two hashers, one for the file's SHA-256
(SHA256SUMS) and one for the digests of the tensors it overlaps (manifest.json), so the reads never wait for the
hashing: on 2 cores SHA-256 (about 1.3-2 GB/s with SHA-NI) and BLAKE3 each get a core, and the disk is what is
left to wait for.

A failure in any of these threads is the run's failure, as it was when verify read and hashed in one thread.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from convert.fileio.direct_io import ALIGN, aligned_buffer
from convert.fileio.faults import stall_point
from convert.fileio.streams import ByteStream
from convert.fileio.workers import BufferPool, Lease, Pending, Worker
from convert.integrity.digests import Hasher, new_hasher
from convert.integrity.manifest import TensorEntry
from convert.run.reader import READ_AHEAD, READ_SIZE

# The reads in flight, each hasher's queue and the call it runs, and the chunk being handed over.
# Reads of READ_SIZE, the size this disk serves fastest: the reads in flight, the one each hasher works on, and
# one for the next take. Hashing a chunk takes less time than reading it, so the hashers' queues stay short.
HASH_BUFFERS = READ_AHEAD + 3

FileHashes = tuple[str, dict[str, str]]  # a file's SHA-256, and the digest of each of its ranges by name


def _update(hasher: Hasher, data: memoryview) -> None:
    hasher.update(data)


def _update_ranges(parts: list[tuple[Hasher, memoryview]]) -> None:
    for hasher, part in parts:
        hasher.update(part)


class RunningDigests:
    """A file's SHA-256 and the digests of its ranges, fed the file's bytes front to back in pieces of any size:
    split() hands out which part of each piece goes to which hash state, so the caller can run the updates on
    the hasher threads in the order it calls split()."""

    def __init__(self, ranges: Sequence[TensorEntry], algorithms: Sequence[str]) -> None:
        self.whole = hashlib.sha256()
        self._ranges = ranges
        self._hashers = [new_hasher(a) for a in algorithms]
        self._ordered = sorted(range(len(ranges)), key=lambda i: (ranges[i].begin, ranges[i].end))
        self._first = 0  # _ordered[:_first] end at or before the bytes fed so far: done
        self.position = 0  # bytes fed so far

    def split(self, data: memoryview) -> list[tuple[Hasher, memoryview]]:
        """The parts of data (the file's bytes at self.position) for each range it overlaps; advances."""
        position, end = self.position, self.position + len(data)
        parts = []
        index = self._first
        while index < len(self._ordered) and self._ranges[self._ordered[index]].begin < end:
            entry = self._ranges[self._ordered[index]]
            if entry.end > position:
                part = data[max(entry.begin, position) - position : min(entry.end, end) - position]
                parts.append((self._hashers[self._ordered[index]], part))
            index += 1
        while self._first < len(self._ordered) and self._ranges[self._ordered[self._first]].end <= end:
            self._first += 1
        self.position = end
        return parts

    def result(self) -> FileHashes:
        """Once every update has run: the file's SHA-256 and each range's digest by name."""
        return self.whole.hexdigest(), {r.name: h.hexdigest() for r, h in zip(self._ranges, self._hashers, strict=True)}


class FolderHasher:
    """The pool, read workers and hashers of one verify; close() ends the threads."""

    def __init__(self) -> None:
        self._pool = BufferPool(HASH_BUFFERS, partial(aligned_buffer, READ_SIZE + 2 * ALIGN))
        self._reads = [Worker(f"read-{n}", depth=1) for n in range(READ_AHEAD)]
        self._file_hasher = Worker("file-hasher")
        self._tensor_hasher = Worker("tensor-hasher")

    def close(self) -> None:
        for worker in [*self._reads, self._file_hasher, self._tensor_hasher]:
            worker.close()

    def hash_file(
        self, path: Path, ranges: Sequence[TensorEntry], algorithms: Sequence[str]
    ) -> FileHashes:
        """path's SHA-256 and, for each range (algorithms[i] for ranges[i]), the digest of its bytes that the
        file holds; in one read."""
        stall_point(path.name)
        running = RunningDigests(ranges, algorithms)
        stream = ByteStream([path])
        pending: deque[tuple[int, Lease, Pending[memoryview]]] = deque()

        def hand_over() -> None:
            _, lease, read = pending.popleft()
            try:
                data = read.result()
                parts = running.split(data)
            except BaseException:
                lease.release_all()
                raise
            self.hash(running, data, parts, lease)

        try:
            for number, start in enumerate(range(0, stream.size, READ_SIZE)):
                lease = Lease(self._pool, self._pool.take(), 2)  # the file hasher, the tensor hasher
                size = min(READ_SIZE, stream.size - start)
                read = self._reads[number % READ_AHEAD].submit(
                    partial(stream.read_bulk, lease.buffer, start, size)
                )
                pending.append((start, lease, read))
                if len(pending) == READ_AHEAD:
                    hand_over()
            while pending:
                hand_over()
            self.join()
        except BaseException:
            for _, lease, _ in pending:  # cut short by a failure: nobody takes from the pool any more
                lease.release_all()
            raise  # the stream stays open: a read may still be under way on it, and the run is ending
        stream.close()
        return running.result()

    def hash(
        self, running: RunningDigests, data: memoryview, parts: list[tuple[Hasher, memoryview]], lease: Lease | None
    ) -> None:
        """Hand data (split by running.split) to the file hasher and its parts to the tensor hasher; each gives
        back one of lease's holds when done (the lease was made with two for them)."""
        release = lease.release if lease is not None else None
        self._file_hasher.submit(partial(_update, running.whole, data), release)
        self._tensor_hasher.submit(partial(_update_ranges, parts), release)

    def join(self) -> None:
        """Wait until every update handed over so far has run."""
        self._file_hasher.join()
        self._tensor_hasher.join()
