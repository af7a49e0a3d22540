"""--json always prints JSON on stdout: a failure before the command's own JSON (a folder that is not there, a
usage error argparse refuses, a flag combination the tool refuses) is one JSON object with ok false and the
error's line and exit status, beside the usual one line on stderr. Issue 23, finding 4: verify --json on a path
that does not exist printed a plain line and no JSON, and a usage error printed none either."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CliRunner

pytestmark = pytest.mark.e2e

MISSING = "/nonexistent/mixtral-convert-test"
CASES = {
    "verify-missing-folder": (["verify", MISSING, "--json"], "no such folder"),
    "verify-usage": (["verify", "--json"], "the following arguments are required: path"),
    "verify-unknown-flag": (["verify", MISSING, "--json", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    "verify-missing-pins": (["verify", ".", "--json", "--expect", "no-such-pins"], "no such pins file"),
    "inspect-missing-folder": (["inspect", MISSING, "--json"], "no such folder"),
    "dry-run-missing-folder": (["convert", MISSING, "out", "--to", "hf", "--dry-run", "--json"], "no such folder"),
    "json-without-dry-run": (["convert", MISSING, "out", "--to", "hf", "--json"], "--json goes with --dry-run"),
    "convert-usage": (["convert", "--json"], "the following arguments are required: src, dst, --to"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_failure_is_one_json_object(cli: CliRunner, case: str, tmp_path: Path) -> None:
    argv, says = CASES[case]
    result = cli(*argv, check=False)
    assert result.returncode == 2, result.stderr
    report = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert report["ok"] is False
    assert report["error"]["exit"] == 2 and says in report["error"]["line"], report
    assert "\n" not in report["error"]["line"]
    assert result.stderr.rstrip("\n").splitlines()[-1] == report["error"]["line"]
    if argv[0] == "verify":  # verify's object keeps the report's fields, empty
        assert report["results"] == [] and report["layout"] is None


def test_without_json_a_failure_prints_no_json(cli: CliRunner) -> None:
    result = cli("verify", MISSING, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"mixtral-convert: error: {MISSING}: no such folder"
