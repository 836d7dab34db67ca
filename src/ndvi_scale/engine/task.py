"""One (period, chunk): read every item's red, nir and scl window, fold its NDVI into the day layers, reduce.

This is the only per-pixel path of ndvi-scale. No uint16 stack of the period is made: reads are fetched in the
process's I/O pool (:mod:`ndvi_scale.engine.fetch`, many requests in flight, bounded read-ahead), finished
(decoded, on the engine's own COG path) in the task's thread when it is their turn, and each item is folded
into its day's float32 layer as soon as it is its turn (:func:`ndvi_scale.kernel.ndvi_into`: mask, NDVI,
same-day mosaic, first valid wins); then the days are reduced (:func:`ndvi_scale.kernel.reduce_days`). A task
holds the (days, y, x) float32 NDVI and the read-ahead windows.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rasterio import windows

from ..faults import ReadPolicy
from ..kernel import filter_reach, filtered_clear, ndvi_into, reduce_days
from .fetch import POOL, PREFETCH_POOL, READ_AHEAD_BYTES, env_number, ordered_reads
from .grid import OutputGrid
from .owntiles import DECODE_POOL, gather
from .reader import reader_for
from .sources import AssetSource, ItemSource
from .tiles import RESULTS, SCRATCH, TILE_CACHE, WINDOWS, ScratchPool, populate
from .warm import WARM, WARM_CHUNK_BYTES, on_cluster

log = logging.getLogger(__name__)

__all__ = [
    "DAY_LAYERS", "IDLE", "TASK_DAY_BYTES", "IdleRelease", "PeriodReads", "TaskSettings", "composite_block",
    "empty_block", "expect_reads", "prefetch", "prepare_day_layers", "read_jobs", "release_buffers", "strip_rows",
    "warm_next",
]

#: The (days, y, x) float32 layers of a task, kept for the next task: ~100 MB for a month of a 2048-px chunk,
#: which fresh the kernel zeroes page by page on first touch (perf: page faults were ~13 % of the benchmark's CPU
#: before the pools). One per region thread (a core); given back when the engine is idle (:data:`IDLE`).
DAY_LAYERS = ScratchPool(max(2, os.cpu_count() or 2))


def release_buffers() -> None:
    """Give back what the engine keeps between tasks: :data:`DAY_LAYERS`, the result blocks
    (:data:`~.tiles.RESULTS`), the readers' windows and decode buffers (:data:`~.tiles.WINDOWS`,
    :data:`~.tiles.SCRATCH`) and the cached tiles (:data:`~.tiles.TILE_CACHE`,
    its counters kept). The next task allocates afresh. Called by :data:`IDLE` and at the end of
    :func:`ndvi_scale.pipeline.run`."""
    DAY_LAYERS.clear()
    RESULTS.clear()
    WINDOWS.clear()
    SCRATCH.clear()
    TILE_CACHE.drop()


class IdleRelease:
    """Calls ``release`` once no task of this process has run for ``seconds``.

    Tasks run inside :meth:`busy`. The buffers a task leaves for the next one are worth keeping only while
    tasks follow each other; a notebook that ran ``build(cfg).compute()`` (no :func:`ndvi_scale.pipeline.run`
    to give them back at its end) would otherwise hold them until its next run: ~0.2 GB of day layers and
    windows and up to the tile cache's 384 MB. Within a run the next task starts milliseconds after the last
    ends, so 2 s idle never happens between tasks of a local run, and on a cluster only when the worker
    has nothing left of the wave.
    """

    def __init__(self, release: Callable[[], Any], seconds: float) -> None:
        self.release = release
        self.seconds = seconds
        """Idle time before :attr:`release` runs (``NDVI_SCALE_IDLE_RELEASE_S``, default 2)."""
        self._lock = threading.Lock()
        self._active = 0
        self._generation = 0
        self._timer: threading.Timer | None = None

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """The ``with`` block is a task: no release while it runs; the idle time counts from its end."""
        with self._lock:
            self._active += 1
            self._generation += 1
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    # a thread per idle spell (tasks last tens of ms at least): cheap beside what it frees
                    self._timer = threading.Timer(self.seconds, self._fire, args=(self._generation,))
                    self._timer.daemon = True  # never delays the interpreter's exit
                    self._timer.start()

    def _fire(self, generation: int) -> None:
        with self._lock:
            if self._active or generation != self._generation:  # a task started since (its end re-arms)
                return
            self._timer = None
        self.release()


#: The engine's idle release: :func:`release_buffers` after ``NDVI_SCALE_IDLE_RELEASE_S`` seconds (default 2)
#: without a task.
IDLE = IdleRelease(release_buffers, env_number("NDVI_SCALE_IDLE_RELEASE_S", 2.0, 0.0))


def empty_block(n_out: int, height: int, width: int) -> np.ndarray:
    """The packed block of a period without scenes: NaN composites, valid_count 0."""
    out = np.full((1, n_out, height, width), np.nan, dtype=np.float32)
    out[:, 1] = 0
    return out.reshape(1, n_out * height, width)


def prefetch(sources: Sequence[ItemSource], grid: OutputGrid, slices: Sequence[tuple[slice, slice]]) -> None:
    """Open (in the prefetch pool, without waiting) the assets of ``sources`` that reach any of ``slices``: the
    header round trips of a period are issued together, before (or while) its chunks need them."""
    for src in sources:
        if any(src.red.reaches(*s) and src.nir.reaches(*s) for s in slices):
            for a in src.assets:
                reader_for(a.href, grid).open_ahead(PREFETCH_POOL)


#: Most bytes of day layers one task holds at once: a (period, chunk) whose days x rows x cols x 4 B exceed it is
#: composited in strips of rows, one after the other, into the chunk's output block (every pixel is reduced on
#: its own, so strips give the same bytes). A single-tile year (73 days) at the default 2048-px chunk would
#: hold 1.2 GB; in 4 strips of 512 rows it holds 300 MB (benchmarks/RESULTS.md: peak RSS 1.35-1.37 GB instead
#: of 2.5 GB). The chunk (the user's ``--chunk``, also the Zarr chunk) never shrinks for it.
TASK_DAY_BYTES = 384 * 2**20
#: Strips are whole multiples of this many rows (a COG's internal tiles are 512 or 1024 px: strips end on tile
#: boundaries of a grid aligned with the files).
STRIP_ROWS = 256


def strip_rows(n_days: int, height: int, width: int, budget: int | None = None) -> int:
    """Rows per strip for a (period, chunk) of ``n_days`` day layers of ``height`` x ``width`` float32 pixels:
    ``height`` if they fit in ``budget`` bytes (default :data:`TASK_DAY_BYTES`), else the most multiple of
    :data:`STRIP_ROWS` rows that fits (at least :data:`STRIP_ROWS`)."""
    budget = TASK_DAY_BYTES if budget is None else budget
    per_row = max(n_days, 1) * width * 4
    if per_row * height <= budget:
        return height
    return max(STRIP_ROWS, budget // per_row // STRIP_ROWS * STRIP_ROWS)


@dataclass(frozen=True)
class TaskSettings:
    """What every (period, chunk) task of a run shares, besides its period's items."""

    grid: OutputGrid
    """The output grid."""
    method: str
    """The reducer: median, mean, max, min or qNN."""
    mask_classes: tuple[int, ...]
    """SCL classes masked."""
    n_out: int
    """Layers of the packed output block: value, count[, date]."""
    policy: ReadPolicy
    """Retries, skipping and re-signing of failed reads."""
    mask_filters: tuple[tuple[str, float], ...] = ()
    """``(op, metres)`` morphological filters of the cloud/shadow mask (:func:`ndvi_scale.kernel.filtered_clear`)."""
    read_ahead: int = READ_AHEAD_BYTES
    """Bytes of fetched-but-not-folded reads a task may hold (:func:`~.fetch.ordered_reads`)."""

    @property
    def filters_px(self) -> tuple[tuple[str, float], ...]:
        """:attr:`mask_filters` with their radii in output pixels."""
        return tuple((op, float(metres) / self.grid.resolution) for op, metres in self.mask_filters)


