"""Rewriting a GGUF file's metadata with ggml-org's own gguf-py (GGUFReader, then GGUFWriter), as a user editing a
downloaded file would: every tensor's bytes and type are copied as they are, the key/value entries edited. Used
by the tests that feed the converter and verify GGUF files whose metadata says another model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType, GGUFWriter

Entries = dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]  # key -> (value, type, array item type)
# Written by GGUFWriter itself, not entries to copy (the reader shows the header as GGUF.* pseudo-fields).
_WRITTEN_BY_THE_WRITER = ("GGUF.", "general.architecture")


def entries(path: Path) -> Entries:
    reader = GGUFReader(path)
    found: Entries = {}
    for key, field in reader.fields.items():
        if key.startswith(_WRITTEN_BY_THE_WRITER):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        found[key] = (field.contents(), vtype, sub)
    return found


def rewrite(path: Path, edit: Callable[[Entries], None], out: Path | None = None) -> Path:
    """The file at path (or out) rewritten with its entries after edit(entries); tensors unchanged."""
    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    found = entries(path)
    edit(found)
    # raw_shape: numpy's order; for data the reader gives as bytes (uint8), the byte shape, which the writer turns
    # back into elements of raw_dtype.
    tensors = [(t.name, t.data.copy(), t.tensor_type, list(t.data.shape)) for t in reader.tensors]
    del reader
    target = out or path
    writer = GGUFWriter(target, arch)
    for key, (value, vtype, sub) in found.items():
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, data, ggml_type, shape in tensors:
        writer.add_tensor(name, data, raw_shape=shape, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
