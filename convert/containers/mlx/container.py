"""The MLX container (mlx-lm on Apple silicon): the folder mlx_lm.convert writes for a Mixtral, plain or
affine-quantized (--outtype q4/q8, groups of 32, 64 or 128).

What mlx_lm.convert writes (mlx-lm 0.32.2: convert.py, utils.py save_model / make_shards / save_config /
quantize_model / get_total_parameters, models/mixtral.py; mlx 0.32: io/safetensors.cpp; docs/formats.md, "MLX"):
- the tensors under transformers' names, the experts of a layer stacked into one [experts, rows, cols] tensor each
  (block_sparse_moe.switch_mlp.{gate,up,down}_proj), q/k rows in transformers' half-split order;
- quantized (-q): every Linear, Embedding and SwitchLinear whose input dimension is a multiple of the group size
  (attention, router, experts, embeddings, lm_head) as NAME.weight (uint32, packed), NAME.scales and NAME.biases
  (the model's dtype, one per group); norms stay in float. Their bytes are mx.quantize's (quantize.py);
- model.safetensors, or model-0000N-of-0000M.safetensors past 5 GiB, filled in module order; each with metadata
  exactly {"format": "mlx"} and a header that is nlohmann::json's compact dump (keys sorted, no padding);
- model.safetensors.index.json always, with total_size and total_parameters (a quantized matrix counts the
  elements it stands for), json.dump(indent=4), the weight map sorted;
- config.json: the model's config.json with quantization and quantization_config ({group_size, bits, mode}),
  keys sorted, json.dump(indent=4); generation_config.json copied; the tokenizer files transformers saves.

Unquantized, an MLX folder is a source like any layout (told apart from hf by its weights' metadata format). A
quantized one is refused as a source (one-way) and read by inspect and verify.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert.common.dtypes import CONFIG_NAME, ITEM_SIZE
from convert.common.errors import ConvertError, shown
from convert.containers.contract import (
    Ambiguities,
    OpenedWeights,
    OutputRequest,
    Part,
    PlannedOutput,
    from_tokenizer,
    placed,
    text_file,
)
from convert.containers.hf_safetensors import (
    CONFIG,
    GENERATION_CONFIG,
    INDEX,
    SINGLE,
    HfSafetensors,
    hf_config_json,
    release_metadata,
    shard_groups,
    shard_name,
    weights_format,
)
from convert.containers.mlx.settings import BIASES, BITS, DEFAULT_GROUP_SIZE, FLOATS, GROUP_SIZES, SCALES, WEIGHT
from convert.containers.safetensors import open_safetensors
from convert.fileio.regular import MAX_INDEX_JSON, is_present
from convert.model.outputs import OutputFile, TargetTensor
from convert.model.params import json_text, read_json_object
from convert.model.records import TensorRecord
from convert.tokenizer.hf_files import hf_tokenizer_files

# quantize.py (numpy) is loaded where a cast is made: detecting a folder's layout loads this module, and verify of
# a safetensors folder loads no numpy (convert/containers/__init__.py).
if TYPE_CHECKING:
    from convert.containers.mlx.quantize import FloatCast
    from convert.fileio.streams import ByteStream
    from convert.model.params import ModelParams
    from convert.model.tables import LayoutTable

METADATA_FORMAT = "mlx"  # every weights file's __metadata__ is exactly {"format": "mlx"} (save_model)
WEIGHTS_GLOB = "model*.safetensors"  # what mlx-lm's load_model reads, every one of them
DEFAULT_MAX_SHARD_SIZE = 5 << 30  # make_shards: MAX_FILE_SIZE_GB = 5, shifted by 30 (GiB)
FLOAT_OUTTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}
QUANTIZED = {f"q{bits}": bits for bits in BITS}
QUANT_SUFFIXES = (".weight", ".scales", ".biases")  # the three tensors of a quantized module, in mlx's order


def quant_settings(outtype: str | None) -> tuple[int, int] | None:
    """(bits, group size) of a quantized outtype (q4, q8, or q4-g32 and so on), None for a float one or none."""
    if outtype is None:
        return None
    name, _, group = outtype.partition("-g")
    if name not in QUANTIZED:
        return None
    return QUANTIZED[name], int(group) if group else DEFAULT_GROUP_SIZE


def outtype_name(bits: int, group_size: int) -> str:
    return f"q{bits}" if group_size == DEFAULT_GROUP_SIZE else f"q{bits}-g{group_size}"


def quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    """nn.quantize's rule as quantize_model applies it: every module with to_quantized (Linear, Embedding,
    SwitchLinear: every matrix of Mixtral; the norms are RMSNorm, 1-D, which has none) whose weight's last (input)
    dimension is a multiple of the group size."""
    return name.endswith(".weight") and len(shape) >= 2 and shape[-1] % group_size == 0


def header_bytes(tensors: Sequence[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """The 8-byte length and JSON header mx.save_safetensors writes: nlohmann::json's dump() of an object (its
    keys sorted, as std::map orders them, no spaces), never padded. tensors: name, dtype, shape, data offset."""
    header: dict[str, Any] = {"__metadata__": {"format": METADATA_FORMAT}}
    for name, dtype, shape, offset in tensors:
        size = math.prod(shape) * ITEM_SIZE[dtype]
        header[name] = {"data_offsets": [offset, offset + size], "dtype": dtype, "shape": list(shape)}
    text = json.dumps(header, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")
    return struct.pack("<Q", len(text)) + text


def weights_file(name: str, tensors: Sequence[TargetTensor]) -> OutputFile:
    """One weights file, its tensors' data in module order. mlx writes them in the order of the std::unordered_map
    it is handed, which differs between C++ standard libraries (libc++ on macOS, libstdc++ on Linux), so no order
    is the one mlx_lm.convert writes; the header names, dtypes and shapes are, and so is every tensor's bytes."""
    entries = []
    offset = 0
    for tensor in tensors:
        entries.append((tensor.name, tensor.dtype, tensor.shape, offset))
        offset += tensor.nbytes
    header = header_bytes(entries)
    pieces = tuple(p for t, entry in zip(tensors, entries, strict=True) for p in placed(t, len(header) + entry[3]))
    return OutputFile(name, len(header) + offset, blobs=((0, header),), pieces=pieces)


