"""Executing a plan: each output file is written under a temporary name, strictly front to back, fsynced and
renamed; the plan's last file (the index, or params.json) goes last, so an interrupted run never leaves a folder
that looks complete.

Threads overlap the work: a reader turns the file's parts (known bytes, source pieces read and transformed,
deferred bytes) into chunks in file order; the main thread writes them; two hashers compute each file's and each
tensor's digest (and check floats for NaN/Inf) from the same chunks, so nothing is read twice. Large files
bypass the page cache both ways (convert/direct_io.py): the reader reads READ_SIZE at a time into the pool's
aligned buffers and a disk-writer thread writes aligned staging blocks, several at once when they queue up.
Buffers come from a fixed pool and queues are short, so memory is bounded by scheduling: a few reads in flight,
and at most one transformed piece (a q/k matrix, a transposed expert block). A committer thread syncs and renames
each finished file, in order, while the next weights file streams.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from convert import faults
from convert.digests import TENSOR_DIGEST, Digests, Hasher, new_hasher
from convert.direct_io import ALIGN, StagedWriter, aligned_buffer, open_direct
from convert.dtypes import ITEM_SIZE, word_dtype
from convert.errors import ConvertError
from convert.faults import fault_point
from convert.finite import FiniteCheck
from convert.formats.streams import ByteStream
from convert.formats.zip_crc import crc32, crc32_combine
from convert.integrity import file_digest
from convert.outputs import OutputFile, Piece
from convert.owned import no_links
from convert.plan import Plan
from convert.resume import Journal
from convert.source import source_identity
from convert.transforms import run_steps
from convert.workers import CHUNK, POLL, QUEUE_DEPTH, UNWIND, BufferPool, Lease, Pending, Worker, run_stop
from convert.writeback import EarlyWriteback

log = logging.getLogger("mixtral-convert")

DIRECT_MIN = 64 * 2**20  # smaller files (metadata, tiny models) are not worth the staging
PARTIAL_SUFFIX = ".partial"


def partial_name(name: str) -> str:
    return f"{name}{PARTIAL_SUFFIX}"


Chunk = tuple[int, memoryview, str | None, Lease | None]  # offset in the file, bytes, their tensor, their lease
# Reads in flight at once: direct reads have no kernel readahead, and one at a time left the disk idle while the
# reader computed a zip's CRC-32.
READ_AHEAD = 2
# One source read: this VM's disk read 8 MiB requests at about half the speed of 32-64 MiB ones
# (bench/profiles.md). Each read is handed on in CHUNK slices, so queues and hashers see the same chunks as before.
READ_SIZE = 32 * 2**20
# Pool buffers (READ_SIZE each): the reads in flight, the one being handed on, and the slices downstream (the
# writer's and both hashers' queues, 3 * QUEUE_DEPTH chunks, span up to three reads). Fewer only slows the reader:
# every slice handed on is released without it, so a take always ends.
POOL_BUFFERS = READ_AHEAD + 1 + -(-3 * QUEUE_DEPTH * CHUNK // READ_SIZE)


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
    if piece.steps:
        view = _moved(piece, digests)
        if crc:
            fault_point("crc")
            digests.tensor_crc32[piece.tensor] = crc32(view, running)
        for start in range(0, piece.nbytes, CHUNK):
            yield piece.dst_offset + start, view[start : start + CHUNK], piece.tensor, None
        return
    if pool is None or not reads:
        for start in range(0, piece.nbytes, CHUNK):
            chunk = memoryview(bytearray(min(CHUNK, piece.nbytes - start)))
            piece.record.stream.readinto(chunk, piece.src_offset + start)
            checked = digests.source_crc.update(piece.record, piece.src_offset + start, chunk)
            if crc:
                running = _extend_crc(running, chunk, checked)
                digests.tensor_crc32[piece.tensor] = running
            yield piece.dst_offset + start, chunk, piece.tensor, None
        return
    pending: deque[tuple[int, Lease, Pending[memoryview]]] = deque()

    def arrived() -> Iterator[Chunk]:
        nonlocal running
        start, lease, read = pending.popleft()
        try:
            data = read.result()
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

    try:
        for number, start in enumerate(range(0, piece.nbytes, read_size)):
            size = min(read_size, piece.nbytes - start)
            # Each slice is held by the writer, the file hasher and the tensor hasher.
            lease = Lease(pool, pool.take(), 3 * -(-size // CHUNK))
            read = reads[number % len(reads)].submit(
                partial(piece.record.stream.read_bulk, lease.buffer, piece.src_offset + start, size)
            )
            pending.append((start, lease, read))
            if len(pending) == len(reads):
                yield from arrived()
        while pending:
            yield from arrived()
    finally:
        for _, lease, _ in pending:  # reads cut short by a failure: their buffers go back to the pool
            lease.release_all()


def _moved(piece: Piece, digests: Digests) -> memoryview:
    """A piece with steps, read whole (the steps move elements across it) and transformed: only the transformed copy
    stays in flight."""
    buffer = aligned_buffer(piece.nbytes + 2 * ALIGN)
    data = piece.record.stream.read_bulk(buffer, piece.src_offset, piece.nbytes)
    digests.source_crc.update(piece.record, piece.src_offset, data)
    tensor = np.frombuffer(data, dtype=word_dtype(piece.record.dtype)).reshape(piece.shape)
    fault_point("transform")
    result = np.ascontiguousarray(run_steps(tensor, piece.steps, piece.tensor))
    del data, tensor, buffer
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
    for offset, item in sorted(items, key=lambda entry: entry[0]):
        if isinstance(item, Piece):
            yield from piece_chunks(item, digests, crc=crc, pool=pool, reads=reads, read_size=READ_SIZE)
        elif isinstance(item, bytes):
            yield offset, memoryview(item), None, None
        else:
            fault_point("deferred")
            yield offset, memoryview(item(digests)), None, None  # type: ignore[operator]
    if output.copy_of is not None:
        stream = ByteStream([output.copy_of])
        try:
            for start in range(0, stream.size, CHUNK):
                chunk = bytearray(min(CHUNK, stream.size - start))
                stream.readinto(chunk, start)
                yield start, memoryview(chunk), None, None
        finally:
            stream.close()


class _Reader:
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


class _Writer:
    def __init__(self, destination: Path, progress: tqdm, digests: Digests, *, strict: bool, checksums: bool) -> None:
        self.destination = destination
        self.checksums = checksums
        self.progress = progress
        self.digests = digests
        self.strict = strict
        # SHA-256 runs at about 1.8 GB/s a core here (SHA-NI): the file and tensor hashes get a thread each.
        self.file_hasher = Worker("file-hasher")
        self.tensor_hasher = Worker("tensor-hasher")
        # Direct reads have no kernel readahead: READ_AHEAD reads in flight keep the disk busy while the reader
        # computes a zip's CRC-32.
        self.reads = [Worker(f"read-{n}", depth=1) for n in range(READ_AHEAD)]
        # Syncs and renames finished files, in order, while the next file streams.
        self.committer = Worker("committer", depth=1)
        self._committing: Pending[None] | None = None
        self.finite_check = FiniteCheck()  # runs in the tensor hasher's thread
        self.pool = BufferPool(POOL_BUFFERS, partial(aligned_buffer, READ_SIZE + 2 * ALIGN))

    def close(self) -> None:
        for worker in [self.file_hasher, self.tensor_hasher, *self.reads, self.committer]:
            worker.close()

    def write(
        self,
        output: OutputFile,
        before_commit: Callable[[], None],
        committed: Callable[[], None],
        *,
        completes: bool = False,
    ) -> None:
        """Write output as NAME.partial; then, on the committer thread, sync it and rename it into place unless
        before_commit raises, and call committed. Returns once every byte is handed to the disk: the next file
        can stream while this one syncs (a sync waits for the disk to flush its cache: 1.8-3.2 s per shard here, no
        byte moving); wait_committed() waits for it. completes: this file makes the output complete; once it is
        in place, the run's outcome is success whatever signal comes."""
        if faults.stalls_at(output.name):
            self.wait_committed()  # a test's kill point: every file before this one is in place, as it would be
        temporary = self.destination / partial_name(output.name)
        file_hash = hashlib.sha256()
        tensor_hashes: dict[str, Hasher] = {}
        dtypes = {p.tensor: p.out_dtype for p in output.pieces}
        non_finite: set[str] = set()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW  # never through a link planted in DST
        with no_links(temporary):
            if output.size >= DIRECT_MIN:
                fd, direct = open_direct(temporary, flags)
            else:
                fd, direct = os.open(temporary, flags, 0o644), False
        staged: StagedWriter | None = None
        reader: _Reader | None = None
        handed_over = False
        try:
            staged = StagedWriter(fd, temporary) if direct else None
            reader = _Reader(output, self.digests, self.pool, self.reads)
            writeback = EarlyWriteback(fd)  # for the page-cache path
            position = 0
            for offset, data, tensor, lease in reader:
                try:
                    if offset != position:
                        raise ConvertError(f"internal: plan has a gap or overlap at byte {position}", file=temporary)
                    if staged is not None:
                        staged.write(data)
                    else:
                        _pwrite_all(fd, data, offset, temporary)
                        writeback.written_up_to(offset + len(data))
                    if offset == 0:
                        faults.stall_point(output.name)
                    release = lease.release if lease is not None else None
                    whole = file_hash if self.checksums else None
                    self.file_hasher.submit(partial(_hash, "file-hash", whole, data), release)
                    if tensor is not None:
                        digest = _tensor_hasher(tensor_hashes, tensor) if self.checksums else None
                        check = partial(self.finite_check, data, dtypes[tensor], tensor, non_finite)
                        self.tensor_hasher.submit(partial(_hash, "tensor-hash", digest, data, check), release)
                    elif release is not None:
                        release()
                    if release is not None:
                        release()
                except BaseException:
                    if lease is not None:  # after a failure nobody takes from the pool; give it back all the same
                        lease.release_all()
                    raise
                position += len(data)
                self.progress.update(len(data))
            if position != output.size:
                raise ConvertError(f"wrote {position} bytes but the plan says {output.size}", file=temporary)
            if staged is not None:
                staged.finish(output.size)
            self.file_hasher.join()
            self.tensor_hasher.join()
            commit = partial(
                self._commit, output, fd, file_hash, tensor_hashes, non_finite, before_commit, committed, completes
            )
            # The committer owns fd from here: the release closes it whether the commit runs or the run has failed.
            self._committing = self.committer.submit(commit, release=partial(os.close, fd))
            handed_over = True
        finally:
            if reader is not None:
                reader.stop()
            if staged is not None:
                staged.close()
            if not handed_over:
                os.close(fd)

    def wait_committed(self) -> None:
        """Wait until the file written last is synced and in place (Stopped if the run failed meanwhile)."""
        if self._committing is not None:
            self._committing.result()
            self._committing = None

    def _commit(
        self,
        output: OutputFile,
        fd: int,
        file_hash: hashlib._Hash,
        tensor_hashes: dict[str, Hasher],
        non_finite: set[str],
        before_commit: Callable[[], None],
        committed: Callable[[], None],
        completes: bool,
    ) -> None:
        """Sync a written file and rename it into place (the committer thread, in file order)."""
        temporary = self.destination / partial_name(output.name)
        faults.stall_point(f"commit:{output.name}")
        try:
            fault_point("fsync")
            os.fsync(fd)
        except OSError as exc:
            raise ConvertError(f"cannot sync to disk: {exc.strerror}", file=temporary) from None
        if self.checksums:
            self.digests.file_sha256[output.name] = file_hash.hexdigest()
            for tensor, digest in tensor_hashes.items():
                self.digests.tensor_digest[tensor] = digest.hexdigest()
        sources = {p.tensor: p.record for p in output.pieces}  # messages name the source's file and tensor
        for tensor in sorted(non_finite):
            record = sources[tensor]
            if self.strict:
                raise ConvertError("has NaN or Inf values (--strict)", file=record.stream.label, tensor=record.name)
            log.warning("%s: tensor %s has NaN or Inf values; converted as they are", record.stream.label, record.name)
        before_commit()
        if completes:
            run_stop().commit()
        try:
            fault_point("rename")
            os.replace(temporary, self.destination / output.name)
        except OSError as exc:
            raise ConvertError(f"cannot rename into place: {exc.strerror}", file=temporary) from None
        committed()


