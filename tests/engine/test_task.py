"""The per-(period, chunk) task and its graph: the stack-then-reduce reference's numbers, bit for bit, in one task
per period and chunk, with many reads in flight."""

from __future__ import annotations

import threading
import time
from typing import Any

import dask
import numpy as np
import pytest
from helpers import bboxes, cfg, items_and_grid

from ndvi_scale import kernel
from ndvi_scale.engine.fetch import ordered_reads
from ndvi_scale.engine.reader import AssetReader, reader_for
from ndvi_scale.pipeline import build, make_plan, plan_grid
from ndvi_scale.sample import Truth
from ndvi_scale.testing.reference import clear_mask, mosaic_days, ndvi, reference_stack, stack_then_reduce


@pytest.mark.parametrize(("method", "chunk"), [("median", 64), ("max", 80), ("mean", 4096), ("q25", 64)])
def test_engine_equals_stack_then_reduce(sample, method, chunk):
    spec, catalog = sample
    c = cfg(catalog, bboxes(spec)["partly-outside"], chunk=chunk, method=method)
    ref = stack_then_reduce(c)
    got = build(c).compute(scheduler="threads", num_workers=2)
    np.testing.assert_array_equal(got.ndvi.values, ref["ndvi"])
    np.testing.assert_array_equal(got.valid_count.values, ref["valid_count"])
    if method == "max":
        days = got.max_date.values.astype("datetime64[D]").astype(np.int64).astype(np.float64)
        days[np.isnat(got.max_date.values)] = np.nan
        np.testing.assert_array_equal(days, ref["date"])
    assert (ref["valid_count"] > 0).any() and (ref["valid_count"] == 0).any()
    plan = make_plan(c)
    grid = plan_grid(plan)
    assert all(reader_for(b.href, grid).fast for p in plan.plans if p for it in p.items for b in it.bands.values())


@pytest.mark.parametrize("method", ["median", "max"])
def test_empty_periods_are_nan_with_count_0(sample, method):
    spec, catalog = sample
    # March has no acquisition: an empty period at the start of the calendar
    c = cfg(catalog, bboxes(spec)["across-overlap"], chunk=64, method=method, start="2024-03-01")
    got = build(c)
    plan = make_plan(c)
    assert plan.plans[0] is None and sum(p is not None for p in plan.plans) >= 2
    n_cp = len(plan.periods) * len(got.ndvi.chunks[1]) * len(got.ndvi.chunks[2])
    n_live = sum(p is not None for p in plan.plans)
    tasks = len(dict(dask.optimize(got)[0].__dask_graph__()))
    # 1 + one per variable per (period, chunk) and each non-empty period's sources: nothing else
    assert tasks <= (1 + len(got.data_vars)) * n_cp + n_live
    ref = stack_then_reduce(c)
    got = got.compute()
    np.testing.assert_array_equal(got.ndvi.values, ref["ndvi"])
    np.testing.assert_array_equal(got.valid_count.values, ref["valid_count"])
    assert np.isnan(got.ndvi.values[0]).all() and (got.valid_count.values[0] == 0).all()


def test_graph_is_one_task_per_period_and_chunk_carrying_specs_not_readers(sample):
    """A distributed worker unpickles each task's spec on its own and keeps it until the run's results are
    released: the tasks carry asset specs (hrefs), never reader objects or open files, and the specs of a period
    are one task its chunks share."""
    import cloudpickle

    spec, catalog = sample
    c = cfg(catalog, spec.bbox_lonlat(), chunk=64)
    plan = make_plan(c)
    live = [p for p in plan.plans if p]
    cube = build(c).ndvi.data
    graph = dict(dask.optimize(cube)[0].__dask_graph__())
    n_chunks = len(cube.chunks[1]) * len(cube.chunks[2])
    assert n_chunks > 1
    assert len(graph) <= len(plan.periods) * n_chunks * 2 + len(live)
    for task in graph.values():  # as distributed sends it
        blob = cloudpickle.dumps(task)
        assert b"AssetReader" not in blob and b"DatasetReader" not in blob


