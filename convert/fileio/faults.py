"""Test-only fault injection, driven by environment variables and inert without them.

MIXTRAL_CONVERT_FAULT=SITE:N:KIND makes the Nth pass through the call site SITE (counted from 1, over all
threads) raise an exception of KIND, so that tests can fail every thread and every I/O call of a real process
once and check how the whole run stops. The moment of the failure (time.time()) is written to the file named by
MIXTRAL_CONVERT_FAULT_LOG, so a test can measure the time from failure to exit.

MIXTRAL_CONVERT_STALL_AT=FILE stalls for good after the writer's first chunk of output FILE (the files before it
in place: the writer waits for their commits first, so a kill there finds them done), or before a whole-file
read of FILE (verify, hashing); =commit:FILE stalls the committer before it syncs output FILE. A test can then kill
or signal the process at a known point; the stall still ends when the run stops.
"""

from __future__ import annotations

import errno
import os
import threading
import time

from convert.common.errors import ConvertError
from convert.fileio.workers import POLL, run_stop

FAULT_ENV = "MIXTRAL_CONVERT_FAULT"
FAULT_LOG_ENV = "MIXTRAL_CONVERT_FAULT_LOG"
STALL_AT_ENV = "MIXTRAL_CONVERT_STALL_AT"

# Every call site that can be made to fail, with the thread it runs in. The tests iterate over this.
SITES = {
    "source-read": "the reads in flight, or the reader",
    "transform": "the reader (a q/k permutation or transpose)",
    "crc": "the reader (a zip's CRC-32 of what it read)",
    "deferred": "the reader (bytes made from digests: zip directory, manifest, SHA256SUMS)",
    "write": "the main thread (a write through the page cache: files under 64 MiB)",
    "disk-write": "the disk writer (an O_DIRECT block)",
    "file-hash": "the file hasher",
    "tensor-hash": "the tensor hasher",
    "finite": "the tensor hasher (the NaN/Inf check)",
    "fsync": "the committer (a finished file)",
    "rename": "the committer (NAME.partial to NAME)",
    "journal": "the committer (the resume journal), or the main thread (starting it)",
    "input-hash": "the input hasher (--hash-input)",
}


def _exception(kind: str, site: str) -> BaseException:
    if kind == "OSError":
        return OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected at {site})")
    if kind == "ConvertError":
        return ConvertError(f"injected failure at {site}")
    if kind == "RuntimeError":
        return RuntimeError(f"injected bug at {site}")
    if kind == "MemoryError":
        return MemoryError(f"injected at {site}")
    raise ValueError(f"{FAULT_ENV}: unknown exception kind {kind!r}")


def _parse(spec: str | None) -> tuple[str, int, str] | None:
    if not spec:
        return None
    site, count, kind = spec.split(":")
    if site not in SITES:
        raise ValueError(f"{FAULT_ENV}: unknown site {site!r}")
    _exception(kind, site)  # a typo fails at once, not never
    return site, int(count), kind


_PLAN = _parse(os.environ.get(FAULT_ENV))
_passes = 0
_lock = threading.Lock()


def fault_point(site: str) -> None:
    """A place where a test may inject a failure; costs one comparison when no fault is planned."""
    if _PLAN is None or _PLAN[0] != site:
        return
    global _passes
    with _lock:
        _passes += 1
        due = _passes == _PLAN[1]
    if due:
        log = os.environ.get(FAULT_LOG_ENV)
        if log:
            with open(log, "w") as handle:
                handle.write(f"{time.time()!r}\n")
        raise _exception(_PLAN[2], site)


def stalls_at(name: str) -> bool:
    """Whether a test asked for a stall at this name."""
    return os.environ.get(STALL_AT_ENV) == name


def stall_point(name: str) -> None:
    """Stall here for good if a test asked for it at this file; a failure or signal still ends the stall."""
    if not stalls_at(name):
        return
    stop = run_stop()
    while True:
        stop.check()
        time.sleep(POLL)
