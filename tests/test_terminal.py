"""What a person sees: the progress bar's units, the summary line a conversion ends with, and --quiet."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_cli

from convert.common.sizes import format_size
from convert.run.writer import progress_bar

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("terminal") / "sample"
    run_cli("sample", folder)
    return folder


def test_progress_bar_counts_and_rate_in_one_unit_family() -> None:
    """The issue's bar read `5.89G/5.89G ... 802MB/s` for a 6.33 GB source: binary counts beside a decimal rate,
    the B missing. Counts and rate are now decimal bytes, each with its B."""
    stream = io.StringIO()
    with contextlib.redirect_stderr(stream), progress_bar(6_330_000_000, True) as bar:
        bar.update(3_165_000_000)
        bar.refresh()
    text = stream.getvalue()
    assert re.search(r"\b3\.1[67]GB/6\.33GB\b", text), text
    assert re.search(r"\d[kMGT]?B/s\]", text), text
    assert "iB" not in text and not re.search(r"\d[kMG]/", text), text


def test_format_size_is_decimal() -> None:
    assert [format_size(n) for n in (999, 1000, 6_330_000_000, 93_405_585_408)] == [
        "999 B",
        "1.00 kB",
        "6.33 GB",
        "93.41 GB",
    ]


def test_conversion_ends_with_one_summary_line(sample: Path, tmp_path: Path) -> None:
    dst = tmp_path / "hf"
    result = run_cli("convert", sample, dst, "--to", "hf")
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and result.stderr == "", result
    size = sum(p.stat().st_size for p in dst.iterdir())
    count = len(list(dst.iterdir()))
    match = re.fullmatch(
        rf"wrote {count} files, [\d.]+ kB \({size:,} bytes\) to {re.escape(str(dst))} in [\d.]+ s \(.+B/s\); "
        rf"check them with `cd {re.escape(str(dst))} && sha256sum -c SHA256SUMS` or "
        rf"`mixtral-convert verify {re.escape(str(dst))}`",
        lines[0],
    )
    assert match, lines[0]
    if shutil.which("sha256sum"):  # the advice works as given
        checked = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=dst, capture_output=True, text=True)
        assert checked.returncode == 0 and checked.stdout.count(": OK") == count - 1, checked.stdout
    unchecked = run_cli("convert", sample, tmp_path / "plain", "--to", "hf", "--no-checksums")
    assert "no SHA256SUMS (--no-checksums)" in unchecked.stdout


def test_quiet_keeps_only_errors(sample: Path, tmp_path: Path) -> None:
    noisy = tmp_path / "noisy"
    shutil.copytree(sample, noisy)
    (noisy / "tokenizer.model").write_bytes(b"not a tokenizer")  # a warning: the output has no tokenizer.json
    loud = run_cli("convert", noisy, tmp_path / "a", "--to", "hf")
    assert "warning" in loud.stderr and loud.stdout.startswith("wrote ")
    quiet = run_cli("convert", noisy, tmp_path / "b", "--to", "hf", "--quiet")
    assert (quiet.stdout, quiet.stderr) == ("", "")
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    failed = run_cli("convert", noisy, tmp_path / "b", "--to", "hf", "--quiet", check=False)
    assert_one_line_error(failed, "--force")
