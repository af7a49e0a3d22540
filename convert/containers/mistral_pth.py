"""Mistral's torrent container: consolidated.00.pth (a torch zip; the torrent ships it whole or as -splitN parts
laid end to end), params.json in Mistral's own style, tokenizer.model. Read by mistral-inference and torch.load."""

from __future__ import annotations

from collections.abc import Iterable
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
    text_file,
    torch_zip_file,
)
from convert.containers.mistral_params import mistral_params_json, read_mistral_params
from convert.containers.torchzip.reader import read_torch_index
from convert.fileio.regular import is_present
from convert.fileio.streams import ByteStream, split_parts
from convert.integrity.crc32 import check_records
from convert.model.records import TensorRecord

if TYPE_CHECKING:
    from convert.model.tables import LayoutTable

WEIGHTS = "consolidated.00.pth"
MARKERS = (WEIGHTS, f"{WEIGHTS}-split0")  # the registry's: the weights, or the first of their split parts
PARAMS = "params.json"


class MistralPth(Format):
    container = "mistral_pth"
    markers = MARKERS
    replaces = (PARAMS, WEIGHTS, f"{WEIGHTS}-split*")

    def check_records(self, records: Iterable[TensorRecord]) -> list[ConvertError]:
        """Each storage record's CRC-32 from the zip's central directory (torch.load checks none)."""
        return check_records(records)

    def open(
        self, folder: Path, table: LayoutTable, streams: list[ByteStream], ambiguities: Ambiguities
    ) -> OpenedWeights:
        whole = folder / WEIGHTS
        parts = split_parts(folder, WEIGHTS)
        has_whole = is_present(whole)
        if has_whole and parts:
            ambiguities.append(
                ConvertError(
                    f"holds both {WEIGHTS} and its {len(parts)} -split parts, which need not be the same bytes: "
                    f"torch.load and mistral-inference read {WEIGHTS}, the parts are only read here when it "
                    "is absent; remove the parts (or the whole file)",
                    file=folder,
                )
            )
        check_mistral_pair(folder, WEIGHTS, ambiguities)
        paths = [whole] if has_whole else parts
        if not paths:
            raise ConvertError(f"{WEIGHTS} (or its -split0 ... parts) is missing", file=folder)
        stream = ByteStream(paths)
        streams.append(stream)
        records = read_torch_index(stream)
        params_file = folder / PARAMS
        params = read_mistral_params(params_file, embedding_vocab(records, table))
        return OpenedWeights(records, paths, params_file, params)

    def plan(self, request: OutputRequest) -> PlannedOutput:
        return PlannedOutput(
            [torch_zip_file(WEIGHTS, request.tensors)], [], text_file(PARAMS, mistral_params_json(request.params))
        )


FORMAT = MistralPth()
