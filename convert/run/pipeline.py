"""One conversion from start to end, for the command line and for library use."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from convert.fileio.owned import LOCK, destination_lock, refuse_links
from convert.fileio.workers import run_scope
from convert.planning.plan import DEFAULT_OPTIONS, Plan, PlanOptions, build_plan
from convert.planning.source import open_source
from convert.run.destination import check_destination, prepare_destination
from convert.run.resume import JOURNAL, Journal, unlike_plan
from convert.run.writer import execute, partial_name


def convert_checkpoint(
    source: Path,
    destination: Path,
    target: str,
    options: PlanOptions = DEFAULT_OPTIONS,
    *,
    source_layout: str | None = None,
    force: bool = False,
    resume: bool = False,
    progress: bool = False,
) -> Plan:
    """Convert the checkpoint folder source into destination in the target layout; returns the plan it ran.
    With resume, an interrupted conversion into destination continues where it stopped."""
    with run_scope():
        return _convert(
            source, destination, target, options, source_layout, force=force, resume=resume, progress=progress
        )


def _convert(
    source: Path,
    destination: Path,
    target: str,
    options: PlanOptions,
    source_layout: str | None,
    *,
    force: bool,
    resume: bool,
    progress: bool,
) -> Plan:
    check_destination(destination, source)
    with open_source(source, source_layout) as opened:
        plan = build_plan(opened, target, options)
        # One run at a time in DST, taken before anything there is removed or written.
        with destination_lock(destination):
            if resume and not os.path.lexists(destination / JOURNAL):
                if not any(p.name != LOCK for p in destination.iterdir()):
                    # Nothing to resume (a Ctrl-C before the first byte): --resume is then a plain run, so a
                    # retry loop may always pass it.
                    resume = False
                elif unlike_plan(destination, plan) is None:  # done before: say so, rewrite nothing
                    return replace(plan, kept_complete=True)
            if resume:
                # Resume reads, keeps and rewrites what it finds: no link may stand among those names. (--force
                # removes links like any stale file, and os.replace puts a file in place of a link.)
                names = [n for f in plan.files for n in (f.name, partial_name(f.name))]
                refuse_links(destination, [*names, JOURNAL])
                journal = Journal.resume(destination, plan)
            else:
                prepare_destination(destination, plan, force=force)
                journal = Journal.start(destination, plan)
            execute(plan, destination, journal, progress=progress)
            journal.close()
    return plan