def test_reads_are_in_flight_together_and_folded_in_order():
    """ordered_reads keeps many reads running at once (a slow store's latency overlaps) but yields in order,
    within its memory budget; a failing read stops the rest."""
    active, peak, lock = 0, 0, threading.Lock()

    def read(job: int) -> int:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.02)
        with lock:
            active -= 1
        return job * 10

    out = list(ordered_reads(range(40), read, cost=lambda j: 1, budget=16))
    assert out == [(j, j * 10) for j in range(40)]
    assert 8 <= peak <= 17  # many at once, never more than the budget (+ the one being folded)
    out = list(ordered_reads(range(5), read, cost=lambda j: 100, budget=16))  # each over budget: one at a time
    assert [j for j, _ in out] == list(range(5))

    def failing(job: int) -> int:
        if job == 3:
            raise OSError("boom")
        return job

    got = []
    with pytest.raises(OSError, match="boom"):
        for j, _ in ordered_reads(range(10), failing, cost=lambda j: 1, budget=4):
            got.append(j)
    assert got == [0, 1, 2]


def test_a_task_keeps_many_requests_in_flight(sample, monkeypatch):
    """Reads of a (period, chunk) task run concurrently: with every read slowed down (a store 20 ms away), many of
    them overlap; one after the other, the peak would be 1."""
    spec, catalog = sample
    c = cfg(catalog, bboxes(spec)["partly-outside"], chunk=4096)
    active, peak, lock = 0, 0, threading.Lock()
    original = AssetReader._fetch_once  # the I/O half of a read (the decode half runs in the task's thread)

    def slow(self: Any, window: Any) -> Any:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.02)
        try:
            return original(self, window)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(AssetReader, "_fetch_once", slow)
    got = build(c).compute(scheduler="sync")  # one task at a time: the concurrency is the task's own
    assert peak >= 6, peak
    np.testing.assert_array_equal(got.ndvi.values, stack_then_reduce(c)["ndvi"])


# numba is optional: its engine is checked where it is installed; the numpy engine always runs.
@pytest.mark.parametrize("engine", ["numpy", *(["numba"] if kernel.NUMBA else [])])
def test_kernel_is_bit_identical_to_mask_ndvi_mosaic(sample, monkeypatch, engine):
    spec, catalog = sample
    c = cfg(catalog, spec.bbox_lonlat(), chunk=64)
    plan = make_plan(c)
    p = max((q for q in plan.plans if q), key=lambda q: len(q.items))  # a period with same-day granules
    assert len(set(p.day_index)) < len(p.items)  # two granules per day
    block = reference_stack(p.items, plan_grid(plan))
    per_item = np.stack([
        ndvi(block[i, 0], block[i, 1], p.red_scale[i], p.red_offset[i],
             clear_mask(block[i, 2], block[i, 0], block[i, 1], c.mask_classes), p.nir_scale[i], p.nir_offset[i])
        for i in range(block.shape[0])
    ])
    expected = mosaic_days(per_item, p.day_index)
    monkeypatch.setenv("NDVI_SCALE_NUMBA", "1" if engine == "numba" else "0")
    days = np.full_like(expected, 7.0)  # item by item, on layers that start as garbage
    seen: set[int] = set()
    for i, d in enumerate(p.day_index):
        kernel.ndvi_into(days[d], block[i, 0], block[i, 1], block[i, 2], p.red_scale[i], p.red_offset[i],
                         p.nir_scale[i], p.nir_offset[i], c.mask_classes, first=d not in seen)
        seen.add(d)
    assert np.array_equal(days, expected, equal_nan=True)
    assert np.isnan(days).any() and not np.isnan(days).all()


