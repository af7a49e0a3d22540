"""The one threading primitive of the tool, and the one way a run stops.

A run's threads (the reader, the reads in flight, the hashers, the disk writer, the input hasher, read-ahead)
all share one RunStop. The first failure anywhere, an exception of any type in any thread or a SIGINT/SIGTERM,
is recorded there once; every blocking wait in every thread looks at it at least every POLL seconds and raises
Stopped, so each thread unwinds through its `finally` blocks, releasing what it holds, and the command exits
with the one line of the first failure. Stopped itself is only ever a consequence and is never reported.

Every thread is a daemon started through `spawn`, so no thread can keep the interpreter alive once the main
thread is done; none comes from concurrent.futures, whose workers the interpreter joins at exit.
"""

from __future__ import annotations

import mmap
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Generic, TypeVar

QUEUE_DEPTH = 4
CHUNK = 8 * 2**20
# How long a blocked wait goes before it looks at the run's stop again: a failure anywhere ends every wait
# within this, far inside the one second a run has to exit.
POLL = 0.05
# How long the main thread waits for the other threads to unwind after a failure before it exits anyway (a
# thread inside a slow disk call cannot be interrupted; being a daemon it cannot hold the process either).
UNWIND = 0.25

T = TypeVar("T")


class Stopped(Exception):
    """Raised in a thread that finds its run stopping because of a failure elsewhere."""


class Interrupted(BaseException):
    """A SIGINT or SIGTERM, recorded as the run's failure (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class Failure:
    error: BaseException
    thread: str
    at: float  # time.monotonic() when it was recorded


class RunStop:
    """The first failure of a run, seen by every thread. Reading `failure` takes no lock, so a signal handler
    (which runs in the main thread, possibly while that thread holds a lock) can look at it safely."""

    def __init__(self) -> None:
        self.failure: Failure | None = None
        self.committed = False  # the output is complete but for syncing and tidying: signals no longer stop it
        self._lock = threading.Lock()
        self.threads = 0  # threads of this run alive now (spawn counts them)
        self._threads_lock = threading.Lock()
        self._alive: list[threading.Thread] = []

    def fail(self, error: BaseException) -> None:
        """Record error as the run's failure unless one is recorded already (or it is only a Stopped)."""
        if isinstance(error, Stopped):
            return
        with self._lock:
            if self.failure is None:
                self.failure = Failure(error, threading.current_thread().name, time.monotonic())

    def commit(self) -> None:
        """The run is about to make its output complete: Stopped if it has failed; from here on a signal is
        ignored (the output is complete, or the commit itself failed and says so)."""
        with self._lock:
            self.check()
            self.committed = True

    def interrupt(self, signum: int) -> None:
        """From a signal handler: never waits for the lock (the main thread may be holding it in fail() or
        commit(), and then a failure is being recorded, or the output committed, anyway)."""
        if self._lock.acquire(blocking=False):
            try:
                if self.failure is None and not self.committed:
                    self.failure = Failure(Interrupted(signum), threading.current_thread().name, time.monotonic())
            finally:
                self._lock.release()

    @property
    def stopped(self) -> bool:
        return self.failure is not None

    def check(self) -> None:
        if self.failure is not None:
            raise Stopped

    def get(self, source: queue.Queue[T]) -> T:
        """queue.get that gives up with Stopped once the run has failed."""
        while True:
            self.check()
            try:
                return source.get(timeout=POLL)
            except queue.Empty:
                continue

    def put(self, target: queue.Queue[T], item: T) -> None:
        """queue.put that gives up with Stopped once the run has failed."""
        while True:
            self.check()
            try:
                target.put(item, timeout=POLL)
                return
            except queue.Full:
                continue

    def wait(self, event: threading.Event) -> None:
        while not event.wait(POLL):
            self.check()

    def spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        """Start a daemon thread of this run: an exception in it becomes the run's failure."""

        def run() -> None:
            try:
                target()
            except BaseException as exc:
                self.fail(exc)
            finally:
                with self._threads_lock:
                    self.threads -= 1

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._threads_lock:
            self.threads += 1
            self._alive = [t for t in self._alive if t.is_alive()]
            self._alive.append(thread)
        thread.start()
        return thread

    def join(self, thread: threading.Thread) -> None:
        """Wait for thread to end: fully while the run is well, at most UNWIND once it has failed."""
        while thread.is_alive() and not self.stopped:
            thread.join(POLL)
        thread.join(UNWIND)

    def unwind(self, deadline: float = UNWIND) -> list[str]:
        """After a failure: give the run's threads until deadline to end; the names of those still running."""
        end = time.monotonic() + deadline
        with self._threads_lock:
            alive = list(self._alive)
        for thread in alive:
            thread.join(max(0.0, end - time.monotonic()))
        return [t.name for t in alive if t.is_alive()]


