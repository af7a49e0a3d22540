"""What a container module provides, and the pieces several of them share.

A layout is a naming table (mappings/NAME.toml: how each canonical tensor is spelled and stored) plus the container
the table names (`container = "..."`): one module under convert/containers/ that owns everything about the files
themselves: which files identify it, how they are found and read, how tensors are split into files, the index,
the parameters file and the bytes of every header. Planning, the source reader, verify and inspect go through a
container's Format only; the stream, integrity and resume code never see one.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from convert.common.dtypes import ITEM_SIZE, nbytes_of
from convert.common.errors import ConvertError
from convert.containers.safetensors import layout_header
from convert.containers.torchzip.writer import layout_torch_zip
from convert.fileio.regular import MAX_TOKENIZER, is_present, read_small
from convert.model.outputs import Cast, OutputFile, Piece, TargetTensor
from convert.model.records import TensorRecord

if TYPE_CHECKING:
    from convert.fileio.streams import ByteStream
    from convert.model.params import ModelParams
    from convert.model.tables import LayoutTable

log = logging.getLogger("mixtral-convert")
Ambiguities = list[ConvertError]
TOKENIZER = "tokenizer.model"  # every container keeps Mistral's SentencePiece model beside the weights
SAFETENSORS_METADATA = MappingProxyType({"format": "pt"})  # what safetensors.torch.save_file writes


@dataclass(frozen=True)
class OpenedWeights:
    """What a container found in a source folder: its tensors (from headers only), the files holding them, and
    the hyperparameters."""

    records: list[TensorRecord]
    weight_files: list[Path]
    params_file: Path
    params: ModelParams
    outtype: str | None = None  # the --outtype the files say they were written with, where a container records it
    # What the files say besides the tensors, which the same container writes back as it is when it re-lays them
    # (GGUF's key/value entries, split keys aside); opaque to everything but that container.
    carried: Any = None


@dataclass(frozen=True)
class OutputRequest:
    """Everything a container needs to lay out an output: the tensors in the table's module order, each with the
    source pieces that fill it, and what the command line asked for."""

    table: LayoutTable
    tensors: list[TargetTensor]
    params: ModelParams
    dtype: str  # the dtype most bytes have (config.json states it)
    tokenizer: Path | None  # the source's tokenizer.model
    instruct: bool
    max_shard_size: int | None  # None: the container's default
    outtype: str | None  # None: the source's element types
    # The source's OpenedWeights.carried where the source is of this container (a GGUF re-laid as GGUF), else None.
    carried: Any = None


@dataclass(frozen=True)
class PlannedOutput:
    weights: list[OutputFile]  # written first, in this order; the manifest lists their tensors
    others: list[OutputFile]  # tokenizer files and parameters, written after the weights
    # The small file whose bytes the plan holds (an index, params.json) that makes the folder a loadable checkpoint,
    # written last; None where the weights themselves are what a loader opens (they are then written after
    # everything else but the checksums, which end the run).
    marker: OutputFile | None


class Format(ABC):
    """One container. Subclasses are stateless; each module defines one instance named FORMAT."""

    container: ClassVar[str]
    markers: ClassVar[tuple[str, ...]]  # any of these files identifies the container in a folder: its MARKERS
    # Globs of every file an output holds, the completion marker first: --force into a folder holding an earlier
    # output (of any layout) removes those the new output does not write.
    replaces: ClassVar[tuple[str, ...]]
    must_not_contain: ClassVar[tuple[str, ...]] = ()  # globs an output folder must not hold beside this one
    chat_template: ClassVar[bool] = False  # whether the output has a place for --instruct's chat template
    outtypes: ClassVar[tuple[str, ...]] = ()  # what --outtype may ask of this container; none: dtypes are kept
    # Outtypes taken besides those: one of them with a setting other than its default, spelled OUTTYPE-gN for a
    # quantization group of N (--group-size), as the plan and OpenedWeights.outtype carry it. Not --outtype's
    # choices, nor run one by one by the contract test (they differ from their outtype by a number only).
    outtype_variants: ClassVar[tuple[str, ...]] = ()
    # What depends on how the weights were split into files (--max-shard-size), which verify --against, knowing
    # the source but not the split asked for, does not compare: files (hf's index; the structure check ties it to
    # the shards) and key prefixes of Format.metadata (GGUF's split.*).
    split_files: ClassVar[tuple[str, ...]] = ()
    split_keys: ClassVar[tuple[str, ...]] = ()

    def claims(self, folder: Path, table: LayoutTable) -> bool:
        """Whether folder holds table's layout in this container's files. By default any marker present (a file
        name, or a glob where the names are the user's, such as *.gguf); a container whose file names another
        layout shares looks inside too (a metadata key, a tensor's name), so that two layouts with the same file
        names are told apart (gguf and gguf_legacy)."""
        return any(marker_present(folder, marker) for marker in self.markers)

    def nbytes(self, dtype: str, shape: tuple[int, ...]) -> int:
        """The bytes a tensor of this dtype and shape takes in this container's files: elements times their size,
        or whole blocks for a block-quantized type (GGUF's), whose blocks run along the rows."""
        return nbytes_of(dtype, shape)

    def stores(self, dtype: str) -> bool:
        """Whether this container can hold a tensor of this dtype as it is (a quantized GGUF type: GGUF only)."""
        return dtype in ITEM_SIZE

    def check_records(self, records: Iterable[TensorRecord]) -> list[ConvertError]:
        """Every check the container's own records carry, read whole (a torch zip's CRC-32 per storage record):
        what inspect and verify report. A conversion checks the same records as it reads them. None by default."""
        return []

    def metadata(self, path: Path) -> dict[str, Any] | None:
        """What a loader reads from this file besides its tensors, key by key, as the plan's OutputFile.metadata
        records it (GGUF: every key/value entry); None where the container keeps no such thing in its weights
        files (the JSON files beside them are whole files, compared as they are)."""
        return None

    def has_chat_template(self, folder: Path, weight_files: Sequence[Path]) -> bool:
        """Whether the output in folder was written with --instruct's chat template (verify --against plans the
        source again as it was converted). False for a container with no place for one."""
        return False

    def for_model(self, params: ModelParams) -> Format:
        """This container as the plan of one model's output sees it: a container whose choices for a tensor depend
        on the whole model (GGUF: the type llama-quantize gives a tensor depends on the layer and expert counts)
        returns a copy that knows params, so that FORMAT itself stays stateless. Default: itself."""
        return self

    def tensor_dtype(self, name: str, shape: tuple[int, ...], dtype: str, outtype: str | None) -> str:
        """The dtype this container stores tensor name in, given the checkpoint's dtype for it and --outtype."""
        return dtype

    def parts(self, name: str, shape: tuple[int, ...], dtype: str, outtype: str | None) -> tuple[Part, ...] | None:
        """How one canonical tensor is stored when it is stored as several tensors (a quantized matrix with its
        scales and biases): each part's name suffix, dtype, stored shape and the cast that computes its bytes
        from the source's elements (dtype). None, the default: one tensor, as tensor_dtype and cast say."""
        return None

    def checkpoint_dtype(self, record: TensorRecord, main: str) -> str:
        """The dtype a stored tensor had in the checkpoint, main being the dtype most bytes have: a container
        that widens some tensors by rule (GGUF's F32 norms) says so here, so they go back."""
        return record.dtype

    def cast(self, src: str, dst: str) -> Cast | None:
        """How this container converts elements from src to dst for its own writes; None: it has none."""
        return None

    def restore(self, src: str, dst: str) -> Cast | None:
        """How elements this container stored as src go back to the checkpoint's dst (see checkpoint_dtype);
        None: it has no such conversion."""
        return None

    @abstractmethod
    def open(
        self, folder: Path, table: LayoutTable, streams: list[ByteStream], ambiguities: Ambiguities
    ) -> OpenedWeights:
        """Find and index the weights (streams opened go into streams, so the caller closes them on failure),
        read the parameters; files another loader would read instead go into ambiguities."""

    @abstractmethod
    def plan(self, request: OutputRequest) -> PlannedOutput:
        """The output's files, each with its exact size, headers and the pieces streamed into it."""


@dataclass(frozen=True)
class Part:
    """One stored tensor of a canonical tensor stored as several (see Format.parts)."""

    suffix: str  # appended to the tensor's name in the table ("" for the one that keeps it)
    dtype: str
    shape: tuple[int, ...]  # as stored, for the whole tensor (all experts, when the table stacks them)
    cast: Cast  # computes this part's bytes from a slice of the source's elements
    # The end of the table's name the suffix replaces, where the part is named beside the tensor rather than
    # after it (MLX: q_proj.weight's scales are q_proj.scales, so ".weight" is replaced by ".scales").
    replaces: str = ""

    def name_for(self, name: str) -> str:
        """This part's tensor name, name being the table's."""
        return name.removesuffix(self.replaces) + self.suffix


def marker_present(folder: Path, marker: str) -> bool:
    """A marker is a file name or a glob (a container whose file names are the user's, such as *.gguf)."""
    return any(folder.glob(marker)) if any(c in marker for c in "*?[") else (folder / marker).exists()


T = TypeVar("T")


class _TokenizerBuilder(Protocol[T]):
    def __call__(self, model: bytes, *, vocab_size: int | None, instruct: bool, source: str) -> T: ...


def from_tokenizer(request: OutputRequest, build: _TokenizerBuilder[T], without: str) -> T | None:
    """What a container builds from the source's tokenizer.model (hf's tokenizer.json, GGUF's vocabulary), or None
    when there is none (plan warned already). A tokenizer that cannot be translated is a warning saying what the
    output is then `without` (the weights are still right), and an error when --instruct asked for the chat
    template."""
    if request.tokenizer is None:
        return None
    try:
        return build(
            read_small(request.tokenizer, MAX_TOKENIZER, TOKENIZER),
            vocab_size=request.params.vocab_size,
            instruct=request.instruct,
            source=str(request.tokenizer),
        )
    except ConvertError as exc:
        if request.instruct:
            raise
        # the line is escaped already: as the message itself, not an argument (arguments are shown() again)
        log.warning(exc.line() + "; " + without)
        return None


def embedding_vocab(records: Sequence[TensorRecord], table: LayoutTable) -> int | None:
    """The vocabulary size the embedding's rows say, where params may be silent about it."""
    name = table.kind_layout("embed").pattern
    embedding = next((r for r in records if r.name == name), None)
    return embedding.shape[0] if embedding is not None and embedding.shape else None


def text_file(name: str, text: str) -> OutputFile:
    data = text.encode("utf-8")
    return OutputFile(name, len(data), blobs=((0, data),), is_text=True)


def placed(tensor: TargetTensor, start: int) -> tuple[Piece, ...]:
    """The tensor's pieces at absolute offsets, the tensor starting at start."""
    return tuple(p.moved(start) for p in tensor.pieces)


def safetensors_file(name: str, tensors: Sequence[TargetTensor]) -> OutputFile:
    header = layout_header([(t.name, t.dtype, t.shape) for t in tensors], dict(SAFETENSORS_METADATA))
    pieces = tuple(p for t in tensors for p in placed(t, header.offsets[t.name]))
    return OutputFile(name, header.size, blobs=((0, header.header),), pieces=pieces)


def torch_zip_file(name: str, tensors: Sequence[TargetTensor]) -> OutputFile:
    archive = name.rsplit(".", 1)[0]  # the folder inside the zip: torch.save uses the file's stem
    zipped = layout_torch_zip(archive, [(t.name, t.dtype, t.shape) for t in tensors])
    pieces = tuple(p for t in tensors for p in placed(t, zipped.tensor_offsets[t.name]))
    return OutputFile(name, zipped.size, blobs=zipped.blobs, pieces=pieces, deferred=zipped.deferred)


MISTRAL_WEIGHTS = ("consolidated.safetensors", "consolidated.00.pth")


def check_mistral_pair(folder: Path, read: str, ambiguities: Ambiguities) -> None:
    """mistral-inference's Transformer.from_folder loads consolidated.safetensors or consolidated.00.pth and
    refuses a folder holding both; reached with --from, which picks one of them here."""
    if all(is_present(folder / name) for name in MISTRAL_WEIGHTS):
        ambiguities.append(
            ConvertError(
                f"holds both {MISTRAL_WEIGHTS[0]} and {MISTRAL_WEIGHTS[1]}: mistral-inference refuses such a folder, "
                f"and this tool read {read} only; remove the other",
                file=folder,
            )
        )
