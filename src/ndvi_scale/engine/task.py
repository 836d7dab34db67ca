"""One (period, chunk): read every item's red, nir and scl window, fold its NDVI into the day layers, reduce.

This is the only per-pixel path of ndvi-scale. No uint16 stack of the period is made: reads are fetched in the
process's I/O pool (:mod:`ndvi_scale.engine.fetch`, many requests in flight, bounded read-ahead), finished
(decoded, on the engine's own COG path) in the task's thread when it is their turn, and each item is folded
into its day's float32 layer as soon as it is its turn (:func:`ndvi_scale.kernel.ndvi_into`: mask, NDVI,
same-day mosaic, first valid wins); then the days are reduced (:func:`ndvi_scale.kernel.reduce_days`). A task
holds the (days, y, x) float32 NDVI and the read-ahead windows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from rasterio import windows

from ..faults import ReadPolicy
from ..kernel import filter_reach, filtered_clear, ndvi_into, reduce_days
from .fetch import PREFETCH_POOL, READ_AHEAD_BYTES, ordered_reads
from .grid import OutputGrid
from .reader import reader_for
from .sources import AssetSource, ItemSource

__all__ = ["TASK_DAY_BYTES", "composite_block", "empty_block", "prefetch", "strip_rows"]


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
                PREFETCH_POOL.submit(reader_for(a.href, grid).coverage)


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


def composite_block(
    sources: Sequence[ItemSource],
    block_id: tuple[int, int, int],
    slices: tuple[slice, slice],
    *,
    grid: OutputGrid,
    day_numbers: Sequence[int],
    method: str,
    mask_classes: tuple[int, ...],
    n_out: int,
    policy: ReadPolicy,
    read_ahead: int = READ_AHEAD_BYTES,
    mask_filters: tuple[tuple[str, float], ...] = (),
    aoi: Any = None,
) -> np.ndarray:
    """The packed (1, n_out * height, width) float32 block of one period and chunk: value, count[, date].

    ``aoi`` (a polygon in the grid's CRS, or None for the whole chunk): pixels whose centre is outside it are NaN
    with count 0, set after the reduction (inside pixels are exactly those of a run without it); a chunk without
    any pixel centre inside reads nothing.

    Composited in strips of rows when its day layers would exceed :data:`TASK_DAY_BYTES` (same bytes: each
    pixel is reduced on its own). Raises as :func:`_composite_part`.
    """
    rows, cols = slices
    height, width = rows.stop - rows.start, cols.stop - cols.start
    inside = _aoi_inside(aoi, grid, rows, cols) if aoi is not None else None
    if inside is not None and not inside.any():
        return empty_block(n_out, height, width)
    step = strip_rows(len(day_numbers), height, width)

    def part(rows: slice) -> np.ndarray:
        return _composite_part(sources, block_id, (rows, cols), grid=grid, day_numbers=day_numbers, method=method,
                               mask_classes=mask_classes, n_out=n_out, policy=policy, read_ahead=read_ahead,
                               mask_filters=mask_filters)

    if step >= height:
        out = part(rows)
    else:
        out = np.empty((n_out, height, width), dtype=np.float32)
        for r0 in range(0, height, step):
            r1 = min(height, r0 + step)
            out[:, r0:r1] = part(slice(rows.start + r0, rows.start + r1))
    if inside is not None:
        outside = ~inside
        out[:, outside] = np.nan  # value and date layers
        out[1, outside] = 0  # valid_count
    return out.reshape(1, n_out * height, width)


def _composite_part(
    sources: Sequence[ItemSource],
    block_id: tuple[int, int, int],
    slices: tuple[slice, slice],
    *,
    grid: OutputGrid,
    day_numbers: Sequence[int],
    method: str,
    mask_classes: tuple[int, ...],
    n_out: int,
    policy: ReadPolicy,
    read_ahead: int = READ_AHEAD_BYTES,
    mask_filters: tuple[tuple[str, float], ...] = (),
) -> np.ndarray:
    """The (n_out, height, width) float32 layers of one period over the window ``slices`` (a chunk or a strip
    of one): value, count[, date].

    Days are visited from a start that differs between neighbouring chunks (``block_id`` = (period, i, j)):
    two tasks on adjacent chunks then read different items at a time, so a COG tile they share is inflated by
    one and found in the tile cache by the other, instead of both waiting for it at once. Each day's items are
    still folded in their own order (the mosaic rule: first valid wins), and each day has its own layer, so the
    result does not depend on the visiting order.

    ``mask_filters``: ``(op, metres)`` morphological filters of the cloud/shadow mask
    (:func:`ndvi_scale.kernel.filtered_clear`). The SCL is then read with the margin they reach (clipped to the
    grid), so the mask of the chunk is the mask of the whole grid cut to it: results do not depend on the chunk.

    Raises :class:`~ndvi_scale.faults.AssetReadError` (a read failed and ``policy`` does not skip) or
    :class:`~ndvi_scale.errors.ReadError`.
    """
    rows, cols = slices
    height, width = rows.stop - rows.start, cols.stop - cols.start
    window = windows.Window.from_slices(rows, cols)
    filters_px = tuple((op, float(metres) / grid.resolution) for op, metres in mask_filters)
    reach = filter_reach(filters_px)
    grid_h, grid_w = grid.shape
    # the SCL window: the chunk plus the filters' reach, inside the grid; (top, left) = the chunk's offset in it
    scl_rows = slice(max(0, rows.start - reach), min(grid_h, rows.stop + reach))
    scl_cols = slice(max(0, cols.start - reach), min(grid_w, cols.stop + reach))
    scl_window = windows.Window.from_slices(scl_rows, scl_cols)
    inner = (slice(rows.start - scl_rows.start, rows.stop - scl_rows.start),
             slice(cols.start - scl_cols.start, cols.stop - scl_cols.start))
    n_days = len(day_numbers)
    days = np.empty((n_days, height, width), dtype=np.float32)
    started = np.zeros(n_days, dtype=bool)
    by_day: list[list[int]] = [[] for _ in range(n_days)]
    for i, s in enumerate(sources):
        by_day[s.day].append(i)
    shift = (sum(block_id[1:]) * ((n_days + 1) // 2)) % n_days if n_days else 0
    order = [i for d in [*range(shift, n_days), *range(shift)] for i in by_day[d]]
    # The items whose red and nir metadata footprints reach the chunk; the others observe nothing here.
    reading = [i for i in order if sources[i].red.reaches(rows, cols) and sources[i].nir.reaches(rows, cols)]
    jobs = [(i, a) for i in reading for a in sources[i].assets]

    def window_of(job: tuple[int, AssetSource]) -> windows.Window:
        return scl_window if filters_px and job[1].band == "scl" else window

    def start(job: tuple[int, AssetSource]) -> Callable[[], np.ndarray]:
        return reader_for(job[1].href, grid).start(window_of(job), policy)

    def cost(job: tuple[int, AssetSource]) -> int:
        return reader_for(job[1].href, grid).cost(window_of(job))

    got: dict[str, np.ndarray] = {}
    for (i, asset), finish in ordered_reads(jobs, start, cost, read_ahead):
        data = finish()  # the tiles are decoded now (decode pool, one thread per core), not while in flight
        w = window_of((i, asset))
        if data.shape != (int(w.height), int(w.width)):
            raise RuntimeError(f"reader returned {data.shape} for a {int(w.height)} x {int(w.width)} window")
        got[asset.band] = data
        if asset.band != "scl":
            continue
        if filters_px:
            got["clear"] = filtered_clear(data, mask_classes, filters_px)[inner]
            got["scl"] = data[inner]
        src = sources[i]
        _fold(days[src.day], not started[src.day], src, got, grid, rows, cols, mask_classes)
        started[src.day] = True
        got = {}
    if not started.all():
        days[~started] = np.nan
    out = np.empty((n_out, height, width), dtype=np.float32)
    reduce_days(days, method, np.asarray(day_numbers, dtype=np.int64), out=out)
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
    ndvi_into(
        layer[pr, pc],
        got["red"][pr, pc],
        got["nir"][pr, pc],
        got["scl"][pr, pc],
        src.red_scale,
        src.red_offset,
        src.nir_scale,
        src.nir_offset,
        mask_classes,
        first=first,
        clear=got["clear"][pr, pc] if "clear" in got else None,
    )


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

