"""Compiling a numba kernel without losing the run's signals: a first compile holds the GIL in LLVM calls for
up to seconds, so no signal handler of the process could run meanwhile, where a run must stop within a second.
It is done in a child process, which writes numba's cache and is killed if this one stops waiting for it (a
signal, an error); loading from the cache then takes tens of milliseconds. Used by the quantizers' prepare()
(convert/containers/gguf/kquants.py, convert/containers/mlx/quantize.py), on the planning thread, before the run's
threads start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # where `convert` is imported from


def writable(array: np.ndarray) -> np.ndarray:
    """array, or a copy of it where it is read-only (a view of a bytes buffer). numba compiles a kernel apart for
    read-only arrays, and prepare() compiles the writable kind: a read-only array reaching a kernel would compile
    it again, in a worker, holding the GIL for a second or more."""
    return array if array.flags.writeable else array.copy()


def in_cache(kernel: Any, args: tuple[Any, ...]) -> bool:
    """Whether kernel (a numba dispatcher) is compiled in this process or in numba's cache for calls with these
    example arguments. Through numba's dispatcher internals (_cache.load_overload, what a call does first): where
    they differ in another numba version, False, and the child compiles or loads it."""
    try:
        import numba

        types = tuple(numba.typeof(arg) for arg in args)
        return kernel.signatures != [] or kernel._cache.load_overload(types, kernel.targetctx) is not None
    except Exception:  # numba's internals moved: let the child find out
        return False


def compile_in_child(module: str, function: str, argument: str) -> None:
    """Run `from module import function; function(argument)` in a child process, which compiles into numba's
    cache, waiting in short steps (a signal handler of this process runs between them). The child is killed if
    the wait ends otherwise; its failure is not an error here (the caller then compiles in process)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", f"from {module} import {function}; {function}({argument!r})"]
    child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while True:
            try:
                child.wait(0.05)
                return
            except subprocess.TimeoutExpired:
                continue
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
