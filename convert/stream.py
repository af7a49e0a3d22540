"""Executing a plan: each output file is written under a temporary name, strictly front to back, fsynced and
renamed; the plan's last file (the index, or params.json) goes last, so an interrupted run never leaves a folder
that looks complete.

Threads overlap the work: a reader turns the file's parts (known bytes, source pieces read and transformed,
deferred bytes) into chunks in file order; the main thread writes them; two hashers compute each file's and each
tensor's SHA-256 (and check floats for NaN/Inf) from the same chunks, so nothing is read twice. Large files
bypass the page cache both ways (convert/direct_io.py): the reader reads into the pool's aligned buffers and a
disk-writer thread writes aligned staging blocks. Chunks come from a fixed pool and queues are short, so memory
is bounded by scheduling: a few chunks in flight, and at most one transformed piece (a q/k matrix, a transposed
expert block).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from convert.digests import Digests
from convert.direct_io import ALIGN, StagedWriter, aligned_buffer, open_direct
from convert.dtypes import word_dtype
from convert.errors import ConvertError
from convert.finite import FiniteCheck
from convert.formats.streams import ByteStream
from convert.integrity import file_digest
from convert.outputs import OutputFile, Piece
from convert.plan import Plan
from convert.resume import Journal
from convert.source import source_identity
from convert.transforms import run_steps
from convert.workers import CHUNK, QUEUE_DEPTH, BufferPool, Lease, Stopped, Worker
from convert.writeback import EarlyWriteback

log = logging.getLogger("mixtral-convert")

DIRECT_MIN = 64 * 2**20  # smaller files (metadata, tiny models) are not worth the staging
PARTIAL_SUFFIX = ".partial"
# Fault injection for the resume tests: stall for good after the first chunk of the named file, so that a test
# can kill the process at a chosen point. Read where it acts; nothing else looks at it.
STALL_AT_ENV = "MIXTRAL_CONVERT_STALL_AT"


def partial_name(name: str) -> str:
    return f"{name}{PARTIAL_SUFFIX}"


Chunk = tuple[int, memoryview, str | None, Lease | None]  # offset in the file, bytes, their tensor, their lease
# Reads in flight at once: direct reads have no kernel readahead, and one at a time left the disk idle while the
# reader computed a zip's CRC-32.
READ_AHEAD = 2
# Every queue full, plus the reads in flight, one being written and one spare.
POOL_BUFFERS = 3 * QUEUE_DEPTH + READ_AHEAD + 2


def piece_chunks(
    piece: Piece,
    digests: Digests,
    *,
    crc: bool,
    pool: BufferPool | None = None,
    stop: threading.Event | None = None,
    reads: Executor | None = None,
) -> Iterator[Chunk]:
    """A piece's bytes as chunks; a pure rename is copied in CHUNK slices without building a tensor.
    crc: accumulate the tensor's CRC-32 (a zip needs it); pool, stop and reads: read into the pool's buffers,
    READ_AHEAD chunks at once on the reads executor (else one fresh buffer after another)."""
    running = digests.tensor_crc32.get(piece.tensor, 0)
    if piece.steps:
        buffer = aligned_buffer(piece.nbytes + 2 * ALIGN)
        data = piece.record.stream.read_bulk(buffer, piece.src_offset, piece.nbytes)
        digests.source_crc.update(piece.record, piece.src_offset, data)
        tensor = np.frombuffer(data, dtype=word_dtype(piece.record.dtype)).reshape(piece.shape)
        result = np.ascontiguousarray(run_steps(tensor, piece.steps, piece.tensor))
        del data, tensor, buffer  # only the transformed copy stays in flight
        view = memoryview(result.reshape(-1).view(np.uint8))
        if crc:
            digests.tensor_crc32[piece.tensor] = zlib.crc32(view, running)
        for start in range(0, piece.nbytes, CHUNK):
            yield piece.dst_offset + start, view[start : start + CHUNK], piece.tensor, None
        return
    if pool is None or stop is None or reads is None:
        for start in range(0, piece.nbytes, CHUNK):
            chunk = memoryview(bytearray(min(CHUNK, piece.nbytes - start)))
            piece.record.stream.readinto(chunk, piece.src_offset + start)
            digests.source_crc.update(piece.record, piece.src_offset + start, chunk)
            if crc:
                running = zlib.crc32(chunk, running)
                digests.tensor_crc32[piece.tensor] = running
            yield piece.dst_offset + start, chunk, piece.tensor, None
        return
    pending: deque[tuple[int, Lease, Future[memoryview]]] = deque()

    def arrived() -> Chunk:
        nonlocal running
        start, lease, future = pending.popleft()
        chunk = future.result()
        digests.source_crc.update(piece.record, piece.src_offset + start, chunk)
        if crc:  # in file order, while the next reads are under way
            running = zlib.crc32(chunk, running)
            digests.tensor_crc32[piece.tensor] = running
        return piece.dst_offset + start, chunk, piece.tensor, lease

    for start in range(0, piece.nbytes, CHUNK):
        size = min(CHUNK, piece.nbytes - start)
        lease = Lease(pool, pool.take(stop), 3)  # the writer, the file hasher, the tensor hasher
        read = reads.submit(piece.record.stream.read_bulk, lease.buffer, piece.src_offset + start, size)
        pending.append((start, lease, read))
        if len(pending) == READ_AHEAD:
            yield arrived()
    while pending:
        yield arrived()


def _file_chunks(
    output: OutputFile, digests: Digests, pool: BufferPool, stop: threading.Event, reads: Executor
) -> Iterator[Chunk]:
    """Everything of one output file in offset order. Deferred bytes are made when reached, once the tensors
    before them have been read (the reader computes the CRCs a zip needs as it goes)."""
    items: list[tuple[int, object]] = [*output.blobs, *output.deferred, *((p.dst_offset, p) for p in output.pieces)]
    crc = bool(output.deferred) and bool(output.pieces)
    for offset, item in sorted(items, key=lambda entry: entry[0]):
        if isinstance(item, Piece):
            yield from piece_chunks(item, digests, crc=crc, pool=pool, stop=stop, reads=reads)
        elif isinstance(item, bytes):
            yield offset, memoryview(item), None, None
        else:
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
    """Runs _file_chunks in its own thread, a few chunks ahead of the writer."""

    _DONE = object()

    def __init__(self, output: OutputFile, digests: Digests, pool: BufferPool) -> None:
        self._queue: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(output, digests, pool), name="reader", daemon=True)
        self._thread.start()

    def _run(self, output: OutputFile, digests: Digests, pool: BufferPool) -> None:
        try:
            with ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="read") as reads:
                for chunk in _file_chunks(output, digests, pool, self._stop, reads):
                    self._put(chunk)
            self._queue.put(self._DONE)
        except Stopped:
            return
        except BaseException as exc:
            self._queue.put(exc)

    def _put(self, chunk: Chunk) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(chunk, timeout=0.1)
                return
            except queue.Full:
                continue
        raise Stopped

    def __iter__(self) -> Iterator[Chunk]:
        while (item := self._queue.get()) is not self._DONE:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


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
        self.finite_check = FiniteCheck()  # runs in the tensor hasher's thread
        self.pool = BufferPool(POOL_BUFFERS)

    def close(self) -> None:
        self.file_hasher.close()
        self.tensor_hasher.close()

    def write(self, output: OutputFile, before_commit: Callable[[], None]) -> None:
        """Write output as NAME.partial and rename it into place, unless before_commit raises."""
        temporary = self.destination / partial_name(output.name)
        file_hash = hashlib.sha256()
        tensor_hashes: dict[str, hashlib._Hash] = {}
        dtypes = {p.tensor: p.record.dtype for p in output.pieces}
        non_finite: set[str] = set()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        if output.size >= DIRECT_MIN:
            fd, direct = open_direct(temporary, flags)
        else:
            fd, direct = os.open(temporary, flags, 0o644), False
        staged = StagedWriter(fd, temporary) if direct else None
        reader = _Reader(output, self.digests, self.pool)
        writeback = EarlyWriteback(fd)  # for the page-cache path
        try:
            position = 0
            for offset, data, tensor, lease in reader:
                if offset != position:
                    raise ConvertError(f"internal: plan has a gap or overlap at byte {position}", file=temporary)
                if staged is not None:
                    staged.write(data)
                else:
                    _pwrite_all(fd, data, offset, temporary)
                    writeback.written_up_to(offset + len(data))
                if offset == 0 and os.environ.get(STALL_AT_ENV) == output.name:
                    _stall()
                self.file_hasher.submit(partial(_hash_and_release, file_hash if self.checksums else None, data, lease))
                if tensor is not None:
                    digest = tensor_hashes.setdefault(tensor, hashlib.sha256()) if self.checksums else None
                    check = partial(self.finite_check, data, dtypes[tensor], tensor, non_finite)
                    self.tensor_hasher.submit(partial(_hash_and_release, digest, data, lease, check))
                elif lease is not None:
                    lease.release()
                if lease is not None:
                    lease.release()
                position += len(data)
                self.progress.update(len(data))
            if position != output.size:
                raise ConvertError(f"wrote {position} bytes but the plan says {output.size}", file=temporary)
            if staged is not None:
                staged.finish(output.size)
            self.file_hasher.join()
            self.tensor_hasher.join()
            os.fsync(fd)
        finally:
            reader.stop()
            if staged is not None:
                staged.close()
            os.close(fd)
        if self.checksums:
            self.digests.file_sha256[output.name] = file_hash.hexdigest()
            for tensor, digest in tensor_hashes.items():
                self.digests.tensor_sha256[tensor] = digest.hexdigest()
        sources = {p.tensor: p.record for p in output.pieces}  # messages name the source's file and tensor
        for tensor in sorted(non_finite):
            record = sources[tensor]
            if self.strict:
                raise ConvertError("has NaN or Inf values (--strict)", file=record.stream.label, tensor=record.name)
            log.warning("%s: tensor %s has NaN or Inf values; converted as they are", record.stream.label, record.name)
        before_commit()
        os.replace(temporary, self.destination / output.name)


def _hash_and_release(
    digest: hashlib._Hash | None, data: memoryview, lease: Lease | None, check: Callable[[], None] | None = None
) -> None:
    if digest is not None:
        digest.update(data)
    if check is not None:
        check()
    if lease is not None:
        lease.release()


def _stall() -> None:
    while True:
        time.sleep(60)


def _pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    view = data.cast("B")
    done = 0
    while done < len(view):
        try:
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
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
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
    hasher = ThreadPoolExecutor(1, thread_name_prefix="input-hasher") if options.hash_input else None
    if hasher is not None:
        future = hasher.submit(lambda: {p.name: file_digest(p, "sha256") for p in plan.source.input_files})
        digests.input_sha256 = future.result
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
    remaining = sum(f.size for f in plan.files if f.name not in journal.finished)
    with progress_bar(remaining, progress) as bar:
        writer = _Writer(destination, bar, digests, strict=options.strict, checksums=options.checksums)
        try:
            for output in [*body, marker]:
                if output is marker:  # every source record's CRC-32 checked before the output looks complete
                    digests.source_crc.finish(plan.source.records.values())
                    fsync_folder(destination)
                finished = journal.finished.get(output.name)
                if finished is not None:
                    if finished.sha256 is not None:
                        digests.file_sha256[output.name] = finished.sha256
                    digests.tensor_sha256.update(finished.tensors)
                    continue
                writer.write(output, before_commit=source_unchanged)
                tensors = {p.tensor: digests.tensor_sha256[p.tensor] for p in output.pieces if options.checksums}
                journal.record(output.name, digests.file_sha256.get(output.name), tensors)
            fsync_folder(destination)
        finally:
            writer.close()
            if hasher is not None:
                hasher.shutdown(cancel_futures=True)
    return digests
