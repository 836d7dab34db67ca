"""Waves: the region tasks of a write submitted a bounded number at a time (part of the write stage).

A country-year holds 10^5 regions; handed to a Dask scheduler at once, each is a task (plus its composite) the
scheduler tracks, prioritises and reports on, and the client holds a future per region. In waves of at most
:func:`wave_regions` regions (period after period, rows of chunks within a period: the order regions are listed
in), the scheduler holds at most two waves: the next wave is submitted as soon as the running one is down to
its last wave's worth, so the workers never wait at a wave boundary. A killed client loses nothing but the
running waves: every written region has its marker, and the next run resumes from them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import dask

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
