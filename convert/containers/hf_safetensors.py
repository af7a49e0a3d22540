"""The Hugging Face container (transformers, vLLM): model-NNNNN-of-NNNNN.safetensors shards with
model.safetensors.index.json (or one model.safetensors), config.json, generation_config.json, and tokenizer.json
with its configs built from tokenizer.model, so that transformers loads the folder without sentencepiece.

config.json and generation_config.json carry fields no params.json has; their values are the published release's,
kept as data in mappings/release/mixtral-8x7b-v0.1.toml."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from convert.common.dtypes import CONFIG_NAME
from convert.common.errors import ConvertError, shown
from convert.containers.contract import (
    Ambiguities,
    Format,
    OpenedWeights,
    OutputRequest,
    PlannedOutput,
    embedding_vocab,
    from_tokenizer,
    safetensors_file,
    text_file,
)
from convert.containers.safetensors import open_safetensors
from convert.fileio.regular import MAX_INDEX_JSON, MAX_TOKENIZER, is_present, read_small
from convert.model.outputs import OutputFile, TargetTensor
from convert.model.params import (
    DEFAULT_EXPERTS_PER_TOKEN,
    DEFAULT_ROPE_THETA,
    IMPLIED_HEAD_DIM,
    JSON,
    Dialect,
    JsonType,
    Key,
    ModelParams,
    Reading,
    Step,
    check_consistent,
    head_dim_is_not_implied,
    json_text,
    max_positions,
    read_json_object,
    read_json_params,
    same_as,
    vocab_from_tensors,
    written_keys,
)
from convert.model.records import TensorRecord
from convert.model.tables import data_dir
from convert.tokenizer.hf_files import hf_tokenizer_files

if TYPE_CHECKING:
    from convert.fileio.streams import ByteStream
    from convert.model.tables import LayoutTable

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MARKERS = (INDEX, SINGLE)  # the registry's: a folder holding either may be hf (or mlx, which shares them)
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # decimal, as transformers sharded the published checkpoint
RELEASE = "mixtral-8x7b-v0.1.toml"  # mappings/release/: config.json fields params.json does not carry


INT, NUMBER, WINDOW = JsonType.INT, JsonType.NUMBER, JsonType.WINDOW


def rope_parameters(reading: Reading) -> None:
    """transformers 5.x moved rope_theta into rope_parameters (Key.preferred reads it there): that object must be
    Mixtral's plain rotary embedding."""
    nested = reading.source.get("rope_parameters")
    if nested is None:
        return
    if not isinstance(nested, dict):
        raise ConvertError("key 'rope_parameters' must be an object", file=reading.file)
    if nested.get("rope_type", "default") != "default":
        raise ConvertError(f"rope_type {nested['rope_type']!r} is not Mixtral's default rotary", file=reading.file)


# The order config.json has always been read in (the first broken rule is the one reported); megablocks' HF-style
# params.json is read the same way.
HF_READ_ORDER: tuple[str | Step, ...] = (
    "dim",
    "n_heads",
    rope_parameters,
    "sliding_window",
    "max_position_embeddings",
    "n_layers",
    "n_kv_heads",
    "head_dim",
    "hidden_dim",
    "n_experts",
    "experts_per_tok",
    "vocab_size",
    "norm_eps",
    "rope_theta",
)

