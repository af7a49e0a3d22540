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

from convert.digests import Hasher, new_hasher
from convert.direct_io import ALIGN, aligned_buffer
from convert.faults import stall_point
from convert.formats.streams import ByteStream
from convert.integrity import TensorEntry
from convert.stream import READ_AHEAD
from convert.workers import CHUNK, QUEUE_DEPTH, BufferPool, Lease, Pending, Worker

# The reads in flight, each hasher's queue and the call it runs, and the chunk being handed over.
HASH_BUFFERS = READ_AHEAD + 2 * (QUEUE_DEPTH + 1) + 1


def _update(hasher: Hasher, data: memoryview) -> None:
    hasher.update(data)


def _update_ranges(parts: list[tuple[Hasher, memoryview]]) -> None:
    for hasher, part in parts:
        hasher.update(part)


class FolderHasher:
    """The pool, read workers and hashers of one verify; close() ends the threads."""

    def __init__(self) -> None:
        self._pool = BufferPool(HASH_BUFFERS, partial(aligned_buffer, CHUNK + 2 * ALIGN))
        self._reads = [Worker(f"read-{n}", depth=1) for n in range(READ_AHEAD)]
        self._file_hasher = Worker("file-hasher")
        self._tensor_hasher = Worker("tensor-hasher")

    def close(self) -> None:
        for worker in [*self._reads, self._file_hasher, self._tensor_hasher]:
            worker.close()

    def hash_file(
        self, path: Path, ranges: Sequence[TensorEntry], algorithms: Sequence[str]
    ) -> tuple[str, dict[str, str]]:
        """path's SHA-256 and, for each range (algorithms[i] for ranges[i]), the digest of its bytes that the
        file holds; in one read."""
        stall_point(path.name)
        whole = hashlib.sha256()
        hashers = [new_hasher(a) for a in algorithms]
        ordered = sorted(range(len(ranges)), key=lambda i: (ranges[i].begin, ranges[i].end))
        first = 0  # ordered[:first] end at or before the current chunk: done
        stream = ByteStream([path])
        pending: deque[tuple[int, Lease, Pending[memoryview]]] = deque()

        def hand_over() -> None:
            nonlocal first
            position, lease, read = pending.popleft()
            try:
                data = read.result()
                end = position + len(data)
                parts = []
                index = first
                while index < len(ordered) and ranges[ordered[index]].begin < end:
                    entry = ranges[ordered[index]]
                    if entry.end > position:
                        part = data[max(entry.begin, position) - position : min(entry.end, end) - position]
                        parts.append((hashers[ordered[index]], part))
                    index += 1
                while first < len(ordered) and ranges[ordered[first]].end <= end:
                    first += 1
            except BaseException:
                lease.release_all()
                raise
            self._file_hasher.submit(partial(_update, whole, data), lease.release)
            self._tensor_hasher.submit(partial(_update_ranges, parts), lease.release)

        try:
            for number, start in enumerate(range(0, stream.size, CHUNK)):
                lease = Lease(self._pool, self._pool.take(), 2)  # the file hasher, the tensor hasher
                size = min(CHUNK, stream.size - start)
                read = self._reads[number % READ_AHEAD].submit(
                    partial(stream.read_bulk, lease.buffer, start, size)
                )
                pending.append((start, lease, read))
                if len(pending) == READ_AHEAD:
                    hand_over()
            while pending:
                hand_over()
            self._file_hasher.join()
            self._tensor_hasher.join()
        except BaseException:
            for _, lease, _ in pending:  # cut short by a failure: nobody takes from the pool any more
                lease.release_all()
            raise  # the stream stays open: a read may still be under way on it, and the run is ending
        stream.close()
        return whole.hexdigest(), {ranges[i].name: hashers[i].hexdigest() for i in range(len(ranges))}
