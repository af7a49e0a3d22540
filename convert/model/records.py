"""What every source reader returns: where one tensor's bytes sit, its element type and shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from convert.fileio.streams import ByteStream
    from convert.integrity.crc32 import CheckedRecord


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor's bytes sit in a stream, with its element type and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    stream: ByteStream
    offset: int  # absolute, within the stream
    nbytes: int
    checked: CheckedRecord | None = None  # the stored record holding it whose CRC-32 is checked (torch zips)
