"""Mistral's SentencePiece tokenizer.model read without sentencepiece or protobuf: the protobuf wire format is parsed
here directly, and the model checked for translation into other tokenizer formats (convert/tokenizer/hf_files.py,
GGUF's vocabulary).

Only the model Mixtral ships is accepted: BPE with byte fallback, identity normalization with SentencePiece's dummy
prefix and no whitespace collapsing, no user-defined or unused pieces. Anything else is refused with a ConvertError
rather than converted into a tokenizer that encodes differently.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

from convert.common.errors import ConvertError

# ModelProto.SentencePiece.Type (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


_PIECE_TYPES = {NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE}


# TrainerSpec.ModelType
_MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}


BPE = 2


SPACE = "\u2581"  # "▁", SentencePiece's escaped space


@dataclass(frozen=True)
class VocabEntry:
    """One entry of the vocabulary (ModelProto.SentencePiece): its text, score and type."""

    text: str
    score: float
    kind: int


@dataclass(frozen=True)
class SentencePieceModel:
    """The fields of ModelProto that decide how text is encoded; protobuf defaults where a field is absent."""

    pieces: tuple[VocabEntry, ...]
    model_type: int = 1
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    charsmap: bytes = b""
    normalization_rules: str = ""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    denormalizer_rules: bool = False


class _Corrupt(Exception):
    """Raised inside the parser; turned into a ConvertError naming the file at the top."""


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= end:
            raise _Corrupt(f"truncated varint at byte {pos}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >= 1 << 64:
                raise _Corrupt(f"varint longer than 64 bits before byte {pos}")
            return value, pos
    raise _Corrupt(f"varint longer than 10 bytes before byte {pos}")


def _fields(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of one message: an int for varints and fixed-width fields (raw bits),
    the bytes for length-delimited ones. Groups (wire types 3 and 4) are obsolete and not in this schema."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Corrupt(f"field number 0 at byte {pos}")
        if wire == 0:
            value, pos = _varint(data, pos, end)
            yield field, wire, value
        elif wire == 1:
            if pos + 8 > end:
                raise _Corrupt(f"truncated 64-bit field {field} at byte {pos}")
            yield field, wire, int.from_bytes(data[pos : pos + 8], "little")
            pos += 8
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise _Corrupt(f"field {field} of {length} bytes runs past the end of its message at byte {pos}")
            yield field, wire, data[pos : pos + length]
            pos += length
        elif wire == 5:
            if pos + 4 > end:
                raise _Corrupt(f"truncated 32-bit field {field} at byte {pos}")
            yield field, wire, int.from_bytes(data[pos : pos + 4], "little")
            pos += 4
        else:
            raise _Corrupt(f"invalid wire type {wire} for field {field} before byte {pos}")


def _bytes(field: int, wire: int, value: int | bytes, message: str) -> bytes:
    """The value of a length-delimited field (string, bytes or sub-message), checking the wire type."""
    if wire != 2 or not isinstance(value, bytes):
        raise _Corrupt(f"{message} field {field} has wire type {wire}, expected 2")
    return value


def _number(field: int, wire: int, value: int | bytes, message: str, wanted: int = 0) -> int:
    """The raw bits of a varint (wanted 0) or 32-bit (wanted 5) field, checking the wire type."""
    if wire != wanted or not isinstance(value, int):
        raise _Corrupt(f"{message} field {field} has wire type {wire}, expected {wanted}")
    return value


def _int32(value: int) -> int:
    """int32 fields are varints of the two's complement 64-bit value (negative ids such as pad_id = -1)."""
    if value >= 1 << 63:
        value -= 1 << 64
    if not -(1 << 31) <= value < 1 << 31:
        raise _Corrupt(f"int32 field out of range: {value}")
    return value


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _Corrupt(f"{what} is not UTF-8: {raw[:32]!r}") from error


_SCORE = struct.Struct("<f")


