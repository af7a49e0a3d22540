"""Early writeback is only a head start for the disk; on Linux it must actually be wired up, or runs get slower
without any test noticing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from convert.fileio import writeback

pytestmark = pytest.mark.unit


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is a Linux call")
def test_linux_has_the_call() -> None:
    assert writeback._START is not None


def test_queued_stretches_leave_the_bytes_alone(tmp_path: Path) -> None:
    path = tmp_path / "out"
    payload = os.urandom(3 * writeback.STRETCH + 12345)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        tracker = writeback.EarlyWriteback(fd)
        for start in range(0, len(payload), 2**20):
            end = start + os.pwrite(fd, payload[start : start + 2**20], start)
            tracker.written_up_to(end)
    finally:
        os.close(fd)
    assert path.read_bytes() == payload
