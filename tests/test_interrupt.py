"""An interrupted conversion stops cleanly and never leaves an output that looks complete."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO
from test_memory import write_sparse_mistral


def test_ctrl_c_mid_run_leaves_no_index(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "hf"
    write_sparse_mistral(src, 1)
    command = [sys.executable, "-m", "convert", "convert", src, dst, "--to", "hf", "--max-shard-size", "400MB"]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(dst.glob("model-00001-of-*.safetensors")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == [
        "mixtral-convert: interrupted; the output is incomplete (its index was not written)"
    ]
    assert not (dst / "model.safetensors.index.json").exists()
    assert not (dst / "config.json").exists()
    finished = sorted(p.name for p in dst.glob("model-*.safetensors"))
    assert finished and len(finished) < 8
