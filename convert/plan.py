"""Planning a conversion from metadata alone: which bytes of the source land at which offset of which output
file, through which transforms. The plan fixes every output file's exact size and every small file's content
before a byte is written, which is what --dry-run prints.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

from convert import integrity
from convert.dtypes import CONFIG_NAME, nbytes_of
from convert.errors import ConvertError
from convert.files import MAX_TOKENIZER, read_small
from convert.formats.safetensors import TensorRecord, layout_header
from convert.formats.torchzip_writer import layout_torch_zip
from convert.mapping import KindLayout, LayoutTable, layout
from convert.outputs import OutputFile, Piece
from convert.params import ModelParams, hf_config_json, hf_params_json, json_text, mistral_params_json
from convert.source import HF_INDEX, TOKENIZER, Source
from convert.tokenizer import hf_tokenizer_files
from convert.transforms import steps_between

log = logging.getLogger("mixtral-convert")

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # decimal, as transformers shards the published checkpoint
DESCRIBED_TEXT_LIMIT = 2**20  # --dry-run --json shows the content of text files up to this size
MEGABLOCKS_FILES = 8  # consolidated.00.pt ... consolidated.07.pt, as uploaded and as transformers' script reads
SAFETENSORS_METADATA = MappingProxyType({"format": "pt"})
# check_source names each missing tensor when params imply at most this many times the tensors present, plus a few
# (a layer or two too many); beyond, one line says the counts disagree, and nothing per tensor is built.
EXPECTED_SLACK = 2
EXPECTED_SLACK_TENSORS = 64


@dataclass(frozen=True)
class TargetTensor:
    name: str
    layer: int | None
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]  # dst_offset relative to the tensor's start

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


@dataclass(frozen=True)
class PlanOptions:
    """How a conversion is planned, as the command line sets it."""

    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    hash_input: bool = False  # record each source file's SHA-256 in the manifest
    instruct: bool = False  # add the chat template (hf)
    strict: bool = False  # warnings about tensors are errors
    checksums: bool = True  # SHA256SUMS and manifest.json


DEFAULT_OPTIONS = PlanOptions()


@dataclass(frozen=True)
class Plan:
    source: Source
    target: LayoutTable
    params: ModelParams
    dtype: str
    files: tuple[OutputFile, ...]  # in write order; the last one marks the output complete
    options: PlanOptions = DEFAULT_OPTIONS  # what the run does beyond the files: hashing, strictness

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def describe(self) -> dict:
        files = []
        for f in self.files:
            entry: dict[str, object] = {"name": f.name, "size": f.size}
            if f.is_text and f.size <= DESCRIBED_TEXT_LIMIT:
                entry["content"] = f.text
            files.append(entry)
        return {
            "source": {
                "folder": str(self.source.folder),
                "layout": self.source.layout.name,
                "files": [str(p) for p in self.source.weight_files],
            },
            "target": self.target.name,
            "dtype": self.dtype,
            "tensors": len({p.tensor for f in self.files for p in f.pieces}),
            "files": files,
        }


def check_source(source: Source) -> list[ConvertError]:
    """Every problem with the source's tensors against its layout table and params: unexpected or missing
    names, wrong shapes, files another loader would read instead. convert stops at the first; inspect lists them
    all."""
    params = source.params
    env = params.shape_env()
    problems = list(source.ambiguities)
    label = source.folder
    implied = source.layout.tensor_count(params.n_layers, params.n_experts)
    if implied > EXPECTED_SLACK * len(source.records) + EXPECTED_SLACK_TENSORS:
        # Listing each missing tensor would build a list as long as layers times experts (10**6 layers: gigabytes,
        # minutes) for what one count says: the parameters do not describe these files.
        problems.append(
            ConvertError(
                f"{params.n_layers:,} layers and {params.n_experts:,} experts make {implied:,} tensors in the "
                f"{source.layout.name} layout, but the source holds {len(source.records):,}: "
                f"{source.params_file.name} does not describe these weights",
                file=source.params_file,
            )
        )
        return problems
    expected = {t.name: t for t in source.layout.tensors(params.n_layers, params.n_experts)}
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


def main_dtype(source: Source, *, strict: bool = False) -> str:
    """The dtype most bytes have; config.json states it. A tensor that differs is kept as it is, with a warning
    (an error when strict)."""
    weight: Counter[str] = Counter()
    for record in source.records.values():
        weight[record.dtype] += record.nbytes
    dtype = weight.most_common(1)[0][0] if weight else "BF16"
    for record in source.records.values():
        if record.dtype != dtype and strict:
            raise ConvertError(
                f"dtype {record.dtype} unlike the rest ({dtype}) (--strict)",
                file=record.stream.label,
                tensor=record.name,
            )
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
        result.append(TargetTensor(stored.name, stored.layer, dtypes.pop(), stored.shape(env), tuple(pieces)))
    return result


def _placed(tensor: TargetTensor, start: int) -> tuple[Piece, ...]:
    return tuple(
        Piece(p.tensor, p.record, p.src_offset, p.shape, start + p.dst_offset, p.nbytes, p.steps) for p in tensor.pieces
    )


def _text_file(name: str, text: str) -> OutputFile:
    data = text.encode("utf-8")
    return OutputFile(name, len(data), blobs=((0, data),), is_text=True)


def _tokenizer_files(source: Source, target: LayoutTable, *, instruct: bool) -> list[OutputFile]:
    """tokenizer.model copied byte for byte; for HF, also tokenizer.json and its configs built from it, so
    transformers loads the folder without sentencepiece. A tokenizer that cannot be translated is a warning
    (the weights are still right), and an error when --instruct asked for the chat template."""
    if source.tokenizer is None:
        if instruct:
            raise ConvertError(f"--instruct needs a {TOKENIZER}", file=source.folder)
        log.warning("%s: no %s; the output will have no tokenizer", source.folder, TOKENIZER)
        return []
    files = [OutputFile(TOKENIZER, source.tokenizer.stat().st_size, copy_of=source.tokenizer)]
    if target.params_style != "hf_config":
        if instruct:
            raise ConvertError(
                f"--instruct writes a chat template into HF tokenizer files; --to {target.name} has "
                "none (the Mistral layouts keep tokenizer.model only)"
            )
        return files
    try:
        texts = hf_tokenizer_files(
            read_small(source.tokenizer, MAX_TOKENIZER, TOKENIZER),
            vocab_size=source.params.vocab_size,
            instruct=instruct,
            source=str(source.tokenizer),
        )
    except ConvertError as exc:
        if instruct:
            raise
        # the line is escaped already: as the message itself, not an argument (arguments are shown() again)
        log.warning(exc.line() + "; tokenizer.json not written (transformers will need sentencepiece)")
        return files
    return files + [_text_file(name, text) for name, text in sorted(texts.items())]


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


def _safetensors_file(name: str, tensors: list[TargetTensor]) -> OutputFile:
    header = layout_header([(t.name, t.dtype, t.shape) for t in tensors], dict(SAFETENSORS_METADATA))
    pieces = tuple(p for t in tensors for p in _placed(t, header.offsets[t.name]))
    return OutputFile(name, header.size, blobs=((0, header.header),), pieces=pieces)


def _torch_zip_file(name: str, tensors: list[TargetTensor]) -> OutputFile:
    archive = name.rsplit(".", 1)[0]  # the folder inside the zip: torch.save uses the file's stem
    zipped = layout_torch_zip(archive, [(t.name, t.dtype, t.shape) for t in tensors])
    pieces = tuple(p for t in tensors for p in _placed(t, zipped.tensor_offsets[t.name]))
    return OutputFile(name, zipped.size, blobs=zipped.blobs, pieces=pieces, deferred=zipped.deferred)


def _weights_hf(tensors: list[TargetTensor], max_shard_size: int) -> tuple[list[OutputFile], OutputFile]:
    groups = shard_groups(tensors, max_shard_size)
    files = []
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        files.append(_safetensors_file(name, group))
        weight_map.update(dict.fromkeys((t.name for t in group), name))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    return files, _text_file(HF_INDEX, json_text(index))


def _weights_mistral(tensors: list[TargetTensor], _max_shard_size: int) -> tuple[list[OutputFile], None]:
    return [_safetensors_file("consolidated.safetensors", tensors)], None


def _weights_torrent(tensors: list[TargetTensor], _max_shard_size: int) -> tuple[list[OutputFile], None]:
    return [_torch_zip_file("consolidated.00.pth", tensors)], None


def _weights_megablocks(tensors: list[TargetTensor], _max_shard_size: int) -> tuple[list[OutputFile], None]:
    """Always MEGABLOCKS_FILES files, as uploaded: transformers' convert_mixtral_weights_to_hf.py opens
    consolidated.00.pt ... consolidated.07.pt whatever the model's depth. Consecutive layers share a file; the
    embedding goes with the first, the final norm and output with the last that holds a layer; with fewer layers
    than files, the remaining files hold an empty state dict (the upload's own split is not known; any split reads
    back the same)."""
    n_layers = 1 + max((t.layer for t in tensors if t.layer is not None), default=0)
    count = min(MEGABLOCKS_FILES, n_layers)
    groups: list[list[TargetTensor]] = [[] for _ in range(MEGABLOCKS_FILES)]
    seen_layer = False
    for tensor in tensors:
        if tensor.layer is not None:
            seen_layer = True
            groups[tensor.layer * count // n_layers].append(tensor)
        else:
            groups[count - 1 if seen_layer else 0].append(tensor)
    return [_torch_zip_file(f"consolidated.{i:02d}.pt", group) for i, group in enumerate(groups)], None


_WEIGHT_WRITERS: MappingProxyType[str, Callable[[list[TargetTensor], int], tuple[list[OutputFile], OutputFile | None]]]
_WEIGHT_WRITERS = MappingProxyType(
    {
        "safetensors_sharded": _weights_hf,
        "safetensors_single": _weights_mistral,
        "torch_zip": _weights_torrent,
        "torch_zip_multi": _weights_megablocks,
    }
)


def _params_files(target: LayoutTable, params: ModelParams, dtype: str) -> list[OutputFile]:
    if target.params_style == "mistral":
        return [_text_file("params.json", mistral_params_json(params))]
    if target.params_style == "hf_params":
        return [_text_file("params.json", hf_params_json(params))]
    if target.params_style == "hf_config":
        config = hf_config_json(params, CONFIG_NAME[dtype], dict(target.extra["config_defaults"]))
        generation = json_text(dict(target.extra["generation_config"]))
        return [_text_file("generation_config.json", generation), _text_file("config.json", config)]
    raise ValueError(f"unknown params style {target.params_style!r}")


def build_plan(source: Source, target_name: str, options: PlanOptions = DEFAULT_OPTIONS) -> Plan:
    """Weights first, then the tokenizer and the parameters; the last file (the HF index, or params.json)
    is what makes the folder a loadable checkpoint, so it is written last."""
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
    dtype = main_dtype(source, strict=options.strict)
    tensors = target_tensors(source, target)
    weights, index = _WEIGHT_WRITERS[target.container](tensors, options.max_shard_size)
    files = [
        *weights,
        *_tokenizer_files(source, target, instruct=options.instruct),
        *_params_files(target, source.params, dtype),
    ]
    if index is not None:
        files.append(index)
    *body, marker = files
    manifest = integrity.manifest_file(
        {
            "source": {
                "layout": source.layout.name,
                "files": [{"name": p.name, "size": p.stat().st_size} for p in source.weight_files],
            },
            "target": target.name,
        },
        _placements(tensors, weights),
        [(p.name, p.stat().st_size) for p in source.input_files] if options.hash_input else None,
    )
    if not options.checksums:
        return Plan(source, target, source.params, dtype, (*body, marker), options)
    sums = integrity.sums_file([*body, manifest, marker])
    return Plan(source, target, source.params, dtype, (*body, manifest, sums, marker), options)


def _placements(tensors: list[TargetTensor], weights: list[OutputFile]) -> list[integrity.TensorEntry]:
    """Where each tensor landed: its file and absolute byte range, in file order."""
    by_name = {t.name: t for t in tensors}
    entries = []
    for output in weights:
        for name, begin in output.tensor_starts().items():
            tensor = by_name[name]
            entries.append(
                integrity.TensorEntry(name, output.name, tensor.dtype, tensor.shape, begin, begin + tensor.nbytes)
            )
    return entries