@dataclass(frozen=True)
class PeriodReads:
    """What the chunk tasks of one period read, and what they may read ahead for the tasks after them."""

    settings: TaskSettings
    """What every task of the run shares."""
    run: str
    """Token of the run's graph: names the chunks in the warm registry (:mod:`.warm`)."""
    t: int
    """Index of the period in the cube."""
    items: tuple[ItemSource, ...]
    """The period's items, in fold order within each day."""
    day_numbers: tuple[int, ...]
    """Per day of the period with a scene: days since 1970-01-01 (for the date of the max/min)."""
    windows: tuple[tuple[int, int, tuple[slice, slice]], ...] = ()
    """Every chunk (i, j, slices) of the period that a task computes."""
    next: PeriodReads | None = None
    """The next period with scenes (its chunks are warmed once every chunk of this one has started)."""


def composite_block(
    period: PeriodReads,
    block_id: tuple[int, int, int],
    slices: tuple[slice, slice],
    aoi: Any = None,
) -> np.ndarray:
    """The packed (1, n_out * height, width) float32 block of one period and chunk: value, count[, date].

    ``aoi`` (a polygon in the grid's CRS, or None for the whole chunk): pixels whose centre is outside it are NaN
    with count 0, set after the reduction (inside pixels are exactly those of a run without it); a chunk without
    any pixel centre inside reads nothing.

    Composited in strips of rows when its day layers would exceed :data:`TASK_DAY_BYTES` (same bytes: each
    pixel is reduced on its own). Once its reads are all submitted, the task warms the first reads of chunks
    that have not started (:func:`warm_next`). Raises as :func:`_composite_part`.
    """
    with IDLE.busy():
        return _composite_block(period, block_id, slices, aoi)


