"""The early Hugging Face upload's container: consolidated.00.pt ... consolidated.07.pt (torch zips, each a subset
of the tensors), an HF-style params.json, tokenizer.model. transformers' convert_mixtral_weights_to_hf.py reads it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

from convert.common.errors import ConvertError
from convert.containers.contract import (
    Ambiguities,
    Format,
    OpenedWeights,
    OutputRequest,
    PlannedOutput,
    embedding_vocab,
    text_file,
    torch_zip_file,
)
from convert.containers.hf_safetensors import CONFIG_PARAMS, HF_READ_ORDER
from convert.containers.torchzip.reader import read_torch_index
from convert.fileio.streams import ByteStream
from convert.integrity.crc32 import check_records
from convert.model.outputs import TargetTensor
from convert.model.params import (
    DEFAULT_MAX_POSITIONS,
    JSON,
    Dialect,
    JsonType,
    ModelParams,
    Reading,
    check_consistent,
    json_params,
    max_positions,
    read_json_params,
)
from convert.model.records import TensorRecord

if TYPE_CHECKING:
    from convert.model.tables import LayoutTable

FILES = 8  # consolidated.00.pt ... consolidated.07.pt, as uploaded and as transformers' script reads
PARAMS = "params.json"
_PT_FILE = re.compile(r"consolidated\.(\d+)\.pt$")


INT, NUMBER, WINDOW = JsonType.INT, JsonType.NUMBER, JsonType.WINDOW


def _window_as_uploaded(params: ModelParams) -> str:
    """transformers' convert_mixtral_weights_to_hf.py (4.36 to 4.45) passes sliding_window through int(), 4.36
    without checking that the key exists, so neither null nor "null" nor a missing key is read by both. "No
    sliding window" is written as a window of the model's whole context (max_position_embeddings, 32768 by
    default), in a string as uploaded: no token ever lies that far back, so the attention is the same for every
    sequence the model supports. _whole_context_is_no_window reads it back as none."""
    return str(max_positions(params) if params.sliding_window is None else params.sliding_window)


def _whole_context_is_no_window(reading: Reading) -> None:
    """The inverse of _window_as_uploaded: a window no shorter than the longest sequence the model supports is
    none."""
    got = reading.got
    window = got["sliding_window"]
    if window is not None and window >= (got["max_position_embeddings"] or DEFAULT_MAX_POSITIONS):
        got["sliding_window"] = None


# The upload's keys, in its order: config.json's spellings and value types (transformers' script reads it as
# config.json is read), but for the window written as a string of the whole context when there is none, and
# max_position_embeddings left out when it is the default rather than written with it.
_CONFIG_KEY = {key.field: key for key in CONFIG_PARAMS.keys}
MEGABLOCKS_PARAMS: Final = Dialect(
    name="params.json (megablocks)",
    syntax=JSON,
    keys=(
        *(_CONFIG_KEY[field] for field in ("dim", "hidden_dim", "n_heads", "n_layers", "n_kv_heads", "n_experts")),
        *(_CONFIG_KEY[field] for field in ("experts_per_tok", "vocab_size", "norm_eps", "rope_theta")),
        replace(_CONFIG_KEY["sliding_window"], encode=_window_as_uploaded),
        _CONFIG_KEY["head_dim"],
        replace(_CONFIG_KEY["max_position_embeddings"], encode=None, omit=(None, DEFAULT_MAX_POSITIONS)),
    ),
    order=(*HF_READ_ORDER, _whole_context_is_no_window),
    check=check_consistent,
)


def read_megablocks_params(path: Path, vocab_from_embedding: int | None = None) -> ModelParams:
    return read_json_params(MEGABLOCKS_PARAMS, path, vocab_from_embedding)


def megablocks_params_json(params: ModelParams) -> str:
    return json.dumps(json_params(MEGABLOCKS_PARAMS, params), indent=2) + "\n"


def file_name(number: int) -> str:
    return f"consolidated.{number:02d}.pt"


MARKERS = (file_name(0),)  # the registry's: the first of the numbered files


class MegablocksPt(Format):
    container = "megablocks_pt"
    markers = MARKERS
    replaces = (PARAMS, "consolidated.[0-9]*.pt")

    def check_records(self, records: Iterable[TensorRecord]) -> list[ConvertError]:
        """Each storage record's CRC-32 from the zip's central directory (torch.load checks none)."""
        return check_records(records)

    def open(
        self, folder: Path, table: LayoutTable, streams: list[ByteStream], ambiguities: Ambiguities
    ) -> OpenedWeights:
        numbered = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _PT_FILE.fullmatch(p.name)))
        if not numbered:
            raise ConvertError("no consolidated.NN.pt files", file=folder)
        records: list[TensorRecord] = []
        for _, path in numbered:
            stream = ByteStream([path])
            streams.append(stream)
            records += read_torch_index(stream)
        params_file = folder / PARAMS
        params = read_megablocks_params(params_file, embedding_vocab(records, table))
        return OpenedWeights(records, [p for _, p in numbered], params_file, params)

    def plan(self, request: OutputRequest) -> PlannedOutput:
        """Always FILES files, as uploaded: transformers' convert_mixtral_weights_to_hf.py opens consolidated.00.pt
        ... consolidated.07.pt whatever the model's depth. Consecutive layers share a file; the embedding goes with
        the first, the final norm and output with the last that holds a layer; with fewer layers than files, the
        remaining files hold an empty state dict (the upload's own split is not known; any split reads back the
        same)."""
        tensors = request.tensors
        n_layers = 1 + max((t.layer for t in tensors if t.layer is not None), default=0)
        count = min(FILES, n_layers)
        groups: list[list[TargetTensor]] = [[] for _ in range(FILES)]
        seen_layer = False
        for tensor in tensors:
            if tensor.layer is not None:
                seen_layer = True
                groups[tensor.layer * count // n_layers].append(tensor)
            else:
                groups[count - 1 if seen_layer else 0].append(tensor)
        weights = [torch_zip_file(file_name(i), group) for i, group in enumerate(groups)]
        return PlannedOutput(weights, [], text_file(PARAMS, megablocks_params_json(request.params)))


FORMAT = MegablocksPt()
