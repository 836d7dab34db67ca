"""Reads started for a chunk task before it starts: no round trip of idle cores when a task begins.

A (period, chunk) task keeps many reads in flight once it runs (:func:`~.fetch.ordered_reads`), but its first
reads still cost a round trip during which its core waits: at 100 ms per request, for every task, and at every
period boundary for all of them at once. So the first reads of the chunks that have not started yet are issued
early, by the tasks already running, into this process's :data:`WARM` registry; a task claims them as it reaches
them: the same fetch its own ``reader.start(window, policy)`` would have made, so the results are the same. A
warmed read makes one attempt, outside the read policy; if it fails, the task makes the read again itself, under
the policy (retries, records, skipping), as if nothing had been warmed. What is warmed is bounded (per chunk by
the caller's limit: :data:`WARM_CHUNK_BYTES` at the start of a run, more once the task before it has submitted its
reads; :data:`WARM_BYTES` in all; entries older than :data:`WARM_TTL` dropped), and nothing is warmed in a
distributed worker, where the chunk may run elsewhere.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from .fetch import POOL, env_number

__all__ = ["WARM", "WARM_BYTES", "WARM_CHUNK_BYTES", "WARM_TTL", "WarmReads", "on_cluster"]

R = TypeVar("R")


#: Bytes (by the reader's ``cost``: compressed tiles) of one not-yet-started chunk read ahead of its task
#: (``NDVI_SCALE_WARM_CHUNK_MB``): what its task folds while the reads it submits itself make their round trip.
#: A 2048-px window of a Sentinel-2 band is 2-8 MB of tiles, so 16 MB was 1-2 items, folded in less than a
#: 100 ms round trip: 32 MB ran the benchmark 0.958x at 100 ms per request (5 paired rounds), no change at 40 ms.
WARM_CHUNK_BYTES = env_number("NDVI_SCALE_WARM_CHUNK_MB", 32, 0) * 2**20

#: Bytes warmed and not yet claimed in this process at most (``NDVI_SCALE_WARM_MB``; 0 turns warming off): three
#: chunks' first reads, of the chunks the two threads start next; what it adds to peak memory. Since the chunks
#: are warmed further once a task has submitted its last read (``task.WARM_ON_STARTED``), 128 MB was held, not
#: just allowed: the benchmark's max method peaked at 1.58 GB instead of 1.48 GB; with 96 MB at 1.40 GB, and
#: still 0.963x the wall at 100 ms per request (8 paired rounds).
WARM_BYTES = env_number("NDVI_SCALE_WARM_MB", 96, 0) * 2**20

#: Seconds an unclaimed warmed read is kept: a run that failed or was interrupted leaves them behind.
WARM_TTL = 120.0


def on_cluster() -> bool:
    """Whether this thread runs a task of a distributed worker (whose chunks may run on other workers)."""
    if "distributed" not in sys.modules:
        return False
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


class WarmReads:
    """Reads submitted to the I/O pool for a task that has not started, by key, until claimed or dropped.

    A key is claimed at most once (the claimer gets the future, exactly as if it had submitted the read); a
    unit of warming (a chunk) is warmed at most once and never once its task has started.
    """

    def __init__(self, budget: int = WARM_BYTES, ttl: float = WARM_TTL) -> None:
        self.budget = budget
        self.ttl = ttl
        self._lock = threading.Lock()
        self._reads: OrderedDict[Hashable, tuple[Future[Any], int, float]] = OrderedDict()
        self._held = 0
        # per unit: _STARTED, or the bytes warmed for it so far (its task has not started)
        self._units: OrderedDict[Hashable, int] = OrderedDict()
        self.claimed = 0
        self.warmed = 0
        self.failed = 0

    def started(self, unit: Hashable) -> None:
        """``unit``'s task has started: never warm it from now on."""
        with self._lock:
            self._units[unit] = _STARTED
            self._trim_units()

    def has_started(self, unit: Hashable) -> bool:
        """Whether ``unit``'s task has started in this process."""
        with self._lock:
            return self._units.get(unit) == _STARTED

    def has_room(self, unit: Hashable, limit: int) -> bool:
        """Whether :meth:`warm` could submit anything for ``unit`` under ``limit`` (so its reads need be listed at
        all): its task has not started, what was warmed for it has not passed ``limit`` (at ``limit``, reads of no
        cost may still follow), and the budget is not full."""
        with self._lock:
            self._expire(time.monotonic())
            so_far = self._units.get(unit, 0)
            return self._open_to(so_far) and so_far <= limit

    def claim(self, key: Hashable, again: Callable[[], Future[Any]]) -> Future[Any] | None:
        """The warmed read of ``key`` (removed from the registry), or None. If the warmed read fails (it made one
        attempt, outside the read policy), the returned future gets the result of ``again()`` instead: the
        task's own read, with the policy's retries and records."""
        with self._lock:
            got = self._reads.pop(key, None)
            if got is None:
                return None
            self._held -= got[1]
            self.claimed += 1
        warmed: Future[Any] = got[0]
        out: Future[Any] = Future()

        def settle(src: Future[Any]) -> None:
            try:
                out.set_result(src.result())
            except BaseException as e:  # noqa: BLE001 - handed to the task's thread, which raises it
                out.set_exception(e)

        def landed(f: Future[Any]) -> None:
            if not f.cancelled() and f.exception() is None:
                out.set_result(f.result())
                return
            self.failed += 1
            try:
                again().add_done_callback(settle)
            except BaseException as e:  # noqa: BLE001 - e.g. the pool closed: the task raises it
                out.set_exception(e)

        warmed.add_done_callback(landed)
        return out

    def warm(
        self,
        unit: Hashable,
        reads: Sequence[tuple[Hashable, Callable[[], Any], int]],
        limit: int = WARM_CHUNK_BYTES,
    ) -> bool:
        """Submit the leading ``reads`` (``(key, read, cost)``) of ``unit`` not warmed yet, until what was warmed
        for ``unit`` in all reaches ``limit`` bytes (at least one read), while the registry holds less than its
        budget: a later call with a larger ``limit`` continues where an earlier one stopped. Returns whether
        anything was submitted (never once ``unit``'s task has started, nor when the budget is full)."""
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            so_far = self._units.get(unit, 0)
            if not self._open_to(so_far):
                return False
            taken = 0
            for key, read, cost in reads:
                if key in self._reads:
                    continue
                if so_far + taken and (so_far + taken + cost > limit or self._held + cost > self.budget):
                    break
                self._reads[key] = (POOL.submit(read), cost, now)
                self._held += cost
                taken += cost
                self.warmed += 1
            if taken or unit not in self._units:
                self._units[unit] = so_far + taken
                self._trim_units()
            return taken > 0

    def _open_to(self, so_far: int) -> bool:
        # Under the lock: whether a unit with ``so_far`` (its entry in _units) may get more reads: its task has not
        # started and the budget is not full (a budget of 0 or less is always full: _held is never negative).
        return so_far != _STARTED and self._held < self.budget

    def clear(self) -> None:
        """Drop every unclaimed read, forget every unit and zero the counters (tests; between runs of a notebook)."""
        with self._lock:
            self.claimed = self.warmed = self.failed = 0
            for fut, _, _ in self._reads.values():
                fut.cancel()
            self._reads.clear()
            self._units.clear()
            self._held = 0

    def _expire(self, now: float) -> None:
        while self._reads:
            key, (fut, cost, when) = next(iter(self._reads.items()))
            if now - when < self.ttl:
                break
            fut.cancel()
            del self._reads[key]
            self._held -= cost

    def _trim_units(self) -> None:
        while len(self._units) > 100_000:  # a long-lived worker: forget the oldest runs' chunks
            self._units.popitem(last=False)


_STARTED = -1  # a unit whose task has started, in WarmReads._units

#: This process's warmed reads.
WARM = WarmReads()
