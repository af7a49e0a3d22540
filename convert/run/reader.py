"""The read half that conversion and verify share: a plan's output file as chunks in file order.

Known bytes, source pieces read (READ_SIZE at a time into a fixed pool of aligned buffers, READ_AHEAD reads in
flight on the read workers) and transformed or cast, and deferred bytes made on arrival; every source byte read is
checked against its record's CRC-32 where the container gives one (convert.integrity.crc32). FileReader runs this
in its own thread a few chunks ahead of the writer (convert/run/writer.py); verify --against reads the same pieces
through piece_chunks to compare them (convert/verify/compare.py).
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from functools import partial

import numpy as np

from convert.common.dtypes import ITEM_SIZE
from convert.common.errors import ConvertError
from convert.fileio.direct_io import ALIGN, READ_AHEAD, READ_SIZE, aligned_buffer
from convert.fileio.faults import fault_point
from convert.fileio.streams import ByteStream
from convert.fileio.workers import CHUNK, POLL, QUEUE_DEPTH, UNWIND, BufferPool, Lease, Pending, Worker, run_stop
from convert.integrity.crc32 import crc32, crc32_combine
from convert.integrity.digests import Digests
from convert.model.outputs import OutputFile, Piece
from convert.model.transforms import run_steps

Chunk = tuple[int, memoryview, str | None, Lease | None]  # offset in the file, bytes, their tensor, their lease
# Pool buffers (READ_SIZE each): the reads in flight, the one being handed on, the one a q/k matrix is moved into,
# and the slices downstream (the writer's and both hashers' queues, 3 * QUEUE_DEPTH chunks, span up to three
# reads). Fewer only slows the reader: every slice handed on is released without it, so a take always ends.
POOL_BUFFERS = READ_AHEAD + 2 + -(-3 * QUEUE_DEPTH * CHUNK // READ_SIZE)


def word_dtype(dtype: str) -> np.dtype:
    """Unsigned integers as wide as the element: the transforms move elements as such words, whatever the format."""
    return np.dtype(f"u{ITEM_SIZE[dtype]}")


def piece_chunks(
    piece: Piece,
    digests: Digests,
    *,
    crc: bool,
    pool: BufferPool | None = None,
    reads: Sequence[Worker] = (),
    read_size: int = CHUNK,
) -> Iterator[Chunk]:
    """A piece's bytes as chunks; a pure rename is copied in CHUNK slices without building a tensor.
    crc: accumulate the tensor's CRC-32 (a zip needs it); pool and reads: read_size bytes at a time into the
    pool's buffers (read_size + 2 * ALIGN long), one read in flight on each of the reads workers, handed on in
    CHUNK slices that share the read's lease (else one fresh CHUNK buffer after another)."""
    running = digests.tensor_crc32.get(piece.tensor, 0)
    if piece.cast is not None:
        yield from _cast_chunks(piece, digests, crc=crc, workers=reads)
        return
    pooled = pool is not None and bool(reads)
    if piece.steps and not (pooled and read_ahead_fits(piece, read_size)):
        yield from _moved_chunks(piece, _moved(piece, digests), digests, crc=crc, lease=None)
        return
    if not pooled:
        for start in range(0, piece.nbytes, CHUNK):
            chunk = memoryview(bytearray(min(CHUNK, piece.nbytes - start)))
            piece.record.stream.readinto(chunk, piece.src_offset + start)
            checked = digests.source_crc.update(piece.record, piece.src_offset + start, chunk)
            if crc:
                running = _extend_crc(running, chunk, checked)
                digests.tensor_crc32[piece.tensor] = running
            yield piece.dst_offset + start, chunk, piece.tensor, None
        return
    assert pool is not None
    yield from _read_ahead([piece], digests, crc=crc, pool=pool, reads=reads, read_size=read_size)


def read_ahead_fits(piece: Piece, read_size: int) -> bool:
    """Whether _read_ahead takes piece: copied unchanged, or moved by steps and small enough to be one read (a
    q/k matrix of Mixtral is 32 MiB in bf16)."""
    return piece.cast is None and (not piece.steps or piece.nbytes <= read_size)


