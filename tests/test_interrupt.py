"""An interrupted conversion stops cleanly and never leaves an output that looks complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from full_size import write_sparse_mistral
from helpers import REPO, run_cli, start_held

from convert.fileio.workers import Interrupted

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_run_stops_cleanly_and_resumes(tmp_path: Path, signum: int) -> None:
    src, dst = tmp_path / "src", tmp_path / "hf"
    write_sparse_mistral(src, 1)
    command = [sys.executable, "-m", "convert", "convert", src, dst, "--to", "hf", "--max-shard-size", "400MB"]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # Signalled once shard 1 is done and shard 2 under way, so that something is cut short (between two files,
    # e.g. while the journal is synced, there would be nothing partial to name). Shard 2 streams while shard 1 is
    # synced and renamed, so the one does not imply the other.
    while time.monotonic() < deadline and not (
        list(dst.glob("model-00001-of-*.safetensors")) and list(dst.glob("model-00002-of-*.safetensors.partial"))
    ):
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    # the stand-in tokenizer.model draws a warning; besides it, exactly the one line
    assert [line for line in stderr.splitlines() if not line.startswith("mixtral-convert: warning:")] == [
        "mixtral-convert: interrupted; the output is incomplete (no index or params written); continue with: "
        f"mixtral-convert convert {src} {dst} --to hf --max-shard-size 400MB --resume"
    ]
    assert not (dst / "model.safetensors.index.json").exists()
    assert not (dst / "config.json").exists()
    finished = sorted(p.name for p in dst.glob("model-*.safetensors"))
    assert finished and len(finished) < 8
    assert list(dst.glob("*.partial"))  # what was cut short is named as partial

    run_cli("convert", src, dst, "--to", "hf", "--max-shard-size", "400MB", "--resume")
    assert run_cli("verify", dst).stdout.splitlines()[-1].startswith("verified")
    assert not list(dst.glob("*.partial"))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads signal dispositions from /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_verify_says_verify_did_not_finish(tmp_path: Path, signum: int) -> None:
    """verify changes nothing: its interrupt line says so (it once spoke of an output without its index)."""
    src, hf = tmp_path / "src", tmp_path / "hf"
    run_cli("sample", src)
    run_cli("convert", src, hf, "--to", "hf")
    env = dict(os.environ, MIXTRAL_CONVERT_STALL_AT="model-00001-of-00001.safetensors")  # stalls verify's read
    command = [sys.executable, "-m", "convert", "verify", hf]
    process = start_held(command, env, REPO)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 130, stderr
    said = "mixtral-convert: interrupted; verify did not finish; it changes nothing, run it again"
    assert stderr.splitlines() == [said]


def _processes_using(marker: str) -> list[int]:
    """Live processes whose environment holds marker (their /proc/PID/environ)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the compiling child through /proc")
