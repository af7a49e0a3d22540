"""Opening input files safely: regular files only, and small files read whole under a size limit.

A FIFO named params.json blocks the first read forever, and a symlink to /dev/zero never ends; a device or a
socket is no checkpoint either. So every input is checked with fstat after an open that cannot block
(O_NONBLOCK: opening a FIFO for reading otherwise waits for a writer), and refused by name unless it is a regular
file. Symlinks are followed: the Hugging Face cache links every file of a snapshot to ../../blobs/<hash>, so a
symlink to a regular file is read wherever it points; a symlink to anything else is refused like the thing itself.

JSON and other small files are refused before parsing when they are larger than any real one could be: parsing
costs many times the text's size (8 MiB of "[[],[],...]" peaks at ~220 MiB), so the limits keep the worst input
well inside the memory bound while leaving a wide margin over the real files (see each limit).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from convert.common.errors import ConvertError

KiB, MiB = 2**10, 2**20
# params.json of Mixtral-8x7B is 300 bytes, config.json 800; 1 MiB is a thousand times that.
MAX_PARAMS_JSON = 1 * MiB
# model.safetensors.index.json: ~95 KB for Mixtral-8x7B (995 tensors), ~170 KB for 8x22B (1,739); 4 MiB is over
# twenty times the largest, and parses in ~120 MiB at worst.
MAX_INDEX_JSON = 4 * MiB
# manifest.json (one ~250-byte line per tensor): ~250 KB for 8x7B, ~450 KB for 8x22B.
MAX_MANIFEST_JSON = 8 * MiB
# SHA256SUMS: one ~100-byte line per file, a few dozen files.
MAX_SUMS = 1 * MiB
# tokenizer.model: Mixtral's SentencePiece model is 493 KB; the largest in use (256k pieces) are ~4 MB.
MAX_TOKENIZER = 32 * MiB

_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refuse(path: str | Path, mode: int) -> ConvertError:
    return ConvertError(f"is {_kind(mode)}, not a regular file; only regular files are read", file=path)


def is_present(path: Path) -> bool:
    """Whether path names an input file: False when nothing is there, True for a regular file (or a symlink to
    one), an error for anything else (a FIFO, a device, a socket, a folder), which must not count as absent."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        raise _refuse(path, mode)
    return True


def open_regular(path: str | Path) -> int:
    """A read-only file descriptor for path, which must be a regular file. stat first, so that a socket is named
    rather than failing to open; the open itself cannot block (O_NONBLOCK), and fstat checks what was opened."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _refuse(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped between the stat and the open
            raise _refuse(path, mode)
        os.set_blocking(fd, True)  # no effect on a regular file; the descriptor is handed on as an ordinary one
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small(path: Path, limit: int, what: str) -> bytes:
    """The whole of a small file, refused before reading when it is over limit bytes (what: how the message names
    the kind of file, e.g. "params.json"). Raises FileNotFoundError when the file is absent."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ConvertError(
                f"is {size:,} bytes, over the {limit:,} a {what} can need; refused before parsing", file=path
            )
        chunks = []
        remaining = limit + 1  # a file that grows while read is still cut at the limit
        while remaining > 0:
            chunk = os.read(fd, min(remaining, MiB))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise ConvertError(f"grew past the {limit:,} bytes a {what} can need while it was read", file=path)
    return data
