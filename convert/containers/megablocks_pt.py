"""The early Hugging Face upload's container: consolidated.00.pt ... consolidated.07.pt (torch zips, each a subset
of the tensors), an HF-style params.json, tokenizer.model. transformers' convert_mixtral_weights_to_hf.py reads it."""

from __future__ import annotations

import re
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
    embedding_vocab,
    text_file,
    torch_zip_file,
)
from convert.containers.torchzip.reader import read_torch_index
from convert.fileio.streams import ByteStream
from convert.integrity.crc32 import check_records
from convert.model.outputs import TargetTensor
from convert.model.params import hf_params_json, read_hf_params
from convert.model.records import TensorRecord

if TYPE_CHECKING:
    from convert.model.tables import LayoutTable

FILES = 8  # consolidated.00.pt ... consolidated.07.pt, as uploaded and as transformers' script reads
PARAMS = "params.json"
_PT_FILE = re.compile(r"consolidated\.(\d+)\.pt$")


def file_name(number: int) -> str:
    return f"consolidated.{number:02d}.pt"


class MegablocksPt(Format):
    container = "megablocks_pt"
    markers = (file_name(0),)
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
        params = read_hf_params(params_file, embedding_vocab(records, table), megablocks=True)
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
        return PlannedOutput(weights, [], text_file(PARAMS, hf_params_json(request.params)))


FORMAT = MegablocksPt()