def _tensor_hasher(hashes: dict[str, Hasher], tensor: str) -> Hasher:
    if tensor not in hashes:
        hashes[tensor] = new_hasher(TENSOR_DIGEST)
    return hashes[tensor]


def _hash(site: str, digest: Hasher | None, data: memoryview, check: Callable[[], None] | None = None) -> None:
    fault_point(site)
    if digest is not None:
        digest.update(data)
    if check is not None:
        check()


def _pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    view = data.cast("B")
    done = 0
    while done < len(view):
        try:
            fault_point("write")
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise ConvertError(f"cannot write: {exc.strerror}", file=path) from None


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[tqdm]:
    """Decimal units throughout (kB, MB, GB and MB/s: powers of 1000, as --max-shard-size 5GB and the published
    shard sizes); tqdm leaves the unit off the counts, so the format puts the B after them."""
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]",
        file=sys.stderr,
        disable=not enabled,
        desc="converting",
        dynamic_ncols=True,
    )
    try:
        yield bar
    finally:
        bar.close()


def execute(plan: Plan, destination: Path, journal: Journal, *, progress: bool) -> Digests:
    """Write every planned file into destination, skipping those the journal holds as finished; the last one
    only once all others are durable. The source is checked for changes after every file.

    With --hash-input a thread reads each source file front to back and hashes it while the conversion runs. The
    conversion reads tensors in output order, which is not the source's, so the two reads share the page cache
    rather than being one read: single-pass hashing of both sides would need the whole model in memory."""
    digests = Digests()
    options = plan.options
    hasher = Worker("input-hasher") if options.hash_input else None
    if hasher is not None:

        def hash_inputs() -> dict[str, str]:
            hashes = {}
            for path in plan.source.input_files:
                try:
                    fault_point("input-hash")
                except OSError as exc:
                    raise ConvertError(f"cannot read: {exc.strerror}", file=path) from None
                hashes[path.name] = file_digest(path, "sha256")
            return hashes

        digests.input_sha256 = hasher.submit(hash_inputs).result
    identity = source_identity(plan.source)

    def source_unchanged() -> None:
        for was, now in zip(identity, source_identity(plan.source), strict=True):
            if was != now:
                raise ConvertError(
                    "changed during the conversion (size or modification time); the output file being written is "
                    "left .partial",
                    file=plan.source.folder / was["name"],
                )

    *body, marker = plan.files
    # Every source record's CRC-32 is checked before the output can look complete: before the marker, and
    # before the last file holding tensors is renamed into place (where the weights are what a loader opens, that
    # file is complete on its own).
    last_weights = max((n for n, f in enumerate(plan.files) if f.pieces), default=None)
    crc_checked = False

    def records_intact() -> None:
        nonlocal crc_checked
        if not crc_checked:
            digests.source_crc.finish(plan.source.records.values())
            crc_checked = True

    def before_last_weights() -> None:
        source_unchanged()
        records_intact()

    def recorder(output: OutputFile) -> Callable[[], None]:
        def record() -> None:
            tensors = {p.tensor: digests.tensor_digest[p.tensor] for p in output.pieces if options.checksums}
            journal.record(output.name, digests.file_sha256.get(output.name), tensors)

        return record

    remaining = sum(f.size for f in plan.files if f.name not in journal.finished)
    with progress_bar(remaining, progress) as bar:
        writer = _Writer(destination, bar, digests, strict=options.strict, checksums=options.checksums)
        try:
            for number, output in enumerate([*body, marker]):
                # Only weights stream while the file before them commits: every other file is made from digests
                # the commits store (index, manifest, SHA256SUMS), and the marker goes once all others are durable.
                if not output.pieces:
                    writer.wait_committed()
                if output is marker:
                    records_intact()
                    fsync_folder(destination)
                finished = journal.finished.get(output.name)
                if finished is not None:
                    if finished.sha256 is not None:
                        digests.file_sha256[output.name] = finished.sha256
                    digests.tensor_digest.update(finished.tensors)
                    continue
                check = before_last_weights if number == last_weights else source_unchanged
                writer.write(output, check, recorder(output), completes=output is marker)
            writer.wait_committed()
            fsync_folder(destination)
        finally:
            writer.close()
            if hasher is not None:
                hasher.close()
    return digests
