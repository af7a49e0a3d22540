"""Large files are read and written with O_DIRECT: the disk moves bytes to and from our own reused buffers.

Through the page cache, every byte is copied into freshly allocated cache pages, and on this machine (a VM whose
host reclaims free guest memory) that copy ran at about 0.7-1.2 GB/s and took more CPU than both SHA-256 passes:
`cp` of a 6.3 GB file spent 7-17 s in the kernel, `dd iflag=direct oflag=direct` 0.6 s. Direct I/O needs the
buffer address, the file offset and the length aligned to the device's block; ALIGN (4 KiB) covers the usual
512 B and 4 KiB blocks. Reads fetch the aligned range around what is wanted; writes go through staging blocks
filled in file order, and the unaligned tail is written padded and then cut back with ftruncate.

Where a file system refuses O_DIRECT (at open, or EINVAL on the first aligned call), the same calls run through
the page cache instead: slower, never wrong.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import queue
from pathlib import Path

from convert.common.errors import ConvertError
from convert.fileio.faults import fault_point
from convert.fileio.workers import run_stop

ALIGN = 4096
STAGE = 8 * 2**20  # the block the writer fills and hands to the disk-writer thread
# Up to BATCH blocks that are waiting go to the disk in one pwritev: this VM's disk ran 8 MiB writes at about
# half the speed of 64 MiB ones (bench/profiles.md), and a batch only forms when the disk is what the run waits for.
BATCH = 4
STAGES = BATCH + 2  # a batch being written, one block filling, one spare
O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux only; 0 elsewhere means "through the page cache"
# Reads in flight at once: direct reads have no kernel readahead, and one at a time left the disk idle while the
# reader computed a zip's CRC-32.
READ_AHEAD = 2
# One source read: this VM's disk read 8 MiB requests at about half the speed of 32-64 MiB ones
# (bench/profiles.md). Each read is handed on in CHUNK slices, so queues and hashers see the same chunks as before.
READ_SIZE = 32 * 2**20


def aligned_buffer(size: int) -> mmap.mmap:
    """Page-aligned anonymous memory (a bytearray has no alignment guarantee), in transparent huge pages where
    the kernel offers them.

    Why huge pages: a direct request is built from the buffer's physical pages, and a disk takes a limited number
    of separate segments per request (this VM's virtio disk: 254, `max_segments`). Scattered 4 KiB pages cap a
    request near 1 MiB, so an 8 MiB write became eight requests or more; 2 MiB pages are one segment each and
    requests reach the disk's own maximum (4 MiB here, `max_sectors_kb`). Measured on 6.3 GB written: 1.6-2.9 MB
    a write request -> 4.0 MB (bench/profiles.md). Private, because a shared anonymous mapping (mmap's default)
    is shmem, which this kernel never backs with huge pages."""
    private = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    buffer = mmap.mmap(-1, _round_up(size), flags=private) if private else mmap.mmap(-1, _round_up(size))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # A kernel without transparent huge pages refuses the advice: 4 KiB pages, smaller requests, same bytes.
        with contextlib.suppress(OSError):
            buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


def _round_up(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def open_direct(path: Path, flags: int, mode: int = 0o644) -> tuple[int, bool]:
    """Open with O_DIRECT where the file system allows it; returns the fd and whether it is direct."""
    if O_DIRECT:
        try:
            return os.open(path, flags | O_DIRECT, mode), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, mode), False


def is_direct(fd: int) -> bool:
    return bool(O_DIRECT) and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)


def drop_direct(fd: int) -> None:
    """Switch an fd back to the page cache (Linux lets F_SETFL clear O_DIRECT)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)


def read_aligned(fd: int, buffer: mmap.mmap, offset: int, size: int) -> tuple[memoryview, int]:
    """Read the aligned range around [offset, offset + size) of a direct fd into buffer (at least
    size + 2 * ALIGN long); returns that range's view and how many bytes of it the file had (short at EOF)."""
    begin = offset - offset % ALIGN
    view = memoryview(buffer)[: _round_up(offset + size) - begin]
    done = 0
    while begin + done < offset + size:
        got = os.preadv(fd, [view[done:]], begin + done)
        if got <= 0:
            break
        done += got
    return view[offset - begin :], done - (offset - begin)


class StagedWriter:
    """Writes one file front to back through aligned staging blocks; a thread writes a block while the next is
    filled. Any failure of the writing thread (a ConvertError for an I/O error, anything else as it is) is the
    run's failure: write() and finish() then raise Stopped, and finish() never cuts a file to size whose blocks
    were not all written."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd, self._path = fd, path
        self._stop = run_stop()
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(STAGES):
            self._free.put(aligned_buffer(STAGE))
        self._pending: queue.Queue[tuple[mmap.mmap, int, int] | None] = queue.Queue()
        self._written = 0  # bytes the thread has written, in order; read by finish() once it has ended
        self._stage, self._fill, self._base = self._stop.get(self._free), 0, 0
        self._thread = self._stop.spawn(self._run, "disk-writer")

    def write(self, data: memoryview) -> None:
        # Imported here, not at the top: verify reads through this module and, without numpy to import, starts
        # hashing sooner (its start-up is what it loses to a bare SHA-256 of a small folder).
        import numpy as np

        view = np.frombuffer(data.cast("B"), dtype=np.uint8)
        while len(view):
            size = min(len(view), STAGE - self._fill)
            # numpy copies without the GIL; an mmap slice assignment holds it for the whole 8 MiB memcpy, and every
            # other thread of the run (hashers, reads, the disk writer) then waits to run its next line.
            np.copyto(np.frombuffer(self._stage, dtype=np.uint8)[self._fill : self._fill + size], view[:size])
            self._fill += size
            view = view[size:]
            if self._fill == STAGE:
                self._submit(STAGE)

    def finish(self, size: int) -> None:
        """Write the tail (padded to ALIGN), wait for every block, and cut the file to size."""
        written = self._base + self._fill
        if written != size:
            raise ConvertError(f"internal: staged {written} bytes but the file has {size}", file=self._path)
        length = _round_up(self._fill)
        self._stage[self._fill : length] = bytes(length - self._fill)
        self._submit(length)
        self.close()
        self._stop.check()
        if self._written != self._base:  # cannot happen while the run is well; never truncate a short file
            raise ConvertError(f"internal: {self._written} of {self._base} staged bytes written", file=self._path)
        os.ftruncate(self._fd, size)

    def close(self) -> None:
        """Stop the writing thread after what is queued (at once after a failure elsewhere)."""
        if self._thread.is_alive():
            self._pending.put(None)
            self._stop.join(self._thread)

    def _submit(self, length: int) -> None:
        self._pending.put((self._stage, self._base, length))
        self._base += length
        self._stage, self._fill = self._stop.get(self._free), 0

    def _run(self) -> None:
        ending = False
        while not ending and (item := self._stop.get(self._pending)) is not None:
            batch = [item]
            while len(batch) < BATCH:  # contiguous by construction: blocks are submitted in file order
                try:
                    more = self._pending.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    ending = True
                    break
                batch.append(more)
            try:
                self._write_blocks([memoryview(stage)[:length] for stage, _, length in batch], batch[0][1])
                self._written = batch[-1][1] + batch[-1][2]
            finally:
                for stage, _, _ in batch:
                    self._free.put(stage)

    def _write_blocks(self, blocks: list[memoryview], offset: int) -> None:
        """blocks, back to back from offset, in as few pwritev calls as the kernel takes."""
        while blocks:
            try:
                fault_point("disk-write")
                done = os.pwritev(self._fd, blocks, offset)
            except OSError as exc:
                if exc.errno == errno.EINVAL and is_direct(self._fd):
                    try:
                        drop_direct(self._fd)  # the file system took the open but not the I/O
                    except OSError as again:
                        raise ConvertError(f"cannot write: {again.strerror}", file=self._path) from None
                    continue
                raise ConvertError(f"cannot write: {exc.strerror}", file=self._path) from None
            offset += done
            while blocks and done >= len(blocks[0]):  # a short write: go on from where it stopped
                done -= len(blocks[0])
                blocks = blocks[1:]
            if blocks and done:
                blocks = [blocks[0][done:], *blocks[1:]]
