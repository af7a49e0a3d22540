"""What the writer learns while streaming: each output tensor's CRC-32 and SHA-256, each output file's SHA-256.

Bytes that depend on these (a zip's data descriptors and central directory, the manifest, SHA256SUMS) are
produced from them at their place in the file, after everything they describe has been written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from convert.formats.zip_crc import SourceCrc


@dataclass
class Digests:
    tensor_crc32: dict[str, int] = field(default_factory=dict)
    tensor_sha256: dict[str, str] = field(default_factory=dict)
    file_sha256: dict[str, str] = field(default_factory=dict)
    # The source files' SHA-256 (--hash-input), hashed beside the conversion; waits for them when asked.
    input_sha256: Callable[[], dict[str, str]] = dict
    # The source's zip records checked against their CRC-32s as the pieces read them (torch zip sources).
    source_crc: SourceCrc = field(default_factory=SourceCrc)


Producer = Callable[[Digests], bytes]