# config.json's keys. The order is not the file's (transformers sorts the keys); torch_dtype and the published
# defaults are added by hf_config_json.
CONFIG_PARAMS: Final = Dialect(
    name="config.json",
    syntax=JSON,
    keys=(
        Key("dim", ("hidden_size",), INT),
        Key("n_layers", ("num_hidden_layers",), INT),
        Key("n_heads", ("num_attention_heads",), INT),
        # transformers 5 writes an unset head_dim as null: null is absent, as for every key but vocab_size.
        Key("n_kv_heads", ("num_key_value_heads",), INT, default=same_as("n_heads")),
        Key("head_dim", ("head_dim",), INT, default=IMPLIED_HEAD_DIM, when=head_dim_is_not_implied),
        Key("hidden_dim", ("intermediate_size",), INT),
        Key("n_experts", ("num_local_experts",), INT),
        Key("experts_per_tok", ("num_experts_per_tok",), INT, default=DEFAULT_EXPERTS_PER_TOKEN),
        # Only a missing vocab_size is read from the embedding; null is a missing required key.
        Key("vocab_size", ("vocab_size",), INT, absent=(), fallback=vocab_from_tensors),
        Key("norm_eps", ("rms_norm_eps",), NUMBER),
        Key(
            "rope_theta",
            ("rope_theta",),
            NUMBER,
            default=DEFAULT_ROPE_THETA,
            preferred=("rope_parameters", "rope_theta"),
        ),
        Key("sliding_window", ("sliding_window",), WINDOW, required=False),
        Key("max_position_embeddings", ("max_position_embeddings",), INT, required=False, encode=max_positions),
    ),
    order=HF_READ_ORDER,
    check=check_consistent,
)


def read_hf_params(path: Path, vocab_from_embedding: int | None = None) -> ModelParams:
    """config.json, transformers 4.x (rope_theta) or 5.x (rope_parameters) style."""
    return read_json_params(CONFIG_PARAMS, path, vocab_from_embedding)


def hf_config_json(params: ModelParams, torch_dtype: str, defaults: Mapping[str, object]) -> str:
    """config.json exactly as transformers serializes it (indent 2, sorted keys, trailing newline): the published
    defaults, then the parameters over them."""
    config = dict(defaults)
    config.update((key.name, value) for key, value in written_keys(CONFIG_PARAMS.keys, params))
    config["torch_dtype"] = torch_dtype
    return json_text(config)


def shard_name(number: int, count: int) -> str:
    return f"model-{number:05d}-of-{count:05d}.safetensors"


@cache
def release_metadata() -> MappingProxyType[str, MappingProxyType[str, object]]:
    """[config_defaults] and [generation_config] of the shipped release table, checked on load."""
    path = data_dir("mappings.release") / RELEASE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConvertError(f"release metadata unreadable: {exc}", file=path) from None
    sections = {}
    for section in ("config_defaults", "generation_config"):
        if not isinstance(data.get(section), dict):
            raise ConvertError(f"missing section [{section}], which config.json needs", file=path)
        sections[section] = MappingProxyType(dict(data[section]))
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConvertError(f"unknown section [{unknown[0]}] (allowed: {', '.join(sections)})", file=path)
    return MappingProxyType(sections)


def shard_groups(tensors: Sequence[TargetTensor], max_shard_size: int) -> list[list[TargetTensor]]:
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


TOKENIZER_CONFIG = "tokenizer_config.json"  # where the chat template is, with --instruct
# The safetensors __metadata__ "format" of layouts that share hf's file names: mlx-lm writes "mlx" (transformers
# writes "pt"). A folder whose weights say one of these is that layout's, told apart by what is inside.
FOREIGN_FORMATS = ("mlx",)


def weights_format(folder: Path) -> str | None:
    """The __metadata__ "format" of the folder's model.safetensors, else of its first model-*.safetensors shard;
    None where there is none or it cannot be read (opening the folder then says why)."""
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    path = folder / SINGLE if is_present(folder / SINGLE) else (shards[0] if shards else None)
    if path is None:
        return None
    try:
        stream, _, metadata = open_safetensors(path)
    except ConvertError:
        return None
    stream.close()
    return metadata.get("format")


