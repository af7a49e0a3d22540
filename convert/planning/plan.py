"""Planning a conversion from metadata alone: which bytes of the source land at which offset of which output
file, through which transforms. The plan fixes every output file's exact size and every small file's content
before a byte is written, which is what --dry-run prints.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from convert.common.dtypes import CONFIG_NAME, ITEM_SIZE
from convert.common.errors import ConvertError
from convert.containers import format_of
from convert.containers.contract import Format, OutputRequest
from convert.integrity import manifest as integrity
from convert.model.outputs import Cast, ChainedCast, OutputFile, Piece, TargetTensor
from convert.model.params import ModelParams
from convert.model.records import TensorRecord
from convert.model.tables import ATTRIBUTES, KindLayout, LayoutTable, StoredTensor, canonical, layout, target_names
from convert.model.transforms import TRANSFORMS, Step
from convert.planning.source import TOKENIZER, Source

log = logging.getLogger("mixtral-convert")

DESCRIBED_TEXT_LIMIT = 2**20  # --dry-run --json shows the content of text files up to this size
# check_source names each missing tensor when params imply at most this many times the tensors present, plus a few
# (a layer or two too many); beyond, one line says the counts disagree, and nothing per tensor is built.
EXPECTED_SLACK = 2
EXPECTED_SLACK_TENSORS = 64


@dataclass(frozen=True)
class PlanOptions:
    """How a conversion is planned, as the command line sets it."""

    max_shard_size: int | None = None  # None: the container's default (hf: 5 GB shards; others: one file)
    hash_input: bool = False  # record each source file's SHA-256 in the manifest
    instruct: bool = False  # add the chat template (hf)
    strict: bool = False  # warnings about tensors are errors
    checksums: bool = True  # SHA256SUMS and manifest.json
    outtype: str | None = None  # the element type a container that can convert is asked for; None: the source's


DEFAULT_OPTIONS = PlanOptions()


@dataclass(frozen=True)
class Plan:
    source: Source
    target: LayoutTable
    params: ModelParams
    dtype: str
    files: tuple[OutputFile, ...]  # in write order; the last one marks the output complete
    options: PlanOptions = DEFAULT_OPTIONS  # what the run does beyond the files: hashing, strictness
    tensors: tuple[TargetTensor, ...] = ()  # the target's tensors the files hold (verify --against checks them)
    # --resume found the output folder already complete for this plan and wrote nothing.
    kept_complete: bool = False

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
            "outtype": self.options.outtype,
            "tensors": len({p.tensor for f in self.files for p in f.pieces}),
            "files": files,
        }


def check_source(source: Source) -> list[ConvertError]:
    """Every problem with the source's tensors against its layout table and params: unexpected or missing
    names, wrong shapes, files another loader would read instead. convert stops at the first; inspect lists them
    all."""
    params = source.params
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
    expected = _stored_shapes(source)
    for name, record in source.records.items():
        shape = expected.get(name)
        if shape is None:
            problems.append(
                ConvertError(
                    f"unexpected tensor: not part of the {source.layout.name} layout for "
                    f"{params.n_layers} layers and {params.n_experts} experts",
                    file=record.stream.label,
                    tensor=name,
                )
            )
        elif record.shape != shape:
            problems.append(
                ConvertError(
                    f"shape {list(record.shape)} does not match {list(shape)} "
                    f"required by {source.params_file.name}",
                    file=record.stream.label,
                    tensor=name,
                )
            )
    for name in expected:
        if name not in source.records:
            problems.append(ConvertError("tensor is missing", file=label, tensor=name))
    return problems


def _stored_shapes(source: Source) -> dict[str, tuple[int, ...]]:
    """Every tensor the source's files should hold, by name, with its shape: the table's tensors, or the parts a
    container stores one as (Format.parts: a quantized matrix with its scales and biases), as the files say they
    were written (Source.outtype). Only names and shapes are compared, so parts is asked with the stored dtype."""
    params = source.params
    env = params.shape_env()
    reads = format_of(source.layout)
    expected: dict[str, tuple[int, ...]] = {}
    for stored in source.layout.tensors(params.n_layers, params.n_experts):
        shape = stored.shape(env)
        record = source.records.get(stored.name)
        parts = reads.parts(stored.name, shape, record.dtype if record else "", source.outtype)
        if parts is None:
            expected[stored.name] = shape
        else:
            expected.update((part.name_for(stored.name), part.shape) for part in parts)
    return expected


def kept_as_stored(record: TensorRecord, target: Format) -> bool:
    """A block-quantized tensor the target container stores as it is (quantized GGUF re-laid as GGUF): its bytes
    are copied, no element of it is read as a number."""
    return record.dtype not in ITEM_SIZE and target.stores(record.dtype)


def main_dtype(source: Source, *, strict: bool = False, target: Format | None = None) -> str:
    """The dtype most bytes have; config.json states it. A tensor that differs is kept as it is, with a warning
    (an error when strict). Quantized tensors the target keeps as they are count for nothing here."""
    weight: Counter[str] = Counter()
    kept = {name for name, r in source.records.items() if target is not None and kept_as_stored(r, target)}
    for record in source.records.values():
        if record.name not in kept:
            weight[record.dtype] += record.nbytes
    dtype = weight.most_common(1)[0][0] if weight else "BF16"
    for record in source.records.values():
        if record.name in kept:
            continue
        held = format_of(source.layout).checkpoint_dtype(record, dtype)
        if held != dtype and strict:
            raise ConvertError(
                f"dtype {held} unlike the rest ({dtype}) (--strict)",
                file=record.stream.label,
                tensor=record.name,
            )
        if held != dtype:
            log.warning(
                "%s: tensor %s has dtype %s unlike the rest (%s); kept as it is",
                record.stream.label,
                record.name,
                held,
                dtype,
            )
    if dtype not in CONFIG_NAME:
        raise ConvertError(f"weights are {dtype}, not a floating-point type", file=source.folder)
    return dtype


def steps_between(source: KindLayout, target: KindLayout, env: Mapping[str, int]) -> tuple[Step, ...]:
    """The transforms from how source stores a kind to how target does: undo the source's attributes back to
    canonical (last applied first), then apply the target's. Equal values cancel: a pure rename has no step."""
    rules = canonical().attributes
    heads_param = source.kind.rotary_heads
    heads = env[heads_param] if heads_param else 0
    undo: list[Step] = []
    apply: list[Step] = []
    for attr in ATTRIBUTES:
        have, want = source.attributes[attr], target.attributes[attr]
        if have == want:
            continue
        rule = rules[attr]
        if have in rule.transforms:
            undo.insert(0, Step(TRANSFORMS[rule.transforms[have]].inverse, heads))
        if want in rule.transforms:
            apply.append(Step(TRANSFORMS[rule.transforms[want]], heads))
    return (*undo, *apply)


