"""Waves: the region tasks of a write submitted a bounded number at a time (part of the write stage).

A country-year holds 10^5 regions; handed to a Dask scheduler at once, each is a task (plus its composite) the
scheduler tracks, prioritises and reports on, and the client holds a future per region. In waves of at most
:func:`wave_regions` regions (period after period, rows of chunks within a period: the order regions are listed
in), the scheduler holds at most two waves: the next wave is submitted as soon as the running one is down to
its last wave's worth, so the workers never wait at a wave boundary. A killed client loses nothing but the
running waves: every written region has its marker, and the next run resumes from them.

On the local threaded scheduler the regions run in that order on the scheduler's threads, a region starting as
soon as a thread is free (:func:`run_in_order`): no barrier between waves or periods, so a period of fewer regions
than threads (a small area: one chunk a period) does not leave threads idle, and a period's last region overlaps
the next period's first ones; yet at most ``threads - 1`` regions of one period are still running when the next
starts (dask's own order interleaves periods, and the tile cache then re-reads ~1/5 of the bytes).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import dask
import dask.local

log = logging.getLogger(__name__)

__all__ = ["WAVE_REGIONS", "compute_in_waves", "split_waves", "wave_regions"]

#: Regions per wave by default: 4096 regions are ~8,200 scheduler tasks (composite + write), so two waves in
#: flight stay far below the ~500k tasks where one scheduler falls over, while a wave still spans hundreds of
#: (2-core) workers' worth of regions. NDVI_SCALE_WAVE_REGIONS overrides it.
WAVE_REGIONS = 4096


def wave_regions() -> int:
    """Regions per wave: ``NDVI_SCALE_WAVE_REGIONS`` if set to a positive integer, else :data:`WAVE_REGIONS`."""
    raw = os.environ.get("NDVI_SCALE_WAVE_REGIONS", "").strip()
    try:
        value = int(raw)
    except ValueError:
        return WAVE_REGIONS
    return value if value > 0 else WAVE_REGIONS


def split_waves(groups: Sequence[Sequence[Any]], size: int) -> list[list[Any]]:
    """``groups`` (one list of region tasks per period, in order) cut into waves of at most ``size`` tasks. A
    wave never mixes periods: neighbouring chunks of one period share COG tiles and open files (the reader's
    caches), so a period's regions run together."""
    return [list(g[i : i + size]) for g in groups for i in range(0, len(g), size)]


def compute_in_waves(
    waves: Sequence[Sequence[Any]],
    client: Any | None,
    *,
    retries: int = 0,
    on_done: Callable[[int], None] | None = None,
) -> int:
    """Compute every task of ``waves``, wave after wave; return the number of waves run.

    With a distributed ``client``: at most two waves on the scheduler at a time (the next is submitted when the
    outstanding tasks fit in one wave), earlier waves first (priority), each task retried ``retries`` times (a
    lost worker must not fail the job); on any failure the outstanding futures are cancelled and it is raised.
    Without: ``dask.compute`` of one wave at a time (the local scheduler). ``on_done(n)`` is called with the
    number of tasks finished so far.
    """
    threads = _local_threads() if client is None else None
    if threads is not None:
        run_in_order([t for w in waves for t in w], threads, on_done=on_done)
        return len(waves)
    if client is None:
        done = 0
        for k, wave in enumerate(waves):
            log.debug("wave %d/%d: %d region(s)", k + 1, len(waves), len(wave))
            dask.compute(*wave)
            done += len(wave)
            if on_done is not None:
                on_done(done)
        return len(waves)
    from distributed import as_completed

    pending = _submitter(waves, client, retries)
    size = max((len(w) for w in waves), default=0)
    running = as_completed(next(pending, []))
    outstanding = running.count()
    done = 0
    try:
        for fut in running:
            fut.result()
            done += 1
            outstanding -= 1
            if on_done is not None:
                on_done(done)
            if outstanding <= size:  # the running waves are down to one wave's worth: add the next one
                more = next(pending, None)
                if more is not None:
                    running.update(more)
                    outstanding += len(more)
    except BaseException:
        client.cancel(list(running.futures))
        raise
    return len(waves)


def _submitter(waves: Sequence[Sequence[Any]], client: Any, retries: int) -> Iterator[list[Any]]:
    """The futures of each wave, submitted only when asked for (earlier waves with higher priority)."""
    for k, wave in enumerate(waves):
        log.debug("wave %d/%d: %d region(s) submitted", k + 1, len(waves), len(wave))
        yield list(client.compute(list(wave), retries=retries, priority=len(waves) - k))