def _composite_block(
    period: PeriodReads,
    block_id: tuple[int, int, int],
    slices: tuple[slice, slice],
    aoi: Any,
) -> np.ndarray:
    rows, cols = slices
    height, width = rows.stop - rows.start, cols.stop - cols.start
    settings = period.settings
    n_out = settings.n_out
    WARM.started((period.run, period.t, block_id[1], block_id[2]))
    inside = _aoi_inside(aoi, settings.grid, rows, cols) if aoi is not None else None
    if inside is not None and not inside.any():
        return empty_block(n_out, height, width)
    warm = functools.partial(_warm_quietly, period)

    def part(rows: slice, last: bool) -> np.ndarray:
        return _composite_part(period.items, block_id, (rows, cols), settings, period.day_numbers,
                               on_started=warm if last else None)

    strips = _strips(len(period.day_numbers), slices)
    if len(strips) == 1:
        out = part(rows, True)
    else:
        out = RESULTS.get((n_out, height, width), np.float32)
        for k, strip in enumerate(strips):
            out[:, strip.start - rows.start : strip.stop - rows.start] = part(strip, k == len(strips) - 1)
    if inside is not None:
        outside = ~inside
        out[:, outside] = np.nan  # value and date layers
        out[1, outside] = 0  # valid_count
    return out.reshape(1, n_out * height, width)


def _strips(n_days: int, slices: tuple[slice, slice]) -> list[slice]:
    """The rows of a chunk that its task composites one after the other (:func:`strip_rows`): one strip, the
    chunk's, unless its day layers would exceed :data:`TASK_DAY_BYTES`."""
    rows, cols = slices
    height = rows.stop - rows.start
    step = strip_rows(n_days, height, cols.stop - cols.start)
    return [slice(rows.start + r0, rows.start + min(height, r0 + step)) for r0 in range(0, height, step)]


def prepare_day_layers(period: PeriodReads) -> None:
    """Lend :data:`DAY_LAYERS` the day layers of the period's first tasks (one per region thread), their pages
    mapped in a thread while the first reads are in flight: a fresh layer set is ~100 MB the kernel would
    otherwise zero page by page under the first folds (0.04-0.2 s of CPU each, measured), when every core is
    busy. Call before the tasks start (they take the prepared layers)."""
    if not period.windows:
        return
    n_days = len(period.day_numbers)
    tasks = min(DAY_LAYERS.keep, len(period.windows))
    shapes = []
    for _, _, (rows, cols) in period.windows:
        strip = _strips(n_days, (rows, cols))[0]
        shapes.append((n_days, strip.stop - strip.start, cols.stop - cols.start))
    shape = max(shapes, key=lambda s: s[0] * s[1] * s[2])
    layers = [DAY_LAYERS.get(shape, np.float32) for _ in range(tasks)]
    for layer in layers:
        DAY_LAYERS.give(layer)  # lent to the tasks from now on; mapping the pages does not change a byte

    def map_pages() -> None:
        for layer in layers:
            populate(layer)

    threading.Thread(target=map_pages, name="ndvi-scale-prepare", daemon=True).start()