def test_composites_match_the_analytic_truth(sample):
    spec, catalog = sample
    c = cfg(catalog, spec.bbox_lonlat(), chunk=64, method="median")
    got = build(c).compute()
    X, Y = np.meshgrid(got.x.values, got.y.values)
    dates = spec.dates()
    for t, (t0, t1) in enumerate(zip(got.time.values, got.time_end.values, strict=True)):
        lo, hi = np.datetime64(t0, "D"), np.datetime64(t1, "D")
        sel = [d for d in dates if lo <= np.datetime64(d.date(), "D") <= hi]
        expected, counts = Truth.expected_composite(spec, X, Y, sel, method="median", mask_filters=c.mask_filters)
        np.testing.assert_array_equal(got.valid_count.values[t], counts)
        seen = counts > 0
        assert np.isnan(got.ndvi.values[t][~seen]).all()
        assert np.abs(got.ndvi.values[t][seen] - expected[seen]).max() < 0.01
    assert (got.valid_count.values > 0).mean() > 0.5


def test_warped_items_equal_the_reference(sample):
    """A grid in the neighbouring UTM zone: every asset is warped (nearest), same composites as the reference."""
    spec, catalog = sample
    c = cfg(catalog, bboxes(spec)["across-overlap"], chunk=64, crs="EPSG:32632")
    items, grid = items_and_grid(catalog, bboxes(spec)["across-overlap"], crs="EPSG:32632")
    got = build(c).compute()
    ref = stack_then_reduce(c)
    np.testing.assert_array_equal(got.ndvi.values, ref["ndvi"])
    np.testing.assert_array_equal(got.valid_count.values, ref["valid_count"])
    assert (ref["valid_count"] > 0).any()
    assert not any(reader_for(it.bands["red"].href, grid).fast for it in items)


@pytest.mark.parametrize("method", ["median", "max"])
def test_days_beyond_the_budget_are_composited_in_strips_with_the_same_bytes(sample, method, monkeypatch):
    from ndvi_scale.engine import task

    spec, catalog = sample
    c = cfg(catalog, bboxes(spec)["partly-outside"], chunk=80, method=method)
    ref = stack_then_reduce(c)
    calls: list[tuple[int, int]] = []
    part = task._composite_part

    def spy(items, block_id, slices, *args, **kw):
        calls.append((slices[0].start, slices[0].stop))
        return part(items, block_id, slices, *args, **kw)

    monkeypatch.setattr(task, "_composite_part", spy)
    monkeypatch.setattr(task, "STRIP_ROWS", 16)
    monkeypatch.setattr(task, "TASK_DAY_BYTES", 16 * 80 * 4 * 4)  # 4 days of a 16-row strip of an 80-px chunk
    lazy = build(c)
    regions = len(lazy.time) * len(lazy.ndvi.chunks[1]) * len(lazy.ndvi.chunks[2])
    got = lazy.compute(scheduler="threads", num_workers=2)
    np.testing.assert_array_equal(got.ndvi.values, ref["ndvi"])
    np.testing.assert_array_equal(got.valid_count.values, ref["valid_count"])
    strips = [r1 - r0 for r0, r1 in calls]
    assert max(strips) <= 16 and len(calls) > regions  # strips really happened


def test_strip_rows_budget():
    from ndvi_scale.engine.task import STRIP_ROWS, TASK_DAY_BYTES, strip_rows

    assert strip_rows(12, 2048, 2048) == 2048  # a month: 12 x 16 MB, whole
    year = strip_rows(73, 2048, 2048)  # a single-tile year at the default chunk: 1.2 GB otherwise
    assert year % STRIP_ROWS == 0 and 73 * year * 2048 * 4 <= TASK_DAY_BYTES and year == 512
    assert strip_rows(10_000, 2048, 2048) == STRIP_ROWS  # never below one tile row of strips