def _local_threads() -> int | None:
    """Threads of dask's local threaded scheduler when it is the one in use (``num_workers``, default one per
    core), else None (a distributed client, the synchronous or the process scheduler: left to dask)."""
    import dask.threaded
    from dask.base import get_scheduler

    if get_scheduler() is not dask.threaded.get:
        return None
    n = dask.config.get("num_workers", None)
    return int(n) if n else dask.threaded.CPU_COUNT


def run_in_order(tasks: Sequence[Any], threads: int, *, on_done: Callable[[int], None] | None = None) -> None:
    """Compute the dask ``tasks`` (Delayed objects of one graph, e.g. ``to_delayed()``'s) on ``threads`` threads,
    starting them strictly in the given order, each as soon as a thread is free.

    Dependencies a task does not share are computed in its thread (dask's synchronous scheduler, with the active
    dask callbacks); one shared by several tasks (a period's sources) is computed once, by the first task that
    needs it. On a failure no further task starts; the tasks running finish, and the first failure (in task
    order) is raised.
    """
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    if not tasks:
        return
    from dask.callbacks import Callback

    subgraphs, shared, deps = _split_graph(tasks)
    # Handed to each get_sync explicitly: without, each empties the global ``Callback.active`` while it runs (so
    # nested schedulers skip them) and restores it after, so the threads running at once lost them, for good.
    callbacks = set(Callback.active)
    memo: dict[Any, Any] = {}
    locks = {k: threading.Lock() for k in shared}
    stop = threading.Event()

    def one(key: Any) -> None:
        if stop.is_set():
            return
        try:
            dsk = dict(subgraphs[key])
            for dep in [k for k in dsk if k in shared]:
                with locks[dep]:
                    if dep not in memo:
                        memo[dep] = dask.local.get_sync(_closure(subgraphs[key], dep, deps), dep,
                                                        callbacks=callbacks)
                dsk[dep] = memo[dep]
            dask.local.get_sync(dsk, key, callbacks=callbacks)
        except BaseException:
            stop.set()  # here, before this thread takes the next task (the main thread may only see it later)
            raise

    keys = [t.key for t in tasks]
    done = 0
    with ThreadPoolExecutor(threads, thread_name_prefix="ndvi-scale-region") as pool:
        pending = {pool.submit(one, k): n for n, k in enumerate(keys)}
        first: tuple[int, BaseException] | None = None
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in finished:
                    n = pending.pop(fut)
                    exc = fut.exception()
                    if exc is not None:
                        stop.set()
                        if first is None or n < first[0]:
                            first = (n, exc)
                    elif first is None:
                        done += 1
                        if on_done is not None:
                            on_done(done)
        except BaseException:
            stop.set()
            raise
    if first is not None:
        raise first[1]


def _split_graph(tasks: Sequence[Any]) -> tuple[dict[Any, dict[Any, Any]], set[Any], dict[Any, set[Any]]]:
    """Per task key the subgraph it needs (its key and everything it depends on), the keys needed by more than one
    task, and the dependencies of every key met."""
    from dask.utils import ensure_dict

    graph = ensure_dict(tasks[0].__dask_graph__())
    for t in tasks[1:]:
        if t.__dask_graph__() is not tasks[0].__dask_graph__():
            graph.update(ensure_dict(t.__dask_graph__()))
    deps: dict[Any, set[Any]] = {}
    subgraphs = {t.key: _closure(graph, t.key, deps) for t in tasks}
    users: dict[Any, int] = {}
    for sub in subgraphs.values():
        for k in sub:
            users[k] = users.get(k, 0) + 1
    return subgraphs, {k for k, n in users.items() if n > 1}, deps


def _closure(graph: dict[Any, Any], key: Any, deps: dict[Any, set[Any]]) -> dict[Any, Any]:
    """``key`` and what it depends on, within ``graph``; ``deps`` caches each key's direct dependencies."""
    from dask.core import get_dependencies

    out: dict[Any, Any] = {}
    todo = [key]
    while todo:
        k = todo.pop()
        if k in out:
            continue
        out[k] = graph[k]
        if k not in deps:
            deps[k] = set(get_dependencies(graph, k))
        todo.extend(deps[k])
    return out
