"""Resuming an interrupted conversion: a journal in the output folder records the plan it belongs to and each
finished file with its hashes. A resumed run keeps the finished files whose bytes still hash as recorded and
redoes the rest, so its output is byte for byte an uninterrupted run's. A journal from another plan (another
source, other settings, another version of the tool) is refused with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from convert import __version__
from convert.errors import ConvertError
from convert.faults import fault_point
from convert.integrity import file_digest
from convert.plan import Plan
from convert.source import source_identity

JOURNAL = ".mixtral-convert-journal"


@dataclass(frozen=True)
class Finished:
    sha256: str | None
    tensors: dict[str, str]


def fingerprint(plan: Plan) -> dict:
    return {
        "tool": __version__,
        "source": source_identity(plan.source),
        "plan": hashlib.sha256(json.dumps(plan.describe(), sort_keys=True).encode()).hexdigest(),
    }


@dataclass
class Journal:
    path: Path
    finished: dict[str, Finished] = field(default_factory=dict)

    @classmethod
    def start(cls, destination: Path, plan: Plan) -> Journal:
        destination.mkdir(parents=True, exist_ok=True)
        journal = cls(destination / JOURNAL)
        journal._append({"fingerprint": fingerprint(plan)}, truncate=True)
        return journal

    @classmethod
    def resume(cls, destination: Path, plan: Plan) -> Journal:
        path = destination / JOURNAL
        if not path.is_file():
            complete = (destination / plan.files[-1].name).is_file()
            reason = "it is already complete" if complete else "it holds no journal of an interrupted conversion"
            raise ConvertError(f"nothing to resume: {reason}", file=destination)
        lines = path.read_text().splitlines()
        recorded = _entry(lines[0]).get("fingerprint") if lines else None
        if not recorded:
            # The run died (a full disk, a kill) before its journal said anything: nothing is finished; start over.
            return cls.start(destination, plan)
        if not isinstance(recorded, dict):
            raise ConvertError("the resume journal is damaged; start over with --force", file=path)
        entries = [_entry(line) for line in lines[1:] if line.strip()]
        _refuse_other_plan(recorded, fingerprint(plan), path)
        journal = cls(path)
        planned = {f.name: f.size for f in plan.files}
        for entry in entries:
            name = entry.get("file")
            target = destination / str(name)
            intact = (
                name in planned
                and target.is_file()
                and target.stat().st_size == planned[name]
                # without checksums (--no-checksums) a finished file is trusted by its size
                and (entry.get("sha256") is None or file_digest(target, "sha256") == entry.get("sha256"))
            )
            if intact:
                journal.finished[name] = Finished(entry.get("sha256"), dict(entry.get("tensors", {})))
        return journal

    def record(self, name: str, sha256: str | None, tensors: dict[str, str]) -> None:
        self._append({"file": name, "sha256": sha256, "tensors": tensors})
        self.finished[name] = Finished(sha256, tensors)

    def close(self) -> None:
        """The conversion is complete: the journal goes."""
        self.path.unlink(missing_ok=True)

    def _append(self, entry: dict, truncate: bool = False) -> None:
        """One whole line, synced; a short write (a full disk) is an error, never a cut line."""
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else os.O_APPEND)
        line = memoryview((json.dumps(entry) + "\n").encode())
        try:
            fault_point("journal")
            fd = os.open(self.path, flags, 0o644)
            try:
                while line:
                    line = line[os.write(fd, line) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ConvertError(f"cannot write the resume journal: {exc.strerror}", file=self.path) from None


def _entry(line: str) -> dict:
    """A journal line; one cut short by a crash records nothing (its file is redone)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}


def _refuse_other_plan(recorded: dict, current: dict, path: Path) -> None:
    if recorded.get("tool") != current["tool"]:
        reason = f"it was started by mixtral-convert {recorded.get('tool')}, this is {current['tool']}"
    elif recorded.get("source") != current["source"]:
        reason = "the source files differ from those it was started from (names, sizes or modification times)"
    elif recorded.get("plan") != current["plan"]:
        reason = "it was started with other settings (target layout, shard size or source layout)"
    else:
        return
    raise ConvertError(f"cannot resume: {reason}; start over with --force", file=path.parent)
