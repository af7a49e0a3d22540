"""Bounded memory on REAL Mixtral dimensions, without the disk cost: the source is a consolidated.safetensors
whose data region is a sparse hole (made with truncate), so reading costs nothing and only the output is real.

Peak resident memory is max RSS from the OS's accounting of the finished converter process (wait4).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from full_size import write_sparse_mistral
from helpers import run_measured

from convert.fileio.streams import ByteStream

pytestmark = pytest.mark.e2e

GIB = 2**30


def convert_measuring_rss(src: Path, dst: Path, target: str) -> int:
    measured = run_measured("convert", src, dst, "--to", target, "--no-progress")
    assert measured.result.returncode == 0, measured.result.stderr
    return measured.peak_mib * 2**20


def test_full_size_file_reads_at_the_end_without_mapping(tmp_path: Path) -> None:
    """A 93 GB single file: the kernel would refuse a private mapping; positional reads work anywhere in it."""
    size = write_sparse_mistral(tmp_path / "full", 32)
    assert size > 93 * 10**9
    stream = ByteStream([tmp_path / "full" / "consolidated.safetensors"])
    try:
        assert stream.read(4096, size - 4096) == bytes(4096)
    finally:
        stream.close()


@pytest.mark.skipif(
    os.statvfs("/tmp").f_bavail * os.statvfs("/tmp").f_frsize < 14 * 10**9,
    reason="needs 14 GB free for the real-dimension outputs",
)
def test_peak_rss_is_bounded_and_flat_in_depth(tmp_path: Path) -> None:
    """mistral -> hf and hf -> torrent (the writer that replaces torch.save) on 1 and 2 real layers."""
    peaks: dict[tuple[str, int], int] = {}
    for layers in (1, 2):
        src, hf, torrent = tmp_path / f"src{layers}", tmp_path / f"hf{layers}", tmp_path / f"torrent{layers}"
        write_sparse_mistral(src, layers)
        peaks["hf", layers] = convert_measuring_rss(src, hf, "hf")
        assert sum(p.stat().st_size for p in hf.glob("model-*.safetensors")) > layers * 2.8 * 10**9
        peaks["torrent", layers] = convert_measuring_rss(hf, torrent, "torrent")
        assert (torrent / "consolidated.00.pth").stat().st_size > layers * 2.8 * 10**9
        shutil.rmtree(hf)  # one real-dimension output on disk at a time
        shutil.rmtree(torrent)
    for target in ("hf", "torrent"):
        assert peaks[target, 1] < GIB and peaks[target, 2] < GIB, peaks
        assert peaks[target, 2] <= peaks[target, 1] * 1.10, peaks


def test_verify_against_peak_rss_is_bounded_and_flat_in_depth(tmp_path: Path) -> None:
    """verify --against on 1 and 2 real layers (3.4 and 6.3 GB a side, both sparse: reading holes costs no disk):
    the pooled reader's buffers and one piece at a time, far below the tensors' size, whatever the depth."""
    peaks = {}
    for layers in (1, 2):
        folder, source = tmp_path / f"folder{layers}", tmp_path / f"source{layers}"
        write_sparse_mistral(folder, layers)
        write_sparse_mistral(source, layers)
        measured = run_measured("verify", folder, "--against", source)
        assert measured.result.returncode == 0, measured.result.stdout + measured.result.stderr
        assert measured.result.stdout.strip().splitlines()[-1].startswith(f"verified: {folder} (mistral)")
        peaks[layers] = measured.peak_mib
    assert peaks[1] <= 512 and peaks[2] <= 512, peaks
    assert peaks[2] <= peaks[1] * 1.10, peaks


@pytest.mark.skipif(
    os.statvfs("/tmp").f_bavail * os.statvfs("/tmp").f_frsize < 8 * 10**9,
    reason="needs 8 GB free for the real-dimension outputs",
)
def test_gguf_q8_0_peak_rss_is_bounded_and_flat_in_depth(tmp_path: Path) -> None:
    """torrent-like source -> GGUF q8_0, the path that converts every element while streaming, on 1 and 2 real
    layers: the casts go slice by slice, never a whole expert in float32."""
    peaks = {}
    for layers in (1, 2):
        src, out = tmp_path / f"src{layers}", tmp_path / f"gguf{layers}"
        write_sparse_mistral(src, layers)
        measured = run_measured("convert", src, out, "--to", "gguf", "--outtype", "q8_0", "--no-progress")
        assert measured.result.returncode == 0, measured.result.stderr
        peaks[layers] = measured.peak_mib
        assert (out / "model.gguf").stat().st_size > layers * 1.5 * 10**9
        shutil.rmtree(out)
    assert peaks[1] < 512 and peaks[2] < 512, peaks
    assert peaks[2] <= peaks[1] * 1.10, peaks
