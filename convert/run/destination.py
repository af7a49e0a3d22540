"""Checks and preparation of the output folder, before anything is written.

The source is never touched: the output may not be the source, inside it, or around it. A non-empty output
needs --force, which makes the folder this output: the files of an earlier output of any layout that this one
does not write are removed, the completion markers first, so that the folder never looks complete while it is
rewritten and ends as exactly one layout. Files that no layout defines are left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from convert.common.errors import ConvertError
from convert.containers import format_of
from convert.fileio.owned import LOCK, PARTIAL_SUFFIX
from convert.integrity.manifest import MANIFEST, SUMS
from convert.model.tables import layout, layout_names
from convert.planning.plan import Plan
from convert.planning.source import TOKENIZER
from convert.run.resume import JOURNAL

# Files every output holds whatever its layout (the tokenizer when the source has one, the integrity files unless
# --no-checksums): an earlier run's copy that this run does not write would describe another output.
COMMON_OUTPUTS = (SUMS, MANIFEST, TOKENIZER)


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
    """A non-empty output needs force; then every file an output of any layout may hold that this output does not
    write is removed (see output_files), so the folder ends as exactly one layout. Files no layout defines are left
    alone, and one the target must not sit beside (a file vLLM would load instead) is refused before anything goes."""
    if not destination.is_dir() or not any(p.name != LOCK for p in destination.iterdir()):
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
    first, rest = stale_outputs(destination, plan)
    for pattern in format_of(target).must_not_contain:
        for path in sorted(destination.glob(pattern)):
            if path not in first and path not in rest:
                raise ConvertError(
                    f"an {target.name} output must not contain {path.name} (matches {pattern!r}) and no layout "
                    "defines that file, so --force leaves it; remove it or choose an empty folder",
                    file=destination,
                )
    (destination / plan.files[-1].name).unlink(missing_ok=True)
    for path in [*first, *rest]:  # what makes an earlier output look complete goes first
        path.unlink(missing_ok=True)


def stale_outputs(destination: Path, plan: Plan) -> tuple[list[Path], list[Path]]:
    """The files of an earlier output that this one does not write, in two lists: those that make an output
    complete or detectable (each container's first `replaces` entry and its markers), then the rest: every other
    file a container's `replaces` names, the files every output holds (checksums, manifest, tokenizer), leftover
    .partial files and the journal."""
    planned = {f.name for f in plan.files}
    formats = [format_of(layout(name)) for name in layout_names()]
    leading = [f.replaces[0] for f in formats if f.replaces] + [m for f in formats for m in f.markers]
    others = [g for f in formats for g in f.replaces[1:]] + [*COMMON_OUTPUTS, f"*{PARTIAL_SUFFIX}", JOURNAL]
    first = sorted({p for g in leading for p in destination.glob(g) if p.name not in planned})
    rest = sorted({p for g in others for p in destination.glob(g) if p.name not in planned} - set(first))
    return first, rest
