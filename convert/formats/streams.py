"""Positional reads from a source: one file, or split parts read as one byte stream.

No mapping at all: the kernel refuses a private mapping of a 93 GB file on a 24 GiB machine, and positional
reads keep resident memory to the buffers the caller owns (the page cache is not ours).
"""

from __future__ import annotations

import io
import os
import re
from bisect import bisect_right
from pathlib import Path

from convert.errors import ConvertError


class ByteStream:
    """Read-only positional access to the bytes of one file or of several parts laid end to end."""

    def __init__(self, paths: list[Path]) -> None:
        if not paths:
            raise ValueError("a byte stream needs at least one file")
        self.paths = paths
        self.label = str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} parts)"
        self._fds = [os.open(p, os.O_RDONLY) for p in paths]
        sizes = [os.fstat(fd).st_size for fd in self._fds]
        self._starts = [0]
        for size in sizes:
            self._starts.append(self._starts[-1] + size)
        self.size = self._starts[-1]

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def readinto(self, buffer: memoryview | bytearray, offset: int) -> None:
        """Fill buffer with the bytes at offset; a stream that ends early is a truncated file."""
        view = memoryview(buffer).cast("B")
        if offset < 0 or offset + len(view) > self.size:
            raise ConvertError(
                f"needs bytes {offset}..{offset + len(view)} but the file has {self.size} (truncated download?)",
                file=self.label,
            )
        done = 0
        while done < len(view):
            part = bisect_right(self._starts, offset + done) - 1
            local = offset + done - self._starts[part]
            want = min(len(view) - done, self._starts[part + 1] - (offset + done))
            got = os.preadv(self._fds[part], [view[done : done + want]], local)
            if got <= 0:
                raise ConvertError(f"unexpected end of file at byte {local}", file=self.paths[part])
            done += got

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