def expect_reads(period: PeriodReads) -> None:
    """Tell this process's readers the windows the period's tasks read each asset on (every chunk's strips, in
    :func:`read_jobs`' windows): a COG tile that several of them need leaves the tile cache once the last has
    taken it (:meth:`~.reader.AssetReader.expect`)."""
    settings = period.settings
    expected: dict[str, set[windows.Window]] = {}
    for i, j, slices in period.windows:
        for strip in _strips(len(period.day_numbers), slices):
            jobs, window_of = read_jobs(period.items, len(period.day_numbers), (period.t, i, j),
                                        (strip, slices[1]), settings)
            for _, asset in jobs:
                expected.setdefault(asset.href, set()).add(window_of(asset))
    for href, wins in expected.items():
        reader_for(href, settings.grid).expect(wins)


def warm_next(period: PeriodReads, limit_chunks: int = 4, *, decode: bool = False,
              chunk_bytes: int = WARM_CHUNK_BYTES) -> int:
    """Warm the first reads of up to ``limit_chunks`` chunks that have not started: this period's, and once every
    chunk of this period has started, the next period's (:mod:`.warm`; nothing on a distributed worker). Returns
    the number of chunks warmed.

    ``chunk_bytes``: what is warmed of each chunk in all (:data:`~.warm.WARM_CHUNK_BYTES` by default); a chunk warmed
    before gets the reads that follow those, up to that total.

    ``decode``: also decode each warmed read as soon as its bytes are in (the window its task will fold),
    for when no task runs yet (:func:`~.graph.start_reading`, while the cube's template is written): a core
    that would wait decodes instead (a decoded read holds its window: ~3-5x its compressed bytes, until its task
    starts moments later). While tasks run, their own decoding goes first: the default.

    Not the next period's while this one still has chunks to start: their reads would go before the ones this
    period needs first, and their edge tiles would take the tile cache's room from this period's.
    """
    if WARM.budget <= 0 or on_cluster():
        return 0
    settings = period.settings
    warmed = 0
    for p in (period, period.next):
        if p is None or warmed >= limit_chunks:
            break
        pending = [(i, j, s) for i, j, s in p.windows if not WARM.has_started((p.run, p.t, i, j))]
        for i, j, slices in pending[: limit_chunks - warmed]:
            if not WARM.has_room((p.run, p.t, i, j), chunk_bytes):  # warmed as far already (by another task)
                continue
            # The reads of its first strip: what its task reads first (a chunk of many days is composited
            # in strips, whose windows are the strip's rows).
            first = (_strips(len(p.day_numbers), slices)[0], slices[1])
            jobs, window_of = read_jobs(p.items, len(p.day_numbers), (p.t, i, j), first, settings)
            reads = [(_warm_key(a.href, settings.grid, window_of(a)),
                      functools.partial(_try_start_decoded if decode else _try_start, a.href, settings.grid,
                                        window_of(a), settings.policy),
                      reader_for(a.href, settings.grid).cost(window_of(a)))
                     for _, a in jobs]
            if WARM.warm((p.run, p.t, i, j), reads, chunk_bytes):
                warmed += 1
        if pending:
            break
    return warmed


#: What is warmed of each next chunk in all once a task has submitted its last read (a chunk warmed at the start
#: of the run gets as much again, raw): the reads its task folds while its own first reads make their round trip.
WARM_ON_STARTED = 2 * WARM_CHUNK_BYTES


def _warm_quietly(period: PeriodReads) -> None:
    """:func:`warm_next`, whose failure (a header not readable yet, say) must not fail the task that warms: the
    chunk's own task meets the same error when it reads, under the read policy."""
    try:
        warm_next(period, chunk_bytes=WARM_ON_STARTED)
    except Exception as e:  # noqa: BLE001 - an optimisation; the reads themselves report errors
        log.debug("warming the next chunks failed: %s", e)


