"""Positional reads from a source: one file, or split parts read as one byte stream.

No mapping at all: the kernel refuses a private mapping of a 93 GB file on a 24 GiB machine, and positional
reads keep resident memory to the buffers the caller owns (the page cache is not ours). Bulk reads can bypass
the page cache (read_direct, see convert/fileio/direct_io.py); small reads (headers, pickles) go through it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import mmap
import os
import re
import threading
from bisect import bisect_right
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from convert.common.errors import ConvertError
from convert.fileio.direct_io import ALIGN, O_DIRECT, aligned_buffer, read_aligned
from convert.fileio.faults import fault_point, stall_point
from convert.fileio.regular import open_regular
from convert.fileio.residency import is_cached
from convert.fileio.workers import Worker


class ByteStream:
    """Read-only positional access to the bytes of one file or of several parts laid end to end."""

    def __init__(self, paths: list[Path]) -> None:
        if not paths:
            raise ValueError("a byte stream needs at least one file")
        self.paths = paths
        self.label = str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} parts)"
        self._fds: list[int] = []
        try:  # regular files only: a FIFO or /dev/zero among the parts would block or never end
            for path in paths:
                self._fds.append(open_regular(path))
        except BaseException:
            for fd in self._fds:
                os.close(fd)
            raise
        # O_DIRECT twins, opened on first use; reads may run on several threads at once, hence the lock. A twin
        # the file system turns out to refuse is retired, not closed, so no other read can hit a reused fd.
        self._direct_fds: list[int | None] = [None] * len(paths)
        self._direct_tried = [False] * len(paths)
        self._retired: list[int] = []
        self._direct_lock = threading.Lock()
        sizes = [os.fstat(fd).st_size for fd in self._fds]
        self._starts = [0]
        for size in sizes:
            self._starts.append(self._starts[-1] + size)
        self.size = self._starts[-1]

    def close(self) -> None:
        for fd in [*self._fds, *self._direct_fds, *self._retired]:
            if fd is not None:
                os.close(fd)
        self._fds, self._direct_fds, self._retired = [], [], []

    def _check_range(self, offset: int, size: int) -> None:
        if offset < 0 or offset + size > self.size:
            raise ConvertError(
                f"needs bytes {offset}..{offset + size} but the file has {self.size} (truncated download?)",
                file=self.label,
            )

    def _direct_fd(self, part: int) -> int | None:
        with self._direct_lock:
            if not self._direct_tried[part] and O_DIRECT:
                self._direct_tried[part] = True
                # A file already in the page cache is read from there (convert/fileio/residency.py), not from the disk.
                if not is_cached(self._fds[part]):
                    with contextlib.suppress(OSError):  # else this file system reads through the page cache only
                        self._direct_fds[part] = os.open(self.paths[part], os.O_RDONLY | O_DIRECT)
            return self._direct_fds[part]

    def reads_directly(self, part: int = 0) -> bool:
        """Whether bulk reads of this part bypass the page cache (decided at the first one)."""
        return self._direct_fd(part) is not None

    def read_direct(self, buffer: mmap.mmap, offset: int, size: int) -> memoryview | None:
        """The bytes at offset, read around the page cache into buffer (page-aligned, size + 8 KiB or more);
        None where that is not possible (a range across two split parts, a file system without O_DIRECT):
        the caller then uses readinto."""
        self._check_range(offset, size)
        part = bisect_right(self._starts, offset) - 1
        local = offset - self._starts[part]
        fd = self._direct_fd(part)
        if fd is None or offset + size > self._starts[part + 1]:
            return None
        try:
            view, got = read_aligned(fd, buffer, local, size)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise ConvertError(f"cannot read: {exc.strerror}", file=self.paths[part]) from None
            with self._direct_lock:  # the open was accepted, the I/O is not: page cache from here on
                if self._direct_fds[part] == fd:
                    self._direct_fds[part] = None
                    self._retired.append(fd)
            return None
        if got < size:
            raise ConvertError(f"unexpected end of file at byte {local + max(got, 0)}", file=self.paths[part])
        return view[:size]

    def readinto(self, buffer: memoryview | bytearray, offset: int) -> None:
        """Fill buffer with the bytes at offset; a stream that ends early is a truncated file."""
        view = memoryview(buffer).cast("B")
        self._check_range(offset, len(view))
        done = 0
        while done < len(view):
            part = bisect_right(self._starts, offset + done) - 1
            local = offset + done - self._starts[part]
            want = min(len(view) - done, self._starts[part + 1] - (offset + done))
            try:
                got = os.preadv(self._fds[part], [view[done : done + want]], local)
            except OSError as exc:
                raise ConvertError(f"cannot read: {exc.strerror}", file=self.paths[part]) from None
            if got <= 0:
                raise ConvertError(f"unexpected end of file at byte {local}", file=self.paths[part])
            done += got

    def read_bulk(self, buffer: mmap.mmap, offset: int, size: int) -> memoryview:
        """The bytes at offset, in buffer (page-aligned, size + 8 KiB or more): around the page cache where
        possible, through it otherwise."""
        try:
            fault_point("source-read")
        except OSError as exc:
            raise ConvertError(f"cannot read: {exc.strerror}", file=self.label) from None
        direct = self.read_direct(buffer, offset, size)
        if direct is not None:
            return direct
        view = memoryview(buffer)[:size]
        self.readinto(view, offset)
        return view

    def chunks(self, size: int) -> Iterator[memoryview]:
        """The whole stream front to back in size pieces; a thread reads the next one while the caller uses
        this one (direct reads have no kernel readahead to overlap them). A piece is valid until the next."""
        stall_point(self.paths[0].name)
        buffers = [aligned_buffer(size + 2 * ALIGN) for _ in range(2)]
        starts = range(0, self.size, size)

        def read(index: int) -> memoryview:
            return self.read_bulk(buffers[index % 2], starts[index], min(size, self.size - starts[index]))

        reader = Worker("read-ahead", depth=1)
        try:
            pending = reader.submit(partial(read, 0)) if starts else None
            for index in range(len(starts)):
                assert pending is not None
                piece = pending.result()
                pending = reader.submit(partial(read, index + 1)) if index + 1 < len(starts) else None
                yield piece
        finally:
            reader.close()

    def read(self, size: int, offset: int) -> bytes:
        buffer = bytearray(size)
        self.readinto(buffer, offset)
        return bytes(buffer)


class StreamFile(io.RawIOBase):
    """A seekable read-only file object over a ByteStream, for zipfile's central directory parsing."""

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._stream.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        size = max(0, min(len(buffer), self._stream.size - self._pos))
        if size:
            self._stream.readinto(memoryview(buffer)[:size], self._pos)
            self._pos += size
        return size


_SPLIT_SUFFIX = re.compile(r"-split(\d+)$")


def split_parts(folder: Path, stem: str) -> list[Path]:
    """The parts stem-split0 ... stem-splitN in NUMERIC order (split10 after split9); a gap is an error."""
    numbered: dict[int, Path] = {}
    for path in folder.glob(f"{stem}-split*"):
        match = _SPLIT_SUFFIX.search(path.name)
        if match is None or path.name != f"{stem}-split{match.group(1)}":
            continue
        number = int(match.group(1))
        if number in numbered:
            raise ConvertError(f"{numbered[number].name} and {path.name} both claim part {number}", file=folder)
        numbered[number] = path
    if not numbered:
        return []
    missing = sorted(set(range(max(numbered) + 1)) - set(numbered))
    if missing:
        raise ConvertError(
            f"split parts have a gap: {stem}-split{missing[0]} is missing "
            f"(found {len(numbered)} parts up to -split{max(numbered)})",
            file=folder,
        )
    return [numbered[i] for i in sorted(numbered)]
