"""What the writer learns while streaming: each output tensor's CRC-32 and digest, each output file's SHA-256.

Bytes that depend on these (a zip's data descriptors and central directory, the manifest, SHA256SUMS) are
produced from them at their place in the file, after everything they describe has been written.

Per-tensor digests use BLAKE3 (TENSOR_DIGEST): they exist only for manifest.json and verify, so they need no
outside tool, and on this kind of machine BLAKE3 hashes a core's worth of bytes in about two thirds of the CPU
SHA-256 takes even with SHA-NI. File digests stay SHA-256, so `sha256sum -c SHA256SUMS` keeps working.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

# blake3 and ISA-L (crc32) are not loaded by this module: verify starts hashing files with SHA-256 before it
# needs either (convert/verify/folder.py), and every module loaded before that delays its start. A conversion
# loads them before its stream begins (load_hasher, the source's CRC check).
if TYPE_CHECKING:
    from convert.integrity.crc32 import SourceCrc

TENSOR_DIGEST = "blake3"  # what manifest.json names in its "tensor_digest" field and as each tensor's key
# What verify can check: manifests written before BLAKE3 have no such field and a "sha256" key per tensor.
TENSOR_DIGESTS = ("blake3", "sha256")


class Hasher(Protocol):
    def update(self, data: memoryview | bytes, /) -> object: ...
    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str) -> Hasher:
    """A fresh hash state; BLAKE3 on one thread (the run's threads already keep both cores busy)."""
    if algorithm == "blake3":
        import blake3

        return blake3.blake3(max_threads=1)
    return hashlib.new(algorithm)


def load_hasher(algorithm: str) -> None:
    """Import the module behind `algorithm` now, before a run's stream starts. Importing a C extension holds the
    GIL while the kernel reads the file in, and during a stream those reads wait behind its large direct requests:
    loaded by the tensor hasher at the first chunk, BLAKE3 stopped every thread of a cold run for that long
    (bench/profiles.md)."""
    new_hasher(algorithm)


def _source_crc() -> SourceCrc:
    from convert.integrity.crc32 import SourceCrc

    return SourceCrc()


@dataclass
class Digests:
    tensor_crc32: dict[str, int] = field(default_factory=dict)
    tensor_digest: dict[str, str] = field(default_factory=dict)  # TENSOR_DIGEST, hex
    file_sha256: dict[str, str] = field(default_factory=dict)
    # The source files' SHA-256 (--hash-input), hashed beside the conversion; waits for them when asked.
    input_sha256: Callable[[], dict[str, str]] = dict
    # The source's zip records checked against their CRC-32s as the pieces read them (torch zip sources).
    source_crc: SourceCrc = field(default_factory=_source_crc)


Producer = Callable[[Digests], bytes]