_current = RunStop()
_depth = 0  # run_scope nesting: a library call inside a command joins the command's run


def run_stop() -> RunStop:
    """The stop of the run in progress in this process (one conversion, verify or inspect at a time)."""
    return _current


def in_run() -> bool:
    return _depth > 0


@contextmanager
def run_scope() -> Iterator[RunStop]:
    """One run of the tool. The outermost scope starts with a fresh stop. Whatever ends the run, the exception
    that leaves the scope is the run's FIRST failure, from whichever thread it came, never the Stopped another
    thread got as its consequence; the outermost scope also gives the run's threads UNWIND to end."""
    global _current, _depth
    if _depth == 0:
        _current = RunStop()
    stop = _current
    _depth += 1
    try:
        yield stop
        stop.check()  # a thread that failed after the main thread was done with it
    except BaseException as exc:
        stop.fail(exc)
        first = stop.failure.error if stop.failure is not None else exc
        if _depth == 1:
            stop.unwind()
        if first is exc:
            raise
        raise first from None
    finally:
        _depth -= 1
        if _depth == 0:  # what runs next, in or out of a scope, starts well; this run's threads keep theirs
            _current = RunStop()


class Pending(Generic[T]):
    """The result of a call handed to a Worker, waited for with the run's stop in view."""

    def __init__(self, stop: RunStop) -> None:
        self._stop = stop
        self._done = threading.Event()
        self._value: T | None = None
        self._failed = False

    def _settle(self, value: T | None, failed: bool) -> None:
        self._value, self._failed = value, failed
        self._done.set()

    def result(self) -> T:
        self._stop.wait(self._done)
        if self._failed:  # the call's exception is the run's failure (or came after it)
            raise Stopped
        return self._value  # type: ignore[return-value]


class Worker:
    """One daemon thread running submitted calls in order, with a short queue for back-pressure. A call that
    raises makes that the run's failure; after a failure, queued calls are skipped but their `release`
    callbacks still run, so pooled buffers go back."""

    def __init__(self, name: str, depth: int = QUEUE_DEPTH) -> None:
        self._stop = run_stop()
        self._queue: queue.Queue[tuple[Callable[[], object], Callable[[], None] | None, Pending] | None]
        self._queue = queue.Queue(depth)
        self._thread = self._stop.spawn(self._run, name)

    def _run(self) -> None:
        while (item := self._next()) is not None:
            call, release, pending = item
            try:
                if self._stop.stopped:
                    pending._settle(None, True)
                    continue
                try:
                    value = call()
                except BaseException as exc:
                    self._stop.fail(exc)
                    pending._settle(None, True)
                else:
                    pending._settle(value, False)
            finally:
                if release is not None:
                    release()

    def _next(self) -> tuple[Callable[[], object], Callable[[], None] | None, Pending] | None:
        # After a failure, drain what is queued (running only the releases) without waiting for more.
        if self._stop.stopped:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                return None
        try:
            return self._stop.get(self._queue)
        except Stopped:
            return self._next()

    def submit(self, call: Callable[[], T], release: Callable[[], None] | None = None) -> Pending[T]:
        pending: Pending[T] = Pending(self._stop)
        try:
            self._stop.put(self._queue, (call, release, pending))
        except Stopped:
            if release is not None:
                release()
            raise
        return pending

    def join(self) -> None:
        """Wait until every call submitted so far has run; Stopped if the run failed meanwhile."""
        self.submit(lambda: None).result()

    def close(self) -> None:
        """End the thread after what is queued (at once, but for the releases, after a failure)."""
        if self._thread.is_alive():
            with suppress(Stopped):  # stopped: the thread is ending by itself
                self._stop.put(self._queue, None)
            self._stop.join(self._thread)


class Lease:
    """A pooled buffer shared by the writer and the hashers; the last one done returns it to the pool."""

    def __init__(self, pool: BufferPool, buffer: mmap.mmap, holders: int) -> None:
        self._pool, self.buffer, self._holders = pool, buffer, holders
        self._returned = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            done = self._holders == 0 and not self._returned
            self._returned |= done
        if done:
            self._pool.give_back(self.buffer)

    def release_all(self) -> None:
        """After a failure: back to the pool now, whoever else held it (nobody takes from it any more)."""
        with self._lock:
            done, self._returned = not self._returned, True
        if done:
            self._pool.give_back(self.buffer)


class BufferPool:
    """A fixed set of buffers made by make(), reused: no fresh pages to fault in for every chunk, and a hard
    memory bound."""

    def __init__(self, count: int, make: Callable[[], mmap.mmap]) -> None:
        self._stop = run_stop()
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(count):
            self._free.put(make())

    def take(self) -> mmap.mmap:
        return self._stop.get(self._free)

    def give_back(self, buffer: mmap.mmap) -> None:
        self._free.put(buffer)
