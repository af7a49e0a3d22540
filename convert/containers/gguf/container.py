"""The GGUF container: what planning, the source reader, verify and inspect call.

Part of the GGUF container (convert/containers/gguf/): see its __init__ for the sources of every fact.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

from convert.common.errors import ConvertError, shown
from convert.containers.contract import (
    TOKENIZER,
    Format,
    OpenedWeights,
    OutputRequest,
    PlannedOutput,
    embedding_vocab,
    from_tokenizer,
    placed,
)
from convert.containers.gguf.casts import BLOCK_QUANTIZED, convert_elements, restore_elements
from convert.containers.gguf.keys import (
    KV,
    check_unmapped,
    check_vocabulary,
    key_records,
    model_metadata,
    params_from_metadata,
    tokenizer_metadata,
)
from convert.containers.gguf.kquants import prepare
from convert.containers.gguf.quant_mix import CHOSEN, MIXES, tensor_order
from convert.containers.gguf.reader import _SPLIT_NAME, check_splits, read_gguf, split_paths
from convert.containers.gguf.types import (
    _NUMPY_OF_DTYPE,
    DTYPE_OF_GGML,
    F32,
    GGML_OF_DTYPE,
    OUTTYPE_OF_DTYPE,
    OUTTYPES,
    Q8_0,
    QUANTIZED,
    converted_nbytes,
    tensor_nbytes,
    tensor_type,
)
from convert.containers.gguf.writer import TensorInfo, layout_split
from convert.fileio.regular import MAX_TOKENIZER, is_present, read_small
from convert.fileio.streams import ByteStream
from convert.model.outputs import OutputFile
from convert.model.records import TensorRecord
from convert.tokenizer.chat_template import CHAT_TEMPLATE
from convert.tokenizer.sentencepiece import read_model

if TYPE_CHECKING:
    from convert.model.params import ModelParams
    from convert.model.tables import LayoutTable

STEM = "model"  # the output is model.gguf, or model-0000i-of-0000N.gguf when split


class _Cast:
    """Element conversion while streaming (outputs.Cast): a write to a GGUF type (convert_elements), or a GGUF
    source's tensor back to the checkpoint's dtype (restore_elements, exact or refused)."""

    def __init__(self, src_dtype: str, dst_dtype: str, *, restore: bool) -> None:
        self.src_dtype = src_dtype
        self.dst_dtype = dst_dtype
        self._restore = restore
        self._item = np.dtype(_NUMPY_OF_DTYPE[src_dtype]).itemsize
        self._dst = GGMLQuantizationType[dst_dtype]
        self.granule = self._item * GGML_QUANT_SIZES[self._dst][0]  # Q8_0: whole blocks of 32 elements
        if self._dst in BLOCK_QUANTIZED and not restore:
            prepare(self._dst)  # compiled here, on the planning thread, not in the middle of the run

    def out_nbytes(self, nbytes: int) -> int:
        return converted_nbytes(nbytes // self._item, self._dst)

    def __call__(self, data: memoryview, tensor: str, first: int) -> memoryview:
        if self._restore:
            converted = restore_elements(data, GGML_OF_DTYPE[self.src_dtype], self.dst_dtype, tensor=tensor,
                                         first_element=first)  # fmt: skip
        else:
            converted = convert_elements(data, self.src_dtype, self._dst, tensor=tensor, first_element=first)
        return memoryview(np.ascontiguousarray(converted)).cast("B")


def _one_model(folder: Path) -> Path:
    """The first file of the one GGUF model in folder. Several models (two files, or a file beside a split set)
    are two readings of the folder: refused, as llama.cpp is always given one file."""
    found = sorted(p for p in folder.glob("*.gguf") if p.is_file())
    firsts = [p for p in found if not (m := _SPLIT_NAME.match(p.name)) or int(m["no"]) == 1]
    if not found:
        raise ConvertError("no .gguf file", file=folder)
    if len(firsts) != 1:
        names = ", ".join(shown(p.name) for p in (firsts or found)[:4])
        raise ConvertError(
            f"holds {len(firsts) or 'no first file of'} GGUF models ({names}): llama.cpp loads the one it is given, "
            "this tool would have to guess; keep one model (its split files together) in the folder",
            file=folder,
        )
    paths = split_paths(firsts[0])
    strays = sorted(set(found) - set(paths))
    if strays:
        raise ConvertError(
            f"{shown(strays[0].name)} is not part of the GGUF model {shown(firsts[0].name)}; remove it", file=folder
        )
    return firsts[0]


class GgufFormat(Format):
    container = "gguf"
    markers = ("*.gguf",)  # the package's MARKERS (convert/containers/gguf/__init__.py; tests/test_contract.py)
    split_keys = ("split.",)
    replaces = ("*.gguf",)
    chat_template = True
    outtypes = tuple(OUTTYPES)

    def open(
        self, folder: Path, table: LayoutTable, streams: list[ByteStream], ambiguities: list[ConvertError]
    ) -> OpenedWeights:
        paths = split_paths(_one_model(folder))
        metadatas = []
        records: list[TensorRecord] = []
        for path in paths:
            stream = ByteStream([path])
            streams.append(stream)
            metadata, found = read_gguf(stream, quantized=True)
            metadatas.append(metadata)
            records += found
        check_splits(paths, metadatas, len(records))
        params = params_from_metadata(metadatas[0], file=str(paths[0]))
        check_unmapped(metadatas[0], file=str(paths[0]))
        vocabulary = check_vocabulary(metadatas[0], embedding_vocab(records, table), file=str(paths[0]))
        if vocabulary is not None:
            ambiguities.append(vocabulary)
        _check_beside_tokenizer(folder, metadatas[0], ambiguities)
        carried = tuple(entry for entry in metadatas[0].values() if not entry.key.startswith(self.split_keys))
        return OpenedWeights(records, paths, paths[0], params, _written_outtype(metadatas[0]), carried)

    def claims(self, folder: Path, table: LayoutTable) -> bool:
        """A .gguf model whose tensors are named as table names them: blk.0.ffn_gate_exps for gguf, blk.0.ffn_gate.0
        for gguf_legacy (headers only are read). One that cannot be read is the writable table's, whose open()
        then says what is wrong with it."""
        if not super().claims(folder, table):
            return False
        probe = table.kind_layout("expert_w1").pattern.format(layer=0, expert=0)
        records: list[TensorRecord] = []
        try:
            for path in split_paths(_one_model(folder)):  # a split set's tensors are spread over its files
                stream = ByteStream([path])
                try:
                    records += read_gguf(stream, quantized=True)[1]
                finally:
                    stream.close()
        except (ConvertError, OSError):
            return not table.read_only
        return any(record.name == probe for record in records)

    def nbytes(self, dtype: str, shape: tuple[int, ...]) -> int:
        quantized = QUANTIZED.get(dtype)
        return tensor_nbytes(shape, quantized) if quantized is not None else super().nbytes(dtype, shape)

    def stores(self, dtype: str) -> bool:
        return dtype in GGML_OF_DTYPE or dtype in QUANTIZED

    _params: ModelParams | None = None  # set on the copy for_model returns

    def for_model(self, params: ModelParams) -> GgufFormat:
        bound = copy.copy(self)
        bound._params = params
        return bound

    def tensor_dtype(self, name: str, shape: tuple[int, ...], dtype: str, outtype: str | None) -> str:
        ggml_type = tensor_type(name, shape, outtype or _default_outtype(dtype, name), self._params)
        return DTYPE_OF_GGML.get(ggml_type, ggml_type.name)

    def checkpoint_dtype(self, record: TensorRecord, main: str) -> str:
        if record.dtype not in GGML_OF_DTYPE:
            raise ConvertError(
                f"is {record.dtype}: quantized GGUF is one-way, its weights cannot be restored; convert from the "
                "original checkpoint instead",
                file=record.stream.label,
                tensor=record.name,
            )
        forced = main in OUTTYPE_OF_DTYPE and tensor_type(record.name, record.shape, OUTTYPE_OF_DTYPE[main]) == F32
        return main if record.dtype == "F32" and forced else record.dtype

    def cast(self, src: str, dst: str) -> _Cast | None:
        if src in GGML_OF_DTYPE and (dst in GGML_OF_DTYPE or dst == Q8_0.name or dst in _QUANTIZED_BY_NAME):
            return _Cast(src, dst, restore=False)
        return None

    def restore(self, src: str, dst: str) -> _Cast | None:
        if src in GGML_OF_DTYPE and dst in GGML_OF_DTYPE:
            return _Cast(src, dst, restore=True)
        return None

    def plan(self, request: OutputRequest) -> PlannedOutput:
        if request.carried is not None:
            # A GGUF re-laid as GGUF (split, merged, its legacy per-expert tensors stacked, types kept): its keys
            # are written back as they are, in their order; only the split keys are the output's own.
            metadata = list(request.carried)
            if request.instruct:
                template = KV(Keys.Tokenizer.CHAT_TEMPLATE, GGUFValueType.STRING, CHAT_TEMPLATE)
                metadata = [e for e in metadata if e.key != template.key] + [template]
        else:
            outtype = request.outtype or _default_outtype(request.dtype, "the weights")
            metadata = [*model_metadata(request.params, outtype, name=MODEL_NAME), *_vocabulary(request)]
            if outtype in MIXES:
                metadata = _as_quantized(metadata)
        tensors = request.tensors
        if request.carried is None and request.outtype in MIXES:
            # llama-quantize writes the tensors in the order of its std::map of them (quant_mix.tensor_order).
            tensors = sorted(tensors, key=lambda t: tensor_order(t.name))
        if request.carried is not None:
            # Re-laid, the tensors keep the source's order (as gguf-split keeps it): a split set merged again is
            # the file it came from, byte for byte. A legacy file's stacked experts go where its expert 0 was.
            tensors = sorted(tensors, key=lambda t: (t.pieces[0].record.stream.label, t.pieces[0].src_offset))
        infos = [TensorInfo(t.name, GGMLQuantizationType[t.dtype], t.shape) for t in tensors]
        by_name = {t.name: t for t in request.tensors}
        files = []
        for name, layout in layout_split(metadata, infos, stem=STEM, max_size=request.max_shard_size):
            blobs = [(0, layout.header), *((offset, bytes(size)) for offset, size in layout.zero_blobs)]
            pieces = tuple(p for t in layout.offsets for p in placed(by_name[t], layout.offsets[t]))
            records = key_records(layout.metadata)
            files.append(OutputFile(name, layout.size, blobs=tuple(blobs), pieces=pieces, metadata=records))
        return PlannedOutput(files, [], None)

    def has_chat_template(self, folder: Path, weight_files: Sequence[Path]) -> bool:
        records = self.metadata(weight_files[0]) if weight_files else None
        return records is not None and Keys.Tokenizer.CHAT_TEMPLATE in records

    def metadata(self, path: Path) -> dict[str, Any] | None:
        stream = ByteStream([path])
        try:
            found, _ = read_gguf(stream, quantized=True)
        finally:
            stream.close()
        return key_records(found.values())


MODEL_NAME = "Mixtral"  # general.name; llama.cpp's converter takes it from the folder's name or model card


def _vocabulary(request: OutputRequest) -> list[KV]:
    """The tokenizer keys from tokenizer.model. As for hf's tokenizer.json, a tokenizer that cannot be translated is
    a warning (the weights are still right, but llama.cpp needs the vocabulary to load the file), and an error when
    --instruct asked for the chat template; no tokenizer.model was warned about already."""
    built = from_tokenizer(request, tokenizer_metadata, "the GGUF has no vocabulary (llama.cpp will not load it)")
    return built or []


_QUANTIZED_BY_NAME = frozenset(t.name for t in CHOSEN)  # what a mix quantizes to (casts.py: kquants.py's bytes)
_AT_THE_END = (Keys.General.QUANTIZATION_VERSION, Keys.General.FILE_TYPE)


def _as_quantized(metadata: list[KV]) -> list[KV]:
    """The keys llama-quantize writes from the converter's GGUF of the model: every key in its order, except that
    general.quantization_version and then general.file_type (the mix's ftype, which model_metadata already
    holds) go last: gguf_set_val_u32 removes a key and appends it, and llama_model_quantize sets those two after
    copying the others (gguf_set_kv)."""
    kept = [e for e in metadata if e.key not in _AT_THE_END]
    moved = {e.key: e for e in metadata if e.key in _AT_THE_END}
    return [*kept, *(moved[key] for key in _AT_THE_END)]


def _written_outtype(metadata: Mapping[str, KV]) -> str | None:
    """general.file_type as an outtype name (what verify --against converts the original with)."""
    entry = metadata.get(Keys.General.FILE_TYPE)
    by_value = {int(v): k for k, v in OUTTYPES.items()}
    return by_value.get(int(entry.value)) if entry is not None and entry.type == GGUFValueType.UINT32 else None


def _default_outtype(dtype: str, what: str) -> str:
    """No silent cast: without --outtype a GGUF holds the checkpoint's own element type."""
    outtype = OUTTYPE_OF_DTYPE.get(dtype)
    if outtype is None:
        raise ConvertError(f"{what}: {dtype} has no GGUF type; choose one with --outtype ({', '.join(OUTTYPES)})")
    return outtype


def _check_beside_tokenizer(folder: Path, metadata: Mapping[str, KV], ambiguities: list[ConvertError]) -> None:
    """A tokenizer.model beside the GGUF is copied into other layouts; one whose pieces are not the GGUF's
    vocabulary would make the converted model tokenize differently from the GGUF: two readings."""
    path = folder / TOKENIZER
    tokens = metadata.get(Keys.Tokenizer.LIST)
    if not is_present(path) or tokens is None:
        return
    try:
        pieces = [p.text for p in read_model(read_small(path, MAX_TOKENIZER, TOKENIZER), str(path)).pieces]
    except ConvertError as error:
        ambiguities.append(error)
        return
    if pieces != list(tokens.value):
        ambiguities.append(
            ConvertError(
                f"its pieces are not the GGUF's tokenizer.ggml.tokens ({len(pieces)} vs {len(tokens.value)}): the "
                "converted model would tokenize differently from the GGUF; remove it or put the matching one",
                file=path,
            )
        )


FORMAT = GgufFormat()
