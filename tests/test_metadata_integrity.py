"""Everything a loader reads is verified, not only tensor bytes (issue 23, finding 1: on c8b1743, rope.freq_base
changed from 1e6 to 2e6 in a converted model.gguf, with its SHA256SUMS line rewritten, passed verify and verify
--against). manifest.json records every key of each GGUF file (type and value; arrays by length and SHA-256);
verify names the key that differs from it, and verify --against names the key that differs from what converting
the source gives, for GGUF keys and for the small files of the other layouts (config.json, params.json, the
tokenizer files), whose SHA256SUMS lines can be rewritten too. Files are edited with gguf-py's own writer."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import CliRunner
from gguf import GGUFValueType as V
from gguf_edit import Entries, rewrite

pytestmark = pytest.mark.e2e


def rewrite_sums_line(folder: Path, name: str) -> None:
    """What someone hiding an edit does: the file's SHA256SUMS line made to match again."""
    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    (folder / "SHA256SUMS").write_text("".join(f"{digest}  {name}\n" if line.endswith(f"  {name}") else f"{line}\n"
                                               for line in lines))  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, cli: CliRunner) -> Path:
    folder = tmp_path_factory.mktemp("metadata")
    cli("sample", folder / "src")
    for name, args in {
        "gguf": ["--to", "gguf"],
        "gguf-instruct": ["--to", "gguf", "--instruct"],
        "gguf-split": ["--to", "gguf", "--max-shard-size", "300000"],
        "hf": ["--to", "hf"],
        "hf-instruct": ["--to", "hf", "--instruct"],
        "torrent": ["--to", "torrent"],
    }.items():
        cli("convert", folder / "src", folder / name, *args, "--no-progress")
    return folder


def copy(work: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(work / name, tmp_path / name))


def failed_lines(result: object) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("FAILED ") and ": " in line]  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["gguf", "gguf-instruct", "gguf-split", "hf", "hf-instruct", "torrent"])
def test_an_untouched_output_verifies_against_its_source(cli: CliRunner, work: Path, name: str) -> None:
    result = cli("verify", work / name, "--against", work / "src", check=False)
    assert result.returncode == 0, result.stdout


def test_the_manifest_records_every_gguf_key(work: Path) -> None:
    recorded = json.loads((work / "gguf" / "manifest.json").read_text())["metadata"]["model.gguf"]
    assert recorded["llama.rope.freq_base"] == {"type": "FLOAT32", "value": 1000000.0}
    assert recorded["tokenizer.ggml.tokens"]["type"] == "ARRAY[STRING]"
    assert recorded["tokenizer.ggml.tokens"]["count"] == 1003
    assert "metadata" not in json.loads((work / "hf" / "manifest.json").read_text())  # its keys are whole files


GGUF_EDITS = {
    "rope-base": (
        lambda e: e.__setitem__("llama.rope.freq_base", (2e6, V.FLOAT32, None)),
        "key llama.rope.freq_base is FLOAT32 2000000.0; {who} FLOAT32 1000000.0",
    ),
    "a-token": (
        lambda e: e.__setitem__("tokenizer.ggml.tokens", (["<zzz>", *e["tokenizer.ggml.tokens"][0][1:]], V.ARRAY,
                                                          V.STRING)),
        "key tokenizer.ggml.tokens is ARRAY[STRING] of 1003 items, sha256",
    ),
    "key-removed": (lambda e: e.pop("general.name"), "key general.name is missing; {who} STRING 'Mixtral'"),
    "key-added": (
        lambda e: e.__setitem__("general.note", ("hello", V.STRING, None)),
        "key general.note is STRING 'hello'; {who} no such key",
    ),
}  # fmt: skip


def test_a_key_of_the_wrong_type_is_refused_naming_it(cli: CliRunner, work: Path, tmp_path: Path) -> None:
    """llama.cpp refuses a key of another type than it requires: the structure check says so, naming the key."""
    folder = copy(work, "gguf", tmp_path)
    rewrite(folder / "model.gguf", lambda e: e.__setitem__("llama.attention.head_count", (4, V.INT32, None)))
    rewrite_sums_line(folder, "model.gguf")
    result = cli("verify", folder, check=False)
    assert result.returncode == 1
    assert "key llama.attention.head_count is INT32, llama.cpp requires UINT32" in result.stdout


