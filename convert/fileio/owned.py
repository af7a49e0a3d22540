"""The output folder belongs to one run at a time, and the run writes only through paths it owns there.

A lock file in DST, held with flock for the whole run, keeps a second run out (the kernel drops a dead holder's
lock, so --resume after a crash or SIGKILL still gets it). Every file the run opens in DST is opened with
O_NOFOLLOW, and the names it will write are checked before anything is removed or written: a symbolic link
planted there (a .partial, the journal, an output) would otherwise make the run write wherever it points,
outside DST or into the source.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from convert.common.errors import ConvertError

log = logging.getLogger("mixtral-convert")

LOCK = ".mixtral-convert-lock"
PARTIAL_SUFFIX = ".partial"  # a file being written is NAME.partial until it is whole; verify reports leftovers
LINK_RULE = (
    "is a symbolic link; mixtral-convert never writes through a link in the output folder "
    "(it could point outside it, or into the source): remove the link"
)


def open_owned(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open of a regular file in DST that never follows a symbolic link at path."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConvertError(LINK_RULE, file=path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConvertError("is not a regular file; remove it", file=path)
    return fd


@contextmanager
def no_links(path: Path) -> Iterator[None]:
    """Turns the ELOOP of an O_NOFOLLOW open of path into the one-line error."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConvertError(LINK_RULE, file=path) from None
        raise


def refuse_links(destination: Path, names: Iterable[str]) -> None:
    """None of these names in DST may be a symbolic link (checked before anything is removed or written)."""
    for name in names:
        if (destination / name).is_symlink():
            raise ConvertError(LINK_RULE, file=destination / name)


@contextmanager
def destination_lock(destination: Path) -> Iterator[None]:
    """Hold DST/.mixtral-convert-lock for the duration; a run that finds it held is refused with the holder's pid.
    The lock file is removed at the end, while still held: a run that opened it meanwhile finds that the path
    no longer names the file it locked and tries again, so two runs never both hold a lock."""
    destination.mkdir(parents=True, exist_ok=True)
    path = destination / LOCK
    while True:
        fd = open_owned(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _pid_in(fd)
            os.close(fd)
            who = f"another mixtral-convert (pid {holder})" if holder else "another mixtral-convert"
            raise ConvertError(
                f"{who} is writing to {destination}; wait for it to end (two runs in one folder would mix their files)"
            ) from None
        except OSError as exc:  # a file system without locks (some network mounts): say so, and go on
            log.warning("%s: cannot lock the output folder (%s); make sure no other run writes there", path, exc)
            break
        try:
            current = os.lstat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # the holder removed the file between our open and our lock: lock the new one
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds without its pid; the run's first write says what is wrong
        yield
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _pid_in(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
