"""Resuming an interrupted conversion: a journal in the output folder records the plan it belongs to and each
finished file with its hashes. A resumed run keeps the finished files whose bytes still hash as recorded and
redoes the rest, so its output is byte for byte an uninterrupted run's. A journal from another plan (another
source, other settings, another version of the tool) is refused with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from convert import __version__
from convert.common.errors import ConvertError
from convert.fileio.faults import fault_point
from convert.fileio.owned import open_owned
from convert.integrity.manifest import file_digest
from convert.model.outputs import OutputFile
from convert.planning.plan import Plan
from convert.run.fingerprint import difference, source_fingerprint

JOURNAL = ".mixtral-convert-journal"


# A journal holds one line a file (about 100 bytes a tensor): a few MiB for any checkpoint, even after many
# resumes. A larger one was not written by this tool, and is refused before it is read.
JOURNAL_LIMIT = 64 * 2**20
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Finished:
    sha256: str | None
    tensors: dict[str, str]


def fingerprint(plan: Plan) -> dict:
    return {
        "tool": __version__,
        "source": source_fingerprint(plan.source),
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
        """The journal is input like any other: every line is checked against the plan, and one that does not
        fit is refused with its line number (a run that follows a journal it does not understand could keep a
        file it should redo). The one damage a crash can do, a last line cut short, is dropped: its file is
        redone."""
        path = destination / JOURNAL
        if not os.path.lexists(path):
            complete = (destination / plan.files[-1].name).is_file()
            reason = "it is already complete" if complete else "it holds no journal of an interrupted conversion"
            raise ConvertError(f"nothing to resume: {reason}", file=destination)
        lines = _read_lines(path)
        if not lines:
            # The run died (a full disk, a kill) before its journal said anything: nothing is finished; start over.
            return cls.start(destination, plan)
        head = _parse(lines[0], 1, path)
        recorded = head.get("fingerprint")
        if set(head) != {"fingerprint"} or not isinstance(recorded, dict):
            raise _damaged(path, 1, 'must be {"fingerprint": ...}')
        _refuse_other_plan(recorded, fingerprint(plan), path)
        journal = cls(path)
        outputs = {f.name: f for f in plan.files}
        for number, line in enumerate(lines[1:], start=2):
            try:
                name, sha256, tensors = _finished_entry(_parse(line, number, path), outputs, plan.options.checksums)
            except _EntryError as exc:
                raise _damaged(path, number, f"does not fit this conversion: {exc}") from None
            target = destination / name
            intact = (
                target.is_file()
                and not target.is_symlink()
                and target.stat().st_size == outputs[name].size
                # without checksums (--no-checksums) a finished file is trusted by its size
                and (sha256 is None or file_digest(target, "sha256") == sha256)
            )
            if intact:
                journal.finished[name] = Finished(sha256, tensors)
            else:
                journal.finished.pop(name, None)
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
            fd = open_owned(self.path, flags)
            try:
                while line:
                    line = line[os.write(fd, line) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ConvertError(f"cannot write the resume journal: {exc.strerror}", file=self.path) from None


def _damaged(path: Path, number: int, why: str) -> ConvertError:
    return ConvertError(f"the resume journal is damaged: line {number} {why}; start over with --force", file=path)


def _read_lines(path: Path) -> list[bytes]:
    """The journal's complete lines. A cut last line (a crash during an append) is cut off the file too, so
    that the next append starts a line of its own; anything else unlike a line this tool writes is refused."""
    fd = open_owned(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size > JOURNAL_LIMIT:
            raise ConvertError(
                f"the resume journal is {size:,} bytes, more than any conversion writes ({JOURNAL_LIMIT:,}); "
                "it is not this tool's journal: start over with --force",
                file=path,
            )
        data = os.pread(fd, size, 0)
        *lines, tail = data.split(b"\n")
        if tail:
            # json.dumps writes ASCII and every entry starts with {: a cut line is a prefix of one
            if not tail.isascii() or not tail.startswith(b"{"):
                raise _damaged(path, len(lines) + 1, "is not a line this tool writes (an ASCII JSON object)")
            os.ftruncate(fd, size - len(tail))
    finally:
        os.close(fd)
    return lines


def _parse(line: bytes, number: int, path: Path) -> dict:
    try:
        entry = json.loads(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _damaged(path, number, "is not a line this tool writes (an ASCII JSON object)") from None
    if not isinstance(entry, dict):
        raise _damaged(path, number, "is not a JSON object")
    return entry


def _finished_entry(
    entry: dict, outputs: dict[str, OutputFile], checksums: bool
) -> tuple[str, str | None, dict[str, str]]:
    """(file, sha256, tensor hashes) of a line recording a finished file, each checked against the planned file
    and the checksum setting; _EntryError says what does not fit."""
    if set(entry) != {"file", "sha256", "tensors"}:
        raise _EntryError(f"must hold exactly file, sha256 and tensors (holds {', '.join(sorted(entry)) or 'nothing'})")
    name, sha256, tensors = entry["file"], entry["sha256"], entry["tensors"]
    if not isinstance(name, str):
        raise _EntryError(f"file must be a file name, not {json.dumps(name)}")
    output = outputs.get(name)
    if output is None:
        raise _EntryError(f"file {json.dumps(name)[:80]} is not one this conversion writes")
    if checksums and not (isinstance(sha256, str) and _HEX64.fullmatch(sha256)):
        raise _EntryError(f"sha256 of {name} must be 64 hex digits, not {json.dumps(sha256)[:80]}")
    if not checksums and sha256 is not None:
        raise _EntryError(f"sha256 of {name} must be null: this conversion writes no checksums")
    expected = {p.tensor for p in output.pieces} if checksums else set()
    if not isinstance(tensors, dict) or set(tensors) != expected:
        raise _EntryError(f"tensors of {name} must map each of its {len(expected)} tensors to its SHA-256")
    if not all(isinstance(v, str) and _HEX64.fullmatch(v) for v in tensors.values()):
        raise _EntryError(f"tensors of {name} must map each tensor to 64 hex digits")
    return name, sha256, dict(tensors)


class _EntryError(Exception):
    """A journal line that does not fit the plan; Journal.resume adds the file and line number."""


def _refuse_other_plan(recorded: dict, current: dict, path: Path) -> None:
    if recorded.get("tool") != current["tool"]:
        reason = f"it was started by mixtral-convert {recorded.get('tool')}, this is {current['tool']}"
    elif (changed := difference(recorded.get("source"), current["source"])) is not None:
        reason = changed
    elif recorded.get("plan") != current["plan"]:
        reason = "it was started with other settings (target layout, shard size or source layout)"
    else:
        return
    raise ConvertError(f"cannot resume: {reason}; start over with --force", file=path.parent)


_DIGEST = re.compile(rb'"[0-9a-f]{64}"|^[0-9a-f]{64}(?=  )', re.M)  # a digest in manifest.json or SHA256SUMS


def _without_digests(data: bytes) -> bytes:
    """The bytes with every SHA-256 or BLAKE3 digest written as zeros, as a plan renders them before streaming."""
    return _DIGEST.sub(lambda m: re.sub(rb"[0-9a-f]", b"0", m.group(0)), data)


def unlike_plan(destination: Path, plan: Plan) -> str | None:
    """Why the folder is not the complete output of this plan, or None when it is: every planned file in place
    at its planned size, each file whose bytes the plan holds (index, parameters, tokenizer files) equal, and
    manifest.json and SHA256SUMS equal to the plan's but for the digests (the manifest names the source's files
    and sizes, the target and every tensor's dtype, shape and place). The weights' bytes are not read: verify
    --against SRC checks those."""
    for output in plan.files:
        path = destination / output.name
        if not path.is_file() or path.is_symlink():
            return f"{output.name} is missing"
        size = path.stat().st_size
        if size != output.size:
            return f"{output.name} has {size:,} bytes, this conversion writes {output.size:,}"
        whole = not output.pieces and output.copy_of is None
        if whole and (output.blobs or output.deferred) and size <= 64 * 2**20:
            expected = bytearray(output.size)
            for offset, data in output.blobs:
                expected[offset : offset + len(data)] = data
            for offset, produce in output.deferred:  # checksums and manifest: rendered with zero digests
                data = produce(None)  # type: ignore[arg-type]
                expected[offset : offset + len(data)] = data
            if _without_digests(path.read_bytes()) != _without_digests(bytes(expected)):
                return f"{output.name} differs from what this conversion writes"
    return None