def read_jobs(
    items: Sequence[ItemSource],
    n_days: int,
    block_id: tuple[int, int, int],
    slices: tuple[slice, slice],
    settings: TaskSettings,
) -> tuple[list[tuple[int, AssetSource]], Callable[[AssetSource], windows.Window]]:
    """The reads of one (period, chunk or strip), in the order its task makes them: ``(item index, asset)``
    jobs, and the window each asset is read on (the chunk; the SCL with the mask filters' margin).

    Days are visited from a start that differs between neighbouring chunks (``block_id`` = (period, i, j)):
    two tasks on adjacent chunks then read different items at a time, so a COG tile they share is inflated by
    one and found in the tile cache by the other, instead of both waiting for it at once. Each day's items are
    still folded in their own order (the mosaic rule: first valid wins), and each day has its own layer, so the
    result does not depend on the visiting order.
    """
    rows, cols = slices
    window = windows.Window.from_slices(rows, cols)
    scl_window = windows.Window.from_slices(*_scl_slices(slices, settings))
    filtered = bool(settings.mask_filters)
    by_day: list[list[int]] = [[] for _ in range(n_days)]
    for i, s in enumerate(items):
        by_day[s.day].append(i)
    shift = (sum(block_id[1:]) * ((n_days + 1) // 2)) % n_days if n_days else 0
    order = [i for d in [*range(shift, n_days), *range(shift)] for i in by_day[d]]
    # The items whose red and nir metadata footprints reach the chunk; the others observe nothing here.
    reading = [i for i in order if items[i].red.reaches(rows, cols) and items[i].nir.reaches(rows, cols)]

    def window_of(asset: AssetSource) -> windows.Window:
        return scl_window if filtered and asset.band == "scl" else window

    return [(i, a) for i in reading for a in items[i].assets], window_of


def _scl_slices(slices: tuple[slice, slice], settings: TaskSettings) -> tuple[slice, slice]:
    """The SCL window: the chunk plus the mask filters' reach, inside the grid."""
    rows, cols = slices
    grid = settings.grid
    reach = filter_reach(settings.filters_px)
    grid_h, grid_w = grid.shape
    return (slice(max(0, rows.start - reach), min(grid_h, rows.stop + reach)),
            slice(max(0, cols.start - reach), min(grid_w, cols.stop + reach)))


def _warm_key(href: str, grid: OutputGrid, w: windows.Window) -> tuple[Any, ...]:
    return (href, grid, int(w.row_off), int(w.col_off), int(w.height), int(w.width))


def _start(href: str, grid: OutputGrid, w: windows.Window, policy: ReadPolicy) -> Callable[[], np.ndarray]:
    return reader_for(href, grid).start(w, policy)


def _try_start(href: str, grid: OutputGrid, w: windows.Window, policy: ReadPolicy) -> Callable[[], np.ndarray]:
    return reader_for(href, grid).try_start(w, policy)


def _try_start_decoded(href: str, grid: OutputGrid, w: windows.Window, policy: ReadPolicy
                       ) -> Callable[[], np.ndarray]:
    """:func:`_try_start` and its decode at once (one attempt, outside the policy): the task gets the window."""
    window = reader_for(href, grid).try_read(w)
    return lambda: window


def _composite_part(
    items: Sequence[ItemSource],
    block_id: tuple[int, int, int],
    slices: tuple[slice, slice],
    settings: TaskSettings,
    day_numbers: Sequence[int],
    on_started: Callable[[], Any] | None = None,
) -> np.ndarray:
    """The (n_out, height, width) float32 layers of one period over the window ``slices`` (a chunk or a strip
    of one): value, count[, date].

    Reads in :func:`read_jobs`' order, claiming reads warmed for it (:mod:`.warm`); ``on_started`` is called once
    every read has been submitted. With mask filters the SCL is read with the margin they reach (clipped to the
    grid), so the mask of the chunk is the mask of the whole grid cut to it: results do not depend on the chunk.

    Raises :class:`~ndvi_scale.faults.AssetReadError` (a read failed and the policy does not skip) or
    :class:`~ndvi_scale.errors.ReadError`.
    """
    rows, cols = slices
    grid, mask_classes = settings.grid, settings.mask_classes
    height, width = rows.stop - rows.start, cols.stop - cols.start
    filters_px = settings.filters_px
    scl_rows, scl_cols = _scl_slices(slices, settings)
    inner = (slice(rows.start - scl_rows.start, rows.stop - scl_rows.start),
             slice(cols.start - scl_cols.start, cols.stop - scl_cols.start))
    n_days = len(day_numbers)
    with DAY_LAYERS.take((n_days, height, width), np.float32) as days:
        started = np.zeros(n_days, dtype=bool)
        jobs, window_of = read_jobs(items, n_days, block_id, slices, settings)

        def start(job: tuple[int, AssetSource]) -> Callable[[], np.ndarray]:
            return _start(job[1].href, grid, window_of(job[1]), settings.policy)

        def cost(job: tuple[int, AssetSource]) -> int:
            return reader_for(job[1].href, grid).cost(window_of(job[1]))

        def claim(job: tuple[int, AssetSource]) -> Any:
            return WARM.claim(_warm_key(job[1].href, grid, window_of(job[1])), lambda: POOL.submit(start, job))

        got: dict[str, Any] = {}
        for (i, asset), finish in ordered_reads(jobs, start, cost, settings.read_ahead, claim=claim,
                                                on_started=on_started):
            if asset.band != "scl" and getattr(finish, "tiled", None) is not None:
                got[asset.band] = finish  # folded from its tiles where they lie, once the item's SCL is in
                continue
            data = finish()  # the tiles are decoded now (decode pool, one thread per core), not while in flight
            w = window_of(asset)
            if data.shape != (int(w.height), int(w.width)):
                raise RuntimeError(f"reader returned {data.shape} for a {int(w.height)} x {int(w.width)} window")
            got[asset.band] = data
            if asset.band != "scl":
                continue
            if filters_px:
                got["clear"] = filtered_clear(data, mask_classes, filters_px)[inner]
                got["scl"] = data[inner]
            src = items[i]
            _fold(days[src.day], not started[src.day], src, got, grid, rows, cols, mask_classes)
            started[src.day] = True
            del data
            for arr in got.values():
                if isinstance(arr, np.ndarray):
                    WINDOWS.give(arr)  # folded: the next item's windows reuse them
            got = {}
        if not started.all():
            days[~started] = np.nan
        out = RESULTS.get((settings.n_out, height, width), np.float32)
        reduce_days(days, settings.method, np.asarray(day_numbers, dtype=np.int64), out=out)
        return out


def _aoi_inside(aoi: Any, grid: OutputGrid, rows: slice, cols: slice) -> np.ndarray:
    """Pixels of the chunk whose centre is inside ``aoi`` (grid CRS): the AOI rule, see ndvi_scale.analytics.aoi."""
    from ..analytics.aoi import aoi_mask  # only runs with an AOI need shapely/rasterio's rasteriser

    res = grid.resolution
    left, top = grid.bounds[0] + cols.start * res, grid.bounds[3] - rows.start * res
    return aoi_mask(aoi, left, top, res, (rows.stop - rows.start, cols.stop - cols.start))


def _fold(
    layer: np.ndarray,
    first: bool,
    src: ItemSource,
    got: dict[str, np.ndarray],
    grid: OutputGrid,
    rows: slice,
    cols: slice,
    mask_classes: tuple[int, ...],
) -> None:
    """Fold one item into its day's layer, computing only on the part of the chunk its red and nir cover."""
    part = _covered(src, grid, rows, cols)
    if part is None:  # red or nir does not reach the chunk: the item observes nothing here
        if first:
            layer[:] = np.nan
        return
    pr, pc = part
    if first and (pr.start, pr.stop, pc.start, pc.stop) != (0, layer.shape[0], 0, layer.shape[1]):
        _fill_outside(layer, pr, pc)
    clear = got.get("clear")

    def fold(rect: tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]) -> None:
        (r0, r1, c0, c1), red, nir = rect
        ndvi_into(
            layer[r0:r1, c0:c1],
            red,
            nir,
            got["scl"][r0:r1, c0:c1],
            src.red_scale,
            src.red_offset,
            src.nir_scale,
            src.nir_offset,
            mask_classes,
            first=first,
            clear=clear[r0:r1, c0:c1] if clear is not None else None,
        )

    rects = _band_parts(got, pr, pc)
    try:
        if len(rects) > 1:  # disjoint rectangles of the layer: folded on every core (the last task runs alone)
            gather([DECODE_POOL.submit(fold, rect) for rect in rects])
        else:
            for rect in rects:
                fold(rect)
    finally:
        for band in ("red", "nir"):
            tiled = getattr(got[band], "tiled", None)
            if tiled is not None:
                tiled.release()


def _band_parts(
    got: dict[str, Any], pr: slice, pc: slice
) -> list[tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]]:
    """The rectangles (row0, row1, col0, col1) of the covered part ``pr`` x ``pc`` of the chunk, with their red and
    nir pixels: one per COG tile where red and nir are both read tile by tile on the same tiles (the tiles are
    folded where they lie), else the whole part from the two windows (a deferred read is finished now; one that
    fails to decode tile by tile too, which reads it again under the read policy)."""
    red, nir = got["red"], got["nir"]
    tr, tn = getattr(red, "tiled", None), getattr(nir, "tiled", None)
    rects = tr.rects() if tr is not None and tn is not None else None
    if tr is not None and tn is not None and rects == tn.rects():
        try:
            red_f, nir_f = tr.submit(), tn.submit()  # both bands' tiles in the decode pool at once
            pixels = zip(rects, gather(red_f), gather(nir_f), strict=True)
        except Exception as e:  # noqa: BLE001 - a corrupt tile: the finishers below decode and re-read it
            log.info("red/nir tiles did not decode (%s): finishing their windows, under the read policy", e)
            tr.release()
            tn.release()
        else:
            parts = []
            for (r0, r1, c0, c1), r, n in pixels:
                y0, y1, x0, x1 = max(r0, pr.start), min(r1, pr.stop), max(c0, pc.start), min(c1, pc.stop)
                if y0 < y1 and x0 < x1:
                    rows, cols = slice(y0 - r0, y1 - r0), slice(x0 - c0, x1 - c0)
                    parts.append(((y0, y1, x0, x1), _read_only(r[rows, cols]), _read_only(n[rows, cols])))
            return parts
    for band, value in (("red", red), ("nir", nir)):
        if getattr(value, "tiled", None) is not None:
            got[band] = value()  # its window (given back with the others once folded)
    return [((pr.start, pr.stop, pc.start, pc.stop), got["red"][pr, pc], got["nir"][pr, pc])]


