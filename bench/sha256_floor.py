"""The SHA-256 floor: the least time any check of a folder's SHA256SUMS can take on this machine.

    python bench/sha256_floor.py FILE... [--lanes N] [--block MIB]

Reads every FILE front to back with O_DIRECT, as bench/disk_limit.py --read-only does, and computes its SHA-256
with hashlib (OpenSSL, SHA-NI where the CPU has it), printing `sha256  name` lines as sha256sum does. One file's
SHA-256 is a single sequential computation, so a file can never be checked faster than one core hashes it; LANES
files (default: one per core) are hashed at once, the largest first onto the least loaded lane, and each lane
reads its next block while it hashes the one before. Nothing else is computed: no manifest digests, no parsing.

verify does this and more (the manifest's per-tensor digests, the structure), so this is a floor under verify, not
a contender to beat. Where it takes longer than the O_DIRECT read of the same folder, the read is not a limit a
sha256sum-compatible verify can reach on this machine (bench/profiles.md). Kept free of the converter's code, as
disk_limit.py is: the floor must not depend on the revision being measured.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import mmap
import os
import queue
import sys
import threading
from pathlib import Path

BLOCK_MIB = 64
O_DIRECT = getattr(os, "O_DIRECT", 0)


def _buffer(block: int) -> mmap.mmap:
    """Private anonymous memory in transparent huge pages (see disk_limit.py: whole 4 MiB requests)."""
    buffer = mmap.mmap(-1, block, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


def hash_lane(files: list[Path], block: int, digests: dict[Path, str]) -> None:
    """Hash files one after the other; a reader thread fills one of two buffers while this thread hashes the other."""
    free: queue.Queue[mmap.mmap] = queue.Queue()
    for _ in range(2):
        free.put(_buffer(block))
    filled: queue.Queue[tuple[mmap.mmap, int] | BaseException | None] = queue.Queue()

    def read() -> None:
        try:
            for path in files:
                try:
                    fd = os.open(path, os.O_RDONLY | O_DIRECT)
                except OSError:  # no O_DIRECT on this file system: through the page cache
                    fd = os.open(path, os.O_RDONLY)
                try:
                    offset = 0
                    while True:
                        buffer = free.get()
                        got = os.preadv(fd, [buffer], offset)
                        filled.put((buffer, got))
                        if got <= 0:
                            break
                        offset += got
                finally:
                    os.close(fd)
        except BaseException as exc:  # handed to the hashing thread, which raises it
            filled.put(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    for path in files:
        sha = hashlib.sha256()
        while True:
            item = filled.get()
            if isinstance(item, BaseException):
                raise item
            buffer, got = item
            if got > 0:
                sha.update(memoryview(buffer)[:got])
            free.put(buffer)
            if got <= 0:
                break
        digests[path] = sha.hexdigest()
    reader.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--lanes", type=int, default=os.cpu_count() or 1, help="files hashed at once (default: cores)")
    parser.add_argument("--block", type=int, default=BLOCK_MIB, metavar="MIB", help="request size (default 64)")
    args = parser.parse_args(argv)
    lanes: list[list[Path]] = [[] for _ in range(max(1, min(args.lanes, len(args.files))))]
    loads = [0] * len(lanes)
    sizes = {path: path.stat().st_size for path in args.files}
    for path in sorted(args.files, key=sizes.__getitem__, reverse=True):
        lane = loads.index(min(loads))
        lanes[lane].append(path)
        loads[lane] += sizes[path]
    digests: dict[Path, str] = {}
    failures: list[BaseException] = []

    def guarded(files: list[Path]) -> None:
        try:
            hash_lane(files, args.block * 2**20, digests)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=guarded, args=(files,)) for files in lanes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        print(f"sha256_floor.py: {failures[0]!r}", file=sys.stderr)
        return 1
    for path in args.files:
        print(f"{digests[path]}  {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