def total_parameters(tensors: Sequence[TargetTensor], outtype: str | None) -> int:
    """get_total_parameters: a quantized module counts its packed words times 32 / bits (the elements they stand
    for), not its scales and biases; every other tensor its elements."""
    settings = quant_settings(outtype)
    total = 0
    for tensor in tensors:
        if settings is not None and tensor.dtype == "U32":
            total += math.prod(tensor.shape) * 32 // settings[0]
        elif settings is None or not tensor.name.endswith(QUANT_SUFFIXES[1:]):
            total += math.prod(tensor.shape)
    return total


def mlx_config_json(params: ModelParams, dtype: str, outtype: str | None) -> str:
    """config.json as mlx_lm.convert writes it from the hf config.json this tool writes: the same keys, the
    quantization block twice where quantized, top-level keys sorted, json.dump(indent=4), no final newline."""
    if params.head_dim * params.n_heads != params.dim:
        # mlx-lm's Mixtral computes head_dim as hidden_size / num_attention_heads and ignores config's head_dim.
        raise ConvertError(
            f"head_dim {params.head_dim} is not dim / n_heads ({params.dim} / {params.n_heads}): mlx-lm's Mixtral "
            "cannot hold such a model (it computes head_dim from them); --to mlx refused"
        )
    config = json.loads(hf_config_json(params, CONFIG_NAME[dtype], dict(release_metadata()["config_defaults"])))
    settings = quant_settings(outtype)
    if settings is not None:
        bits, group_size = settings
        config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
        config["quantization_config"] = dict(config["quantization"])
    return json.dumps(dict(sorted(config.items())), indent=4)


