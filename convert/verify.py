"""verify: is a checkpoint folder intact, well-formed, and (with --against) a faithful conversion of its source?

Every check adds a result naming its file, tensor and rule; the folder passes only when all pass. Memory stays
bounded as in conversion: files are hashed and compared in chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from convert.digests import Digests
from convert.errors import ConvertError
from convert.formats.safetensors import TensorRecord
from convert.formats.zip_crc import check_records
from convert.integrity import SUMS, file_digest, parse_sums
from convert.mapping import data_dir
from convert.plan import build_plan, check_source
from convert.source import Source, open_source
from convert.stream import PARTIAL_SUFFIX, Chunk, piece_chunks

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass(frozen=True)
class Result:
    check: str
    file: str | None
    ok: bool
    problem: str | None = None
    tensor: str | None = None

    def line(self) -> str:
        where = ": ".join(part for part in (self.file, self.tensor and f"tensor {self.tensor}") if part)
        return f"{'ok' if self.ok else 'FAILED'} {self.check}: {where}{': ' if where and self.problem else ''}" + (
            self.problem or ""
        )


@dataclass
class Report:
    folder: str
    layout: str | None = None
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def add_error(self, check: str, error: ConvertError) -> None:
        self.results.append(Result(check, error.file, False, error.rule, error.tensor))

    def as_dict(self) -> dict:
        return {
            "folder": self.folder,
            "layout": self.layout,
            "ok": self.ok,
            "notes": self.notes,
            "results": [asdict(r) for r in self.results],
        }


def resolve_pins(name: str) -> Path:
    """A pins file by path, or by its name among the pins this project ships."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = data_dir("pins") / name
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.name for p in data_dir("pins").iterdir() if p.suffix in (".md5", ".sha256")))
    raise ConvertError(f"no such pins file (shipped pins: {known})", file=name)


def check_pins(folder: Path, pins: Path, report: Report) -> None:
    try:
        pairs = parse_sums(pins.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConvertError(f"not a sha256sum or md5sum file: {exc}", file=pins) from None
    for expected, name in pairs:
        path = folder / name
        algorithm = "md5" if len(expected) == 32 else "sha256"
        if not path.is_file():
            report.results.append(Result(f"pin {pins.name}", str(path), False, "file is missing"))
            continue
        actual = file_digest(path, algorithm)
        ok = actual == expected
        problem = None if ok else f"{algorithm} is {actual}, the pin says {expected}"
        report.results.append(Result(f"pin {pins.name}", str(path), ok, problem))


def _check_sums(folder: Path, report: Report) -> None:
    sums = folder / SUMS
    if not sums.is_file():
        report.notes.append(f"no {SUMS}: no checksums were available; only the structure was checked")
        return
    try:
        pairs = parse_sums(sums.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        report.results.append(Result("sha256", str(sums), False, f"not in sha256sum format: {exc}"))
        return
    listed = set()
    for expected, name in pairs:
        listed.add(name)
        path = folder / name
        if not path.is_file():
            report.results.append(Result("sha256", str(path), False, f"listed in {SUMS} but missing"))
            continue
        actual = file_digest(path, "sha256")
        problem = None if actual == expected else f"sha256 is {actual}, {SUMS} says {expected}"
        report.results.append(Result("sha256", str(path), actual == expected, problem))
    for path in sorted(folder.iterdir()):
        if path.name == SUMS or path.name in listed or not path.is_file():
            continue
        if path.suffix in WEIGHT_SUFFIXES or path.name.endswith(PARTIAL_SUFFIX) or path.suffix == ".json":
            report.results.append(Result("sha256", str(path), False, f"not covered by {SUMS}"))
        else:
            report.notes.append(f"{path.name} is not covered by {SUMS}")


def _check_zip_crcs(source: Source, report: Report) -> None:
    """Without checksums, a torch zip still carries a CRC-32 per record: a corrupt download shows there. Read
    through the source's own streams, so split parts are checked as the one file they make."""
    for stream in source.streams:
        records = [r for r in source.records.values() if r.stream is stream and r.zip_record is not None]
        if not records:
            continue
        problems = check_records(records)
        for problem in problems:
            report.add_error("crc32", problem)
        if not problems:
            report.results.append(Result("crc32", stream.label, True))


def _compare_against(folder: Source, original: Source, report: Report) -> None:
    """Every tensor of the folder equals the source's tensor mapped through the tables, byte for byte."""
    plan = build_plan(original, folder.layout.name)
    expected_names = set()
    for output in plan.files:
        starts = output.tensor_starts()
        digests = Digests()
        for piece in sorted(output.pieces, key=lambda p: p.dst_offset):
            expected_names.add(piece.tensor)
            record = folder.records.get(piece.tensor)
            if record is None:
                report.results.append(Result("against", str(folder.folder), False, "missing", piece.tensor))
                continue
            mismatch = _first_mismatch(piece_chunks(piece, digests, crc=False), record, starts[piece.tensor])
            ok = mismatch is None
            problem = None if ok else f"differs from the converted source at byte {mismatch} of the tensor"
            report.results.append(Result("against", record.stream.label, ok, problem, piece.tensor))
    for name in sorted(set(folder.records) - expected_names):
        report.results.append(Result("against", str(folder.folder), False, "not in the source", name))


def _first_mismatch(chunks: Iterator[Chunk], record: TensorRecord, start: int) -> int | None:
    for offset, data, _, _ in chunks:
        relative = offset - start
        actual = record.stream.read(len(data), record.offset + relative)
        if actual != data:
            return relative + next(i for i, (a, b) in enumerate(zip(actual, bytes(data), strict=True)) if a != b)
    return None


def verify_folder(folder: Path, *, against: Path | None = None, pins: Path | None = None) -> Report:
    report = Report(str(folder))
    _check_sums(folder, report)
    if pins is not None:
        check_pins(folder, pins, report)
    try:
        opened = open_source(folder)
    except ConvertError as exc:
        report.add_error("structure", exc)
        return report
    with opened:
        report.layout = opened.layout.name
        problems = check_source(opened)
        for problem in problems:
            report.add_error("structure", problem)
        if not problems:
            report.results.append(Result("structure", str(folder), True))
        if not (folder / SUMS).is_file():
            _check_zip_crcs(opened, report)
        if against is not None and not problems:
            try:
                with open_source(against) as original:
                    _compare_against(opened, original, report)
            except ConvertError as exc:
                report.add_error("against", exc)
    return report
