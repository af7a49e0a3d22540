"""Running the real command line: in this process (run_cli, the default) or in a process of its own
(run_process, where the process is the point: signals, exit paths, environment read at import, peak RSS)."""

from __future__ import annotations

import contextlib
import io
import locale
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Read by convert/faults.py: the plan at import (so never in this process), the stall and its log at each call.
# A test that needs them runs the command with run_process and an env of its own.
_PROCESS_ONLY_ENV = ("MIXTRAL_CONVERT_FAULT", "MIXTRAL_CONVERT_FAULT_LOG", "MIXTRAL_CONVERT_STALL_AT")

# The warning filters of a fresh interpreter with no -W options (pytest's own are wider): what the CLI run as a
# command shows on stderr, its in-process run shows there too, and nothing more.
_DEFAULT_WARNING_FILTERS = (
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
)
# How long threads a run started may take to end after main() returned (a failed run gives its threads
# workers.UNWIND, 0.25 s, and a wait sees the stop within POLL): past this, the run left a thread behind.
_THREAD_GRACE = 5.0


def _failed(command: list[str], result: subprocess.CompletedProcess[str]) -> AssertionError:
    return AssertionError(
        f"{' '.join(command)} exited {result.returncode}\nstderr:\n{result.stderr[-4000:]}\n"
        f"stdout:\n{result.stdout[-2000:]}"
    )


def run_process(*args: object, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`python -m convert ARGS` in a process of its own, from the repo root, offline; with check, a failure
    shows the command and stderr. For what only a process shows; everything else uses run_cli."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "convert", *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise _failed(command[1:], result)
    return result


def _stream(like: io.TextIOBase | None) -> io.TextIOWrapper:
    """A stand-in for the command's stdout or stderr: the encoding and error handler a child process gets
    (those of this process's own streams, set by the same environment), over bytes."""
    encoding = getattr(like, "encoding", None) or "utf-8"
    errors = getattr(like, "errors", None) or "strict"
    return io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors=errors)


def _as_read_by_a_parent(stream: io.TextIOWrapper) -> str:
    """What subprocess.run(text=True) would have read from the pipe: the locale's decoding, universal newlines."""
    stream.flush()
    data = stream.buffer.getvalue()  # type: ignore[attr-defined]
    text = data.decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """warnings.showwarning as a fresh interpreter has it, onto the stderr in place now."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _exit_status(exc: SystemExit) -> int:
    """The status the interpreter exits with for an uncaught SystemExit (its message, if any, goes to stderr)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started since `before` and still running, but for tqdm's monitor: tqdm starts that one daemon at
    its first bar (a disabled one too) and keeps it for the process's life, one for all bars; the command's
    process would end with it, this one reuses it."""
    from tqdm import tqdm

    return [t for t in set(threading.enumerate()) - before if t.is_alive() and t is not tqdm.monitor]


@contextmanager
def _signals_seen() -> Iterator[set[int]]:
    """The signals this process receives meanwhile, whoever handles them (the wakeup fd sees them all)."""
    seen: set[int] = set()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    try:
        yield seen
    finally:
        signal.set_wakeup_fd(previous)
        with contextlib.suppress(BlockingIOError):
            seen.update(os.read(read, 4096))
        os.close(read)
        os.close(write)


def run_cli(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The command line in THIS process: convert.cli.main(ARGS), from the repo root, with stdout, stderr (the
    log handler main() installs included) and warnings captured as a child process would print them, and the
    exit status it would have: main()'s return value; SystemExit's status (argparse's usage errors, --help,
    --version); 1 and the traceback for an exception main() lets through (--debug). Returns what run_process
    returns; with check, a non-zero exit is an AssertionError showing stderr.

    Not the console script's entry() (it installs signal handlers for the process's life and exits with
    os._exit). Afterwards the run must have left this process as it found it: no thread of its own still
    running, no run scope open, the tool's logger and the signal handlers as they were."""
    from convert import cli
    from convert.fileio import workers

    assert Path(cli.__file__).resolve().is_relative_to(REPO), f"{cli.__file__} is not this checkout's (run_process's)"
    set_here = [name for name in _PROCESS_ONLY_ENV if name in os.environ]
    assert not set_here, f"{set_here} are read at import or by a command's process: use run_process"
    argv = [str(arg) for arg in args]
    logger = logging.getLogger("mixtral-convert")
    handlers, filters, level = list(logger.handlers), list(logger.filters), logger.level
    dispositions = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    threads = set(threading.enumerate())
    stdout, stderr = _stream(sys.__stdout__), _stream(sys.__stderr__)
    with (
        _signals_seen() as seen,
        contextlib.chdir(REPO),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
        warnings.catch_warnings(),
    ):
        warnings.resetwarnings()
        for action, category, module in reversed(_DEFAULT_WARNING_FILTERS):
            warnings.filterwarnings(action, category=category, module=module)
        warnings.showwarning = _show_warning
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = _exit_status(exc)
        except BaseException:  # what the interpreter does with an uncaught exception: the traceback, status 1
            traceback.print_exc()
            code = 1
    result = subprocess.CompletedProcess(
        ["mixtral-convert", *argv], code, _as_read_by_a_parent(stdout), _as_read_by_a_parent(stderr)
    )
    deadline = time.monotonic() + _THREAD_GRACE
    for thread in _new_threads(threads):
        thread.join(max(0.0, deadline - time.monotonic()))
    left = sorted(t.name for t in _new_threads(threads))
    assert not left, f"mixtral-convert {' '.join(argv)} left threads running: {left}\nstderr:\n{result.stderr}"
    assert not workers.in_run(), f"mixtral-convert {' '.join(argv)} left its run scope open"
    changed = (logger.handlers, logger.filters, logger.level) != (handlers, filters, level)
    logger.setLevel(level)  # so that one leak fails one test, not every test after it
    assert not changed, f"{argv} changed the tool's logger (handlers, filters or level)"
    now = {signum: signal.getsignal(signum) for signum in dispositions}
    assert now == dispositions, f"mixtral-convert {' '.join(argv)} changed the signal handlers: {now}"
    if signal.SIGINT in seen:  # the command took the Ctrl-C meant for pytest (and exited 130): pass it on
        raise KeyboardInterrupt
    if check and code != 0:
        raise _failed(result.args, result)
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
