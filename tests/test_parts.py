"""The container contract's parts: a container may store one canonical tensor as several tensors (a quantized
matrix with its scales and biases, as MLX does), each computed from the same source slices by its own cast, and no
shared module changes for it. Proved here with a container that exists only in this test: the hf container, but
every BF16 matrix stored as two U8 tensors, its high bytes and its low bytes. safetensors (the real client) reads
the output; the two parts put back together are the source's matrix, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from convert.containers import format_of
from convert.containers.contract import Part
from convert.containers.hf_safetensors import HfSafetensors
from convert.planning import plan as planning
from convert.planning.plan import PlanOptions
from convert.run.pipeline import convert_checkpoint
from convert.sample import write_sample
from convert.verify.folder import verify_folder

pytestmark = pytest.mark.containers


@dataclass(frozen=True)
class ByteOfBf16:
    """One byte of every BF16 element: element-wise, so it runs on any slice of whole elements."""

    high: bool
    src_dtype: str = "BF16"
    dst_dtype: str = "U8"
    granule: int = 2

    def out_nbytes(self, nbytes: int) -> int:
        return nbytes // 2

    def __call__(self, data: memoryview, tensor: str, first: int) -> memoryview:
        words = np.frombuffer(data, dtype="<u2")
        return memoryview((words >> 8 if self.high else words & 0xFF).astype(np.uint8))


class SplitBytes(HfSafetensors):
    """hf, with every matrix stored as NAME.hi and NAME.lo."""

    def parts(self, name: str, shape: tuple[int, ...], dtype: str, outtype: str | None) -> tuple[Part, ...] | None:
        if len(shape) != 2 or dtype != "BF16":
            return None
        return (Part(".hi", "U8", shape, ByteOfBf16(True)), Part(".lo", "U8", shape, ByteOfBf16(False)))


@pytest.fixture
def split_hf(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """--to hf planned through SplitBytes: the registry's answer for the hf table, as the planner asks it."""
    split = SplitBytes()

    def patched(table):
        return split if table.name == "hf" else format_of(table)

    monkeypatch.setattr(planning, "format_of", patched)
    yield


def test_a_tensor_stored_as_two_parts(tmp_path: Path, split_hf: None) -> None:
    source = write_sample(tmp_path / "src")
    out = tmp_path / "out"
    plan = convert_checkpoint(source, out, "hf", PlanOptions())
    weights = {}
    for shard in sorted(out.glob("model*.safetensors")):
        weights.update(load_file(shard))
    original = torch.load(source / "consolidated.00.pth", map_location="cpu", weights_only=True)
    v = "model.layers.0.self_attn.v_proj.weight"  # no rotary permutation: its rows are the torrent's wv
    assert v not in weights and weights[v + ".hi"].dtype == torch.uint8 and weights[v + ".lo"].dtype == torch.uint8
    rebuilt = (weights[v + ".hi"].numpy().astype(np.uint16) << 8) | weights[v + ".lo"].numpy()
    expected = original["layers.0.attention.wv.weight"].view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(rebuilt, expected)
    norm = "model.layers.0.input_layernorm.weight"  # 1-D: stored as one tensor, as the table names it
    assert weights[norm].dtype == torch.bfloat16 and norm + ".hi" not in weights
    assert {t.name for t in plan.tensors} == set(weights)
    # The output's own integrity holds for the parts: SHA256SUMS and the manifest's per-tensor digests pass. Its
    # structure does not: read back as an hf folder, .hi/.lo are not hf tensors (reading parts back as a source
    # is the container's own open(), which this test container does not change).
    report = verify_folder(out)
    checked = {r.check for r in report.results if r.ok}
    assert "sha256" in checked and all(r.check == "structure" for r in report.results if not r.ok), report
