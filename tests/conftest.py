"""Shared test setup: offline Hugging Face libraries and a runner for the converter's command line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Nothing may be downloaded: transformers must resolve everything from the converted folder.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

# synthetic.py and reference.py are plain modules next to the tests, importable whatever pytest's import mode.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

CliRunner = Callable[..., subprocess.CompletedProcess]


def run_cli(*args: str | os.PathLike, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m convert ARGS` from the repo root (the converter is only ever exercised through its CLI)."""
    cmd = [sys.executable, "-m", "convert", *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(
            f"converter failed (exit {proc.returncode}): {' '.join(cmd[1:])}\n"
            f"stderr:\n{proc.stderr[-4000:]}\nstdout:\n{proc.stdout[-2000:]}",
            pytrace=False,
        )
    return proc


@pytest.fixture(scope="session")
def cli() -> CliRunner:
    """The converter's command line as a callable: cli("convert", src, dst, "--to", "hf", ...)."""
    return run_cli
