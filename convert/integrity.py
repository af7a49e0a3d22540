"""The integrity files every conversion writes: SHA256SUMS (in `sha256sum -c` format) and a per-tensor manifest.

Both are planned like any output file: their size is known in advance (a SHA-256 is always 64 hex digits), and
their bytes are produced from the digests the writer computed while streaming, so nothing is read twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from convert import __version__
from convert.digests import TENSOR_DIGEST, Digests
from convert.formats.streams import ByteStream
from convert.outputs import OutputFile

SUMS = "SHA256SUMS"
MANIFEST = "manifest.json"
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


def manifest_file(
    header: dict, tensors: Sequence[TensorEntry], inputs: Sequence[tuple[str, int]] | None = None
) -> OutputFile:
    """manifest.json: each output tensor's file, dtype, shape, absolute byte range and digest (the algorithm
    named by its "tensor_digest" field: BLAKE3, which has 64 hex digits like SHA-256, so the size is known in
    advance); with inputs, the SHA-256 of each source file too."""
    header = {
        "format": MANIFEST_FORMAT,
        "tool": f"mixtral-convert {__version__}",
        "tensor_digest": TENSOR_DIGEST,
        **header,
    }
    frozen = tuple(inputs) if inputs is not None else None
    size = len(_render_manifest(header, frozen, tensors, None))
    return OutputFile(MANIFEST, size, deferred=((0, partial(_render_manifest, header, frozen, tuple(tensors))),))


def _render_sums(names: Sequence[str], known: dict[str, str], digests: Digests | None) -> bytes:
    lines = []
    for name in names:
        digest = _PLACEHOLDER if digests is None else digests.file_sha256.get(name) or known[name]
        lines.append(f"{digest}  {name}\n")
    return "".join(lines).encode("utf-8")


def sums_file(files: Sequence[OutputFile]) -> OutputFile:
    """SHA256SUMS over every other file of the output. A file written after it (the completion marker) must be
    one whose bytes the plan already holds, so its hash is computed here."""
    names = [f.name for f in files]
    known = {f.name: hashlib.sha256(b"".join(data for _, data in f.blobs)).hexdigest() for f in files if f.is_text}
    size = len(_render_sums(names, known, None))
    return OutputFile(SUMS, size, deferred=((0, partial(_render_sums, tuple(names), known)),))


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
