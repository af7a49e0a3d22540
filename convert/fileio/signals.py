"""How SIGINT and SIGTERM stop a run: like any failure (workers.RunStop), within POLL, saying one line.

While the run has threads, the handler only records the signal: every thread (the main one included) sees it at
its next wait. Raising in the handler then could leave a lock held that another thread waits for. With no thread
running (planning, compiling a quantizer), nothing would look at the stop for a while, so the handler raises
Interrupted in the main thread at once.

Python runs a handler at whatever step the main thread is at, and some steps cannot take an exception: a weakref
callback (the import system's module locks have one), a __del__, a garbage collector callback. Python hands the
exception to sys.unraisablehook, which prints "Exception ignored in ..." and a traceback, and the main thread goes
on. A C extension may also catch it and print it with PyErr_Print, which calls sys.excepthook (numba's
_dispatcher does, while it is being imported). The hooks installed here say nothing for an Interrupted and have
the signal delivered again, every POLL/10, until the handler raises at a step that can take it (never inside
either hook, or a Python hook it passes something else to). The signal is already recorded in the run's stop,
so only the line and the delay were ever at risk, never the outcome.
"""

from __future__ import annotations

import _thread
import functools
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import TYPE_CHECKING

from convert.fileio.workers import POLL, Interrupted, in_run, run_stop

if TYPE_CHECKING:
    from _typeshed import UnraisableHookArgs  # sys.UnraisableHookArgs, which exists only as a type

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_again = False  # an Interrupted was lost, or could not be raised: raise it at the next signal outside the hooks
_again_lock = threading.Lock()  # between the thread that delivers it again and the end of the run


@contextmanager
def signals_stop_the_run(when_done: Callable[[int, object], object]) -> Iterator[None]:
    """Inside a run, from the main thread: SIGINT and SIGTERM stop the run. At the end, when_done(signum,
    previous handler) puts each signal's handler back (or sets the one the caller wants)."""
    global _again
    before = {signum: signal.getsignal(signum) for signum in SIGNALS}
    hook, excepthook = sys.unraisablehook, sys.excepthook
    sys.unraisablehook = functools.partial(_on_unraisable, hook)  # no frame of its own: see _inside_a_hook
    sys.excepthook = functools.partial(_on_excepthook, excepthook)
    try:
        for signum in SIGNALS:
            signal.signal(signum, _on_signal)
        yield
    finally:
        with _again_lock:
            _again = False
        # A delivery the thread made just before is handled here, by _on_signal, not later by whatever handler
        # comes back; with _again cleared and the signal recorded, it raises nothing.
        sys.unraisablehook, sys.excepthook = hook, excepthook
        for signum, previous in before.items():
            when_done(signum, previous)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _again
    if not in_run():  # between the run's end and the handlers' reset: the outcome stands
        return
    stop = run_stop()
    first = stop.failure is None and not stop.committed
    stop.interrupt(signum)
    if stop.threads or not (first or _again):
        return
    if _inside_a_hook(frame):  # what is raised here is lost, and nothing would ask again: ask from outside
        _ask_again(signum)
        return
    _again = False
    raise Interrupted(signum)


def _inside_a_hook(frame: FrameType | None) -> bool:
    """Whether the main thread is in one of the hooks or in what it calls (the hook that was there before, which
    may be Python too), where an exception would be lost."""
    while frame is not None:
        if frame.f_code in _HOOKS:
            return True
        frame = frame.f_back
    return False


def _on_unraisable(previous: Callable[[UnraisableHookArgs], object], unraisable: UnraisableHookArgs) -> None:
    if isinstance(unraisable.exc_value, Interrupted) and in_run():
        _ask_again(unraisable.exc_value.signum)
    else:
        previous(unraisable)


def _on_excepthook(
    previous: Callable[[type[BaseException], BaseException, TracebackType | None], object],
    kind: type[BaseException],
    error: BaseException,
    traceback: TracebackType | None,
) -> None:
    if isinstance(error, Interrupted) and in_run():
        _ask_again(error.signum)
    else:
        previous(kind, error, traceback)


_HOOKS = (_on_unraisable.__code__, _on_excepthook.__code__)


def _ask_again(signum: int) -> None:
    global _again
    if not _again:
        _again = True
        # _thread, not threading: this may run while the main thread is inside threading's own locks
        _thread.start_new_thread(_deliver_again, (signum,))


def _deliver_again(signum: int) -> None:
    """Signal the main thread until its handler has raised. It stops asking once the run is over, or has threads:
    they see the recorded stop at their next wait, and a later signal must not raise in the main thread while it
    unwinds. interrupt_main does nothing if the handler is no longer a Python function."""
    global _again
    while True:
        with _again_lock:
            if not _again:
                return
            if not in_run() or run_stop().threads:
                _again = False
                return
            _thread.interrupt_main(signum)
        time.sleep(POLL / 10)
