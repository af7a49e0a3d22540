"""The integrity files every conversion writes: SHA256SUMS (in `sha256sum -c` format) and a per-tensor manifest.

Both are planned like any output file: their size is known in advance (a SHA-256 is always 64 hex digits), and
their bytes are produced from the digests the writer computed while streaming, so nothing is read twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from convert import __version__
from convert.common.errors import ConvertError
from convert.fileio.regular import MAX_MANIFEST_JSON, is_present, read_small
from convert.fileio.streams import ByteStream
from convert.integrity.digests import TENSOR_DIGEST, TENSOR_DIGESTS, Digests

SUMS = "SHA256SUMS"
MANIFEST = "manifest.json"
FILE_SHA256 = "file_sha256"  # manifest.json's field: {weights file name: its SHA-256}, absent in older manifests
MANIFEST_FORMAT = "mixtral-convert manifest 1"
_PLACEHOLDER = "0" * 64
_READ_CHUNK = 8 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _render_manifest(
    header: dict, inputs: tuple[tuple[str, int], ...] | None, tensors: Sequence[TensorEntry], digests: Digests | None
) -> bytes:
    """Readable JSON: the header indented, then one tensor a line. inputs: the source files hashed with
    --hash-input (name, size), or None."""
    body = dict(header)
    # Each weights file's SHA-256 (the one SHA256SUMS lists): where a file's bytes match it, its tensors' digests
    # are those of the bytes the writer digested, so verify need not recompute them (convert/verify/folder.py).
    files = dict.fromkeys(t.file for t in tensors)
    body[FILE_SHA256] = {n: digests.file_sha256[n] if digests is not None else _PLACEHOLDER for n in files}
    if inputs is not None:
        hashes = digests.input_sha256() if digests is not None else {}
        body["inputs"] = [{"name": n, "size": size, "sha256": hashes.get(n, _PLACEHOLDER)} for n, size in inputs]
    lines = [
        json.dumps(
            {
                "name": t.name,
                "file": t.file,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "offsets": [t.begin, t.end],
                TENSOR_DIGEST: digests.tensor_digest[t.name] if digests is not None else _PLACEHOLDER,
            }
        )
        for t in tensors
    ]
    head = json.dumps(body, indent=1)[:-2]
    return (head + ',\n "tensors": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n").encode("utf-8")


Rendered = tuple[int, Callable[[Digests], bytes]]  # a file's exact size, known in advance, and its bytes made later


def manifest_bytes(
    header: dict, tensors: Sequence[TensorEntry], inputs: Sequence[tuple[str, int]] | None = None
) -> Rendered:
    """manifest.json: each output tensor's file, dtype, shape, absolute byte range and digest (the algorithm
    named by its "tensor_digest" field: BLAKE3, which has 64 hex digits like SHA-256, so the size is known in
    advance), and the SHA-256 of each file holding tensors ("file_sha256": 64 hex digits too, from the digests
    the writer computed for SHA256SUMS; the manifest is written after those files); with inputs, the SHA-256 of
    each source file too."""
    header = {
        "format": MANIFEST_FORMAT,
        "tool": f"mixtral-convert {__version__}",
        "tensor_digest": TENSOR_DIGEST,
        **header,
    }
    frozen = tuple(inputs) if inputs is not None else None
    size = len(_render_manifest(header, frozen, tensors, None))
    return size, partial(_render_manifest, header, frozen, tuple(tensors))


def _render_sums(names: Sequence[str], known: dict[str, str], digests: Digests | None) -> bytes:
    lines = []
    for name in names:
        digest = _PLACEHOLDER if digests is None else digests.file_sha256.get(name) or known[name]
        lines.append(f"{digest}  {name}\n")
    return "".join(lines).encode("utf-8")


def sums_bytes(names: Sequence[str], texts: dict[str, bytes]) -> Rendered:
    """SHA256SUMS over the named files. A file written after it (the completion marker) must be one whose bytes
    the plan already holds (texts: name -> bytes), so its hash is computed here."""
    known = {name: hashlib.sha256(data).hexdigest() for name, data in texts.items()}
    size = len(_render_sums(names, known, None))
    return size, partial(_render_sums, tuple(names), known)


def parse_sums(text: str) -> list[tuple[str, str]]:
    """(digest, name) pairs of a sha256sum or md5sum file; '*' before a name marks binary mode."""
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, sep, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name
        if not sep or not name or len(digest) not in (32, 64) or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"line {number} is not '<md5 or sha256 hex>  <file name>'")
        pairs.append((digest, name))
    return pairs


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    stream = ByteStream([path])
    try:
        for piece in stream.chunks(_READ_CHUNK):
            digest.update(piece)
    finally:
        stream.close()
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Reading manifest.json back (verify)


@dataclass(frozen=True)
class ManifestEntry(TensorEntry):
    """A tensor line of manifest.json: where the tensor was placed, and its digest (algorithm: the manifest's
    "tensor_digest", BLAKE3 now, SHA-256 in manifests written before that field existed)."""

    digest: str
    algorithm: str = "sha256"


def _manifest_entry(item: object, algorithm: str) -> ManifestEntry | None:
    """One tensor line of manifest.json, or None when it is not one."""
    if not isinstance(item, dict):
        return None
    name, file, dtype, shape, offsets, digest = (
        item.get(k) for k in ("name", "file", "dtype", "shape", "offsets", algorithm)
    )
    fields_ok = isinstance(name, str) and isinstance(file, str) and isinstance(dtype, str)
    shape_ok = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
    offsets_ok = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
    digest_ok = isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    if not (fields_ok and shape_ok and offsets_ok and digest_ok) or offsets[0] > offsets[1]:
        return None
    return ManifestEntry(name, file, dtype, tuple(shape), offsets[0], offsets[1], digest, algorithm)


def _manifest_json(path: Path) -> object | None:
    """The parsed manifest.json at path, None when there is none; one that is not JSON is a ConvertError."""
    if not is_present(path):
        return None
    try:
        return json.loads(read_small(path, MAX_MANIFEST_JSON, MANIFEST))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ConvertError(f"not valid JSON: {exc}", file=path) from None


def read_manifest(folder: Path) -> list[ManifestEntry] | None:
    """The tensor entries of folder's manifest.json; None when there is none. One that cannot be read is a
    ConvertError naming the file and why."""
    path = folder / MANIFEST
    data = _manifest_json(path)
    if data is None:
        return None
    items = data.get("tensors") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ConvertError("has no list of tensors", file=path)
    algorithm = data.get("tensor_digest", "sha256")  # older manifests: no field, SHA-256
    if algorithm not in TENSOR_DIGESTS:
        known = " or ".join(TENSOR_DIGESTS)
        raise ConvertError(f"tensor_digest {algorithm!r} is not one this version can check ({known})", file=path)
    entries = []
    for number, item in enumerate(items):
        entry = _manifest_entry(item, algorithm)
        if entry is None:
            raise ConvertError(
                f"tensor entry {number} is not {{name, file, dtype, shape, offsets, {algorithm}}}", file=path
            )
        entries.append(entry)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ConvertError("lists a tensor twice", file=path)
    return entries


def read_manifest_file_sha256(folder: Path) -> dict[str, str] | None:
    """manifest.json's "file_sha256": the SHA-256 of each file it places tensors in, as written; None when it has
    none (manifests older than the field) or no manifest. One that is not {name: 64 hex digits} is a
    ConvertError."""
    path = folder / MANIFEST
    data = _manifest_json(path)
    if data is None:
        return None
    found = data.get(FILE_SHA256) if isinstance(data, dict) else None
    if found is None:
        return None
    if not isinstance(found, dict) or not all(
        isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v) for v in found.values()
    ):
        raise ConvertError(f"its {FILE_SHA256} is not an object of file names, each a SHA-256 in hex", file=path)
    return found


def read_manifest_metadata(folder: Path) -> dict[str, dict[str, Any]] | None:
    """manifest.json's "metadata": for each weights file, what a loader reads from it besides the tensors, key by
    key (GGUF's entries); None when the manifest has none (other layouts, manifests older than the field)."""
    path = folder / MANIFEST
    data = _manifest_json(path)
    if data is None:
        return None
    found = data.get("metadata") if isinstance(data, dict) else None
    if found is None:
        return None
    if not isinstance(found, dict) or not all(isinstance(v, dict) for v in found.values()):
        raise ConvertError("its metadata is not an object of files, each an object of keys", file=path)
    return found


def metadata_differences(expected: dict[str, Any], actual: dict[str, Any], source: str) -> list[tuple[str, str]]:
    """(key, what differs) for every key whose record is not the expected one (source says where that comes
    from: "manifest.json records", "the source gives"), that is missing, or that is not expected."""
    found = []
    for key, record in expected.items():
        if key not in actual:
            found.append((key, f"is missing; {source} {_shown_record(record)}"))
        elif actual[key] != record:
            found.append((key, f"is {_shown_record(actual[key])}; {source} {_shown_record(record)}"))
    found += [(key, f"is {_shown_record(actual[key])}; {source} no such key") for key in actual if key not in expected]
    return found


def _shown_record(record: object) -> str:
    if isinstance(record, dict) and "value" in record:
        return f"{record.get('type')} {record['value']!r:.80}"
    if isinstance(record, dict) and "count" in record:
        return f"{record.get('type')} of {record['count']} items, sha256 {str(record.get('sha256'))[:16]}..."
    return f"{record!r:.80}"
