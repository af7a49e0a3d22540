"""Opening a source folder: detect its layout, index its tensors from metadata, read its hyperparameters.

Only headers and pickles are read here; tensor bytes stay on disk until the stream copies them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.common.errors import ConvertError, shown
from convert.containers import format_of, markers, may_hold
from convert.containers.contract import TOKENIZER
from convert.fileio.regular import is_present
from convert.fileio.streams import ByteStream
from convert.model.params import ModelParams
from convert.model.records import TensorRecord
from convert.model.tables import LayoutTable, layout, layout_names


@dataclass
class Source:
    folder: Path
    layout: LayoutTable
    params: ModelParams
    params_file: Path
    records: dict[str, TensorRecord]
    weight_files: list[Path]
    tokenizer: Path | None
    streams: list[ByteStream] = field(default_factory=list)
    # Files another loader would read instead of (or besides) what was read here: each makes two models of one
    # folder, so it is a problem like a wrong shape (convert refuses, inspect and verify list it).
    ambiguities: list[ConvertError] = field(default_factory=list)
    outtype: str | None = None  # the --outtype these files were written with, where the container records it
    carried: Any = None  # what the container writes back as it is when it re-lays these files (OpenedWeights)

    @property
    def input_files(self) -> list[Path]:
        """Every file the conversion reads: weights, parameters, tokenizer."""
        files = [*self.weight_files, self.params_file, *([self.tokenizer] if self.tokenizer else [])]
        return list(dict.fromkeys(files))  # a container may keep its parameters in a weights file

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def source_identity(source: Source) -> list[dict]:
    """Each source file's name, size and modification time: how a changed source is noticed."""
    identity = []
    for path in source.input_files:
        stat = path.stat()
        identity.append({"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return identity


def detect_layout(folder: Path) -> str:
    if not folder.is_dir():
        raise ConvertError("not a folder" if folder.exists() else "no such folder", file=folder)
    # A container's code is loaded only where the folder holds one of its marker files (the registry's MARKERS).
    found = [
        name
        for name in layout_names()
        if may_hold(layout(name), folder) and format_of(layout(name)).claims(folder, layout(name))
    ]
    if len(found) == 1:
        return found[0]
    if found:
        why = ""
        if {"mistral_pth", "mistral_safetensors"} <= {layout(name).container for name in found}:
            why = " (mistral-inference refuses a folder holding both consolidated.safetensors and consolidated.00.pth)"
        raise ConvertError(
            f"matches several layouts ({', '.join(found)}){why}; remove the other files or choose one with --from",
            file=folder,
        )
    parts = sorted(shown(p.name) for p in folder.glob("*-split*"))
    if parts:
        raise ConvertError(
            f"split parts without their first: {parts[0].split('-split')[0]}-split0 is missing "
            f"(found {', '.join(parts[:4])})",
            file=folder,
        )
    present = sorted(shown(p.name) for p in folder.iterdir())[:8]
    needs = "; ".join(f"{name} needs {' or '.join(markers(layout(name).container))}" for name in layout_names())
    raise ConvertError(f"no known checkpoint layout (found: {', '.join(present) or 'nothing'}); {needs}", file=folder)


def open_source(folder: Path, layout_name: str | None = None) -> Source:
    name = layout_name or detect_layout(folder)
    table = layout(name)
    streams: list[ByteStream] = []
    ambiguities: list[ConvertError] = []
    try:
        opened = format_of(table).open(folder, table, streams, ambiguities)
        by_name: dict[str, TensorRecord] = {}
        for record in opened.records:
            if record.name in by_name:
                raise ConvertError(
                    f"tensor appears twice ({by_name[record.name].stream.label} and {record.stream.label})",
                    tensor=record.name,
                )
            by_name[record.name] = record
        tokenizer = folder / TOKENIZER
        present = is_present(tokenizer)  # a FIFO or device named tokenizer.model is refused, not taken for absent
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return Source(
        folder,
        table,
        opened.params,
        opened.params_file,
        by_name,
        opened.weight_files,
        tokenizer if present else None,
        streams,
        ambiguities,
        opened.outtype,
        opened.carried,
    )
