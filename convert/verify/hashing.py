"""verify's checksum pass at the pace of one O_DIRECT read: each file is read once, front to back, into pooled
aligned buffers by READ_AHEAD read workers, and each chunk is handed to two hashers, one for the file's SHA-256
(SHA256SUMS) and one for the digests of the tensors it overlaps (manifest.json), so the reads never wait for the
hashing: on 2 cores SHA-256 (about 1.3-2 GB/s with SHA-NI) and BLAKE3 each get a core, and the disk is what is
left to wait for.

Where only files' SHA-256 are wanted (sha256_files: every file whose manifest.json records its SHA-256, so that
its tensors' digests need not be recomputed when it matches; convert/verify/folder.py), the two hasher threads
become two lanes, each hashing whole files front to back from its own reads: one file's SHA-256 is sequential, so
a file per core is as fast as a folder's SHA256SUMS can be checked here (bench/sha256_floor.py does the same).

A failure in any of these threads is the run's failure, as it was when verify read and hashed in one thread.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from convert.fileio.direct_io import ALIGN, READ_AHEAD, READ_SIZE, aligned_buffer
from convert.fileio.faults import stall_point
from convert.fileio.streams import ByteStream
from convert.fileio.workers import BufferPool, Lease, Pending, Worker
from convert.integrity.digests import Hasher, new_hasher
from convert.integrity.manifest import TensorEntry

# The reads in flight, each hasher's queue and the call it runs, and the chunk being handed over.
# Reads of READ_SIZE, the size this disk serves fastest: the reads in flight, the one each hasher works on, and
# one for the next take. Hashing a chunk takes less time than reading it, so the hashers' queues stay short.
HASH_BUFFERS = READ_AHEAD + 3

# sha256_files runs LANES lanes: the file hasher's and the tensor hasher's threads, one file per core on this
# 2-core machine. The lane with the most bytes sets the pace: it holds LANE_BUFFERS buffers (the one it hashes,
# two reads in flight on two read workers), the other the rest of the HASH_BUFFERS (one read ahead, on a third
# read worker), so its reads take less of the disk while both lanes read. Each lane keeps to its share, so none
# ever waits for another's buffers (one that could, waited for seconds: the other gives a buffer back and takes
# it again at once).
LANES = 2
LANE_BUFFERS = 3
LANE_READS = READ_AHEAD + 1

FileHashes = tuple[str, dict[str, str]]  # a file's SHA-256, and the digest of each of its ranges by name


def _update(hasher: Hasher, data: memoryview) -> None:
    hasher.update(data)


def _update_ranges(parts: list[tuple[Hasher, memoryview]]) -> None:
    for hasher, part in parts:
        hasher.update(part)


def _digest_oldest(sha: hashlib._Hash, pending: deque[tuple[Lease, Pending[memoryview]]]) -> None:
    """Wait for the oldest read in flight, hash it, give its buffer back."""
    lease, read = pending.popleft()
    try:
        sha.update(read.result())
    finally:
        lease.release()


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
        self._reads = [Worker(f"read-{n}", depth=1) for n in range(max(READ_AHEAD, LANE_READS))]
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

    def sha256_files(self, paths: Sequence[Path]) -> dict[Path, str]:
        """Each file's SHA-256 and nothing else, LANES files at once (the largest first, each onto the lane with
        the fewest bytes so far, as bench/sha256_floor.py), each lane with its own reads in flight."""
        return self.start_sha256_files(paths)()

    def start_sha256_files(self, paths: Sequence[Path]) -> Callable[[], dict[Path, str]]:
        """sha256_files on the hasher threads while the caller does other work; the call returned waits for it.
        Until then the hashers and reads are the lanes': nothing else may be handed to them. A caller that fails
        meanwhile must stop the run (RunStop.fail) before close(), which otherwise waits for the lanes to end."""
        lanes: list[list[Path]] = [[] for _ in range(max(1, min(LANES, len(paths))))]
        loads = [0] * len(lanes)
        sizes = {path: path.stat().st_size for path in paths}
        for path in sorted(paths, key=sizes.__getitem__, reverse=True):
            lane = loads.index(min(loads))
            lanes[lane].append(path)
            loads[lane] += sizes[path]
        lanes.sort(key=lambda files: sum(sizes[p] for p in files), reverse=True)  # the pace-setter first
        plans = [(lanes[0], self._reads[:2], LANE_BUFFERS)]
        if len(lanes) > 1:
            plans.append((lanes[1], self._reads[2:3], HASH_BUFFERS - LANE_BUFFERS))
        hashes: dict[Path, str] = {}
        workers = [self._file_hasher, self._tensor_hasher]
        done = [
            worker.submit(partial(self._sha256_lane, files, reads, share, hashes))
            for worker, (files, reads, share) in zip(workers, plans, strict=False)
        ]

        def finish() -> dict[Path, str]:
            for pending in done:
                pending.result()
            return hashes

        return finish

    def _sha256_lane(self, files: list[Path], reads: list[Worker], share: int, hashes: dict[Path, str]) -> None:
        """On a hasher thread: files one after the other, read READ_SIZE at a time into at most share buffers
        (share - 1 reads ahead of the hashing)."""
        for path in files:
            stall_point(path.name)
            sha = hashlib.sha256()
            stream = ByteStream([path])
            pending: deque[tuple[Lease, Pending[memoryview]]] = deque()
            try:
                for number, start in enumerate(range(0, stream.size, READ_SIZE)):
                    if len(pending) == share:
                        _digest_oldest(sha, pending)
                    lease = Lease(self._pool, self._pool.take(), 1)
                    size = min(READ_SIZE, stream.size - start)
                    try:
                        read = reads[number % len(reads)].submit(partial(stream.read_bulk, lease.buffer, start, size))
                    except BaseException:
                        lease.release_all()
                        raise
                    pending.append((lease, read))
                while pending:
                    _digest_oldest(sha, pending)
            except BaseException:
                for lease, _ in pending:  # cut short by a failure: nobody takes from the pool any more
                    lease.release_all()
                raise  # the stream stays open: a read may still be under way on it, and the run is ending
            stream.close()
            hashes[path] = sha.hexdigest()

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
