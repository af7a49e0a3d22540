"""verify and the integrity files, checked with the real tools (sha256sum, md5sum) where they exist."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest
from helpers import assert_one_line_error, flip_byte, run_cli

pytestmark = pytest.mark.e2e

LAYOUTS = ("hf", "torrent", "mistral", "megablocks")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    run_cli("sample", root / "src")
    (root / "src" / "tokenizer.model").write_bytes(b"tokenizer \x00 bytes")
    for layout in LAYOUTS:
        run_cli("convert", root / "src", root / layout, "--to", layout, "--max-shard-size", "300KB")
    return root


def _copy(outputs: Path, layout: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(outputs / layout, tmp_path / layout))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sha256sums_pass_the_real_tool(outputs: Path, layout: str) -> None:
    result = subprocess.run(
        ["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=outputs / layout, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    listed = {line.split("  ", 1)[1] for line in (outputs / layout / "SHA256SUMS").read_text().splitlines()}
    assert listed == {p.name for p in (outputs / layout).iterdir()} - {"SHA256SUMS"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_faithful_output_verifies_against_its_source(outputs: Path, layout: str) -> None:
    result = run_cli("verify", outputs / layout, "--against", outputs / "src")
    assert result.stdout.strip().splitlines()[-1].startswith(f"verified: {outputs / layout} ({layout})")


def test_manifest_hashes_are_the_tensors_bytes(outputs: Path) -> None:
    manifest = json.loads((outputs / "hf" / "manifest.json").read_text())
    assert manifest["source"]["layout"] == "torrent" and manifest["target"] == "hf"
    for entry in manifest["tensors"]:
        data = (outputs / "hf" / entry["file"]).read_bytes()[entry["offsets"][0] : entry["offsets"][1]]
        assert blake3.blake3(data).hexdigest() == entry["blake3"], entry["name"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_flipped_byte_is_named(outputs: Path, layout: str, tmp_path: Path) -> None:
    folder = _copy(outputs, layout, tmp_path)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".pt", ".pth"))
    weights = max(files, key=lambda p: p.stat().st_size)  # one holding tensors (megablocks pads with empty files)
    flip_byte(weights, weights.stat().st_size // 2)
    result = run_cli("verify", folder, "--against", outputs / "src", check=False)
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert f"FAILED sha256: {weights}: sha256 is " in result.stdout
    assert any(line.startswith(f"FAILED against: {weights}: tensor ") for line in failed), result.stdout


def test_missing_shard_and_bad_total_size(outputs: Path, tmp_path: Path) -> None:
    folder = _copy(outputs, "hf", tmp_path)
    (folder / "model-00002-of-00003.safetensors").unlink()
    result = run_cli("verify", folder, check=False)
    assert "FAILED sha256: " in result.stdout and "listed in SHA256SUMS but missing" in result.stdout
    assert "index names shard 'model-00002-of-00003.safetensors', which is missing" in result.stdout

    folder = _copy(outputs, "hf", tmp_path / "again")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] += 2
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    result = run_cli("verify", folder, check=False)
    assert "metadata.total_size" in result.stdout and result.returncode == 1


def test_unlisted_shard_fails(outputs: Path, tmp_path: Path) -> None:
    folder = _copy(outputs, "hf", tmp_path)
    shutil.copy(folder / "model-00001-of-00003.safetensors", folder / "model-00004-of-00003.safetensors")
    result = run_cli("verify", folder, "--json", check=False)
    report = json.loads(result.stdout)
    assert not report["ok"]
    problems = {(r["check"], Path(r["file"]).name, r["problem"]) for r in report["results"] if not r["ok"]}
    assert ("sha256", "model-00004-of-00003.safetensors", "not covered by SHA256SUMS") in problems


def test_folder_without_checksums_gets_structure_and_crc_checks(outputs: Path, tmp_path: Path) -> None:
    folder = _copy(outputs, "torrent", tmp_path)
    (folder / "SHA256SUMS").unlink()
    clean = run_cli("verify", folder)
    assert "note: no SHA256SUMS: no checksums were available" in clean.stdout
    checkpoint = folder / "consolidated.00.pth"
    flip_byte(checkpoint, checkpoint.stat().st_size // 2)
    result = run_cli("verify", folder, check=False)
    failed = [line for line in result.stdout.splitlines() if line.startswith(f"FAILED crc32: {checkpoint}: tensor ")]
    assert len(failed) == 1 and "record consolidated.00/data/" in failed[0], result.stdout  # names tensor and record


@pytest.mark.skipif(shutil.which("md5sum") is None, reason="md5sum is not installed")
def test_pins_made_by_md5sum_and_sha256sum(outputs: Path, tmp_path: Path) -> None:
    src = outputs / "src"
    md5 = subprocess.run(
        ["md5sum", "consolidated.00.pth", "tokenizer.model"], cwd=src, capture_output=True, text=True, check=True
    ).stdout
    (tmp_path / "good.md5").write_text(md5)
    run_cli("verify", src, "--expect", tmp_path / "good.md5")
    (tmp_path / "bad.md5").write_text(md5.replace(md5[:4], "ffff", 1))
    result = run_cli("verify", src, "--expect", tmp_path / "bad.md5", check=False)
    assert f"FAILED pin bad.md5: {src / 'consolidated.00.pth'}: md5 is {md5[:32]}, the pin says ffff" in result.stdout

    sha = subprocess.run(["sha256sum", "params.json"], cwd=src, capture_output=True, text=True, check=True).stdout
    (tmp_path / "good.sha256").write_text(sha)
    run_cli("verify", src, "--expect", tmp_path / "good.sha256")


def test_convert_checks_pins_before_writing(outputs: Path, tmp_path: Path) -> None:
    result = run_cli(
        "convert",
        outputs / "src",
        tmp_path / "out",
        "--to",
        "hf",
        "--expect",
        "mixtral-8x7b-v0.1-torrent.md5",
        check=False,
    )
    assert_one_line_error(result, str(outputs / "src" / "consolidated.00.pth"), "the pin says 1faa9bc9")
    assert not (tmp_path / "out").exists()
    assert_one_line_error(
        run_cli("verify", outputs / "src", "--expect", "no-such-pins", check=False),
        "no such pins file",
        "mixtral-8x7b-v0.1-hf.sha256",
    )


def test_hash_input_records_what_sha256sum_says(outputs: Path, tmp_path: Path) -> None:
    src = outputs / "src"
    run_cli("convert", src, tmp_path / "hf", "--to", "hf", "--hash-input")
    inputs = json.loads((tmp_path / "hf" / "manifest.json").read_text())["inputs"]
    names = [entry["name"] for entry in inputs]
    assert names == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    listing = subprocess.run(["sha256sum", *names], cwd=src, capture_output=True, text=True, check=True).stdout
    assert [f"{e['sha256']}  {e['name']}" for e in inputs] == listing.splitlines()
    assert [e["size"] for e in inputs] == [(src / n).stat().st_size for n in names]
    run_cli("verify", tmp_path / "hf", "--against", src)


def _rewrite_manifest(folder: Path, change: Callable[[dict], None]) -> None:
    """Rewrite manifest.json and its SHA256SUMS line, as an older version (or a forger) would have written it."""
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    digest = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    rewritten = [f"{digest}  manifest.json" if line.endswith("  manifest.json") else line for line in lines]
    (folder / "SHA256SUMS").write_text("".join(line + "\n" for line in rewritten))


def _as_sha256_manifest(folder: Path, manifest: dict) -> None:
    """What versions before BLAKE3 wrote: no tensor_digest field, a "sha256" per tensor."""
    assert manifest.pop("tensor_digest") == "blake3"
    for entry in manifest["tensors"]:
        data = (folder / entry["file"]).read_bytes()[entry["offsets"][0] : entry["offsets"][1]]
        del entry["blake3"]
        entry["sha256"] = hashlib.sha256(data).hexdigest()


def test_an_older_sha256_manifest_still_verifies(outputs: Path, tmp_path: Path) -> None:
    folder = _copy(outputs, "hf", tmp_path)
    _rewrite_manifest(folder, lambda m: _as_sha256_manifest(folder, m))
    run_cli("verify", folder, "--against", outputs / "src")
    # and it is really checked: a tensor's bytes changed under a rewritten SHA256SUMS line are named
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = max(manifest["tensors"], key=lambda e: e["offsets"][1] - e["offsets"][0])
    shard = folder / entry["file"]
    flip_byte(shard, (entry["offsets"][0] + entry["offsets"][1]) // 2)
    _rewrite_manifest(folder, lambda m: None)
    sums = (folder / "SHA256SUMS").read_text().splitlines()
    digest = hashlib.sha256(shard.read_bytes()).hexdigest()
    (folder / "SHA256SUMS").write_text(
        "".join((f"{digest}  {shard.name}" if line.endswith(f"  {shard.name}") else line) + "\n" for line in sums)
    )
    result = run_cli("verify", folder, check=False)
    assert f"FAILED manifest: {shard}: tensor {entry['name']}: sha256 of bytes [" in result.stdout, result.stdout


def test_a_manifest_naming_an_unknown_digest_is_refused(outputs: Path, tmp_path: Path) -> None:
    folder = _copy(outputs, "hf", tmp_path)
    _rewrite_manifest(folder, lambda m: m.update(tensor_digest="md4"))
    result = run_cli("verify", folder, check=False)
    assert result.returncode == 1
    expected = f"FAILED manifest: {folder / 'manifest.json'}: tensor_digest 'md4' is not one this version can check"
    assert expected in result.stdout, result.stdout