def _usual_piece(raw: bytes) -> VocabEntry | None:
    """The encoding protobuf writes for nearly every piece (text under 128 bytes, score, then the type unless it
    is NORMAL), read without the general parser below; None for any other bytes, which the general parser then
    reads or refuses. A tokenizer.model holds 32,000 pieces: this halves what reading it costs before a
    conversion's first byte moves, and for these bytes its result is the general parser's (tests/test_tokenizer.py
    runs both on every piece)."""
    end = 2 + raw[1] if len(raw) > 1 and raw[0] == 0x0A and raw[1] < 0x80 else 0
    if not end or raw[end : end + 1] != b"\x15":
        return None
    if len(raw) == end + 5:
        kind = NORMAL
    elif len(raw) == end + 7 and raw[end + 5] == 0x18 and raw[end + 6] in _PIECE_TYPES:
        kind = raw[end + 6]
    else:
        return None
    (score,) = _SCORE.unpack_from(raw, end + 1)
    try:
        text = raw[2:end].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return VocabEntry(text, score, kind) if score == score else None  # NaN: the general parser says so


def _piece(raw: bytes) -> VocabEntry:
    return _usual_piece(raw) or _any_piece(raw)


def _any_piece(raw: bytes) -> VocabEntry:
    """A SentencePiece message in any valid encoding (fields in any order, repeated: the last one counts)."""
    text, score, kind = "", 0.0, NORMAL
    for field, wire, value in _fields(raw, 0, len(raw)):
        if field == 1:
            text = _text(_bytes(field, wire, value, "SentencePiece"), "a piece")
        elif field == 2:
            bits = _number(field, wire, value, "SentencePiece", wanted=5)
            score = struct.unpack("<f", bits.to_bytes(4, "little"))[0]
            if score != score:  # NaN would make the merge ranking meaningless
                raise _Corrupt(f"piece {text!r} has a NaN score")
        elif field == 3:
            kind = _number(field, wire, value, "SentencePiece")
            if kind not in _PIECE_TYPES:
                raise _Corrupt(f"piece {text!r} has unknown type {kind}")
    return VocabEntry(text, score, kind)


_TRAINER_INTS = {3: "model_type", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}


_TRAINER_BOOLS = {35: "byte_fallback", 24: "treat_whitespace_as_suffix"}


_NORMALIZER_BOOLS = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}


def _trainer_spec(raw: bytes, into: dict[str, object]) -> None:
    for field, wire, value in _fields(raw, 0, len(raw)):
        if field in _TRAINER_INTS:
            into[_TRAINER_INTS[field]] = _int32(_number(field, wire, value, "TrainerSpec"))
        elif field in _TRAINER_BOOLS:
            into[_TRAINER_BOOLS[field]] = bool(_number(field, wire, value, "TrainerSpec"))


def _normalizer_spec(raw: bytes, into: dict[str, object]) -> None:
    for field, wire, value in _fields(raw, 0, len(raw)):
        if field == 1:
            into["normalizer_name"] = _text(_bytes(field, wire, value, "NormalizerSpec"), "the normalizer name")
        elif field == 2:
            into["charsmap"] = _bytes(field, wire, value, "NormalizerSpec")
        elif field in _NORMALIZER_BOOLS:
            into[_NORMALIZER_BOOLS[field]] = bool(_number(field, wire, value, "NormalizerSpec"))
        elif field == 6:
            rules = _bytes(field, wire, value, "NormalizerSpec")
            into["normalization_rules"] = _text(rules, "the normalization rules")


def _denormalizer_has_rules(raw: bytes) -> bool:
    """A denormalizer rewrites decoded text; it only acts with a character map or rules."""
    return any(
        field in (2, 6) and _bytes(field, wire, value, "NormalizerSpec")
        for field, wire, value in _fields(raw, 0, len(raw))
    )


def parse_model(data: bytes) -> SentencePieceModel:
    """Read a serialized sentencepiece.ModelProto; raises _Corrupt when the bytes are not one."""
    pieces = []
    spec: dict[str, object] = {}
    for field, wire, value in _fields(data, 0, len(data)):
        if field == 1:
            pieces.append(_piece(_bytes(field, wire, value, "ModelProto")))
        elif field == 2:
            _trainer_spec(_bytes(field, wire, value, "ModelProto"), spec)
        elif field == 3:
            _normalizer_spec(_bytes(field, wire, value, "ModelProto"), spec)
        elif field == 5:
            spec["denormalizer_rules"] = _denormalizer_has_rules(_bytes(field, wire, value, "ModelProto"))
    return SentencePieceModel(pieces=tuple(pieces), **spec)  # type: ignore[arg-type]


def _byte_piece(value: int) -> str:
    return f"<0x{value:02X}>"