def _source_pieces(source: Source) -> dict[tuple, tuple[TensorRecord, int, KindLayout]]:
    """Canonical key -> (record, absolute offset, how the source stores the kind)."""
    params = source.params
    env = params.shape_env()
    reads = format_of(source.layout)
    pieces = {}
    for stored in source.layout.tensors(params.n_layers, params.n_experts):
        record = source.records[stored.name]
        piece_bytes = reads.nbytes(record.dtype, stored.layout.piece_shape(env))
        for index, key in enumerate(stored.canonical_keys()):
            pieces[key] = (record, record.offset + index * piece_bytes, stored.layout)
    return pieces


def target_tensors(source: Source, target: LayoutTable, *, main: str, outtype: str | None) -> list[TargetTensor]:
    """The target's tensors in its module order, each with the source pieces that fill it. A tensor whose dtype
    the containers change (the target's rules for outtype, or the source's own widening undone) gets a cast; a
    tensor the target stores as several parts (Format.parts) becomes one tensor per part, each computed from the
    same source pieces by its own cast."""
    params = source.params
    env = params.shape_env()
    sources = _source_pieces(source)
    writes, reads = format_of(target).for_model(params), format_of(source.layout)
    quantized = next((r for r in source.records.values() if kept_as_stored(r, writes)), None)
    relayout = quantized is not None
    if quantized is not None and outtype not in (None, source.outtype):
        raise ConvertError(
            f"is {quantized.dtype}: --outtype {outtype} would requantize it, and quantized weights are only ever "
            "re-laid byte for byte; leave --outtype out, or convert from the original checkpoint",
            file=quantized.stream.label,
            tensor=quantized.name,
        )
    result = []
    for stored in target.tensors(params.n_layers, params.n_experts):
        shape = stored.shape(env)
        keys = stored.canonical_keys()
        first = sources[keys[0]][0]
        # Parts are computed from the checkpoint's elements, as any other tensor is written: a source that
        # stores this one widened (GGUF's F32 router of a bf16 model) is restored first (ChainedCast).
        dtype = first.dtype if relayout else reads.checkpoint_dtype(first, main)
        parts = writes.parts(stored.name, shape, dtype, outtype)
        if parts is None:
            cast_of = partial(
                _element_cast, target.name, writes, reads, stored.name, shape, main=main, outtype=outtype,
                relayout=relayout,
            )
            pieces = _pieces(stored, stored.name, sources, env, cast_of, reads)
            result.append(TargetTensor(stored.name, stored.layer, pieces[0].out_dtype, shape, pieces))
            continue
        for part in parts:
            name = part.name_for(stored.name)
            cast_of = partial(_part_cast, reads, part.cast, dtype)
            pieces = _pieces(stored, name, sources, env, cast_of, reads)
            result.append(TargetTensor(name, stored.layer, part.dtype, part.shape, pieces))
    return result


