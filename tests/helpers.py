"""Running the real command line in a subprocess, as a user would."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

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


# The converter is started by this small launcher rather than by pytest itself: Linux counts into a process's
# peak RSS (wait4's ru_maxrss) the memory of the process it was forked from, as it stood at the fork, and pytest
# grows to hundreds of MiB over a run. The launcher (python -S, about 10 MiB) spawns the converter, waits for it,
# kills it at the time limit, and hands back its peak RSS and exit status.
_LAUNCHER = r"""
import os, resource, signal, sys, time
report, timeout, address_space, command = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
if address_space:  # a runaway allocation fails in the child, not on the shared machine
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
pid = os.posix_spawn(command[0], command, os.environ)
deadline = time.monotonic() + timeout
while True:
    done, status, usage = os.wait4(pid, os.WNOHANG)
    if done:
        code = os.waitstatus_to_exitcode(status)
        break
    if time.monotonic() > deadline:
        os.kill(pid, signal.SIGKILL)
        _, status, usage = os.wait4(pid, 0)
        code = None
        break
    time.sleep(0.01)
with open(report, "w") as handle:
    handle.write(f"{usage.ru_maxrss} {code}")
"""


@dataclass(frozen=True)
class Measured:
    result: subprocess.CompletedProcess[str]  # returncode None: killed at the time limit
    peak_mib: int  # the converter's own peak RSS (plus the launcher's few MiB it was spawned from)
    seconds: float


def run_measured(*args: object, timeout: float = 600, address_space: int = 0) -> Measured:
    """`python -m convert ARGS` from the repo root, offline, with its peak RSS from the OS's accounting."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "convert", *map(str, args)]
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report"
        launcher = [sys.executable, "-S", "-c", _LAUNCHER, report, timeout, address_space, *command]
        start = time.monotonic()
        with open(os.devnull, "rb") as stdin:
            done = subprocess.run(
                list(map(str, launcher)), cwd=REPO, env=env, stdin=stdin, capture_output=True, text=True
            )
        seconds = time.monotonic() - start
        if done.returncode != 0 or not report.is_file():
            raise AssertionError(f"the launcher failed: {done.stderr[-2000:]}")
        rss_kib, code = report.read_text().split()
    returncode = None if code == "None" else int(code)
    result = subprocess.CompletedProcess(command, returncode, done.stdout, done.stderr)  # type: ignore[arg-type]
    return Measured(result, int(rss_kib) // 1024, seconds)


def handles_sigterm(pid: int) -> bool:
    """Whether the process has installed its own SIGTERM handler yet (before that, the interpreter is still
    starting, and no program can answer a signal with its own line)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def start_held(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """Start command (run with a MIXTRAL_CONVERT_STALL_AT in env) and return once it is held at its stall: its
    SIGTERM handler is installed, so the imports are done, and it is still running 3 s later."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not handles_sigterm(process.pid) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    time.sleep(3)  # past the imports, into the run: held at the stall
    assert process.poll() is None, process.communicate()
    return process


def flip_byte(path: Path, offset: int) -> None:
    """Change one bit of the byte at offset, in place."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def differing_files(got: Path, want: Path) -> list[str]:
    """What differs between two folders: the file lists, else the names of files whose bytes differ."""
    names = sorted(p.name for p in want.iterdir())
    if sorted(p.name for p in got.iterdir()) != names:
        return [f"files differ: {sorted(p.name for p in got.iterdir())} vs {names}"]
    return [name for name in names if (got / name).read_bytes() != (want / name).read_bytes()]


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """A failure is a non-zero exit and exactly one line on stderr, with no traceback, naming what failed."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("mixtral-convert: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _have_root_mounts() -> str | None:
    """None if this process may mount a tmpfs, else why not."""
    if sys.platform != "linux":
        return "tmpfs mounts need Linux"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (or CAP_SYS_ADMIN)"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount/umount binaries"
    return None


@contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at folder for the duration; skips the test when the machine allows none."""
    reason = _have_root_mounts()
    if reason:
        pytest.skip(reason)
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def evict(path: Path) -> None:
    """Drop path's pages from the page cache, so the converter reads it with O_DIRECT (a file it finds in the
    cache, such as one a test has just written, is read through the cache instead: convert/fileio/residency.py)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # only clean pages are dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
