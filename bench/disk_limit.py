"""The disk limit: what any converter must at least do, read N bytes and write N bytes, with no copy and no work.

    python bench/disk_limit.py OUT_FOLDER FILE... [--read-only | --coupled [--hash sha256|blake3]...] [--block MIB]

Reads FILE... front to back with O_DIRECT into one reused aligned buffer (to nowhere) and, at the same time on a
second thread, writes as many bytes with O_DIRECT to OUT_FOLDER/disk-limit.bin from another reused buffer, cuts
that file to size and fsyncs it: `dd iflag=direct of=/dev/null` ‖ `dd oflag=direct`, without two processes or
their /dev/zero copy. --read-only: only the read (the limit of `verify`, which only reads the folder).
--coupled (one FILE): a copy, O_DIRECT both ways, each block written only after it has been read, COUPLED_BLOCKS
blocks in memory: what a streaming converter in bounded memory could at best do, with no work at all. The disk
limit's reader never waits for its writer, which no converter can do; this checks that the limit asks nothing a
converter cannot do (on this project's VM the coupled copy ran at 0.92-1.09x the limit, bench/profiles.md).
--hash (with --coupled): the same copy also hashes every block, in file order, on a thread per algorithm (SHA-256
for SHA256SUMS, BLAKE3 for manifest.json's per-tensor digests) and prints each digest: what a converter that
writes those files must at least do besides the I/O.
The bytes written are one random block repeated: the disk does not look at them, and nothing compresses here.

The request size is the one this machine's disk wants, not the converter's: 64 MiB, one request in flight each
way, was the fastest of 8, 16, 32, 64 and 128 MiB with 1 to 4 requests in flight (bench/profiles.md); with 8 MiB
requests (what dd does with bs=8M) the converter beat this "limit", which then measured nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import sys
import threading
from pathlib import Path

BLOCK_MIB = 64
COUPLED_BLOCKS = 4  # 256 MiB in flight, about the converter's own buffers (convert/fileio/direct_io.py)
ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | O_DIRECT, 0o644)
    except OSError:  # a file system without O_DIRECT: through the page cache (the report says what was timed)
        return os.open(path, flags, 0o644)


def _buffer(block: int) -> mmap.mmap:
    """Private anonymous memory in transparent huge pages, as the converter's buffers (convert/fileio/direct_io.py):
    scattered 4 KiB pages a request is cut at the disk's segment limit (about 1 MiB here), which would make this
    reference slower than the disk. Kept here rather than imported: the limit must not depend on the converter
    revision being measured."""
    buffer = mmap.mmap(-1, block, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no huge pages here: the same requests the converter gets
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


def read_all(files: list[Path], block: int) -> None:
    buffer = _buffer(block)
    for path in files:
        fd = _open(path, os.O_RDONLY)
        try:
            offset = 0
            while (got := os.preadv(fd, [buffer], offset)) > 0:
                offset += got
        finally:
            os.close(fd)


def write_all(path: Path, size: int, block: int) -> None:
    buffer = _buffer(block)
    buffer[:] = os.urandom(block)
    fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        padded = -(-size // ALIGN) * ALIGN  # a direct write's length must be aligned; the tail is cut back below
        offset = 0
        while offset < padded:
            offset += os.pwrite(fd, memoryview(buffer)[: min(block, padded - offset)], offset)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def new_hash(name: str) -> object:
    """hashlib's SHA-256 (what SHA256SUMS takes), or BLAKE3 on one thread (what the converter's manifest takes)."""
    if name == "blake3":
        import blake3

        return blake3.blake3(max_threads=1)
    import hashlib

    return hashlib.new(name)


def copy_coupled(source: Path, path: Path, block: int, hashes: tuple[str, ...] = ()) -> None:
    """source to path, O_DIRECT both ways: a reader fills COUPLED_BLOCKS buffers in turn and a writer writes each,
    in order, once it is full; a buffer is read into again only after its write."""
    import queue

    size = source.stat().st_size
    buffers = [_buffer(block) for _ in range(COUPLED_BLOCKS)]
    free: queue.Queue[int] = queue.Queue()
    for index in range(COUPLED_BLOCKS):
        free.put(index)
    full: queue.Queue[tuple[int, int] | None] = queue.Queue()
    failures: list[BaseException] = []
    # --hash: each block is also hashed, in file order, on a thread per algorithm; a buffer is read into again
    # only when its write and every hash of it are done.
    users = [0] * COUPLED_BLOCKS
    users_lock = threading.Lock()

    def done_with(index: int) -> None:
        with users_lock:
            users[index] -= 1
            if users[index] == 0:
                free.put(index)

    hash_queues: list[queue.Queue[tuple[int, int] | None]] = [queue.Queue() for _ in hashes]

    def hash_blocks(state: object, jobs: queue.Queue[tuple[int, int] | None]) -> None:
        # A failed update is the copy's failure; the blocks are still given back, so no thread waits for them.
        while (item := jobs.get()) is not None:
            index, got = item
            try:
                if not failures:
                    state.update(memoryview(buffers[index])[:got])  # type: ignore[attr-defined]
            except BaseException as exc:
                failures.append(exc)
            finally:
                done_with(index)

    states = {name: new_hash(name) for name in hashes}  # here: a hash that cannot load fails before any I/O
    hashers = [
        threading.Thread(target=hash_blocks, args=(states[n], q), daemon=True)
        for n, q in zip(hashes, hash_queues, strict=True)
    ]
    for thread in hashers:
        thread.start()

    def read() -> None:
        fd = _open(source, os.O_RDONLY)
        try:
            offset = 0
            while offset < size and not failures:
                index = free.get()
                got = os.preadv(fd, [buffers[index]], offset)
                if got <= 0:
                    raise OSError(f"{source} ended at {offset} of {size} bytes")
                users[index] = 1 + len(hashes)
                for jobs in hash_queues:
                    jobs.put((index, got))
                full.put((index, got))
                offset += got
        except BaseException as exc:
            failures.append(exc)
        finally:
            os.close(fd)
            full.put(None)

    reader = threading.Thread(target=read)
    reader.start()
    fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        offset = 0
        while (item := full.get()) is not None:
            index, got = item
            padded = -(-got // ALIGN) * ALIGN  # only the last block is short; its tail is cut back below
            done = 0
            while done < padded:
                done += os.pwrite(fd, memoryview(buffers[index])[done:padded], offset + done)
            offset += got
            done_with(index)
        for jobs in hash_queues:
            jobs.put(None)
        for thread in hashers:
            thread.join()
        os.ftruncate(fd, size)
        os.fsync(fd)
    except BaseException as exc:
        failures.append(exc)
        free.put(0)  # a reader waiting for a buffer sees the failure and ends
    finally:
        os.close(fd)
        reader.join()
    if failures:
        raise failures[0]
    for name, state in states.items():
        print(f"{name} {state.hexdigest()}")  # type: ignore[attr-defined]  # checkable: `sha256sum FILE`, `b3sum FILE`


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--coupled", action="store_true", help="copy one FILE, each block written after its read")
    parser.add_argument(
        "--hash",
        action="append",
        default=[],
        choices=("sha256", "blake3"),
        help="with --coupled: also hash every block (in file order, a thread per algorithm; repeatable)",
    )
    parser.add_argument("--block", type=int, default=BLOCK_MIB, metavar="MIB", help="request size (default 64)")
    args = parser.parse_args(argv)
    size = sum(p.stat().st_size for p in args.files)
    failures: list[BaseException] = []

    def guarded(call: object, *call_args: object) -> None:
        try:
            call(*call_args)  # type: ignore[operator]
        except BaseException as exc:
            failures.append(exc)

    block = args.block * 2**20
    if args.coupled:
        if len(args.files) != 1 or args.read_only:
            parser.error("--coupled copies one FILE and writes it")
        try:
            copy_coupled(args.files[0], args.out / "disk-limit.bin", block, tuple(args.hash))
        except BaseException as exc:
            print(f"disk_limit.py: {exc!r}", file=sys.stderr)
            return 1
        return 0
    threads = [threading.Thread(target=guarded, args=(read_all, args.files, block))]
    if not args.read_only:
        threads.append(threading.Thread(target=guarded, args=(write_all, args.out / "disk-limit.bin", size, block)))
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
