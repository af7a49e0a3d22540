"""Pickle opcodes written by hand, for the tests that build hostile or mutated pickles. Kept apart from
convert/containers/torchzip/writer.py on purpose: the hostile pickles must not depend on the code under test."""

from __future__ import annotations

import struct


def uni(text: str) -> bytes:
    """BINUNICODE."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def glob(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def num(value: int) -> bytes:
    if 0 <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def tup(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(num(v) for v in values) + b"t"


def call(module: str, name: str, *args: bytes) -> bytes:
    """module.name(*args) as GLOBAL, MARK, args, TUPLE, REDUCE."""
    return glob(module, name) + b"(" + b"".join(args) + b"tR"
