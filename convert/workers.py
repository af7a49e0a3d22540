"""The small threading parts of the writer: an ordered worker with back-pressure, and a pool of chunk buffers
shared by several consumers (the memory bound)."""

from __future__ import annotations

import mmap
import queue
import threading
from collections.abc import Callable

from convert.direct_io import ALIGN, aligned_buffer

QUEUE_DEPTH = 4
CHUNK = 8 * 2**20


class Worker:
    """One thread running submitted calls in order, with a short queue for back-pressure; errors surface on join."""

    def __init__(self, name: str) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (call := self._queue.get()) is not None:
            try:
                if self._error is None:
                    call()
            except BaseException as exc:  # handed to the submitting thread on join
                self._error = exc
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def submit(self, call: Callable[[], None]) -> None:
        self._queue.put(call)

    def join(self) -> None:
        self._queue.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class Lease:
    """A pooled buffer shared by the writer and the hashers; the last one done returns it to the pool."""

    def __init__(self, pool: BufferPool, buffer: mmap.mmap, holders: int) -> None:
        self._pool, self.buffer, self._holders = pool, buffer, holders
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            done = self._holders == 0
        if done:
            self._pool.give_back(self.buffer)


class BufferPool:
    """A fixed set of CHUNK buffers, reused: no fresh pages to fault in for every chunk, and a hard memory bound.
    Page-aligned with room for the aligned range around a chunk, so direct reads land in them."""

    def __init__(self, count: int) -> None:
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(count):
            self._free.put(aligned_buffer(CHUNK + 2 * ALIGN))

    def take(self, stop: threading.Event) -> mmap.mmap:
        while not stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        raise Stopped

    def give_back(self, buffer: mmap.mmap) -> None:
        self._free.put(buffer)


class Stopped(Exception):
    """The writer went away; the reader stops."""
