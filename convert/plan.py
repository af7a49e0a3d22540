"""Planning a conversion from metadata alone: which bytes of the source land at which offset of which output
file, through which transforms. The plan fixes every output file's exact size and every small file's content
before a byte is written, which is what --dry-run prints.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from convert.dtypes import CONFIG_NAME, nbytes_of
from convert.errors import ConvertError
from convert.formats.safetensors import TensorRecord, layout_header
from convert.mapping import KindLayout, LayoutTable, layout, layout_names
from convert.params import ModelParams, hf_config_json, json_text
from convert.source import HF_INDEX, TOKENIZER, Source
from convert.transforms import Step, steps_between

log = logging.getLogger("mixtral-convert")

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # decimal, as transformers shards the published checkpoint
SAFETENSORS_METADATA = MappingProxyType({"format": "pt"})


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


@dataclass(frozen=True)
class TargetTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]  # dst_offset relative to the tensor's start

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


@dataclass(frozen=True)
class OutputFile:
    name: str
    size: int
    head: bytes = b""  # written first: a whole small file, or a safetensors header
    pieces: tuple[Piece, ...] = ()  # absolute dst offsets
    copy_of: Path | None = None  # a file copied byte for byte
    is_text: bool = False


@dataclass(frozen=True)
class Plan:
    source: Source
    target: LayoutTable
    params: ModelParams
    dtype: str
    files: tuple[OutputFile, ...]  # in write order; the last one marks the output complete

    @property
    def payload_bytes(self) -> int:
        return sum(f.size - len(f.head) for f in self.files)

    def describe(self) -> dict:
        files = []
        for f in self.files:
            entry: dict[str, object] = {"name": f.name, "size": f.size}
            if f.is_text:
                entry["content"] = f.head.decode("utf-8")
            files.append(entry)
        return {
            "source": {
                "folder": str(self.source.folder),
                "layout": self.source.layout.name,
                "files": [str(p) for p in self.source.weight_files],
            },
            "target": self.target.name,
            "dtype": self.dtype,
            "tensors": sum(len(f.pieces) for f in self.files),
            "files": files,
        }


def check_source(source: Source) -> list[ConvertError]:
    """Every problem with the source's tensors against its layout table and params: unexpected or missing
    names, wrong shapes. convert stops at the first; inspect lists them all."""
    params = source.params
    env = params.shape_env()
    expected = {t.name: t for t in source.layout.tensors(params.n_layers, params.n_experts)}
    problems = []
    label = source.folder
    for name, record in source.records.items():
        stored = expected.get(name)
        if stored is None:
            problems.append(
                ConvertError(
                    f"unexpected tensor: not part of the {source.layout.name} layout for "
                    f"{params.n_layers} layers and {params.n_experts} experts",
                    file=record.stream.label,
                    tensor=name,
                )
            )
        elif record.shape != stored.shape(env):
            problems.append(
                ConvertError(
                    f"shape {list(record.shape)} does not match {list(stored.shape(env))} "
                    f"required by {source.params_file.name}",
                    file=record.stream.label,
                    tensor=name,
                )
            )
    for name in expected:
        if name not in source.records:
            problems.append(ConvertError("tensor is missing", file=label, tensor=name))
    return problems


def main_dtype(source: Source) -> str:
    """The dtype most bytes have; config.json states it. A tensor that differs is kept as it is, with a warning."""
    weight: Counter[str] = Counter()
    for record in source.records.values():
        weight[record.dtype] += record.nbytes
    dtype = weight.most_common(1)[0][0] if weight else "BF16"
    for record in source.records.values():
        if record.dtype != dtype:
            log.warning(
                "%s: tensor %s has dtype %s unlike the rest (%s); kept as it is",
                record.stream.label,
                record.name,
                record.dtype,
                dtype,
            )
    if dtype not in CONFIG_NAME:
        raise ConvertError(f"weights are {dtype}, not a floating-point type", file=source.folder)
    return dtype


def _source_pieces(source: Source) -> dict[tuple, tuple[TensorRecord, int, KindLayout]]:
    """Canonical key -> (record, absolute offset, how the source stores the kind)."""
    params = source.params
    env = params.shape_env()
    pieces = {}
    for stored in source.layout.tensors(params.n_layers, params.n_experts):
        record = source.records[stored.name]
        piece_bytes = nbytes_of(record.dtype, stored.layout.piece_shape(env))
        for index, key in enumerate(stored.canonical_keys()):
            pieces[key] = (record, record.offset + index * piece_bytes, stored.layout)
    return pieces


def target_tensors(source: Source, target: LayoutTable) -> list[TargetTensor]:
    """The target's tensors in its module order, each with the source pieces that fill it."""
    params = source.params
    env = params.shape_env()
    sources = _source_pieces(source)
    result = []
    for stored in target.tensors(params.n_layers, params.n_experts):
        pieces = []
        offset = 0
        dtypes = set()
        for key in stored.canonical_keys():
            record, src_offset, src_layout = sources[key]
            dtypes.add(record.dtype)
            shape = src_layout.piece_shape(env)
            nbytes = nbytes_of(record.dtype, shape)
            steps = steps_between(src_layout, stored.layout, env)
            pieces.append(Piece(stored.name, record, src_offset, shape, offset, nbytes, steps))
            offset += nbytes
        if len(dtypes) > 1:
            raise ConvertError(f"cannot stack experts of different dtypes {sorted(dtypes)}", tensor=stored.name)
        result.append(TargetTensor(stored.name, dtypes.pop(), stored.shape(env), tuple(pieces)))
    return result