def _covered(src: ItemSource, grid: OutputGrid, rows: slice, cols: slice) -> tuple[slice, slice] | None:
    """The part of the chunk (as slices relative to it) the red and nir rasters cover, or None.

    Exact where the readers know the raster's extent (the aligned path: the file was opened by the read);
    otherwise the whole chunk (the warped path: the read itself put the fill value outside the file).
    """
    r0, r1, c0, c1 = rows.start, rows.stop, cols.start, cols.stop
    for asset in (src.red, src.nir):
        extent = reader_for(asset.href, grid).coverage()
        if extent is None:
            continue
        r0, r1, c0, c1 = max(r0, extent[0]), min(r1, extent[1]), max(c0, extent[2]), min(c1, extent[3])
    if r0 >= r1 or c0 >= c1:
        return None
    return slice(r0 - rows.start, r1 - rows.start), slice(c0 - cols.start, c1 - cols.start)


def _fill_outside(layer: np.ndarray, rows: slice, cols: slice) -> None:
    """NaN in ``layer`` outside [rows, cols] (the margins only: the inside is about to be written)."""
    layer[: rows.start] = np.nan
    layer[rows.stop :] = np.nan
    layer[rows, : cols.start] = np.nan
    layer[rows, cols.stop :] = np.nan



def _read_only(view: np.ndarray) -> np.ndarray:
    """``view`` marked read-only: a tile of the tile cache is shared by the tasks of neighbouring chunks, and the
    fold only reads it (the compiled kernel takes read-only bands: :func:`ndvi_scale.kernel._numba_rows`)."""
    view.setflags(write=False)
    return view
