"""Executing a plan: each output file is written under a temporary name, piece by piece at its planned
offset, fsynced and renamed; the plan's last file (the index) goes last, so an interrupted run never leaves
a folder that looks complete.

Memory is bounded by scheduling, not by clean-up: a pure rename is copied through one reused chunk buffer
without building a tensor; a transformed piece (a q/k permutation, a transposed expert block) is the only
thing ever held whole, one at a time.
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from convert.dtypes import TORCH_DTYPE
from convert.errors import ConvertError
from convert.formats.streams import ByteStream
from convert.plan import OutputFile, Piece, Plan
from convert.transforms import run_steps

CHUNK = 16 * 2**20
PARTIAL_SUFFIX = ".partial"


def partial_name(name: str) -> str:
    return f"{name}{PARTIAL_SUFFIX}"


class _Writer:
    def __init__(self, destination: Path, progress: tqdm) -> None:
        self.destination = destination
        self.progress = progress
        self.buffer = bytearray(CHUNK)

    def write(self, output: OutputFile) -> None:
        final = self.destination / output.name
        temporary = self.destination / partial_name(output.name)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        crcs: dict[str, int] | None = {} if output.finish is not None else None
        try:
            items: list[tuple[int, bytes | Piece]] = [*output.blobs, *((p.dst_offset, p) for p in output.pieces)]
            for offset, item in sorted(items, key=lambda entry: entry[0]):
                if isinstance(item, Piece):
                    self._piece(fd, item, temporary, crcs)
                else:
                    self._pwrite(fd, item, offset, temporary)
            if output.copy_of is not None:
                self._copy_file(fd, output.copy_of, temporary)
            if output.finish is not None and crcs is not None:
                for offset, data in output.finish(crcs):
                    self._pwrite(fd, data, offset, temporary)
            written = os.fstat(fd).st_size
            if written != output.size:
                raise ConvertError(f"wrote {written} bytes but the plan says {output.size}", file=temporary)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, final)

    def _piece(self, fd: int, piece: Piece, path: Path, crcs: dict[str, int] | None) -> None:
        """Pieces arrive in file order, so a tensor's CRC-32 accumulates over its pieces in order."""
        if not piece.steps:
            crc = self._copy_range(
                fd,
                piece.record.stream,
                piece.src_offset,
                piece.dst_offset,
                piece.nbytes,
                path,
                crcs.get(piece.tensor, 0) if crcs is not None else None,
            )
        else:
            data = bytearray(piece.nbytes)
            piece.record.stream.readinto(data, piece.src_offset)
            tensor = torch.frombuffer(data, dtype=TORCH_DTYPE[piece.record.dtype]).view(piece.shape)
            result = run_steps(tensor, piece.steps, piece.tensor).contiguous()
            # Flattened first: a contiguous tensor with a dimension of size 1 may keep an odd stride there.
            result = memoryview(result.reshape(-1).view(torch.uint8).numpy())
            self._pwrite(fd, result, piece.dst_offset, path)
            crc = zlib.crc32(result, crcs.get(piece.tensor, 0)) if crcs is not None else None
            self.progress.update(piece.nbytes)
        if crcs is not None and crc is not None:
            crcs[piece.tensor] = crc

    def _copy_range(
        self, fd: int, stream: ByteStream, src: int, dst: int, nbytes: int, path: Path, crc: int | None = None
    ) -> int | None:
        view = memoryview(self.buffer)
        done = 0
        while done < nbytes:
            size = min(CHUNK, nbytes - done)
            stream.readinto(view[:size], src + done)
            self._pwrite(fd, view[:size], dst + done, path)
            if crc is not None:
                crc = zlib.crc32(view[:size], crc)
            done += size
            self.progress.update(size)
        return crc

    def _copy_file(self, fd: int, source: Path, path: Path) -> None:
        stream = ByteStream([source])
        try:
            self._copy_range(fd, stream, 0, 0, stream.size, path)
        finally:
            stream.close()

    @staticmethod
    def _pwrite(fd: int, data: bytes | memoryview, offset: int, path: Path) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(fd, view[done:], offset + done)
            except OSError as exc:
                raise ConvertError(f"cannot write: {exc.strerror}", file=path) from None


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[tqdm]:
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not enabled,
        desc="converting",
        dynamic_ncols=True,
    )
    try:
        yield bar
    finally:
        bar.close()


def execute(plan: Plan, destination: Path, *, progress: bool) -> None:
    """Write every planned file into destination; the last one only once all others are durable."""
    destination.mkdir(parents=True, exist_ok=True)
    *body, marker = plan.files
    with progress_bar(plan.payload_bytes, progress) as bar:
        writer = _Writer(destination, bar)
        for output in body:
            writer.write(output)
        fsync_folder(destination)
        writer.write(marker)
        fsync_folder(destination)