def _part_cast(reads: Format, cast: Cast, dtype: str, record: TensorRecord) -> Cast:
    """A part's cast, after the source container's restore where record stores its elements in another type than
    the checkpoint's dtype the part was planned for."""
    if record.dtype == dtype:
        return cast
    restore = reads.restore(record.dtype, dtype)
    if restore is None:
        raise ConvertError(f"cannot read {record.dtype} as {dtype}", file=record.stream.label, tensor=record.name)
    return ChainedCast(restore, cast)


def _element_cast(
    target: str,
    writes: Format,
    reads: Format,
    name: str,
    shape: tuple[int, ...],
    record: TensorRecord,
    *,
    main: str,
    outtype: str | None,
    relayout: bool,
) -> Cast | None:
    """The cast of a tensor stored as one: the dtype the target stores it in (its rules for outtype, or the
    source's widening undone) where that differs from the source's. relayout: the source holds quantized tensors
    the target keeps, and every tensor is copied as it is stored (quantized GGUF re-laid as GGUF): converting one
    would mean dequantizing, which this tool never does."""
    if relayout:
        return None
    wanted = writes.tensor_dtype(name, shape, reads.checkpoint_dtype(record, main), outtype)
    if wanted == record.dtype:
        return None
    cast = writes.cast(record.dtype, wanted) or reads.restore(record.dtype, wanted)
    if cast is None:
        raise ConvertError(
            f"cannot convert {record.dtype} to {wanted} for --to {target}",
            file=record.stream.label,
            tensor=record.name,
        )
    return cast


def _pieces(
    stored: StoredTensor,
    name: str,
    sources: dict[tuple, tuple[TensorRecord, int, KindLayout]],
    env: Mapping[str, int],
    cast_of: Callable[[TensorRecord], Cast | None],
    reads: Format,
) -> tuple[Piece, ...]:
    """The source pieces that fill one output tensor (one per canonical key: several when the target stacks
    experts), placed one after another, each read, moved by the steps between the layouts and cast."""
    pieces = []
    offset = 0
    dtypes = set()
    for key in stored.canonical_keys():
        record, src_offset, src_layout = sources[key]
        dtypes.add(record.dtype)
        piece_shape = src_layout.piece_shape(env)
        nbytes = reads.nbytes(record.dtype, piece_shape)
        steps = steps_between(src_layout, stored.layout, env)
        piece = Piece(name, record, src_offset, piece_shape, offset, nbytes, steps, cast_of(record))
        pieces.append(piece)
        offset += piece.out_nbytes
    if len(dtypes) > 1:
        raise ConvertError(f"cannot stack experts of different dtypes {sorted(dtypes)}", tensor=stored.name)
    return tuple(pieces)


def _carries(source: Source, target: LayoutTable, outtype: str | None) -> bool:
    """Whether the target container writes back what the source's files say besides the tensors (a GGUF re-laid
    as GGUF, types kept: its keys, the vocabulary included): --outtype absent, or the one the source was written
    with (as verify --against asks for the folder's own)."""
    same_types = outtype is None or outtype == source.outtype
    return source.carried is not None and source.layout.container == target.container and same_types