def _read_ahead(
    pieces: Sequence[Piece], digests: Digests, *, crc: bool, pool: BufferPool, reads: Sequence[Worker], read_size: int
) -> Iterator[Chunk]:
    """Pieces back to back in the output (each as read_ahead_fits takes it), as chunks: read_size bytes at a time
    into the pool's buffers, one read in flight on each of the reads workers, handed on in CHUNK slices that share
    the read's lease. A piece with steps is one read, moved into another pool buffer when it arrives, whose lease
    its chunks then share.

    The reads stay in flight: the next one is submitted before a read's chunks are handed on (the hand-on waits
    whenever the writer does), and they run on across the pieces' boundaries. A 2-layer run to mlx (stacked
    experts: 8 pieces a tensor) left the disk writer waiting for blocks half a second while reads drained at each
    piece's end, and a q/k matrix read whole on this thread, into fresh memory, drained them twice a layer
    (bench/profiles.md). Each piece's bytes arrive in order, so its tensor's CRC-32 goes on from where the piece
    before it in the same tensor left it."""
    pending: deque[tuple[Piece, int, Lease, Pending[memoryview]]] = deque()
    jobs = ((piece, start) for piece in pieces for start in range(0, piece.nbytes, read_size))
    submitted = 0

    def submit() -> None:
        """One more read in flight, if any is left: on the reads workers in turn, so they arrive in order."""
        nonlocal submitted
        job = next(jobs, None)
        if job is None:
            return
        piece, start = job
        assert read_ahead_fits(piece, read_size)
        size = min(read_size, piece.nbytes - start)
        # Each slice is held by the writer, the file hasher and the tensor hasher.
        lease = Lease(pool, pool.take(), 3 * -(-size // CHUNK))
        try:
            read = reads[submitted % len(reads)].submit(
                partial(piece.record.stream.read_bulk, lease.buffer, piece.src_offset + start, size)
            )
        except BaseException:
            lease.release_all()
            raise
        submitted += 1
        pending.append((piece, start, lease, read))

    def arrived() -> Iterator[Chunk]:
        piece, start, lease, read = pending.popleft()
        try:
            data = read.result()
            submit()  # before handing on: it may wait on the consumer
            if piece.steps:
                yield from moved(piece, lease, data)
                return
            running = digests.tensor_crc32.get(piece.tensor, 0)  # the tensor's CRC-32 so far: arrivals are in order
            for at in range(0, len(data), CHUNK):  # one read of read_size, handed on in CHUNK slices
                chunk = data[at : at + CHUNK]
                checked = digests.source_crc.update(piece.record, piece.src_offset + start + at, chunk)
                if crc:  # in file order, while the next reads are under way
                    fault_point("crc")
                    running = _extend_crc(running, chunk, checked)
                    digests.tensor_crc32[piece.tensor] = running
                yield piece.dst_offset + start + at, chunk, piece.tensor, lease
        except BaseException:  # a failure, or the consumer gone: slices not handed on would hold it for ever
            lease.release_all()
            raise

    def moved(piece: Piece, lease: Lease, data: memoryview) -> Iterator[Chunk]:
        """A piece with steps, arrived whole in lease's buffer: moved into another buffer of the pool, whose lease
        its chunks share; the source's buffer goes back at once."""
        target = Lease(pool, pool.take(), 3 * -(-piece.nbytes // CHUNK))
        try:
            view = _transformed(piece, digests, data, target.buffer)
            lease.release_all()
            yield from _moved_chunks(piece, view, digests, crc=crc, lease=target)
        except BaseException:
            target.release_all()
            raise

    try:
        for _ in reads:
            submit()
        while pending:
            yield from arrived()
    finally:
        for _, _, lease, _ in pending:  # reads cut short by a failure: their buffers go back to the pool
            lease.release_all()


def _moved(piece: Piece, digests: Digests) -> memoryview:
    """A piece with steps, read whole (the steps move elements across it) and transformed: only the transformed copy
    stays in flight. For what _read_ahead does not take: larger than one read, cast, or read without a pool."""
    buffer = aligned_buffer(piece.nbytes + 2 * ALIGN)
    return _transformed(piece, digests, piece.record.stream.read_bulk(buffer, piece.src_offset, piece.nbytes))


def _moved_chunks(
    piece: Piece, view: memoryview, digests: Digests, *, crc: bool, lease: Lease | None
) -> Iterator[Chunk]:
    """A moved piece's bytes (view) as chunks sharing lease, its tensor's CRC-32 carried on over them first."""
    if crc:
        fault_point("crc")
        digests.tensor_crc32[piece.tensor] = crc32(view, digests.tensor_crc32.get(piece.tensor, 0))
    for start in range(0, piece.nbytes, CHUNK):
        yield piece.dst_offset + start, view[start : start + CHUNK], piece.tensor, lease


def _transformed(piece: Piece, digests: Digests, data: memoryview, out: mmap.mmap | None = None) -> memoryview:
    """data, a piece with steps read whole, checked against the source's CRC-32 and moved by its steps: into out
    (a buffer at least as long) when given, else into fresh memory."""
    digests.source_crc.update(piece.record, piece.src_offset, data)
    words = word_dtype(piece.record.dtype)
    tensor = np.frombuffer(data, dtype=words).reshape(piece.shape)
    fault_point("transform")
    target = None if out is None else np.frombuffer(out, dtype=words, count=tensor.size)
    result = np.ascontiguousarray(run_steps(tensor, piece.steps, piece.tensor, target))
    return memoryview(result.reshape(-1).view(np.uint8))


def _cast_chunks(piece: Piece, digests: Digests, *, crc: bool, workers: Sequence[Worker] = ()) -> Iterator[Chunk]:
    """A piece whose elements change type: read (and moved by its steps, which need the whole piece) in whole
    granules, converted slice by slice so that no converted chunk exceeds CHUNK. With workers (the reads, idle
    while a cast piece streams), slices are read and converted on them in turn, one in flight on each, and handed
    on in order: the cast is CPU-bound (numpy releases the GIL), so this uses every worker's core."""
    cast = piece.cast
    assert cast is not None
    running = digests.tensor_crc32.get(piece.tensor, 0)
    step = cast.granule * max(1, CHUNK // max(cast.out_nbytes(cast.granule), cast.granule))
    if piece.steps:
        moved = _moved(piece, digests)

        def sliced(start: int) -> memoryview:
            return moved[start : start + step]
    else:

        def sliced(start: int) -> memoryview:
            chunk = memoryview(bytearray(min(step, piece.nbytes - start)))
            piece.record.stream.readinto(chunk, piece.src_offset + start)
            digests.source_crc.update(piece.record, piece.src_offset + start, chunk)
            return chunk

    def convert(start: int) -> memoryview:
        # Elements counted in the source tensor (for a q/k piece whose rows the steps reorder: in the reordered rows).
        first = (piece.src_offset - piece.record.offset + start) // ITEM_SIZE[piece.record.dtype]
        try:
            return cast(sliced(start), piece.tensor, first)
        except ConvertError as error:
            if error.file is not None:
                raise
            # A value that does not fit is in the source: its line names that file and tensor, as every reader's
            # line does (the cast itself knows neither). Raised in a worker, it is the run's failure all the same.
            raise ConvertError(error.rule, file=piece.record.stream.label, tensor=piece.record.name) from None

    def in_order() -> Iterator[memoryview]:
        pending: deque[Pending[memoryview]] = deque()
        for number, start in enumerate(range(0, piece.nbytes, step)):
            if not workers:
                yield convert(start)
                continue
            pending.append(workers[number % len(workers)].submit(partial(convert, start)))
            if len(pending) == len(workers):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    position = piece.dst_offset
    for converted in in_order():
        if crc:
            fault_point("crc")
            running = crc32(converted, running)
            digests.tensor_crc32[piece.tensor] = running
        yield position, converted, piece.tensor, None
        position += len(converted)


def _extend_crc(running: int, chunk: memoryview, chunk_crc: int | None) -> int:
    """The output tensor's CRC-32 continued over chunk, copied unchanged from the source: from the CRC the
    source's record check just computed over the same bytes when there is one (zip to zip: one crc32 a byte,
    not two), else by running crc32 over it."""
    if chunk_crc is not None:
        return crc32_combine(running, chunk_crc, len(chunk))
    return crc32(chunk, running)


def _file_chunks(output: OutputFile, digests: Digests, pool: BufferPool, reads: Sequence[Worker]) -> Iterator[Chunk]:
    """Everything of one output file in offset order. Deferred bytes are made when reached, once the tensors
    before them have been read (the reader computes the CRCs a zip needs as it goes)."""
    items: list[tuple[int, object]] = [*output.blobs, *output.deferred, *((p.dst_offset, p) for p in output.pieces)]
    crc = bool(output.deferred) and bool(output.pieces)
    run: list[Piece] = []  # pieces back to back that _read_ahead takes: read as one run
    for offset, item in sorted(items, key=lambda entry: entry[0]):
        if isinstance(item, Piece) and read_ahead_fits(item, READ_SIZE) and reads:
            run.append(item)
            continue
        if run:
            yield from _read_ahead(run, digests, crc=crc, pool=pool, reads=reads, read_size=READ_SIZE)
            run = []
        if isinstance(item, Piece):
            yield from piece_chunks(item, digests, crc=crc, pool=pool, reads=reads, read_size=READ_SIZE)
        elif isinstance(item, bytes):
            yield offset, memoryview(item), None, None
        else:
            fault_point("deferred")
            yield offset, memoryview(item(digests)), None, None  # type: ignore[operator]
    if run:
        yield from _read_ahead(run, digests, crc=crc, pool=pool, reads=reads, read_size=READ_SIZE)
    if output.copy_of is not None:
        stream = ByteStream([output.copy_of])
        try:
            for start in range(0, stream.size, CHUNK):
                chunk = bytearray(min(CHUNK, stream.size - start))
                stream.readinto(chunk, start)
                yield start, memoryview(chunk), None, None
        finally:
            stream.close()


class FileReader:
    """Runs _file_chunks in its own thread, a few chunks ahead of the writer. A chunk left in the queue when
    the run stops still holds its lease; stop() gives those back."""

    _DONE = object()

    def __init__(self, output: OutputFile, digests: Digests, pool: BufferPool, reads: Sequence[Worker]) -> None:
        self._stop = run_stop()
        self._queue: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
        self._finished = threading.Event()  # the consumer is gone: the reader ends even if the run is well

        def run() -> None:
            for chunk in _file_chunks(output, digests, pool, reads):
                if self._finished.is_set():
                    return
                self._stop.put(self._queue, chunk)
            self._stop.put(self._queue, self._DONE)

        self._thread = self._stop.spawn(run, "reader")

    def __iter__(self) -> Iterator[Chunk]:
        while (item := self._stop.get(self._queue)) is not self._DONE:
            yield item  # type: ignore[misc]

    def stop(self) -> None:
        self._finished.set()
        while self._thread.is_alive():
            self._drain()
            self._thread.join(POLL)
            if self._stop.stopped:
                self._thread.join(UNWIND)
                break
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple) and item[3] is not None:
                item[3].release_all()
