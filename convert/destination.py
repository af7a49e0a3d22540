"""Checks and preparation of the output folder, before anything is written.

The source is never touched: the output may not be the source, inside it, or around it. A non-empty output
needs --force, and even then only files of an earlier output of the same layout are removed, the completion
marker first, so that the folder never looks complete while it is rewritten.
"""

from __future__ import annotations

import os
from pathlib import Path

from convert.errors import ConvertError
from convert.plan import Plan
from convert.resume import JOURNAL
from convert.stream import PARTIAL_SUFFIX


def check_destination(destination: Path, source: Path | None) -> None:
    """The output may not be the source, inside it or around it, and must be a writable folder or creatable."""
    dst = destination.resolve()
    if source is not None:
        src = source.resolve()
        if dst == src:
            raise ConvertError("the output folder is the source folder; the source is never modified", file=destination)
        if dst.is_relative_to(src):
            raise ConvertError("the output folder is inside the source folder; choose another place", file=destination)
        if src.is_relative_to(dst):
            raise ConvertError("the output folder contains the source folder; choose another place", file=destination)
    if destination.exists() and not destination.is_dir():
        raise ConvertError("the output exists and is not a folder", file=destination)
    existing = dst
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConvertError("the output folder is not writable", file=existing)


def prepare_destination(destination: Path, plan: Plan, *, force: bool) -> None:
    if not destination.is_dir() or not any(destination.iterdir()):
        return
    if not force:
        if (destination / JOURNAL).is_file():
            raise ConvertError(
                "the output folder holds an interrupted conversion; pass --resume to continue it "
                "or --force to start over",
                file=destination,
            )
        raise ConvertError("the output folder is not empty; pass --force to write into it", file=destination)
    target = plan.target
    for pattern in target.must_not_contain:
        for path in sorted(destination.glob(pattern)):
            raise ConvertError(
                f"an {target.name} output must not contain {path.name} (matches {pattern!r}); "
                "remove it or choose an empty folder",
                file=destination,
            )
    marker = destination / plan.files[-1].name
    marker.unlink(missing_ok=True)
    planned = {f.name for f in plan.files}
    stale = {p for pattern in target.replaces for p in destination.glob(pattern) if p.name not in planned}
    stale |= set(destination.glob(f"*{PARTIAL_SUFFIX}")) | set(destination.glob(JOURNAL))
    for path in sorted(stale):
        path.unlink()