@pytest.mark.parametrize("case", GGUF_EDITS, ids=list(GGUF_EDITS))
def test_a_changed_gguf_key_is_named(cli: CliRunner, work: Path, tmp_path: Path, case: str) -> None:
    edit, says = GGUF_EDITS[case]
    folder = copy(work, "gguf", tmp_path)
    # Without the tokenizer.model beside it, so that a changed token list is this check's to name (beside one,
    # the structure check already refuses a GGUF whose tokens are not its pieces).
    (folder / "tokenizer.model").unlink()
    rewrite(folder / "model.gguf", edit)  # type: ignore[arg-type]
    rewrite_sums_line(folder, "model.gguf")
    result = cli("verify", folder, check=False)
    assert result.returncode == 1
    assert f"FAILED metadata: {folder / 'model.gguf'}: {says.format(who='manifest.json records')}" in result.stdout
    against = cli("verify", folder, "--against", work / "src", check=False)
    assert against.returncode == 1
    assert f"FAILED against: {folder / 'model.gguf'}: {says.format(who='the source gives')}" in against.stdout


def test_a_changed_chat_template_is_named(cli: CliRunner, work: Path, tmp_path: Path) -> None:
    folder = copy(work, "gguf-instruct", tmp_path)

    def edit(entries: Entries) -> None:
        entries["tokenizer.chat_template"] = ("{{ messages }}", V.STRING, None)

    rewrite(folder / "model.gguf", edit)
    rewrite_sums_line(folder, "model.gguf")
    result = cli("verify", folder, "--against", work / "src", check=False)
    assert result.returncode == 1
    assert "key tokenizer.chat_template is STRING '{{ messages }}'; the source gives STRING" in result.stdout


JSON_EDITS = {
    "hf-config": ("hf", "config.json", '"rope_theta": 1000000.0', '"rope_theta": 2000000.0',
                  "key rope_theta is 2000000.0; the source gives 1000000.0"),
    "hf-chat-template": ("hf-instruct", "tokenizer_config.json", "[INST]", "[IST]", "key chat_template is "),
    "hf-tokenizer": ("hf", "tokenizer.json", '"fuse_unk": true', '"fuse_unk": false',
                     "key model.fuse_unk is False; the source gives True"),
    "torrent-params": ("torrent", "params.json", '"norm_eps": 1e-05', '"norm_eps": 1e-06',
                       "key norm_eps is 1e-06; the source gives 1e-05"),
}  # fmt: skip


@pytest.mark.parametrize("case", JSON_EDITS, ids=list(JSON_EDITS))
def test_a_changed_json_file_is_named_against_the_source(
    cli: CliRunner, work: Path, tmp_path: Path, case: str
) -> None:
    name, file, old, new, says = JSON_EDITS[case]
    folder = copy(work, name, tmp_path)
    text = (folder / file).read_text()
    assert old in text, (file, old)
    (folder / file).write_text(text.replace(old, new, 1))
    rewrite_sums_line(folder, file)
    assert cli("verify", folder, check=False).returncode == 0  # SHA256SUMS was made to match
    result = cli("verify", folder, "--against", work / "src", check=False)
    assert result.returncode == 1
    assert [line for line in failed_lines(result) if line.startswith(f"FAILED against: {folder / file}: {says}")], (
        result.stdout
    )


def test_a_replaced_tokenizer_model_differs_from_the_source(cli: CliRunner, work: Path, tmp_path: Path) -> None:
    folder = copy(work, "torrent", tmp_path)
    data = bytearray((folder / "tokenizer.model").read_bytes())
    data[len(data) // 2] ^= 1
    (folder / "tokenizer.model").write_bytes(bytes(data))
    rewrite_sums_line(folder, "tokenizer.model")
    result = cli("verify", folder, "--against", work / "src", check=False)
    assert result.returncode == 1
    assert f"FAILED against: {folder / 'tokenizer.model'}: differs from what the source gives at byte" in result.stdout