class Mlx(HfSafetensors):
    """hf's files and config, read the same way; written as mlx_lm.convert writes them."""

    container = "mlx"  # hf's markers (MARKERS), split files and replaced files, inherited: the same file names
    outtypes = (*FLOAT_OUTTYPES, *QUANTIZED)
    outtype_variants = tuple(f"q{bits}-g{group}" for bits in BITS for group in GROUP_SIZES)

    def claims(self, folder: Path, table: LayoutTable) -> bool:
        """hf's file names, with weights whose metadata says mlx wrote them."""
        return any((folder / marker).exists() for marker in self.markers) and weights_format(folder) == "mlx"

    def tensor_dtype(self, name: str, shape: tuple[int, ...], dtype: str, outtype: str | None) -> str:
        return FLOAT_OUTTYPES.get(outtype or "", dtype)

    def cast(self, src: str, dst: str) -> FloatCast | None:
        from convert.containers.mlx.quantize import FloatCast

        return FloatCast(src, dst) if src in FLOATS and dst in FLOATS else None

    def parts(self, name: str, shape: tuple[int, ...], dtype: str, outtype: str | None) -> tuple[Part, ...] | None:
        settings = quant_settings(outtype)
        if settings is None or not quantizable(name, shape, settings[1]):
            return None
        from convert.containers.mlx.quantize import AffineCast

        bits, group_size = settings
        packed = (*shape[:-1], shape[-1] * bits // 32)
        grouped = (*shape[:-1], shape[-1] // group_size)
        return (
            Part("", "U32", packed, AffineCast(dtype, WEIGHT, bits, group_size)),
            Part(".scales", dtype, grouped, AffineCast(dtype, SCALES, bits, group_size), replaces=".weight"),
            Part(".biases", dtype, grouped, AffineCast(dtype, BIASES, bits, group_size), replaces=".weight"),
        )

    def checkpoint_dtype(self, record: TensorRecord, main: str) -> str:
        if record.dtype == "U32":
            raise ConvertError(
                "is U32: quantized MLX is one-way, its weights cannot be restored; convert from the original "
                "checkpoint instead",
                file=record.stream.label,
                tensor=record.name,
            )
        return record.dtype

    def open(
        self, folder: Path, table: LayoutTable, streams: list[ByteStream], ambiguities: Ambiguities
    ) -> OpenedWeights:
        opened = super().open(folder, table, streams, ambiguities)
        return OpenedWeights(
            opened.records, opened.weight_files, opened.params_file, opened.params, _written_as(opened)
        )

    def _weights(
        self, folder: Path, streams: list[ByteStream], ambiguities: Ambiguities
    ) -> tuple[list[TensorRecord], list[Path]]:
        """Every model*.safetensors of the folder, as mlx-lm's load_model globs them (it reads no index: the
        single file and the index are both always there); the index, where present, must list exactly those."""
        paths = sorted(p for p in folder.glob(WEIGHTS_GLOB) if p.is_file())
        if not paths:
            raise ConvertError(f"no {WEIGHTS_GLOB} (mlx-lm loads those)", file=folder)
        records: list[TensorRecord] = []
        held: dict[str, str] = {}
        for path in paths:
            stream, found, _ = open_safetensors(path)
            streams.append(stream)
            records += found
            held.update(dict.fromkeys((r.name for r in found), path.name))
        index_path = folder / INDEX
        if is_present(index_path):
            weight_map = read_json_object(index_path, MAX_INDEX_JSON).get("weight_map")
            if weight_map != held:
                listed = weight_map if isinstance(weight_map, dict) else {}
                name = next((n for n in sorted({*held, *listed}) if held.get(n) != listed.get(n)), None)
                raise ConvertError(
                    f"the index places it in {shown(listed.get(name))}, the folder holds it in "
                    f"{shown(held.get(name))} (mlx-lm loads every {WEIGHTS_GLOB})",
                    file=index_path,
                    tensor=name,
                )
        return records, paths

    def plan(self, request: OutputRequest) -> PlannedOutput:
        tensors = request.tensors
        groups = shard_groups(tensors, request.max_shard_size or DEFAULT_MAX_SHARD_SIZE)
        weights = []
        weight_map = {}
        for number, group in enumerate(groups, start=1):
            name = shard_name(number, len(groups)) if len(groups) > 1 else SINGLE
            weights.append(weights_file(name, group))
            weight_map.update(dict.fromkeys((t.name for t in group), name))
        metadata = {"total_size": sum(t.nbytes for t in tensors),
                    "total_parameters": total_parameters(tensors, request.outtype)}  # fmt: skip
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        dtype = FLOAT_OUTTYPES.get(request.outtype or "", request.dtype)
        without = "tokenizer.json not written (mlx-lm will need sentencepiece)"
        texts = from_tokenizer(request, hf_tokenizer_files, without) or {}
        others = [
            *(text_file(name, text) for name, text in sorted(texts.items())),
            text_file(GENERATION_CONFIG, json_text(dict(release_metadata()["generation_config"]))),
            text_file(CONFIG, mlx_config_json(request.params, dtype, request.outtype)),
        ]
        return PlannedOutput(weights, others, text_file(INDEX, json.dumps(index, indent=4)))


def _written_as(opened: OpenedWeights) -> str | None:
    """The --outtype the folder was written with, from its config.json: q4/q8 (with the group, where not 64) from
    the quantization block, else the dtype config.json states (so that verify --against casts as it did)."""
    config = read_json_object(opened.params_file)
    quantization = config.get("quantization")
    if isinstance(quantization, dict):
        bits, group_size = quantization.get("bits"), quantization.get("group_size")
        if bits not in BITS or group_size not in GROUP_SIZES or quantization.get("mode", "affine") != "affine":
            raise ConvertError(
                f"quantization {json.dumps(quantization)[:200]} is not MLX's affine 4 or 8 bits in groups of "
                f"{', '.join(map(str, GROUP_SIZES))}",
                file=opened.params_file,
            )
        return outtype_name(bits, group_size)
    named = {name: dtype for dtype, name in CONFIG_NAME.items()}.get(str(config.get("torch_dtype")))
    return next((o for o, d in FLOAT_OUTTYPES.items() if d == named), None)


FORMAT = Mlx()
