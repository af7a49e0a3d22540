"""Running the real command line in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: object, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`python -m convert ARGS` from the repo root, offline; with check, a failure shows the command and stderr."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "convert", *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command[1:])} exited {result.returncode}\nstderr:\n{result.stderr[-4000:]}\n"
            f"stdout:\n{result.stdout[-2000:]}"
        )
    return result


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """A failure is a non-zero exit and exactly one line on stderr, with no traceback, naming what failed."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("mixtral-convert: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]
