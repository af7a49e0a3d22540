"""The disk limit: what any converter must at least do, read N bytes and write N bytes, with no copy and no work.

    python bench/disk_limit.py OUT_FOLDER FILE... [--read-only]

Reads FILE... front to back with O_DIRECT into one reused aligned buffer (to nowhere) and, at the same time on a
second thread, writes as many bytes with O_DIRECT to OUT_FOLDER/disk-limit.bin from another reused buffer, cuts
that file to size and fsyncs it: `dd iflag=direct of=/dev/null` ‖ `dd oflag=direct`, without two processes or
their /dev/zero copy. --read-only: only the read (the limit of `verify`, which only reads the folder).
The bytes written are one random block repeated: the disk does not look at them, and nothing compresses here.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import threading
from pathlib import Path

BLOCK = 8 * 2**20  # as the converter's chunks and staging blocks
ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | O_DIRECT, 0o644)
    except OSError:  # a file system without O_DIRECT: through the page cache (the report says what was timed)
        return os.open(path, flags, 0o644)


def read_all(files: list[Path]) -> None:
    buffer = mmap.mmap(-1, BLOCK)
    for path in files:
        fd = _open(path, os.O_RDONLY)
        try:
            offset = 0
            while (got := os.preadv(fd, [buffer], offset)) > 0:
                offset += got
        finally:
            os.close(fd)


def write_all(path: Path, size: int) -> None:
    buffer = mmap.mmap(-1, BLOCK)
    buffer[:] = os.urandom(BLOCK)
    fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        padded = -(-size // ALIGN) * ALIGN  # a direct write's length must be aligned; the tail is cut back below
        offset = 0
        while offset < padded:
            offset += os.pwrite(fd, memoryview(buffer)[: min(BLOCK, padded - offset)], offset)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--read-only", action="store_true")
    args = parser.parse_args(argv)
    size = sum(p.stat().st_size for p in args.files)
    failures: list[BaseException] = []

    def guarded(call: object, *call_args: object) -> None:
        try:
            call(*call_args)  # type: ignore[operator]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=guarded, args=(read_all, args.files))]
    if not args.read_only:
        threads.append(threading.Thread(target=guarded, args=(write_all, args.out / "disk-limit.bin", size)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        print(f"disk_limit.py: {failures[0]!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
