"""Byte sizes on the command line: 5GB is 5 * 10**9 (as transformers shards), 5GiB is 5 * 2**30."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    match = _SIZE.fullmatch(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 5GB, 500MiB, 123456789)")
    value = float(match.group(1)) * _UNITS[unit] if "." in match.group(1) else int(match.group(1)) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"{text!r} must be at least one byte")
    return int(value)


def format_size(size: int) -> str:
    """Bytes in decimal units (kB, MB, GB, TB), the family the progress bar and --max-shard-size 5GB use."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"