def _tokenizer_copy(source: Source, target: LayoutTable, *, instruct: bool, outtype: str | None) -> list[OutputFile]:
    """tokenizer.model copied byte for byte (every container keeps it; some also build their own tokenizer files
    from it). --instruct needs a container with a place for the chat template. A source re-laid in its own
    container carries its vocabulary in its files, so it needs no tokenizer.model."""
    if instruct and not format_of(target).chat_template:
        raise ConvertError(
            f"--instruct writes a chat template into the tokenizer files; --to {target.name} has "
            "none (the Mistral layouts keep tokenizer.model only)"
        )
    if source.tokenizer is None:
        if _carries(source, target, outtype):
            return []
        if instruct:
            raise ConvertError(f"--instruct needs a {TOKENIZER}", file=source.folder)
        log.warning("%s: no %s; the output will have no tokenizer", source.folder, TOKENIZER)
        return []
    return [OutputFile(TOKENIZER, source.tokenizer.stat().st_size, copy_of=source.tokenizer)]


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
    if target.read_only:
        raise ConvertError(f"--to {target.name}: {target.description}; it is a source only")
    if options.outtype is not None and options.outtype not in (*format_of(target).outtypes,
                                                               *format_of(target).outtype_variants):
        if format_of(target).outtypes:
            takes = ", ".join(format_of(target).outtypes)
            if format_of(target).outtype_variants:  # OUTTYPE-gN is --outtype OUTTYPE --group-size N
                takes += f" (with --group-size: {', '.join(format_of(target).outtype_variants)})"
            raise ConvertError(f"--outtype {options.outtype}: --to {target.name} takes {takes}")
        converting = [name for name in target_names() if format_of(layout(name)).outtypes]
        raise ConvertError(
            f"--outtype {options.outtype}: --to {target.name} keeps the source's element types (--outtype is for "
            f"--to {', '.join(converting)})"
        )
    dtype = main_dtype(source, strict=options.strict, target=format_of(target))
    tensors = target_tensors(source, target, main=dtype, outtype=options.outtype)
    copied = _tokenizer_copy(source, target, instruct=options.instruct, outtype=options.outtype)
    request = OutputRequest(
        target,
        tensors,
        source.params,
        dtype,
        source.tokenizer,
        instruct=options.instruct,
        max_shard_size=options.max_shard_size,
        outtype=options.outtype,
        carried=source.carried if _carries(source, target, options.outtype) else None,
    )
    output = format_of(target).plan(request)
    weights = output.weights
    if output.marker is not None:
        body = [*weights, *copied, *output.others]
        last = [output.marker]
    else:
        body = [*copied, *output.others, *weights]
        last = []
    header: dict[str, object] = {
        "source": {
            "layout": source.layout.name,
            "files": [{"name": p.name, "size": p.stat().st_size} for p in source.weight_files],
        },
        "target": target.name,
    }
    metadata = {f.name: f.metadata for f in weights if f.metadata is not None}
    if metadata:  # what a loader reads besides the tensors (GGUF's keys): verify names a key that changed
        header["metadata"] = metadata
    manifest = _manifest_file(
        header,
        _placements(tensors, weights),
        [(p.name, p.stat().st_size) for p in source.input_files] if options.hash_input else None,
    )
    if not options.checksums:
        return Plan(source, target, source.params, dtype, (*body, *last), options, tuple(tensors))
    sums = _sums_file([*body, manifest, *last])
    return Plan(source, target, source.params, dtype, (*body, manifest, sums, *last), options, tuple(tensors))


def _manifest_file(
    header: dict, tensors: list[integrity.TensorEntry], inputs: list[tuple[str, int]] | None
) -> OutputFile:
    size, render = integrity.manifest_bytes(header, tensors, inputs)
    return OutputFile(integrity.MANIFEST, size, deferred=((0, render),))


def _sums_file(files: list[OutputFile]) -> OutputFile:
    """SHA256SUMS over every other file of the output."""
    texts = {f.name: b"".join(data for _, data in f.blobs) for f in files if f.is_text}
    size, render = integrity.sums_bytes([f.name for f in files], texts)
    return OutputFile(integrity.SUMS, size, deferred=((0, render),))


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
