"""Mistral's safetensors container: consolidated.safetensors, params.json in Mistral's own style,
tokenizer.model. mistral-inference loads it, and vLLM switches to its Mistral loader when it sees the file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from convert.common.errors import ConvertError
from convert.containers.contract import (
    Ambiguities,
    Format,
    OpenedWeights,
    OutputRequest,
    PlannedOutput,
    check_mistral_pair,
    embedding_vocab,
    safetensors_file,
    text_file,
)
from convert.containers.mistral_params import mistral_params_json, read_mistral_params
from convert.containers.safetensors import open_safetensors
from convert.fileio.regular import is_present

if TYPE_CHECKING:
    from convert.fileio.streams import ByteStream
    from convert.model.tables import LayoutTable

WEIGHTS = "consolidated.safetensors"
MARKERS = (WEIGHTS,)  # the registry's
PARAMS = "params.json"


class MistralSafetensors(Format):
    container = "mistral_safetensors"
    markers = MARKERS
    replaces = (PARAMS, WEIGHTS)

    def open(
        self, folder: Path, table: LayoutTable, streams: list[ByteStream], ambiguities: Ambiguities
    ) -> OpenedWeights:
        path = folder / WEIGHTS
        if not is_present(path):
            raise ConvertError(f"{WEIGHTS} is missing", file=folder)
        check_mistral_pair(folder, WEIGHTS, ambiguities)
        stream, records, _ = open_safetensors(path)
        streams.append(stream)
        params_file = folder / PARAMS
        return OpenedWeights(
            records, [path], params_file, read_mistral_params(params_file, embedding_vocab(records, table))
        )

    def plan(self, request: OutputRequest) -> PlannedOutput:
        return PlannedOutput(
            [safetensors_file(WEIGHTS, request.tensors)], [], text_file(PARAMS, mistral_params_json(request.params))
        )


FORMAT = MistralSafetensors()
