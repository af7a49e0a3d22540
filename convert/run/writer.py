"""Executing a plan: each output file is written under a temporary name, strictly front to back, fsynced and
renamed; the plan's last file (the index, or params.json) goes last, so an interrupted run never leaves a folder
that looks complete.

Threads overlap the work: the reader (convert/run/reader.py) turns the file's parts (known bytes, source pieces
read and transformed, deferred bytes) into chunks in file order; the main thread writes them; two hashers compute
each file's and each tensor's digest (and check floats for NaN/Inf) from the same chunks, so nothing is read twice.
Large files bypass the page cache both ways (convert/fileio/direct_io.py): the reader reads READ_SIZE at a time
into the pool's aligned buffers and a disk-writer thread writes aligned staging blocks, several at once when they
queue up.
Buffers come from a fixed pool and queues are short, so memory is bounded by scheduling: a few reads in flight,
and at most one transformed piece (a q/k matrix, in the pool when it fits one read; a transposed expert block).
A committer thread syncs and renames each finished file, in order, while the next weights file streams.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Protocol

from convert.common.errors import ConvertError
from convert.fileio import faults
from convert.fileio.direct_io import ALIGN, READ_AHEAD, READ_SIZE, StagedWriter, aligned_buffer, open_direct
from convert.fileio.faults import fault_point
from convert.fileio.owned import PARTIAL_SUFFIX, no_links
from convert.fileio.workers import BufferPool, Pending, Worker, run_stop
from convert.fileio.writeback import EarlyWriteback
from convert.integrity.digests import TENSOR_DIGEST, Digests, Hasher, load_hasher, new_hasher
from convert.integrity.finite import FiniteCheck
from convert.integrity.manifest import file_digest
from convert.model.outputs import OutputFile
from convert.planning.plan import Plan
from convert.planning.source import source_identity
from convert.run.reader import POOL_BUFFERS, FileReader
from convert.run.resume import Journal

log = logging.getLogger("mixtral-convert")

DIRECT_MIN = 64 * 2**20  # smaller files (metadata, tiny models) are not worth the staging


def partial_name(name: str) -> str:
    return f"{name}{PARTIAL_SUFFIX}"


class _Writer:
    def __init__(
        self, destination: Path, progress: Progress, digests: Digests, *, strict: bool, checksums: bool
    ) -> None:
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
        reader: FileReader | None = None
        handed_over = False
        try:
            staged = StagedWriter(fd, temporary) if direct else None
            reader = FileReader(output, self.digests, self.pool, self.reads)
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


class Progress(Protocol):
    def update(self, n: int, /) -> object: ...


class _NoProgress:
    def update(self, n: int, /) -> None:
        pass


@contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[Progress]:
    """Decimal units throughout (kB, MB, GB and MB/s: powers of 1000, as --max-shard-size 5GB and the published
    shard sizes); tqdm leaves the unit off the counts, so the format puts the B after them. tqdm is imported only
    for a bar that shows: with it comes importlib.metadata (email, csv, socket), 30 ms of a cold start."""
    if not enabled:
        yield _NoProgress()
        return
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]",
        file=sys.stderr,
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
    if options.checksums:
        load_hasher(TENSOR_DIGEST)  # now, while the disk is idle: not by a hasher thread once the stream has begun
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
