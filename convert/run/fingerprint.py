"""What --resume knows of the source it started from: enough to notice another checkpoint put in its place.

Size and modification time alone are kept by `cp -p`, `rsync -t` or `os.utime`. So each file is also known by
what the file system says of its identity (inode, ctime in ns: a replaced or rewritten file gets a new one, and
ctime cannot be set by a user), and by a SHA-256 of the bytes that describe it and a sample of the rest: the first
and last MiB (a safetensors header, or a torch zip's pickle and central directory, all of which the plan reads
anyway), the whole safetensors header however long, and 64 KiB at eight offsets spread over the file.

What it cannot catch: a change confined to bytes outside the samples, made in place by a tool that then resets
the mtime, on a file system whose ctime or inode numbers are not kept (some network or FUSE mounts). Only
--hash-input (a SHA-256 of every source byte in manifest.json) or `verify --against SRC` compare everything.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from convert.planning.source import Source

EDGE = 2**20  # the first and last MiB of each file
SAMPLE = 64 * 2**10  # bytes read at each sampled offset
SAMPLES = 8
HEADER_LIMIT = 100 * 2**20  # the safetensors format's own bound on a header


def file_fingerprint(path: Path) -> dict:
    with open(path, "rb", buffering=0) as handle:
        info = os.fstat(handle.fileno())
        digest = hashlib.sha256()
        for start, length in _ranges(handle.fileno(), path, info.st_size):
            digest.update(struct.pack("<QQ", start, length))
            digest.update(os.pread(handle.fileno(), length, start))
    return {
        "name": path.name,
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "ctime_ns": info.st_ctime_ns,
        "inode": info.st_ino,
        "sampled_sha256": digest.hexdigest(),
    }


def _ranges(fd: int, path: Path, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes hashed, in file order; a small file whole."""
    if size <= 2 * EDGE + SAMPLES * SAMPLE:
        return [(0, size)]
    ranges = [(0, EDGE)]
    if path.suffix == ".safetensors":
        (header,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if EDGE < 8 + header <= min(size, 8 + HEADER_LIMIT):
            ranges = [(0, 8 + header)]
    step = size // (SAMPLES + 1)
    ranges += [(k * step // 4096 * 4096, SAMPLE) for k in range(1, SAMPLES + 1)]
    ranges.append((size - EDGE, EDGE))
    return ranges


def source_fingerprint(source: Source) -> dict:
    return {"folder": str(source.folder.resolve()), "files": [file_fingerprint(p) for p in source.input_files]}


_WHAT = {
    "size": "another size",
    "mtime_ns": "another modification time",
    "inode": "been replaced by another file (another inode)",
    "ctime_ns": "been changed (another ctime)",
    "sampled_sha256": "other bytes",
}


def difference(recorded: object, current: dict) -> str | None:
    """Why the recorded source fingerprint is not the current one, or None when they match."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files"), list):
        return "the source files differ from those it was started from (the journal does not record them)"
    if recorded.get("folder") != current["folder"]:
        return (
            f"it was started from the source folder {recorded.get('folder')}, not {current['folder']} "
            "(a moved or copied source is not known to hold the same bytes)"
        )
    was = {f.get("name"): f for f in recorded["files"] if isinstance(f, dict)}
    now = {f["name"]: f for f in current["files"]}
    if set(was) != set(now):
        return f"the source files differ from those it was started from ({', '.join(sorted(set(was) ^ set(now)))})"
    for name, fields in now.items():
        for key, what in _WHAT.items():
            if was[name].get(key) != fields[key]:
                return f"the source files differ from those it was started from: {name} has {what}"
    return None