def _placed(tensor: TargetTensor, start: int) -> tuple[Piece, ...]:
    return tuple(
        Piece(p.tensor, p.record, p.src_offset, p.shape, start + p.dst_offset, p.nbytes, p.steps) for p in tensor.pieces
    )


def _text_file(name: str, text: str) -> OutputFile:
    data = text.encode("utf-8")
    return OutputFile(name, len(data), head=data, is_text=True)


def _tokenizer_file(source: Source) -> list[OutputFile]:
    if source.tokenizer is None:
        log.warning("%s: no %s; the output will have no tokenizer", source.folder, TOKENIZER)
        return []
    return [OutputFile(TOKENIZER, source.tokenizer.stat().st_size, copy_of=source.tokenizer)]


def shard_groups(tensors: list[TargetTensor], max_shard_size: int) -> list[list[TargetTensor]]:
    """Walk tensors in module order; start a new shard when the next tensor would push the current one past
    max_shard_size and it is not empty (how transformers sharded the published checkpoint)."""
    shards: list[list[TargetTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _pack_hf(
    source: Source, target: LayoutTable, tensors: list[TargetTensor], dtype: str, max_shard_size: int
) -> list[OutputFile]:
    groups = shard_groups(tensors, max_shard_size)
    files = []
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        header = layout_header([(t.name, t.dtype, t.shape) for t in group], dict(SAFETENSORS_METADATA))
        pieces = tuple(p for t in group for p in _placed(t, header.offsets[t.name]))
        files.append(OutputFile(name, header.size, head=header.header, pieces=pieces))
        weight_map.update(dict.fromkeys((t.name for t in group), name))
    files += _tokenizer_file(source)
    files.append(_text_file("generation_config.json", json_text(dict(target.extra["generation_config"]))))
    config = hf_config_json(source.params, CONFIG_NAME[dtype], dict(target.extra["config_defaults"]))
    files.append(_text_file("config.json", config))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    files.append(_text_file(HF_INDEX, json_text(index)))  # last: its presence marks the output complete
    return files


_PACKERS: MappingProxyType[str, Callable[..., list[OutputFile]]] = MappingProxyType({"safetensors_sharded": _pack_hf})


def build_plan(source: Source, target_name: str, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Plan:
    problems = check_source(source)
    if problems:
        first = problems[0]
        if len(problems) > 1:
            first = ConvertError(
                f"{first.rule} (and {len(problems) - 1} more problems: see mixtral-convert inspect)",
                file=first.file,
                tensor=first.tensor,
            )
        raise first
    target = layout(target_name)
    packer = _PACKERS.get(target.container)
    if packer is None:
        writable = sorted(n for n in layout_names() if layout(n).container in _PACKERS)
        raise ConvertError(f"writing the {target_name} layout is not supported yet (supported: {', '.join(writable)})")
    dtype = main_dtype(source)
    tensors = target_tensors(source, target)
    files = packer(source, target, tensors, dtype, max_shard_size)
    return Plan(source, target, source.params, dtype, tuple(files))