class HfSafetensors(Format):
    container = "hf_safetensors"
    markers = MARKERS
    split_files = (INDEX,)
    # Completion marker first. Stale shards would contradict the new index, a stale config.json or index would be
    # loaded by transformers.
    replaces = (
        INDEX,
        "model-*-of-*.safetensors",
        SINGLE,
        CONFIG,
        GENERATION_CONFIG,
        "tokenizer.json",
        TOKENIZER_CONFIG,
        "special_tokens_map.json",
    )
    # vLLM switches to its Mistral loader when it finds a consolidated*.safetensors, so an HF folder never holds one.
    must_not_contain = ("consolidated*.safetensors", "params.json")
    chat_template = True

    def claims(self, folder: Path, table: LayoutTable) -> bool:
        """Its file names, unless the weights say another writer made them (see FOREIGN_FORMATS)."""
        return super().claims(folder, table) and weights_format(folder) not in FOREIGN_FORMATS

    def has_chat_template(self, folder: Path, weight_files: Sequence[Path]) -> bool:
        path = folder / TOKENIZER_CONFIG
        try:
            config = json.loads(read_small(path, MAX_TOKENIZER, TOKENIZER_CONFIG)) if is_present(path) else {}
        except (ConvertError, ValueError, UnicodeDecodeError, RecursionError):
            return False  # unreadable: compared as it is, and named there
        return isinstance(config, dict) and "chat_template" in config

    def open(
        self, folder: Path, table: LayoutTable, streams: list[ByteStream], ambiguities: Ambiguities
    ) -> OpenedWeights:
        records, weight_files = self._weights(folder, streams, ambiguities)
        config = folder / CONFIG
        return OpenedWeights(records, weight_files, config, read_hf_params(config, embedding_vocab(records, table)))

    def _weights(
        self, folder: Path, streams: list[ByteStream], ambiguities: Ambiguities
    ) -> tuple[list[TensorRecord], list[Path]]:
        index_path = folder / INDEX
        single = folder / SINGLE
        if not is_present(index_path):
            _check_transformers_weights(folder, SINGLE, ambiguities)
            stream, records, _ = open_safetensors(single)
            streams.append(stream)
            return records, [single]
        if is_present(single):
            ambiguities.append(
                ConvertError(
                    f"holds both {INDEX} and {SINGLE}: transformers' from_pretrained loads {SINGLE} and "
                    f"ignores the index, while this tool reads the index's shards, so the two may be different "
                    "models; remove the one that is not the model",
                    file=folder,
                )
            )
        _check_transformers_weights(folder, INDEX, ambiguities)
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

    def plan(self, request: OutputRequest) -> PlannedOutput:
        tensors = request.tensors
        groups = shard_groups(tensors, request.max_shard_size or DEFAULT_MAX_SHARD_SIZE)
        weights = []
        weight_map = {}
        for number, group in enumerate(groups, start=1):
            name = shard_name(number, len(groups))
            weights.append(safetensors_file(name, group))
            weight_map.update(dict.fromkeys((t.name for t in group), name))
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        release = release_metadata()
        config = hf_config_json(request.params, CONFIG_NAME[request.dtype], dict(release["config_defaults"]))
        others = [
            *_tokenizer_files(request),
            text_file(GENERATION_CONFIG, json_text(dict(release["generation_config"]))),
            text_file(CONFIG, config),
        ]
        return PlannedOutput(weights, others, text_file(INDEX, json_text(index)))


def _tokenizer_files(request: OutputRequest) -> list[OutputFile]:
    """tokenizer.json and its configs, built from tokenizer.model (see base.from_tokenizer)."""
    without = "tokenizer.json not written (transformers will need sentencepiece)"
    texts = from_tokenizer(request, hf_tokenizer_files, without)
    return [text_file(name, text) for name, text in sorted((texts or {}).items())]


def _check_transformers_weights(folder: Path, read: str, ambiguities: Ambiguities) -> None:
    """config.json's transformers_weights names the file from_pretrained loads, before any of the usual names
    (transformers 4.56+); anything but the file read here makes two models of the folder."""
    config = folder / CONFIG
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


FORMAT = HfSafetensors()
