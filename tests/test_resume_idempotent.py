"""--resume is idempotent, so a retry loop may always pass it (as with `wget -c` or `rsync --partial`). Issue 23,
finding 5: into a folder that does not exist or is empty (what a Ctrl-C in the first fraction of a second leaves)
it failed with "nothing to resume"; now it is a plain run with the same bytes. Into a folder that already holds
the complete output of the same command it says so and exits 0, rewriting nothing. A complete output of another
command, or one whose files changed, is refused as before."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import CliRunner

pytestmark = pytest.mark.e2e


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, cli: CliRunner) -> Path:
    folder = tmp_path_factory.mktemp("idempotent") / "src"
    cli("sample", folder)
    return folder


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, cli: CliRunner, source: Path) -> dict[str, dict[str, str]]:
    """An uninterrupted run's files, for each target."""
    runs = {}
    for target in ("hf", "gguf", "torrent"):
        out = tmp_path_factory.mktemp("plain") / target
        cli("convert", source, out, "--to", target, "--no-progress")
        runs[target] = digests(out)
    return runs


@pytest.mark.parametrize("target", ["hf", "gguf", "torrent"])
@pytest.mark.parametrize("state", ["missing", "empty"])
def test_nothing_to_resume_is_a_plain_run(
    cli: CliRunner, source: Path, plain: dict[str, dict[str, str]], tmp_path: Path, target: str, state: str
) -> None:
    out = tmp_path / "out"
    if state == "empty":
        out.mkdir()
    result = cli("convert", source, out, "--to", target, "--resume", "--no-progress")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert digests(out) == plain[target]
    assert result.stdout.startswith("wrote ") and "interrupted run" not in result.stdout  # nothing was resumed


@pytest.mark.parametrize("target", ["hf", "gguf", "torrent"])
def test_a_complete_output_is_kept(cli: CliRunner, source: Path, tmp_path: Path, target: str) -> None:
    out = tmp_path / "out"
    cli("convert", source, out, "--to", target, "--no-progress")
    before, files = stamps(out), digests(out)
    result = cli("convert", source, out, "--to", target, "--resume", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"nothing to do: {out} already holds the complete output of this conversion")
    assert stamps(out) == before and digests(out) == files  # not a file rewritten, touched or added


def change_config(out: Path) -> None:
    path = out / "config.json"
    text = path.read_text()
    path.write_text(text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 2e-05'))  # same size, other model


def cut_a_shard(out: Path) -> None:
    shard = sorted(out.glob("model*.safetensors"))[0]
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 1)


OTHER = {
    "other-shard-size": ([], ["--max-shard-size", "300000"]),
    "other-instruct": ([], ["--instruct"]),
    "other-outtype": (["--to", "gguf"], ["--to", "gguf", "--outtype", "f32"]),
}


@pytest.mark.parametrize("case", OTHER, ids=list(OTHER))
def test_the_complete_output_of_another_command_is_refused(
    cli: CliRunner, source: Path, tmp_path: Path, case: str
) -> None:
    first, second = OTHER[case]
    out = tmp_path / "out"
    cli("convert", source, out, *(first or ["--to", "hf"]), "--no-progress")
    before = stamps(out)
    result = cli("convert", source, out, *(second if "--to" in second else ["--to", "hf", *second]), "--resume",
                 check=False)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == f"mixtral-convert: error: {out}: nothing to resume: it is already complete"
    assert stamps(out) == before


@pytest.mark.parametrize("damage", [change_config, cut_a_shard], ids=["config-edited", "shard-cut"])
def test_a_changed_output_is_refused(cli: CliRunner, source: Path, tmp_path: Path, damage: object) -> None:
    out = tmp_path / "out"
    cli("convert", source, out, "--to", "hf", "--max-shard-size", "300000", "--no-progress")
    damage(out)  # type: ignore[operator]
    result = cli("convert", source, out, "--to", "hf", "--max-shard-size", "300000", "--resume", check=False)
    assert result.returncode == 2
    assert "nothing to resume: it is already complete" in result.stderr
