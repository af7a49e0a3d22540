"""Opening a source folder: detect its layout, index its tensors from metadata, read its hyperparameters.

Only headers and pickles are read here; tensor bytes stay on disk until the stream copies them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from convert.errors import ConvertError, shown
from convert.files import MAX_INDEX_JSON, is_present
from convert.formats.safetensors import TensorRecord, open_safetensors
from convert.formats.streams import ByteStream, split_parts
from convert.formats.torchzip import read_torch_index
from convert.mapping import LayoutTable, layout, layout_names
from convert.params import ModelParams, read_hf_params, read_json_object, read_mistral_params

TOKENIZER = "tokenizer.model"
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"


@dataclass
class Source:
    folder: Path
    layout: LayoutTable
    params: ModelParams
    params_file: Path
    records: dict[str, TensorRecord]
    weight_files: list[Path]
    tokenizer: Path | None
    streams: list[ByteStream] = field(default_factory=list)
    # Files another loader would read instead of (or besides) what was read here: each makes two models of one
    # folder, so it is a problem like a wrong shape (convert refuses, inspect and verify list it).
    ambiguities: list[ConvertError] = field(default_factory=list)

    @property
    def input_files(self) -> list[Path]:
        """Every file the conversion reads: weights, parameters, tokenizer."""
        return [*self.weight_files, self.params_file, *([self.tokenizer] if self.tokenizer else [])]

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def source_identity(source: Source) -> list[dict]:
    """Each source file's name, size and modification time: how a changed source is noticed."""
    identity = []
    for path in source.input_files:
        stat = path.stat()
        identity.append({"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return identity


def detect_layout(folder: Path) -> str:
    if not folder.is_dir():
        raise ConvertError("not a folder" if folder.exists() else "no such folder", file=folder)
    found = [name for name in layout_names() if any((folder / m).exists() for m in layout(name).markers)]
    if len(found) == 1:
        return found[0]
    if found:
        why = ""
        if {"mistral", "torrent"} <= set(found):
            why = " (mistral-inference refuses a folder holding both consolidated.safetensors and consolidated.00.pth)"
        raise ConvertError(
            f"matches several layouts ({', '.join(found)}){why}; remove the other files or choose one with --from",
            file=folder,
        )
    parts = sorted(shown(p.name) for p in folder.glob("*-split*"))
    if parts:
        raise ConvertError(
            f"split parts without their first: {parts[0].split('-split')[0]}-split0 is missing "
            f"(found {', '.join(parts[:4])})",
            file=folder,
        )
    present = sorted(shown(p.name) for p in folder.iterdir())[:8]
    needs = "; ".join(f"{name} needs {' or '.join(layout(name).markers)}" for name in layout_names())
    raise ConvertError(f"no known checkpoint layout (found: {', '.join(present) or 'nothing'}); {needs}", file=folder)


def open_source(folder: Path, layout_name: str | None = None) -> Source:
    name = layout_name or detect_layout(folder)
    table = layout(name)
    streams: list[ByteStream] = []
    ambiguities: list[ConvertError] = []
    try:
        records, weight_files = _READERS[table.container](folder, streams, ambiguities)
        by_name: dict[str, TensorRecord] = {}
        for record in records:
            if record.name in by_name:
                raise ConvertError(
                    f"tensor appears twice ({by_name[record.name].stream.label} and {record.stream.label})",
                    tensor=record.name,
                )
            by_name[record.name] = record
        embedding = by_name.get(table.kind_layout("embed").pattern)
        vocab = embedding.shape[0] if embedding is not None and embedding.shape else None
        params_file, params = _read_params(folder, table.params_style, vocab)
        tokenizer = folder / TOKENIZER
        present = is_present(tokenizer)  # a FIFO or device named tokenizer.model is refused, not taken for absent
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return Source(
        folder,
        table,
        params,
        params_file,
        by_name,
        weight_files,
        tokenizer if present else None,
        streams,
        ambiguities,
    )


def _read_params(folder: Path, style: str, vocab: int | None) -> tuple[Path, ModelParams]:
    if style == "mistral":
        path = folder / "params.json"
        return path, read_mistral_params(path, vocab)
    if style == "hf_params":
        path = folder / "params.json"
        return path, read_hf_params(path, vocab, megablocks=True)
    if style == "hf_config":
        path = folder / "config.json"
        return path, read_hf_params(path, vocab)
    raise ValueError(f"unknown params style {style!r}")


Ambiguities = list[ConvertError]


def _read_torch_zip(
    folder: Path, streams: list[ByteStream], ambiguities: Ambiguities
) -> tuple[list[TensorRecord], list[Path]]:
    whole = folder / "consolidated.00.pth"
    parts = split_parts(folder, "consolidated.00.pth")
    has_whole = is_present(whole)
    if has_whole and parts:
        ambiguities.append(
            ConvertError(
                f"holds both consolidated.00.pth and its {len(parts)} -split parts, which need not be the same bytes: "
                "torch.load and mistral-inference read consolidated.00.pth, the parts are only read here when it "
                "is absent; remove the parts (or the whole file)",
                file=folder,
            )
        )
    _check_mistral_pair(folder, "consolidated.00.pth", ambiguities)
    paths = [whole] if has_whole else parts
    if not paths:
        raise ConvertError("consolidated.00.pth (or its -split0 ... parts) is missing", file=folder)
    stream = ByteStream(paths)
    streams.append(stream)
    return read_torch_index(stream), paths


_PT_FILE = re.compile(r"consolidated\.(\d+)\.pt$")


def _read_torch_zip_multi(
    folder: Path, streams: list[ByteStream], _ambiguities: Ambiguities
) -> tuple[list[TensorRecord], list[Path]]:
    numbered = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _PT_FILE.fullmatch(p.name)))
    if not numbered:
        raise ConvertError("no consolidated.NN.pt files", file=folder)
    records: list[TensorRecord] = []
    for _, path in numbered:
        stream = ByteStream([path])
        streams.append(stream)
        records += read_torch_index(stream)
    return records, [p for _, p in numbered]


