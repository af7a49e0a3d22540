"""What a plan is made of: output files, and the pieces of source bytes streamed into them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from convert.common.dtypes import ITEM_SIZE
from convert.integrity.digests import Producer
from convert.model.transforms import Step

if TYPE_CHECKING:
    from convert.model.records import TensorRecord


class Cast(Protocol):
    """An element-wise conversion from one dtype to another, applied while streaming. Element-wise, so it runs on
    any slice of whole granules and never needs the whole tensor (a float32 copy of an expert would be 235 MB)."""

    src_dtype: str
    dst_dtype: str
    granule: int  # source bytes converted together: slices are whole multiples of it

    def out_nbytes(self, nbytes: int) -> int:
        """The converted size of nbytes of source elements."""
        ...

    def __call__(self, data: memoryview, tensor: str, first: int) -> memoryview:
        """data (which starts at element first of the piece) converted; a value the conversion cannot carry is a
        ConvertError naming tensor."""
        ...


@dataclass(frozen=True)
class ChainedCast:
    """first, then then: a source element type restored (first, the source container's restore) before the
    target's cast of it (then, written for the restored type). Both are element-wise, so the chain runs on slices
    of then's granule counted in first's source elements."""

    first: Cast
    then: Cast

    @property
    def src_dtype(self) -> str:
        return self.first.src_dtype

    @property
    def dst_dtype(self) -> str:
        return self.then.dst_dtype

    @property
    def granule(self) -> int:
        # then's granule, counted in elements, as source bytes; and whole granules of first
        elements = self.then.granule // ITEM_SIZE[self.then.src_dtype]
        return math.lcm(self.first.granule, elements * ITEM_SIZE[self.first.src_dtype])

    def out_nbytes(self, nbytes: int) -> int:
        return self.then.out_nbytes(self.first.out_nbytes(nbytes))

    def __call__(self, data: memoryview, tensor: str, first: int) -> memoryview:
        return self.then(self.first(data, tensor, first), tensor, first)


@dataclass(frozen=True)
class Piece:
    """One canonical tensor's bytes: read from the source, transformed, written at dst_offset."""

    tensor: str  # the output tensor it belongs to, for messages
    record: TensorRecord
    src_offset: int  # absolute, in record.stream
    shape: tuple[int, ...]  # as the source stores this piece
    dst_offset: int  # absolute, in the output file (relative to the tensor until packed)
    nbytes: int
    steps: tuple[Step, ...]
    cast: Cast | None = None  # applied after the steps

    @property
    def out_nbytes(self) -> int:
        """The bytes this piece takes in the output."""
        return self.cast.out_nbytes(self.nbytes) if self.cast is not None else self.nbytes

    @property
    def out_dtype(self) -> str:
        return self.cast.dst_dtype if self.cast is not None else self.record.dtype

    def moved(self, start: int) -> Piece:
        """This piece with its dst_offset counted from start (a tensor's pieces are planned relative to it)."""
        return replace(self, dst_offset=start + self.dst_offset)


@dataclass(frozen=True)
class TargetTensor:
    """One tensor of the output as its layout stores it, with the source pieces that fill it."""

    name: str
    layer: int | None
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]  # dst_offset relative to the tensor's start

    @property
    def nbytes(self) -> int:
        """The bytes the tensor takes in the output (its pieces cover it exactly)."""
        return sum(p.out_nbytes for p in self.pieces)


Blobs = tuple[tuple[int, bytes], ...]  # bytes at absolute offsets


@dataclass(frozen=True)
class OutputFile:
    name: str
    size: int
    blobs: Blobs = ()  # bytes known before streaming: a whole small file, headers
    pieces: tuple[Piece, ...] = ()  # absolute dst offsets
    copy_of: Path | None = None  # a file copied byte for byte
    is_text: bool = False
    # Bytes that depend on what was streamed before them (a zip's CRCs, the checksum files), made on arrival.
    deferred: tuple[tuple[int, Producer], ...] = ()
    # What a loader reads from this file besides its tensors, key by key (GGUF's key/value entries), as the
    # container's Format.metadata reads it back: manifest.json records it and verify compares it.
    metadata: Mapping[str, Any] | None = field(default=None, compare=False)

    def tensor_starts(self) -> dict[str, int]:
        """Each tensor's first byte in this file, in file order."""
        starts: dict[str, int] = {}
        for piece in sorted(self.pieces, key=lambda p: p.dst_offset):
            starts.setdefault(piece.tensor, piece.dst_offset)
        return starts

    @property
    def text(self) -> str:
        return b"".join(data for _, data in self.blobs).decode("utf-8")
