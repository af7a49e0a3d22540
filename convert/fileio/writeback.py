"""Start writing an output's pages to disk as soon as they are complete, instead of when fsync asks.

Left alone, Linux keeps written pages dirty until a tenth of memory is dirty or 30 s pass: the disk idles at
the start of a run and fsync at the end waits for gigabytes. sync_file_range(SYNC_FILE_RANGE_WRITE) queues a
range for writeback and returns at once, so the disk writes while the converter reads, transforms and hashes.
Durability still comes from fsync; this only moves the work earlier. Where the call does not exist (not Linux,
no libc symbol), nothing is done and fsync does it all.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

# Enough to keep the disk's queue full, small enough that a finished stretch goes out while the next is made.
STRETCH = 32 * 2**20
_SYNC_FILE_RANGE_WRITE = 2


def _load() -> Callable[[int, int, int], None] | None:
    if not sys.platform.startswith("linux"):  # sync_file_range is Linux's own
        return None
    try:
        # The C library the interpreter already runs on (dlopen of the program itself): ctypes.util.find_library
        # would run `ldconfig -p` in a subprocess, 20-60 ms of every conversion's start-up on a cold cache.
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int

    def start(fd: int, offset: int, length: int) -> None:
        # A refusal (e.g. a file system without it) only loses the head start; fsync reports real errors.
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    return start


_START = _load()


class EarlyWriteback:
    """Tracks how far a file has been written front to back and hands each finished STRETCH to the kernel."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queued = 0

    def written_up_to(self, end: int) -> None:
        if _START is not None and end - self._queued >= STRETCH:
            _START(self._fd, self._queued, end - self._queued)
            self._queued = end
