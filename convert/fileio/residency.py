"""Is a source file already in the page cache? Then it is read through the cache, not with O_DIRECT.

A user who has just downloaded a checkpoint on a machine with enough RAM has it in memory: an O_DIRECT read
ignores those pages and reads every byte from the disk again, while a buffered read copies them out of memory.

How it is told: mincore(2) on a shared read-only mapping of SAMPLES windows spread evenly over the file. It only
looks at the page tables of the mapping, so it costs microseconds, reads nothing and changes nothing in the
cache (a probe with preadv(RWF_NOWAIT) would start readahead for every page it finds missing, and so change what
it measures). The mapping is a window of WINDOW bytes at a time: a shared mapping of a file is never refused for
its size, but there is no reason to map more than is looked at.

The threshold: a file counts as cached when at least CACHED of the sampled pages are resident. Reading through
the cache pays a memory copy for the resident pages and, for the rest, a buffered disk read into freshly
allocated pages (the slow path convert/fileio/direct_io.py avoids); O_DIRECT pays the disk for all of it. Only a file
that is nearly all in memory is clearly better read through it; a half-cached one is read directly.
"""

from __future__ import annotations

import ctypes
import mmap
import os

SAMPLES = 64
WINDOW = 2**20  # 256 pages of 4 KiB per sample
CACHED = 0.9

_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def cached_fraction(fd: int, size: int) -> float | None:
    """The share of the sampled pages of fd's first size bytes that are in the page cache; None when the kernel
    will not say (no mincore, a file that cannot be mapped)."""
    if size <= 0:
        return 1.0
    windows = max(1, min(SAMPLES, -(-size // WINDOW)))
    step = size // windows
    resident = total = 0
    for number in range(windows):
        offset = (number * step) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        length = min(WINDOW, size - offset)
        if length <= 0:
            continue
        address = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
        if address in (None, _MAP_FAILED):
            return None
        try:
            pages = -(-length // _PAGE)
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(address, length, vector) != 0:
                return None
            resident += sum(byte & 1 for byte in vector)
            total += pages
        finally:
            _libc.munmap(address, length)
    return resident / total if total else 1.0


def is_cached(fd: int) -> bool:
    """Whether fd's file is (nearly) all in the page cache: read it through the cache then."""
    fraction = cached_fraction(fd, os.fstat(fd).st_size)
    return fraction is not None and fraction >= CACHED
