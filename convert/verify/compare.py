"""verify --against, at a conversion's pace: the converted folder's tensors compared with the source's pieces, both
read through the conversion's own pooled reader (O_DIRECT where possible, reads in flight on workers).

The source side is exactly what a conversion writes: convert/run/writer.py's piece_chunks, reading into a BufferPool
on READ_AHEAD read workers and transforming a q/k matrix or expert block whole. For each chunk that arrives, the
same byte range of the folder's tensor is read into another buffer of the same pool on a second pair of workers,
while the next source chunks are being read; the main thread compares each pair once both are in. Memory is the
pool (COMPARE_BUFFERS chunks) plus at most one transformed piece, whatever the model's size. With a FolderFeed
(convert/verify/onepass.py) the folder chunks are hashed for the checksum pass too, so that pass need not read them
again.

A read that fails with a ConvertError (a truncated folder file, a source record failing its CRC-32) is handed
back to the main thread and raised there, so verify reports it as a failed check, as it always has; anything
else is the run's failure, as in a conversion.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from typing import Generic, TypeVar

import numpy as np

from convert.common.errors import ConvertError
from convert.fileio.direct_io import ALIGN, READ_AHEAD, aligned_buffer
from convert.fileio.workers import CHUNK, QUEUE_DEPTH, BufferPool, Lease, Pending, Worker
from convert.integrity.digests import Digests
from convert.model.outputs import Piece
from convert.model.records import TensorRecord
from convert.run.reader import piece_chunks
from convert.verify.onepass import FolderFeed

T = TypeVar("T")

# Chunk pairs waiting to be compared while the next reads run: enough to keep both disks' queues fed.
IN_FLIGHT = READ_AHEAD + 1
# The source reads in flight and the pairs waiting, each pair two buffers, and one spare for the next take.
COMPARE_BUFFERS = READ_AHEAD + 2 * (IN_FLIGHT + 1) + 1
# With a FolderFeed, folder chunks also wait in the hashers' queues (and one in each hasher's hands).
FEED_BUFFERS = QUEUE_DEPTH + 2


def _capture(call: Callable[[], T]) -> T | ConvertError:
    try:
        return call()
    except ConvertError as exc:
        return exc


class _Raised(Generic[T]):
    """A Pending whose ConvertError is raised in the thread that asks for the result."""

    def __init__(self, pending: Pending[T | ConvertError]) -> None:
        self._pending = pending

    def result(self) -> T:
        value = self._pending.result()
        if isinstance(value, ConvertError):
            raise value
        return value


class _Reads:
    """A read worker whose input errors come back to the caller instead of failing the run."""

    def __init__(self, name: str) -> None:
        self._worker = Worker(name, depth=1)

    def submit(self, call: Callable[[], T]) -> _Raised[T]:
        return _Raised(self._worker.submit(partial(_capture, call)))

    def close(self) -> None:
        self._worker.close()


def _first_difference(expected: memoryview, actual: memoryview) -> int | None:
    """Index of the first differing byte, None if equal: numpy compares in C (memoryview == goes byte by byte
    through struct unpacking, about 0.4 GB/s), on 8-byte words where the length allows."""
    left = np.frombuffer(expected, dtype=np.uint8)
    right = np.frombuffer(actual, dtype=np.uint8)
    if len(left) % 8 == 0 and np.array_equal(left.view(np.uint64), right.view(np.uint64)):
        return None
    differing = np.flatnonzero(left != right)
    return int(differing[0]) if len(differing) else None


class Comparer:
    """The pool and the read workers of one verify --against; close() ends the workers."""

    def __init__(self, feed: FolderFeed | None = None) -> None:
        self._feed = feed
        count = COMPARE_BUFFERS + (FEED_BUFFERS if feed is not None else 0)
        self.pool = BufferPool(count, partial(aligned_buffer, CHUNK + 2 * ALIGN))
        self._source_reads = [_Reads(f"read-{n}") for n in range(READ_AHEAD)]
        self._folder_reads = [_Reads(f"against-read-{n}") for n in range(READ_AHEAD)]

    def close(self) -> None:
        for reads in [*self._source_reads, *self._folder_reads]:
            reads.close()

    def mismatches(self, pieces: list[tuple[Piece, TensorRecord, int]]) -> Iterator[tuple[Piece, int]]:
        """For pieces (a source piece, the folder's record of its tensor, where that tensor starts in the planned
        output file) in order: (piece, byte of the tensor) at the first difference of each tensor that differs.
        Each folder chunk read goes to the feed, if there is one, in this order."""
        digests = Digests()  # the source records' CRC-32s, checked as the pieces read them, as in a conversion
        failed: set[str] = set()
        waiting: deque[tuple[Piece, TensorRecord, int, memoryview, Lease | None, Lease, _Raised[memoryview]]]
        waiting = deque()
        count = 0  # chunks so far: their folder reads alternate between the workers
        feed = self._feed

        def compare() -> tuple[Piece, int] | None:
            piece, record, relative, expected, lease, folder, read = waiting.popleft()
            fed = False
            try:
                actual = read.result()
                if feed is not None:
                    fed = True  # the feed gives back its holds on folder whatever happens
                    feed.chunk(record.stream, record.offset + relative, actual, folder)
                if piece.tensor in failed:
                    return None
                at = _first_difference(expected, actual)
                if at is None:
                    return None
                failed.add(piece.tensor)
                return piece, relative + at
            finally:
                if lease is not None:
                    lease.release_all()
                if fed:
                    folder.release()
                else:
                    folder.release_all()

        try:
            for piece, record, start in pieces:
                if piece.tensor in failed:
                    continue
                # Drained to the end even once the tensor fails: a source read still in flight writes into its
                # buffer, which must not go back to the pool before it is done.
                for offset, data, _, lease in piece_chunks(
                    piece, digests, crc=False, pool=self.pool, reads=self._source_reads  # type: ignore[arg-type]
                ):
                    if piece.tensor in failed:
                        if lease is not None:
                            lease.release_all()
                        continue
                    relative = offset - start
                    # Held by this comparison, and by the feed's two hashers when there is a feed.
                    folder = Lease(self.pool, self.pool.take(), 3 if feed is not None else 1)
                    read = self._folder_reads[count % READ_AHEAD].submit(
                        partial(record.stream.read_bulk, folder.buffer, record.offset + relative, len(data))
                    )
                    count += 1
                    waiting.append((piece, record, relative, data, lease, folder, read))
                    if len(waiting) > IN_FLIGHT:
                        found = compare()
                        if found is not None:
                            yield found
            while waiting:
                found = compare()
                if found is not None:
                    yield found
        finally:
            for _, _, _, _, lease, folder, _ in waiting:  # after a failure: nobody takes from the pool any more
                if lease is not None:
                    lease.release_all()
                folder.release_all()
