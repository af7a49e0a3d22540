"""No GGUF key changes the model unseen (issue 23, findings 2 and 3). Each case edits a GGUF this tool wrote,
with gguf-py's own reader and writer (tests/gguf_edit.py), as a user editing a download would:

- a key of the architecture (llama.*) that the tool maps to no layout's parameters, at a value that changes
  what llama.cpp computes (rope scaling, a sliding window, logit scaling), is refused naming the key: the
  output would be another model (on c8b1743 the rope-scaling case converted with exit 0 and no word);
- at a value that changes nothing (rope scaling "none", a factor of 1) or as a label llama.cpp never reads
  (tensor_data_layout), it converts, to the same bytes as without it;
- a token list shorter than the embedding's rows, with no tokenizer.model beside it, is refused naming both
  counts, as llama.cpp refuses to load it (c8b1743 converted it with exit 0).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import CliRunner
from gguf import GGUFValueType as V
from gguf_edit import Entries, rewrite

pytestmark = pytest.mark.containers


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, cli: CliRunner) -> Path:
    """A bf16 GGUF of the sample, without a tokenizer.model beside it (its vocabulary is in the file)."""
    work = tmp_path_factory.mktemp("gguf-keys")
    cli("sample", work / "src")
    cli("convert", work / "src", work / "gguf", "--to", "gguf", "--no-progress")
    (work / "gguf" / "tokenizer.model").unlink()
    return work / "gguf"


def edited(model: Path, tmp_path: Path, edit: object) -> Path:
    folder = tmp_path / "edited"
    folder.mkdir()
    rewrite(model / "model.gguf", edit, folder / "model.gguf")  # type: ignore[arg-type]
    return folder


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


REFUSED = {
    "rope-scaling-linear-4": {
        "llama.rope.scaling.type": ("linear", V.STRING),
        "llama.rope.scaling.factor": (4.0, V.FLOAT32),
    },
    "rope-scaling-factor-only": {"llama.rope.scaling.factor": (2.0, V.FLOAT32)},
    "rope-scale-linear": {"llama.rope.scale_linear": (0.5, V.FLOAT32)},
    "rope-scaling-yarn": {"llama.rope.scaling.type": ("yarn", V.STRING)},
    "sliding-window": {"llama.attention.sliding_window": (4096, V.UINT32)},
    "logit-scale": {"llama.logit_scale": (0.5, V.FLOAT32)},
}
NEUTRAL = {
    "rope-scaling-none": {"llama.rope.scaling.type": ("none", V.STRING)},
    "rope-scaling-factor-1": {"llama.rope.scaling.factor": (1.0, V.FLOAT32)},
    "tensor-data-layout": {"llama.tensor_data_layout": ("Meta AI original pth", V.STRING)},
}


def adding(keys: dict[str, tuple[object, V]]) -> object:
    def edit(entries: Entries) -> None:
        for key, (value, vtype) in keys.items():
            entries[key] = (value, vtype, None)

    return edit


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
@pytest.mark.parametrize("target", ["torrent", "hf"])
def test_a_key_that_changes_the_model_is_refused(
    cli: CliRunner, model: Path, tmp_path: Path, case: str, target: str
) -> None:
    folder = edited(model, tmp_path, adding(REFUSED[case]))
    result = cli("convert", folder, tmp_path / "out", "--to", target, check=False)
    assert result.returncode == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mixtral-convert: error: {folder / 'model.gguf'}: GGUF: key ")
    named = [key for key in REFUSED[case] if f"key {key} = " in lines[0]]
    assert named, lines[0]
    assert "changes what llama.cpp computes" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("case", NEUTRAL, ids=list(NEUTRAL))
def test_a_key_that_changes_nothing_converts_to_the_same_bytes(
    cli: CliRunner, model: Path, tmp_path: Path, case: str
) -> None:
    folder = edited(model, tmp_path, adding(NEUTRAL[case]))
    cli("convert", folder, tmp_path / "out", "--to", "torrent", "--no-progress")
    cli("convert", model, tmp_path / "plain", "--to", "torrent", "--no-progress")
    out, plain = digests(tmp_path / "out"), digests(tmp_path / "plain")
    for checksums in ("manifest.json", "SHA256SUMS"):  # the manifest names the source file's size, which grew
        out.pop(checksums), plain.pop(checksums)
    assert out == plain and "consolidated.00.pth" in out


def test_a_vocabulary_shorter_than_the_embedding_is_refused(cli: CliRunner, model: Path, tmp_path: Path) -> None:
    def drop_last_token(entries: Entries) -> None:
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            value, vtype, sub = entries[key]
            entries[key] = (value[:-1], vtype, sub)

    folder = edited(model, tmp_path, drop_last_token)
    result = cli("convert", folder, tmp_path / "out", "--to", "torrent", check=False)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "tokenizer.ggml.tokens holds 1,002 tokens but the embedding has 1,003 rows" in line, line
    assert "\n" not in line
    inspected = cli("inspect", folder, check=False)  # inspect lists it as a problem
    assert inspected.returncode == 1 and "holds 1,002 tokens but the embedding has 1,003 rows" in inspected.stdout
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
