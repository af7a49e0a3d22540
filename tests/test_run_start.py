"""What a run does before its weights stream, so that nothing else takes the machine once they do.

Nothing is imported while the weights stream: importing a C extension holds the GIL while the kernel reads its
file in, and during a stream those reads queue behind large direct requests, so a module a thread of the run loads
then stops every thread of the run (BLAKE3, once loaded by the tensor hasher at the first chunk,
bench/profiles.md). And numpy's OpenBLAS, which the converter never calls, starts no threads of its own under the
command."""

from __future__ import annotations

import json
import os
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
state = {"phase": "before", "late": []}  # before -> weights (a weights file opened) -> after (another file opened)

def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and args[2] & os.O_WRONLY:
        name = os.fsdecode(args[0])
        if name.endswith(".partial"):
            weights = name.endswith(WEIGHTS)
            if state["phase"] == "before" and weights:
                state["phase"] = "weights"
            elif state["phase"] == "weights" and not weights:
                state["phase"] = "after"
    elif event == "import" and state["phase"] == "weights":
        state["late"].append(args[0])

sys.addaudithook(hook)
from convert.cli import main

code = main(["convert", sys.argv[1], sys.argv[2], "--to", sys.argv[3], "--no-progress", *sys.argv[4:]])
print(json.dumps({"code": code, "streamed": state["phase"] == "after", "late": state["late"]}))
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


_THREADS_AFTER_NUMPY = r"""
import os, sys
if sys.argv[1] == "command":
    import convert.__main__ as command
    sys.argv = ["mixtral-convert", "--version"]
    try:
        command.main()
    except SystemExit:
        pass
import numpy
print(len(os.listdir("/proc/self/task")))
"""


def _threads_after_numpy(how: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    command = [sys.executable, "-c", _THREADS_AFTER_NUMPY, how]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True)
    return int(result.stdout.splitlines()[-1])


def test_numpy_starts_no_blas_threads_under_the_command() -> None:
    if _threads_after_numpy("plain") == 1:
        pytest.skip("numpy starts no BLAS thread here even unasked (one core, or a limit set elsewhere): no premise")
    assert _threads_after_numpy("command") == 1
