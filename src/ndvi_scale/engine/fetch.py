"""Many reads in flight: the process's I/O pool and the ordered, bounded read-ahead of a task.

Object storage answers each range request after 20-100 ms. A task that reads its assets one after another waits
for every round trip (GDAL's open is one or two of them, each window read one or more): at 100 ms the cores idle
most of the time. Here a (period, chunk) task submits the reads of all its assets at once to :data:`POOL`, a
process-wide pool of :data:`READ_CONCURRENCY` threads, and folds the results in its own order as they arrive:
opens, range requests and decoding (GDAL releases the GIL while it inflates) of many assets overlap, and the
cores are kept busy by decoding instead of waiting.

Memory stays bounded: a task has at most :data:`READ_AHEAD_BYTES` of read-but-not-folded pixels (and at least
one item) in flight; the next reads are submitted as earlier ones are folded.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = [
    "POOL", "PREFETCH_POOL", "LazyPool", "PoolClosed", "READ_AHEAD_BYTES", "READ_CONCURRENCY", "env_number",
    "ordered_reads",
]

T = TypeVar("T")
R = TypeVar("R")


N = TypeVar("N", int, float)


def env_number(name: str, default: N, minimum: N) -> N:
    """The engine's setting ``name`` from the environment, of ``default``'s type (int or float), at least
    ``minimum``; ``default`` when unset or not such a number."""
    raw = os.environ.get(name, "").strip()
    try:
        return max(minimum, type(default)(raw)) if raw else default
    except ValueError:
        return default


#: Threads of the process's read pool (``NDVI_SCALE_READ_CONCURRENCY``): 16 per core, at least 32, at most 64.
#: A task's reads wait in this pool, so at 100 ms per request the default sample (one chunk per period, 36 files:
#: one task at a time) took 1.46x its time at 0 ms with 32 threads, 2.1x with 16, 3.0x with 8 (measured). Threads
#: waiting on a socket cost no CPU; how many decode at once is bounded by each task's read-ahead
#: (:data:`READ_AHEAD_BYTES`), not by this number.
READ_CONCURRENCY = env_number("NDVI_SCALE_READ_CONCURRENCY", min(64, max(32, 16 * (os.cpu_count() or 2))), 1)

#: Bytes of fetched-but-not-yet-folded reads one task may hold (``NDVI_SCALE_READ_AHEAD_MB``): compressed tiles on
#: the engine's own COG path (decoded when folded), uint16 windows through GDAL. 64 MB: 8 windows of a 2048-px
#: chunk through GDAL (8 MB of uint16 each), two to three times as many compressed; what it adds to a worker's
#: peak memory stays small (192 MB of GDAL windows took the benchmark from 1.6 to 2.0 GB).
READ_AHEAD_BYTES = env_number("NDVI_SCALE_READ_AHEAD_MB", 64, 1) * 2**20


#: glibc's arena count for a process that runs the I/O pool (``NDVI_SCALE_MALLOC_ARENAS``; 0 leaves malloc alone).
#: glibc gives each new thread its own arena (up to 8 per core), and memory freed in an arena stays with the
#: process: with a pool of I/O threads decoding tiles through GDAL that held ~200-350 MB more at the benchmark's
#: peak. Only the arena count is capped: also trimming freed memory (M_TRIM_THRESHOLD) fixes glibc's mmap threshold
#: at 128 kB, so every tile-sized buffer became fresh zeroed pages: +30 % CPU (measured). ``MALLOC_ARENA_MAX`` in the
#: environment wins.
MALLOC_ARENAS = env_number("NDVI_SCALE_MALLOC_ARENAS", 2, 0)


def _tame_malloc() -> None:
    """Cap glibc's arenas (no-op elsewhere than glibc, when configured, or when the environment sets it)."""
    if MALLOC_ARENAS <= 0 or not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX
    except (OSError, AttributeError):  # musl or another libc: nothing to tame
        pass


class LazyPool:
    """A lazily started, process-wide thread pool (restarted after a fork: threads do not survive one)."""

    def __init__(self, workers: int, name: str = "ndvi-scale-read") -> None:
        self.workers = workers
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., R], *args: Any) -> Future[R]:
        """``fn(*args)`` in the pool. Raises :class:`PoolClosed` once the interpreter is shutting down."""
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                _tame_malloc()
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
                self._pid = os.getpid()
            pool = self._pool
        try:
            return pool.submit(fn, *args)
        except RuntimeError as e:  # "cannot schedule new futures after interpreter shutdown"
            raise PoolClosed(str(e)) from None


class PoolClosed(RuntimeError):
    """The process is shutting down (a run that failed is exiting): reads still in flight end with this, which
    is nobody's fault and never recorded as an unreadable asset."""


#: The process's read threads.
POOL = LazyPool(READ_CONCURRENCY)

#: Threads that open the files of the periods about to be read (header round trips), beside :data:`POOL` so that
#: they never queue in front of the reads of the period being computed. As many as :data:`POOL`: the benchmark's
#: first period is 36 files, whose headers half as many threads fetched in three round trips instead of two.
PREFETCH_POOL = LazyPool(READ_CONCURRENCY)


def ordered_reads(
    jobs: Iterable[T],
    read: Callable[[T], R],
    cost: Callable[[T], int],
    budget: int = READ_AHEAD_BYTES,
    *,
    claim: Callable[[T], Future[R] | None] | None = None,
    on_started: Callable[[], Any] | None = None,
) -> Iterator[tuple[T, R]]:
    """``(job, read(job))`` for every job, in the given order, while up to ``budget`` bytes of later jobs (by
    ``cost``) are already being read in :data:`POOL`. The first job is always submitted, whatever its cost.

    ``claim(job)``: a future of ``read(job)`` already submitted for it (a warmed read, :mod:`.warm`), or None to
    submit it now. ``on_started()`` is called once, when every job has been submitted.

    If a read raises, the reads not started yet are cancelled and the exception is raised here (after the
    results before it were yielded).
    """
    pending = iter(jobs)
    window: list[tuple[T, Future[R], int]] = []
    held = 0
    done = False

    def top_up() -> None:
        nonlocal held, done
        while not done and (not window or held < budget):
            try:
                job = next(pending)
            except StopIteration:
                done = True
                if on_started is not None:
                    on_started()
                return
            c = int(cost(job))
            fut = claim(job) if claim is not None else None
            window.append((job, fut if fut is not None else POOL.submit(read, job), c))
            held += c

    try:
        top_up()
        while window:
            job, fut, c = window.pop(0)
            result = fut.result()
            held -= c
            top_up()
            yield job, result
    finally:
        for _, fut, _ in window:
            fut.cancel()