def test_a_signal_while_the_quantizer_compiles_stops_at_once(tmp_path: Path) -> None:
    """The first K-quant conversion on a machine compiles the quantizer (seconds of LLVM calls that hold the GIL,
    so no signal handler of the compiling process runs meanwhile). It compiles in a child process before the run
    starts (kquants.prepare): a signal then stops the run at once and the child is killed. With an empty numba
    cache (NUMBA_CACHE_DIR), signalled 1.5 s in, mid-compile: the one line and exit 130 within 0.5 s (compiling
    in a worker thread instead took 0.55-0.6 s here), and no process of the run left."""
    from dataclasses import replace

    from synthetic import DEFAULT, make_weights, write_torrent

    cfg = replace(DEFAULT, dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, head_dim=64)  # whole Q4_K blocks
    write_torrent(tmp_path / "src", cfg, make_weights(cfg, 3))
    cache = tmp_path / "numba-cache"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    command = [sys.executable, "-m", "convert", "convert", tmp_path / "src", tmp_path / "out", "--to", "gguf",
               "--outtype", "q4_k_m", "--no-progress"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert process.poll() is None, "finished before the signal: the compile was not cold"
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    took = time.monotonic() - sent
    lines = [line for line in stderr.splitlines() if not line.startswith("mixtral-convert: warning:")]
    assert process.returncode == 130 and lines == ["mixtral-convert: interrupted; nothing was written"], stderr
    assert took < 0.5, f"exit took {took:.2f} s after the signal"
    assert _processes_using(str(cache)) == [], "a compiling child outlived the run"


# The signal lands where Python cannot take an exception. "callback": in a weakref callback, as the import
# system's module-lock callback was running when CI caught it; Python printed "Exception ignored in ..." with a
# traceback and went on. "hook": in a Python unraisable hook the program had before the run, while it handles
# something else a __del__ raised; an exception there is printed and lost too. "printed": in a C extension that
# catches it and prints it with PyErr_Print (numba's _dispatcher does while it is imported, caught by hand on a
# SIGTERM early in a K-quant conversion), which calls sys.excepthook as the child does here. The child marks
# whether its main thread went on for 20 s afterwards.
_SIGNAL_WHERE_NOTHING_CAN_BE_RAISED = """
import signal, sys, time, weakref
from pathlib import Path
import convert.cli as cli

went_on, where, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
convert_for_real = cli.run_convert

def signalled():
    signal.raise_signal(signal.Signals[name])
    for _ in range(10_000):  # the handler runs at one of these steps
        pass

class Token:
    def __del__(self):
        if where == "hook":
            raise ValueError("something else")

def callback(_ref):
    signalled()

def hook(unraisable):
    if isinstance(unraisable.exc_value, ValueError):
        signalled()
    else:
        sys.__unraisablehook__(unraisable)

sys.unraisablehook = hook

def run_convert(args):
    if where == "printed":
        try:
            signalled()
        except BaseException as error:  # what PyErr_Print does with it
            sys.excepthook(type(error), error, error.__traceback__)
    token = Token()
    ref = weakref.ref(token, callback if where == "callback" else None)
    del token
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # Python that never looks at the run's stop, as a long plan would be
        pass
    went_on.write_text("the main thread went on after the signal")
    return convert_for_real(args)

cli.run_convert = run_convert
sys.argv[1:] = sys.argv[4:]
cli.entry()
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("where", ["callback", "hook", "printed"])
def test_a_signal_where_nothing_can_be_raised_still_stops_the_run_with_one_line(
    tmp_path: Path, where: str, name: str
) -> None:
    src, dst, went_on = tmp_path / "src", tmp_path / "hf", tmp_path / "went-on"
    run_cli("sample", src)
    command = [sys.executable, "-c", _SIGNAL_WHERE_NOTHING_CAN_BE_RAISED, went_on, where, name]
    finished = subprocess.run(
        [*command, "convert", src, dst, "--to", "hf"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 130, finished.stderr
    assert finished.stderr.splitlines() == ["mixtral-convert: interrupted; nothing was written"]
    assert not went_on.exists()  # stopped soon after, not at the run's first wait
    assert not dst.exists()


def test_the_run_passes_on_what_is_not_its_interrupt_and_puts_the_hooks_back() -> None:
    """The unraisable hook a run installs keeps only its own Interrupted: anything else Python could not raise still
    reaches the hook that was there before. Once the run is over, that hook and the signal handlers are back."""
    from convert.fileio.signals import SIGNALS, signals_stop_the_run
    from convert.fileio.workers import run_scope

    seen: list[BaseException | None] = []
    before = sys.unraisablehook
    handlers = [signal.getsignal(signum) for signum in SIGNALS]

    class Breaks:
        def __del__(self) -> None:
            raise ValueError("from a __del__")

    sys.unraisablehook = lambda unraisable: seen.append(unraisable.exc_value)
    mine, excepthook = sys.unraisablehook, sys.excepthook
    try:
        with run_scope(), signals_stop_the_run(signal.signal):
            assert [signal.getsignal(signum) for signum in SIGNALS] != handlers
            Breaks()
        assert sys.unraisablehook is mine and sys.excepthook is excepthook
        assert [signal.getsignal(signum) for signum in SIGNALS] == handlers
    finally:
        sys.unraisablehook = before
    assert [type(error) for error in seen] == [ValueError]


def test_once_the_run_has_threads_a_lost_interrupt_is_not_raised_later() -> None:
    """An interrupt lost where nothing can be raised, with the run's threads started before it was delivered
    again: the threads see the recorded stop, and a later signal, coming while the main thread unwinds after
    they ended, must not raise in it (it may be inside a `finally` giving something back)."""
    from convert.fileio import signals
    from convert.fileio.signals import signals_stop_the_run
    from convert.fileio.workers import Stopped, run_scope

    release = threading.Event()
    seen: dict[str, object] = {}  # asserted after the run: inside it, the run's first failure (the interrupt) wins
    with pytest.raises(Interrupted), run_scope() as stop, signals_stop_the_run(signal.signal):
        worker = stop.spawn(release.wait, "holds-the-run")
        signal.raise_signal(signal.SIGTERM)  # recorded: the run has a thread, so nothing is raised here
        signals._ask_again(signal.SIGTERM)  # as _on_unraisable does when the first raise was lost
        deadline = time.monotonic() + 10
        while signals._again and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["still asking"] = signals._again
        release.set()
        worker.join(10)
        seen["threads"] = stop.threads
        try:
            signal.raise_signal(signal.SIGTERM)  # the main thread unwinding, with no thread left
        except Interrupted:
            seen["raised again"] = True
        raise Stopped  # what the main thread's next wait would raise
    assert seen == {"still asking": False, "threads": 0}, seen