def _read_safetensors_single(
    folder: Path, streams: list[ByteStream], ambiguities: Ambiguities
) -> tuple[list[TensorRecord], list[Path]]:
    path = folder / "consolidated.safetensors"
    if not is_present(path):
        raise ConvertError("consolidated.safetensors is missing", file=folder)
    _check_mistral_pair(folder, "consolidated.safetensors", ambiguities)
    stream, records, _ = open_safetensors(path)
    streams.append(stream)
    return records, [path]


def _read_safetensors_sharded(
    folder: Path, streams: list[ByteStream], ambiguities: Ambiguities
) -> tuple[list[TensorRecord], list[Path]]:
    index_path = folder / HF_INDEX
    single = folder / HF_SINGLE
    has_single = is_present(single)
    if not is_present(index_path):
        _check_transformers_weights(folder, HF_SINGLE, ambiguities)
        stream, records, _ = open_safetensors(single)
        streams.append(stream)
        return records, [single]
    if has_single:
        ambiguities.append(
            ConvertError(
                f"holds both {HF_INDEX} and {HF_SINGLE}: transformers' from_pretrained loads {HF_SINGLE} and "
                f"ignores the index, while this tool reads the index's shards, so the two may be different models; "
                "remove the one that is not the model",
                file=folder,
            )
        )
    _check_transformers_weights(folder, HF_INDEX, ambiguities)
    index = read_json_object(index_path, MAX_INDEX_JSON)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConvertError("weight_map must map tensor names to shard file names", file=index_path)
    records: list[TensorRecord] = []
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        path = folder / shard
        if Path(shard).name != shard or not is_present(path):
            raise ConvertError(f"index names shard {shard!r}, which is missing", file=index_path)
        stream, shard_records, _ = open_safetensors(path)
        streams.append(stream)
        for record in shard_records:
            if weight_map.get(record.name) != shard:
                listed_in = weight_map.get(record.name)
                where = f"the index places it in {shown(listed_in)}" if listed_in else "the index does not list it"
                raise ConvertError(
                    f"tensor is in {shown(shard)} but {where}",
                    file=index_path,
                    tensor=record.name,
                )
        records += shard_records
    listed = set(weight_map) - {r.name for r in records}
    if listed:
        name = sorted(listed)[0]
        raise ConvertError(
            f"index lists it in {shown(weight_map[name])} but that shard lacks it", file=index_path, tensor=name
        )
    unlisted = sorted(p.name for p in folder.glob("model-*.safetensors") if p.name not in shards)
    if unlisted:
        raise ConvertError(f"shard {shown(unlisted[0])} is not listed in the index", file=index_path)
    metadata = index.get("metadata")
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    held = sum(r.nbytes for r in records)
    if total is not None and total != held:
        raise ConvertError(f"metadata.total_size {total} is not the {held} bytes the shards hold", file=index_path)
    return records, [folder / s for s in shards]


def _check_mistral_pair(folder: Path, read: str, ambiguities: Ambiguities) -> None:
    """mistral-inference's Transformer.from_folder loads consolidated.safetensors or consolidated.00.pth and
    refuses a folder holding both; reached with --from, which picks one of them here."""
    names = ("consolidated.safetensors", "consolidated.00.pth")
    if all(is_present(folder / name) for name in names):
        ambiguities.append(
            ConvertError(
                f"holds both {names[0]} and {names[1]}: mistral-inference refuses such a folder, and this tool "
                f"read {read} only; remove the other",
                file=folder,
            )
        )


def _check_transformers_weights(folder: Path, read: str, ambiguities: Ambiguities) -> None:
    """config.json's transformers_weights names the file from_pretrained loads, before any of the usual names
    (transformers 4.56+); anything but the file read here makes two models of the folder."""
    config = folder / "config.json"
    if not is_present(config):
        return  # reading the parameters reports it
    named = read_json_object(config).get("transformers_weights")
    if named is not None and named != read:
        ambiguities.append(
            ConvertError(
                f"transformers_weights is {named!r:.200}: transformers' from_pretrained loads that instead of {read}, "
                f"which this tool reads; remove the key or the other weights",
                file=config,
            )
        )


_Reader = Callable[[Path, list[ByteStream], Ambiguities], tuple[list[TensorRecord], list[Path]]]
_READERS: Mapping[str, _Reader] = MappingProxyType(
    {
        "torch_zip": _read_torch_zip,
        "torch_zip_multi": _read_torch_zip_multi,
        "safetensors_single": _read_safetensors_single,
        "safetensors_sharded": _read_safetensors_sharded,
    }
)
