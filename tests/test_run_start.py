"""What a run does before its weights stream, so that nothing else takes the machine once they do.

Nothing is imported while the weights stream: importing a C extension holds the GIL while the kernel reads its
file in, and during a stream those reads queue behind large direct requests, so a module a thread of the run loads
then stops every thread of the run (BLAKE3, once loaded by the tensor hasher at the first chunk,
bench/profiles.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from synthetic import DEFAULT, make_weights, write_torrent

pytestmark = pytest.mark.e2e

# Runs one conversion in a fresh interpreter and prints, as JSON, the modules loaded between the opening of the
# first weights file and the opening of the first file after the weights (sys.audit's "import" event is raised
# only when a module is loaded, not for an import of one already loaded).
_WATCH = r"""
import json, os, sys

WEIGHTS = (".safetensors.partial", ".gguf.partial", ".pth.partial")
state = {"streaming": None, "late": []}

def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and args[2] & os.O_WRONLY:
        name = os.fsdecode(args[0])
        if name.endswith(".partial") and state["streaming"] is not False:
            state["streaming"] = name.endswith(WEIGHTS)
    elif event == "import" and state["streaming"]:
        state["late"].append(args[0])

sys.addaudithook(hook)
from convert.cli import main

code = main(["convert", sys.argv[1], sys.argv[2], "--to", sys.argv[3], "--no-progress", *sys.argv[4:]])
print(json.dumps({"code": code, "streamed": state["streaming"] is False, "late": state["late"]}))
"""


@pytest.fixture(scope="module")
def torrent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("torrent")
    write_torrent(folder, DEFAULT, make_weights(DEFAULT, seed=7))
    return folder


@pytest.mark.parametrize(
    ("target", "extra"),
    [("hf", []), ("mlx", []), ("mlx", ["--outtype", "q4"]), ("gguf", []), ("torrent", [])],
    ids=["hf", "mlx", "mlx-q4", "gguf", "torrent"],
)
def test_no_module_is_loaded_while_the_weights_stream(
    torrent: Path, tmp_path: Path, target: str, extra: list[str]
) -> None:
    command = [sys.executable, "-c", _WATCH, str(torrent), str(tmp_path / "out"), target, *extra]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["code"] == 0
    assert seen["streamed"], "the watch never saw the weights file end: it checked nothing"
    assert seen["late"] == [], f"loaded while the weights streamed: {seen['late']}"
