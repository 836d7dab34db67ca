"""Read and composite in one streamed pass per (period, spatial chunk): no uint16 stack is materialised.

:func:`fused_cube` is what :func:`ndvi_scale.pipeline.build` composites with (:func:`cube_layer` makes its
variables). It replaced ``da.map_blocks(kernel, stack.data, ...)`` over stackstac's stack (now the reference
of tests/test_reader.py), with the same chunks and the same values bit for bit: stackstac's
``fetch_raster_window`` builds the whole (items, 3, y, x) uint16 block of a period and chunk before the kernel
runs (12 items at 2048 px: 300 MB, page-faulted afresh by every task). Here each task reads one item at a
time (red, nir, scl windows, through the very Readers stackstac made for the stack: same URLs and signing,
``gdal_env``, ``errors_as_nodata`` and Reader class, e.g. :class:`~ndvi_scale.reader.FastReader`) and folds it
straight into the period's day layers (:func:`ndvi_scale.kernel.ndvi_into`). A task holds the (days, y, x)
float32 NDVI and three (y, x) windows: about 3x less memory than the stack, and no copy of it.

The graph is one reader-table task per period (opening nothing) plus ONE task per (period, chunk), like
stackstac's own reader table and ``fetch_raster_window`` layer: O(periods x chunks) whatever the number of
items, on any dask scheduler (readers pickle by URL and open lazily where they run).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from rasterio import windows

from .kernel import ndvi_into, reduce_days

__all__ = ["cube_layer", "fused_cube", "reader_table"]

_FETCH_PREFIX = "fetch_raster_window-"
_READERS_PREFIX = "asset_table_to_reader_and_window-"


def reader_table(stack: Any) -> da.Array:
    """stackstac's (time, band) object array of ``(Reader, asset window)`` (or None) behind ``stack``.

    Taken from the stack's own graph, so it is exactly what stackstac would read with. Raises ValueError when
    ``stack`` is not a plain ``stackstac.stack`` result (e.g. sliced or computed on after stacking).
    """
    graph = stack.data.dask
    fetch = [name for name in graph.layers if str(name).startswith(_FETCH_PREFIX)]
    if len(fetch) != 1 or stack.data.name != fetch[0]:
        raise ValueError("not a plain stackstac.stack() array: expected its fetch_raster_window layer on top")
    deps = [d for d in graph.dependencies[fetch[0]] if str(d).startswith(_READERS_PREFIX)]
    if len(deps) != 1:
        raise ValueError("stackstac's reader table was not found in the graph (another stackstac version?)")
    name = deps[0]
    sub = graph.cull_layers([name])
    chunks = stack.data.chunks[:2]
    return da.Array(sub, name, chunks=chunks, dtype=object, meta=np.empty((0, 0), dtype=object))


def fused_cube(
    stack: Any,
    plans: Sequence[Any | None],
    *,
    method: str,
    mask_classes: Sequence[int],
    n_out: int,
) -> da.Array:
    """(all periods, n_out * y, x) float32 composites of ``stack`` (time chunked by non-empty period, band =
    red, nir, scl): the ``n_out`` layers value, count[, date] of a (period, chunk) one under the other in its
    (1, n_out * height, width) block; :func:`cube_layer` takes a layer out. ``plans`` are the
    :class:`ndvi_scale.pipeline.Plan` ``plans``: one :class:`~ndvi_scale.pipeline.PeriodPlan` per period of
    the calendar, None where the period has no scene (its blocks are NaN, with count 0).

    Packed, not (periods, n_out, y, x): taking a layer out of a 4-d block drops an axis, and dask does not
    fuse such a blockwise step into the next one (the region write): the layers would cost one task per
    variable and block more. From packed blocks a layer is a blockwise row slice, which fuses: ``run()``
    writes a region in one task besides the composite's.

    ONE task per (period, chunk), plus ONE per non-empty period that makes the period's readers (fresh
    copies of stackstac's reader table for its items, which is made here: Reader objects only, nothing is
    opened or read). The chunks of a period take the readers as a dependency, as stackstac's fetch tasks
    do: a process holds ONE copy of them, shared by the chunks it runs (threads share it, a distributed
    worker receives it once per period, not once per task), opens each asset once, and drops the readers
    and their open datasets when the period's last chunk is done.

    Never embed the readers in the (period, chunk) tasks themselves: a distributed worker unpickles every
    task's spec on its own, so each task got a private copy of the readers that opened its own datasets,
    and the worker keeps a task's spec until the run's results are released. Its memory then grew with every
    task until dask paused it (80 % of its limit), for good: the run hung as soon as one worker had to run
    most of the tasks, e.g. after the other was killed (tests/test_pipeline_cluster.py). build()'s slicing
    and concatenation of the empty periods (2 more tasks per period and chunk) are not needed either.
    """
    live = [p for p in plans if p is not None]
    readers = reader_table(stack)
    chunks_t, chunks_b = readers.chunks
    if len(chunks_t) != len(live) or any(c != len(p.items) for c, p in zip(chunks_t, live, strict=True)):
        raise ValueError(f"time chunks {chunks_t} do not match the periods' item counts")
    if chunks_b != (3,):
        raise ValueError(f"band chunks {chunks_b}: expected red, nir, scl in one chunk")
    tables = _materialise(readers) if live else None  # Reader objects: no I/O
    starts = np.cumsum((0, *chunks_t))
    chunks_y, chunks_x = stack.data.chunks[2:]
    func = functools.partial(
        _composite_block,
        plans=tuple(live),
        method=method,
        mask_classes=tuple(int(c) for c in mask_classes),
        n_out=n_out,
    )
    key = [
        None
        if p is None
        else (p.day_index, p.day_numbers, p.red_scale, p.red_offset, p.nir_scale, p.nir_offset)
        for p in plans
    ]
    name = f"ndvi-composite-{method}-" + tokenize(
        readers.name, chunks_y, chunks_x, key, method, tuple(mask_classes), n_out
    )
    table_name = "ndvi-readers-" + name.removeprefix("ndvi-composite-")
    tables_dsk: dict[Any, Any] = {  # the readers in the spec are never opened: the task returns fresh copies
        (table_name, k): (_fresh_readers, tables[starts[k] : starts[k + 1]])  # type: ignore[index]
        for k in range(len(live))
    }
    ys = np.cumsum((0, *chunks_y))
    xs = np.cumsum((0, *chunks_x))
    dsk: dict[Any, Any] = {}
    k_live = 0
    for t, p in enumerate(plans):
        for i in range(len(chunks_y)):
            for j in range(len(chunks_x)):
                sl = (slice(int(ys[i]), int(ys[i + 1])), slice(int(xs[j]), int(xs[j + 1])))
                if p is None:
                    dsk[(name, t, i, j)] = (_empty_block, n_out, chunks_y[i], chunks_x[j])
                else:  # the period's readers by key (see above), never a copy in the task itself
                    dsk[(name, t, i, j)] = (func, (table_name, k_live), (k_live, i, j), sl)
        k_live += p is not None
    graph = HighLevelGraph({table_name: tables_dsk, name: dsk}, {table_name: set(), name: {table_name}})
    chunks = ((1,) * len(plans), tuple(n_out * c for c in chunks_y), chunks_x)
    return da.Array(graph, name, chunks=chunks, meta=np.empty((0, 0, 0), dtype=np.float32))


def cube_layer(
    cube: da.Array,
    index: int,
    n_out: int,
    dtype: Any = np.float32,
    convert: Callable[[np.ndarray], np.ndarray] | None = None,
) -> da.Array:
    """(periods, y, x) layer ``index`` of a :func:`fused_cube` of ``n_out`` layers, cast to ``dtype`` or
    through ``convert``.

    A blockwise row slice with the cast: ONE task per block, and one that dask fuses into the task that
    consumes it (``run()``'s region write), so a written region costs 2 tasks: the composite and the write.
    """
    chunks = (cube.chunks[0], tuple(c // n_out for c in cube.chunks[1]), cube.chunks[2])
    return da.map_blocks(
        functools.partial(_layer, index=index, n_out=n_out, dtype=np.dtype(dtype), convert=convert),
        cube,
        chunks=chunks,
        dtype=np.dtype(dtype),
        meta=np.empty((0, 0, 0), dtype=np.dtype(dtype)),
    )


def _layer(block: np.ndarray, index: int, n_out: int, dtype: np.dtype, convert: Any) -> np.ndarray:
    height = block.shape[1] // n_out
    layer = block[:, index * height : (index + 1) * height]
    return convert(layer) if convert is not None else layer.astype(dtype, copy=False)


def _materialise(readers: da.Array) -> np.ndarray:
    """The reader table's values, made here (stackstac's own functions on its asset table: Python objects,
    no I/O, milliseconds), without a trip through a scheduler: no tasks of a run go to planning."""
    from dask.core import get

    graph = dict(readers.__dask_graph__())
    blocks = get(graph, readers.__dask_keys__())
    return np.concatenate([np.concatenate(row, axis=1) for row in blocks], axis=0)


def _fresh_readers(table: np.ndarray) -> np.ndarray:
    """Unopened copies of a reader table's Readers (as a pickle round trip makes them: the Reader protocol's
    ``__getstate__``/``__setstate__``, no serialisation), with the same asset windows.

    The table in the graph stays unopened, so nothing is kept open by the graph once a period is done.
    """
    out = np.empty(table.shape, dtype=object)
    for idx, entry in np.ndenumerate(table):
        out[idx] = (copy.copy(entry[0]), entry[1]) if entry else entry
    return out


def _empty_block(n_out: int, height: int, width: int) -> np.ndarray:
    out = np.full((1, n_out, height, width), np.nan, dtype=np.float32)
    out[:, 1] = 0  # valid_count of an empty period is 0, not NaN
    return out.reshape(1, n_out * height, width)


def _composite_block(
    table: np.ndarray,
    block_id: tuple[int, ...],
    slices: tuple[slice, slice],
    *,
    plans: tuple[Any, ...],
    method: str,
    mask_classes: tuple[int, ...],
    n_out: int,
) -> np.ndarray:
    """One (period, chunk): read each item's red/nir/scl window and fold its NDVI into the day layers.

    Days are visited from a start that differs between neighbouring chunks (``block_id`` = (period, i, j)
    from :func:`fused_cube`): two threads on adjacent chunks then read different items at a time, so a COG
    tile they share is inflated by one and found in the tile cache by the other, instead of both waiting for
    it at once. Each day's items are still folded in their own order (the mosaic rule: first valid wins),
    and each day has its own layer, so the result does not depend on the visiting order.
    """
    p = plans[block_id[0]]
    window = windows.Window.from_slices(*slices)
    height, width = int(window.height), int(window.width)
    n_days = len(p.day_numbers)
    days = np.empty((n_days, height, width), dtype=np.float32)
    started = np.zeros(n_days, dtype=bool)
    by_day: list[list[int]] = [[] for _ in range(n_days)]
    for i, d in enumerate(p.day_index):
        by_day[d].append(i)
    shift = (sum(block_id[1:]) * ((n_days + 1) // 2)) % n_days if n_days else 0
    for d in [*range(shift, n_days), *range(shift)]:
        for i in by_day[d]:
            # Only the part of the window the item's red and nir reach is read and computed: outside it the
            # item observes nothing (its first item leaves the day NaN there; a later one has nothing to add).
            part = _covered(table[i, 0], table[i, 1], window)
            if part is None:  # no red or nir here: nothing observed by this item
                if not started[d]:
                    days[d] = np.nan
                    started[d] = True
                continue
            ph, pw = int(part.height), int(part.width)
            red, nir = (_read_window(table[i, b][0], part, ph, pw) for b in range(2))  # _covered tested them
            scl = _read(table[i, 2], part, ph, pw)
            rows = slice(int(part.row_off - window.row_off), int(part.row_off - window.row_off) + ph)
            cols = slice(int(part.col_off - window.col_off), int(part.col_off - window.col_off) + pw)
            layer = days[d]
            if not started[d] and (ph, pw) != (height, width):
                _fill_outside(layer, rows, cols)
            ndvi_into(
                layer[rows, cols],
                red,
                nir,
                scl if scl is not None else np.zeros((ph, pw), dtype=np.uint16),
                p.red_scale[i],
                p.red_offset[i],
                p.nir_scale[i],
                p.nir_offset[i],
                mask_classes,
                first=not started[d],
            )
            started[d] = True
    if not started.all():
        days[~started] = np.nan
    out = np.empty((1, n_out, height, width), dtype=np.float32)
    reduce_days(days, method, np.asarray(p.day_numbers, dtype=np.int64), out=out[0])
    return out.reshape(1, n_out * height, width)


def _covered(red: Any, nir: Any, window: windows.Window) -> windows.Window | None:
    """The part of ``window`` (output grid pixels) the red and nir rasters cover, or None if they do not
    both reach it.

    Cut to the rasters' exact extents only where the readers know them (the aligned fast path of
    :class:`~ndvi_scale.reader.FastReader`); otherwise the whole window, as stackstac reads it: stackstac's
    asset windows come from metadata (``proj:bbox``, or only the item's footprint bbox) and may be smaller
    than the raster, which is fine for its skip-or-read test but would drop valid pixels at the edge here.
    """
    if not red or not nir:
        return None
    if not all(windows.intersect(window, aw) for _, aw in (red, nir)):
        return None  # as stackstac: do not even open them
    r0, c0 = int(window.row_off), int(window.col_off)
    r1, c1 = r0 + int(window.height), c0 + int(window.width)
    for reader, _ in (red, nir):
        extent = reader.coverage() if hasattr(reader, "coverage") else None
        if extent is None:
            continue
        r0, r1, c0, c1 = max(r0, extent[0]), min(r1, extent[1]), max(c0, extent[2]), min(c1, extent[3])
    if r0 >= r1 or c0 >= c1:
        return None
    return windows.Window(c0, r0, c1 - c0, r1 - r0)


def _fill_outside(layer: np.ndarray, rows: slice, cols: slice) -> None:
    """NaN in ``layer`` outside [rows, cols] (the margins only: the inside is about to be written)."""
    layer[: rows.start] = np.nan
    layer[rows.stop :] = np.nan
    layer[rows, : cols.start] = np.nan
    layer[rows, cols.stop :] = np.nan


def _read(entry: Any, window: windows.Window, height: int, width: int) -> np.ndarray | None:
    """The asset's DN window (fill outside the asset), or None where the asset does not reach the window."""
    if not entry:
        return None
    reader, asset_window = entry
    if not windows.intersect(window, asset_window):  # as stackstac: do not even open it
        return None
    return _read_window(reader, window, height, width)


def _read_window(reader: Any, window: windows.Window, height: int, width: int) -> np.ndarray:
    """The reader's DN window (fill outside the asset)."""
    data = reader.read(window)
    if data.shape != (height, width):
        raise RuntimeError(f"reader returned {data.shape} for a {height} x {width} window")
    return data
