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
REPO = TESTS_DIR.parent

# synthetic.py and reference.py are plain modules next to the tests, importable whatever pytest's import mode.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
# The convert package of this checkout, as `python -m convert` run from it imports (run_process): the CLI run
# in-process (run_cli) and the tests' own imports are then the same code, whichever checkout is installed.
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from helpers import run_cli  # noqa: E402  (needs the path above)

CliRunner = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def cli() -> CliRunner:
    """The converter's command line as a callable, run in this process (helpers.run_cli):
    cli("convert", src, dst, "--to", "hf", ...)."""
    return run_cli


# pyproject.toml's markers; each test module sets one (pytestmark). The stress loop is a tier of its own, so that
# `-m e2e` does not run it: `make test` leaves it out and CI runs it on its own.
TIERS = ("unit", "containers", "e2e", "clients", "stress")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test is in exactly one tier, so that the tiers together are the whole suite."""
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid}: in tiers {tiers}; a test module sets exactly one of {TIERS}")