def test_mask_filters_chunked_equal_unchunked_and_the_reference(sample):
    """Filters reaching across chunk edges (opening 20 m + dilation 100 m: 14 px at 10 m, 64-px chunks): each chunk
    reads the SCL margin it needs, so chunked == unchunked == the whole-grid scipy reference, bit for bit."""
    spec, catalog = sample
    filters = [("opening", 20), ("dilation", 100)]
    box = bboxes(spec)["partly-outside"]
    chunked = build(cfg(catalog, box, chunk=64, mask_filters=filters)).compute(scheduler="threads", num_workers=2)
    whole = build(cfg(catalog, box, chunk=4096, mask_filters=filters)).compute(scheduler="threads", num_workers=2)
    assert len(build(cfg(catalog, box, chunk=64)).ndvi.chunks[2]) > 1
    np.testing.assert_array_equal(chunked.ndvi.values, whole.ndvi.values)
    np.testing.assert_array_equal(chunked.valid_count.values, whole.valid_count.values)
    ref = stack_then_reduce(cfg(catalog, box, chunk=64, mask_filters=filters))
    np.testing.assert_array_equal(chunked.ndvi.values, ref["ndvi"])
    np.testing.assert_array_equal(chunked.valid_count.values, ref["valid_count"])
    plain = build(cfg(catalog, box, chunk=64, mask_filters=())).compute()
    # the dilation masked observations (the opening may give back a few: specks of soil flagged as cloud)
    assert (plain.valid_count.values > chunked.valid_count.values).any()
    assert plain.valid_count.values.sum() > chunked.valid_count.values.sum()


def test_tasks_give_back_every_window_and_reuse_their_buffers(sample, monkeypatch):
    """The readers' windows and the day layers come from pools the tasks give them back to: after a run nothing
    is still lent, a second run allocates no new window, and the numbers do not change (buffers are reused
    dirty: every pixel is written before it is read)."""
    from ndvi_scale.engine.task import DAY_LAYERS, IDLE, release_buffers
    from ndvi_scale.engine.tiles import RESULTS, WINDOWS, _unreferenced

    monkeypatch.setattr(IDLE, "seconds", 3600.0)  # no idle release between the two runs, however slow CI is
    spec, catalog = sample
    c = cfg(catalog, bboxes(spec)["partly-outside"], chunk=64, method="median")
    release_buffers()
    first = build(c).compute(scheduler="threads", num_workers=2)
    assert len(WINDOWS._lent) == 0 and WINDOWS._free and DAY_LAYERS._free
    kept = {id(b) for b in WINDOWS._free}
    free_results = [RESULTS._bufs[i] for i in range(len(RESULTS._bufs)) if _unreferenced(RESULTS._bufs, i)]
    assert free_results  # the result blocks' buffers, free once dask dropped the blocks
    for buf in [*WINDOWS._free, *DAY_LAYERS._free, *free_results]:
        buf.fill(0x7F)  # garbage from an earlier task (3.4e38 as float32) must not reach the result
    second = build(c).compute(scheduler="synchronous")
    assert {id(b) for b in WINDOWS._free} <= kept  # no new window buffer was needed
    np.testing.assert_array_equal(first.ndvi.values, second.ndvi.values)
    np.testing.assert_array_equal(first.valid_count.values, second.valid_count.values)
    np.testing.assert_array_equal(first.ndvi.values, stack_then_reduce(c)["ndvi"])
    release_buffers()
    assert WINDOWS._free == [] and DAY_LAYERS._free == [] and RESULTS._bufs == []


