"""The graph: ONE task per (period, chunk), plus one small task per non-empty period holding its asset specs.

O(periods x chunks) tasks whatever the number of items, on any Dask scheduler. Tasks carry asset specs
(:class:`~ndvi_scale.engine.sources.ItemSource`: hrefs, footprints, scale/offset), never reader objects: readers
and open files live in the worker process (:func:`ndvi_scale.engine.reader.reader_for`), made on first use and
shared by every task that reads the asset there.

The specs of a period are one task the chunk tasks depend on, not a copy in every chunk task: a distributed worker
unpickles each task's spec on its own and keeps it until the run's results are released, so per-task copies grew
a worker's memory with every task until dask paused it for good (tests/test_pipeline_cluster.py kills a worker
and checks the run finishes). That task also starts the period's header reads in the I/O pool.

The output is packed: the ``n_out`` layers (value, count[, date]) of a (period, chunk) one under the other in a
(1, n_out * height, width) float32 block; :func:`cube_layer` takes a layer out as a blockwise row slice, which dask
fuses into the task that consumes it (the region write): a written region costs 2 tasks, the composite and the
write. Taking a layer out of a 4-d block would drop an axis, which dask does not fuse.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import shapely
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from ..faults import ReadPolicy
from .grid import OutputGrid
from .sources import ItemSource
from .task import (
    PeriodReads,
    TaskSettings,
    composite_block,
    empty_block,
    expect_reads,
    prefetch,
    prepare_day_layers,
    release_buffers,
    warm_next,
)
from .tiles import RESULTS

log = logging.getLogger(__name__)

__all__ = ["PeriodSources", "composite_cube", "cube_layer", "release_buffers", "start_reading"]


@dataclass(frozen=True)
class PeriodSources:
    """What one non-empty period reads."""

    items: tuple[ItemSource, ...]
    """Its items, in fold order within each day (the first valid observation of a day wins)."""
    day_numbers: tuple[int, ...]
    """Per day of the period with a scene: days since 1970-01-01 (for the date of the max/min)."""


def composite_cube(
    periods: Sequence[PeriodSources | None],
    grid: OutputGrid,
    chunk: int,
    *,
    method: str,
    mask_classes: Sequence[int],
    n_out: int,
    policy: ReadPolicy,
    mask_filters: Sequence[tuple[str, float]] = (),
    aoi: Any = None,
) -> da.Array:
    """(periods, n_out * y, x) float32 packed composites of every period (None: no scene, NaN and count 0).

    ``mask_filters``: ``(op, metres)`` filters of the cloud/shadow mask (:func:`~.task.composite_block`).
    ``aoi``: a polygon in the grid's CRS (None: everything). A chunk it does not reach is an empty block (no task
    reads it, its header reads are not started); a chunk it covers wholly is computed as without it; the others
    get the AOI's part that reaches them and mask after the reduction (:func:`composite_block`).
    """
    chunks_y, chunks_x = grid.chunks(chunk)
    all_windows = list(grid.windows(chunk))
    pieces = _aoi_pieces(aoi, grid, all_windows)
    windows = [w for w in all_windows if pieces.get((w[0], w[1]), True) is not False]
    mask_classes = tuple(int(c) for c in mask_classes)
    filters = tuple((str(op), float(metres)) for op, metres in mask_filters)
    aoi_token = None if aoi is None else shapely.to_wkb(aoi)
    # The periods' specs hashed as one pickle: dask's tokenize walks every dataclass field of 10^4-10^5 specs
    # (~2 s at 8 x 8 tiles x 73 dates); their pickle is plain values, the same bytes for the same specs.
    specs = hashlib.sha256(pickle.dumps(list(periods), protocol=5)).hexdigest()
    token = tokenize(grid, chunk, specs, method, mask_classes, n_out, policy, aoi_token, filters)
    name = f"ndvi-composite-{method}-{token}"
    table_name = f"ndvi-sources-{token}"
    table: dict[Any, Any] = {}
    dsk: dict[Any, Any] = {}
    k = 0
    live = [(t, p) for t, p in enumerate(periods) if p is not None]
    outside = [w for w in all_windows if pieces.get((w[0], w[1]), True) is False]
    settings = TaskSettings(grid=grid, method=method, mask_classes=mask_classes, n_out=n_out, policy=policy,
                            mask_filters=filters)
    chunk_windows = tuple(windows)
    for t, p in enumerate(periods):
        for i, j, _ in outside:
            dsk[(name, t, i, j)] = (empty_block, n_out, chunks_y[i], chunks_x[j])
        if p is None:
            for i, j, _ in windows:
                dsk[(name, t, i, j)] = (empty_block, n_out, chunks_y[i], chunks_x[j])
            continue
        nxt = live[k + 1] if k + 1 < len(live) else None
        table[(table_name, k)] = (_period_sources, settings, token, t, p, nxt, chunk_windows)
        for i, j, sl in windows:
            piece = pieces.get((i, j))
            dsk[(name, t, i, j)] = (composite_block, (table_name, k), (t, i, j), sl, piece)
        k += 1
    graph = HighLevelGraph({table_name: table, name: dsk}, {table_name: set(), name: {table_name}})
    chunks = ((1,) * len(periods), tuple(n_out * c for c in chunks_y), chunks_x)
    return da.Array(graph, name, chunks=chunks, meta=np.empty((0, 0, 0), dtype=np.float32))


def _aoi_pieces(aoi: Any, grid: OutputGrid, windows: Sequence[tuple[int, int, tuple[slice, slice]]]) -> dict[
    tuple[int, int], Any
]:
    """Per chunk (i, j) the part of ``aoi`` its task needs: ``False`` where the AOI does not reach the chunk,
    no entry where it covers the chunk wholly, else the AOI clipped to the chunk (each task carries its own
    small piece, not the whole polygon)."""
    if aoi is None:
        return {}
    shapely.prepare(aoi)
    left, top, res = grid.bounds[0], grid.bounds[3], grid.resolution
    out: dict[tuple[int, int], Any] = {}
    for i, j, (rows, cols) in windows:
        box = shapely.box(left + cols.start * res, top - rows.stop * res, left + cols.stop * res,
                          top - rows.start * res)
        if not shapely.intersects(aoi, box):
            out[(i, j)] = False
        elif not shapely.contains(aoi, box):
            # Polygonal parts only: where the AOI merely touches the chunk, the intersection holds lines or
            # points, which a rasteriser would burn as pixels.
            parts = [g for g in shapely.get_parts(shapely.get_parts(shapely.intersection(aoi, box)))
                     if shapely.get_type_id(g) == 3]
            out[(i, j)] = shapely.multipolygons(parts) if parts else False
    return out


def _period_sources(
    settings: TaskSettings,
    run: str,
    t: int,
    period: PeriodSources,
    after: tuple[int, PeriodSources] | None,
    chunk_windows: tuple[tuple[int, int, tuple[slice, slice]], ...],
) -> PeriodReads:
    """The period's reads for its chunk tasks. Starts, without waiting, the header reads of this period and of the
    next one (``after``): the write stage computes period after period, so the next period's files are open by the
    time its chunks start, instead of every period starting with a round trip per file."""
    grid = settings.grid
    slices = tuple(s for _, _, s in chunk_windows)
    prefetch(period.items, grid, slices)
    nxt = None
    if after is not None:
        prefetch(after[1].items, grid, slices)
        nxt = PeriodReads(settings, run, after[0], after[1].items, after[1].day_numbers, chunk_windows)
        expect_reads(nxt)
    reads = PeriodReads(settings, run, t, period.items, period.day_numbers, chunk_windows, nxt)
    expect_reads(reads)
    return reads


def start_reading(cube: da.Array) -> bool:
    """Start the reads of the first period of ``cube`` (a :func:`composite_cube`, or an array made from one) now,
    without waiting: its files' headers, the first reads of its first chunks (:func:`~.task.warm_next`) and the
    memory of their day layers (:func:`~.task.prepare_day_layers`). The write stage calls it before it writes
    the cube's template, so the first tasks find their reads under way. Returns False when ``cube`` has no
    period with scenes (nothing started)."""
    import dask.local

    layers = getattr(cube.__dask_graph__(), "layers", {})  # a HighLevelGraph: composite_cube made one
    for name, layer in layers.items():
        if name.startswith("ndvi-sources-") and (name, 0) in layer:
            # Outside the scheduler, so without the active dask callbacks: not a task of the run (the graph's own
            # sources task computes the same again, cheaply: its files' headers are known by then).
            period = dask.local.get_sync({(name, 0): layer[(name, 0)]}, (name, 0), callbacks=())
            try:
                warm_next(period, decode=True)  # no task runs yet: the idle cores decode them too
                prepare_day_layers(period)
            except Exception as e:  # noqa: BLE001 - an optimisation: the tasks make their reads themselves
                log.debug("warming the first chunks failed: %s", e)
            return True
    return False


def cube_layer(
    cube: da.Array,
    index: int,
    n_out: int,
    dtype: Any = np.float32,
    convert: Callable[[np.ndarray], np.ndarray] | None = None,
) -> da.Array:
    """(periods, y, x) layer ``index`` of a :func:`composite_cube` of ``n_out`` layers, cast to ``dtype`` or
    through ``convert``: a blockwise row slice with the cast, ONE task per block, fused into its consumer."""
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
    if convert is not None:
        return convert(layer)
    if layer.dtype == dtype:
        return layer
    out = RESULTS.get(layer.shape, dtype)  # e.g. valid_count as uint16: memory of an earlier region's, not fresh
    np.copyto(out, layer, casting="unsafe")
    return out
