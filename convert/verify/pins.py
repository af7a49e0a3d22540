"""verify --expect: a folder's files against a sha256sum or md5sum file, by path or among the pins this project
ships (package data, convert.pins)."""

from __future__ import annotations

from importlib.resources.abc import Traversable
from pathlib import Path

from convert.common.errors import ConvertError
from convert.integrity.manifest import file_digest, parse_sums
from convert.model.tables import data_dir
from convert.verify.report import Report, Result


def resolve_pins(name: str) -> Traversable:
    """A pins file by path, or by its name among the pins this project ships (package data, convert.pins)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = data_dir("pins").joinpath(name)
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.name for p in data_dir("pins").iterdir() if p.name.endswith((".md5", ".sha256"))))
    raise ConvertError(f"no such pins file (shipped pins: {known})", file=name)


def check_pins(folder: Path, pins: Traversable, report: Report) -> None:
    try:
        pairs = parse_sums(pins.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConvertError(f"not a sha256sum or md5sum file: {exc}", file=str(pins)) from None
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