def test_buffers_are_given_back_once_the_engine_is_idle(sample, monkeypatch):
    """build(cfg).compute() (a notebook: no pipeline.run to release them at its end) leaves day layers, windows
    and cached tiles behind for the next task; once no task has run for IDLE.seconds they are given back, the
    tile cache's counters kept. Tasks running keep them."""
    from ndvi_scale.engine.task import DAY_LAYERS, IDLE, release_buffers
    from ndvi_scale.engine.tiles import SCRATCH, TILE_CACHE, WINDOWS

    spec, catalog = sample
    c = cfg(catalog, bboxes(spec)["partly-outside"], chunk=64, method="median")
    release_buffers()
    monkeypatch.setattr(IDLE, "seconds", 3600.0)
    first = build(c).compute(scheduler="threads", num_workers=2)
    # the tiles every chunk has taken have left the cache: their buffers are kept for the next tiles
    assert WINDOWS._free and DAY_LAYERS._free and (TILE_CACHE.nbytes > 0 or TILE_CACHE._spare)
    with IDLE.busy():  # a task runs: an idle time that has passed must not release
        monkeypatch.setattr(IDLE, "seconds", 0.05)
        time.sleep(0.3)
        assert WINDOWS._free and DAY_LAYERS._free
    counted = TILE_CACHE.hits + TILE_CACHE.waits + TILE_CACHE.misses
    deadline = time.monotonic() + 10
    while (WINDOWS._free or DAY_LAYERS._free or TILE_CACHE.nbytes or TILE_CACHE._spare
           ) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert WINDOWS._free == [] and DAY_LAYERS._free == [] and SCRATCH._free == []
    assert TILE_CACHE.nbytes == 0 and TILE_CACHE._spare == []
    assert TILE_CACHE.hits + TILE_CACHE.waits + TILE_CACHE.misses == counted
    again = build(c).compute(scheduler="threads", num_workers=2)  # allocates afresh: same numbers
    np.testing.assert_array_equal(first.ndvi.values, again.ndvi.values)
    np.testing.assert_array_equal(first.valid_count.values, again.valid_count.values)


def test_idle_release_waits_for_the_last_task_and_counts_from_its_end():
    from ndvi_scale.engine.task import IdleRelease

    released = []
    idle = IdleRelease(lambda: released.append(time.monotonic()), 0.2)
    with idle.busy():
        with idle.busy():
            pass
        time.sleep(0.3)  # the inner task ended 0.3 s ago, but the outer one still runs
        assert released == []
    ended = time.monotonic()
    with idle.busy():  # a task right after: the timer armed above must not fire 0.2 s after the first end
        pass
    time.sleep(0.1)
    with idle.busy():
        pass
    last = time.monotonic()
    deadline = time.monotonic() + 5
    while not released and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(released) == 1 and released[0] >= last + 0.2 - 0.01 and released[0] > ended + 0.2
    time.sleep(0.4)
    assert len(released) == 1  # once per idle spell


def test_red_and_nir_are_folded_from_their_tiles_where_they_lie(sample, monkeypatch):
    """Own-tile reads of red and nir are not pasted into windows: the fold reads each COG tile where it was
    decoded (or cached), rectangle by rectangle; same numbers as the reference. A tile that does not decode
    there falls back to the window, decoded and read again under the read policy: same numbers again."""
    from ndvi_scale.engine import owntiles

    spec, catalog = sample
    c = cfg(catalog, bboxes(spec)["partly-outside"], chunk=64, method="median")
    want = stack_then_reduce(c)
    submitted = []
    submit = owntiles.TiledRead.submit

    def counting(self):
        submitted.append(len(self.rects()))
        return submit(self)

    monkeypatch.setattr(owntiles.TiledRead, "submit", counting)
    got = build(c).compute(scheduler="threads", num_workers=2)
    assert submitted
    if spec.blocksize < 64:  # COG tiles smaller than the chunk: items folded from several tiles each
        assert max(submitted) > 1
    np.testing.assert_array_equal(got.ndvi.values, want["ndvi"])
    np.testing.assert_array_equal(got.valid_count.values, want["valid_count"])
    assert len(owntiles.TILE_BUFFERS._lent) == 0  # every decode buffer given back

    failures = []

    def failing(self):
        if len(failures) < 5:
            failures.append(1)
            raise ValueError("corrupt tile (test)")
        return submit(self)

    monkeypatch.setattr(owntiles.TiledRead, "submit", failing)
    again = build(c).compute(scheduler="threads", num_workers=2)
    assert len(failures) == 5
    np.testing.assert_array_equal(again.ndvi.values, want["ndvi"])
    np.testing.assert_array_equal(again.valid_count.values, want["valid_count"])