def check_model(model: SentencePieceModel, *, vocab_size: int | None, source: str) -> None:
    """Refuse what tokenizer.json cannot reproduce exactly, and a vocabulary that does not fit the weights."""

    def fail(rule: str) -> NoReturn:
        raise ConvertError(rule, file=source)

    if not model.pieces:
        fail("not a SentencePiece model: it has no pieces")
    if model.model_type != BPE:
        name = _MODEL_TYPES.get(model.model_type, f"type {model.model_type}")
        fail(f"SentencePiece model is {name}, not BPE with byte fallback (as Mistral's tokenizer.model)")
    ids: dict[str, int] = {}
    for index, piece in enumerate(model.pieces):
        if piece.text in ids:
            fail(
                f"not a valid SentencePiece model: piece {piece.text!r} appears twice (ids {ids[piece.text]}, {index})"
            )
        if not piece.text:
            fail(f"not a valid SentencePiece model: piece {index} is empty")
        ids[piece.text] = index
    byte_ids = [ids.get(_byte_piece(value)) for value in range(256)]
    missing = [_byte_piece(v) for v, i in enumerate(byte_ids) if i is None or model.pieces[i].kind != BYTE]
    if not model.byte_fallback or missing:
        detail = "byte_fallback is off" if not model.byte_fallback else f"byte pieces missing, e.g. {missing[0]}"
        fail(f"SentencePiece BPE model without byte fallback ({detail}); only byte-fallback models are supported")
    if vocab_size is not None and len(model.pieces) != vocab_size:
        fail(f"tokenizer has {len(model.pieces)} pieces but the model's vocabulary is {vocab_size}")
    for name, index, kinds in (
        ("unk_id", model.unk_id, {UNKNOWN}),
        ("bos_id", model.bos_id, {CONTROL}),
        ("eos_id", model.eos_id, {CONTROL}),
    ):
        if not 0 <= index < len(model.pieces) or model.pieces[index].kind not in kinds:
            fail(f"{name} {index} is not a piece of type {'UNKNOWN' if UNKNOWN in kinds else 'CONTROL'}")
    if model.pad_id >= len(model.pieces) or (model.pad_id >= 0 and model.pieces[model.pad_id].kind != CONTROL):
        fail(f"pad_id {model.pad_id} is not a piece of type CONTROL")
    unknown = [i for i, p in enumerate(model.pieces) if p.kind == UNKNOWN]
    if unknown != [model.unk_id]:
        fail(f"expected exactly one UNKNOWN piece, at unk_id {model.unk_id}; found ids {unknown[:5]}")
    for kind, name in ((USER_DEFINED, "USER_DEFINED"), (UNUSED, "UNUSED")):
        found = [p.text for p in model.pieces if p.kind == kind]
        if found:
            fail(
                f"{len(found)} {name} pieces (e.g. {found[0]!r}), which tokenizer.json cannot encode as "
                "SentencePiece does; not supported"
            )
    if (
        model.charsmap
        or model.normalization_rules
        or model.remove_extra_whitespaces
        or not model.escape_whitespaces
        or model.treat_whitespace_as_suffix
        or model.denormalizer_rules
    ):
        fail(
            f"SentencePiece normalizer {model.normalizer_name or '(unnamed)'!r} rewrites text (character map, "
            "whitespace removal or suffix spaces); only identity normalization, as Mistral's, is supported"
        )


def special_ids(model: SentencePieceModel) -> list[int]:
    """Pieces SentencePiece never produces from text: matched as whole tokens by tokenizers, skipped on decode."""
    return [i for i, p in enumerate(model.pieces) if p.kind in (UNKNOWN, CONTROL)]


def read_model(model: bytes, source: str) -> SentencePieceModel:
    """The SentencePiece model in `model` (the bytes of tokenizer.model, read from `source`), or a ConvertError."""
    try:
        return parse_model(bytes(model))
    except _Corrupt as error:
        raise ConvertError(f"not a SentencePiece model: {error}", file=source) from None


def checked_model(model: bytes, *, vocab_size: int | None, instruct: bool, source: str) -> SentencePieceModel:
    """read_model, checked for translation (every other container's tokenizer is built from it): vocab_size is the
    model's embedding rows, checked against the piece count; instruct needs the dummy prefix, whose space the chat
    template's spaces stand for."""
    parsed = read_model(model, source)
    check_model(parsed, vocab_size=vocab_size, source=source)
    if instruct and not parsed.add_dummy_prefix:
        raise ConvertError(
            "the chat template needs SentencePiece's dummy prefix, which add_dummy_prefix turns off", file=source
        )
    return parsed
