"""End to end on a tiny synthetic catalog: composites vs the generator's truth."""

from __future__ import annotations

import datetime as dt
import json

import dask
import numpy as np
import pytest
import rioxarray  # noqa: F401  (the .rio accessor)
import xarray as xr

from ndvi_scale.composite import periods_between
from ndvi_scale.config import RunConfig
from ndvi_scale.errors import NoScenesError
from ndvi_scale.pipeline import build, make_plan, run
from ndvi_scale.sample import SampleSpec, Truth, generate

SPEC = SampleSpec(size=128, blocksize=128, start=dt.date(2024, 4, 1), end=dt.date(2024, 6, 10))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sample")
    generate(root, SPEC)
    return root / "items.json"


def _cfg(tiny, **kw):
    w, s, e, n = SPEC.bbox_lonlat()
    base = dict(bbox=(w, s, e, n), start="2024-04-01", end="2024-06-10", catalog=str(tiny), chunk=64)
    base.update(kw)
    return RunConfig.create(**base)


def _expected(ds, method, mask_filters=RunConfig.mask_filters):
    X, Y = np.meshgrid(ds.x.values, ds.y.values)
    dates = SPEC.dates()
    vals, counts = [], []
    for t0, t1 in zip(ds.time.values, ds.time_end.values, strict=True):
        lo, hi = np.datetime64(t0, "D"), np.datetime64(t1, "D")
        sel = [d for d in dates if lo <= np.datetime64(d.date(), "D") <= hi]
        v, c = Truth.expected_composite(SPEC, X, Y, sel, method=method, mask_filters=mask_filters)
        vals.append(v)
        counts.append(c)
    return np.stack(vals), np.stack(counts)


def _never_compute():
    def fail(*args, **kwargs):
        raise AssertionError("the graph was computed while it should stay lazy")

    return dask.config.set(scheduler=fail)


@pytest.mark.parametrize("method", ["median", "mean", "max"])
def test_composite_matches_truth(tiny, method):
    cfg = _cfg(tiny, method=method)
    with _never_compute():
        ds = build(cfg)  # building reads no pixel
    assert ds.ndvi.dtype == np.float32
    assert ds.sizes["time"] == 3 and list(ds.time.dt.month.values) == [4, 5, 6]
    got = ds.compute()
    expected, counts = _expected(got, method)
    np.testing.assert_array_equal(got.valid_count.values, counts)  # no cloud/shadow/nodata leak, nothing lost
    seen = counts > 0
    assert seen.mean() > 0.5 and (~seen).any()  # the sample really has holes and data
    assert np.isnan(got.ndvi.values[~seen]).all()
    err = np.abs(got.ndvi.values[seen] - expected[seen])
    assert err.max() < 0.01, f"max |composite - truth| = {err.max():.4f}"
    if method == "max":
        # the date of the maximum is an acquisition day of its period whose truth NDVI is the maximum
        assert got.max_date.dtype.kind == "M"
        md = got.max_date.values
        assert np.isnat(md[~seen]).all() and not np.isnat(md[seen]).any()
        X, Y = np.meshgrid(got.x.values, got.y.values)
        for t in range(got.sizes["time"]):
            for day in np.unique(md[t][seen[t]]):
                at = (md[t] == day) & seen[t]
                when = dt.datetime.fromisoformat(str(day.astype("datetime64[D]")))
                assert np.abs(Truth.apparent_ndvi(SPEC, X[at], Y[at], when) - got.ndvi.values[t][at]).max() < 0.01


def test_pre_and_post_baseline_give_the_same_ndvi(tiny):
    ds = build(_cfg(tiny, method="mean")).compute()
    X, Y = np.meshgrid(ds.x.values, ds.y.values)
    april, may = SPEC.dates()[1], SPEC.dates()[-3]
    assert SPEC.baseline(april) < "04.00" <= SPEC.baseline(may)
    constant = np.isclose(Truth.ndvi(SPEC, X, Y, april), Truth.ndvi(SPEC, X, Y, may), atol=1e-9)
    both = constant & (ds.valid_count[0].values > 0) & (ds.valid_count[1].values > 0)
    # only pixels whose composites the SCL's errors left alone (the truth says which)
    expected, _ = _expected(ds, "mean")
    for t, when in ((0, april), (1, may)):
        both &= np.abs(expected[t] - Truth.ndvi(SPEC, X, Y, when)) < 1e-6
    assert both.sum() > 100
    diff = np.abs(ds.ndvi[0].values - ds.ndvi[1].values)[both]
    assert diff.max() < 0.01


def test_graph_size_does_not_grow_with_items(tiny):
    cfg = _cfg(tiny)
    plan = make_plan(cfg)
    ds = build(cfg, plan)
    n_items = sum(len(p.items) for p in plan.plans if p)
    chunks = len(ds.ndvi.chunks[1]) * len(ds.ndvi.chunks[2])
    tasks = len(dict(ds.ndvi.data.__dask_graph__()))
    # reads + kernel + slicing per (period, chunk) and a few table tasks: far fewer than items x chunks
    assert tasks <= 6 * chunks * len(plan.periods) + 10
    assert tasks < n_items * chunks


@pytest.mark.parametrize("method", ["median", "max"])
def test_a_run_runs_two_tasks_per_region_and_one_per_period(tiny, tmp_path, method):
    """What the scheduler runs for run(): per (period, chunk) the composite and the region write (the layer
    casts fused into it, whatever the number of variables), plus one reader table per period; nothing at
    planning or publishing time. Counted with a dask callback, as benchmarks/ does."""
    from dask.callbacks import Callback

    ran: list[str] = []

    class Count(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            ran.append(key[0] if isinstance(key, tuple) else key)

    cfg = _cfg(tiny, out=str(tmp_path / "cube.zarr"), chunk=64, method=method)
    plan = make_plan(cfg)
    with dask.config.set(scheduler="threads"), Count():
        run(cfg)
    ds = xr.open_zarr(tmp_path / "cube.zarr")
    n_chunks = len(ds.ndvi.chunks[1]) * len(ds.ndvi.chunks[2])
    live = sum(p is not None for p in plan.plans)
    assert n_chunks > 1 and live > 1
    assert len(ran) <= 2 * n_chunks * len(plan.periods) + live, sorted(set(ran))
    np.testing.assert_array_equal(ds.ndvi.values, build(cfg).ndvi.values)  # and it wrote the composite


def test_zarr_output_has_crs_count_and_provenance(tiny, tmp_path):
    out = tmp_path / "cube.zarr"
    cfg = _cfg(tiny, out=str(out))
    run(cfg)
    ds = xr.open_zarr(out, decode_coords="all")
    assert ds.rio.crs.to_epsg() == SPEC.epsg
    assert set(ds.data_vars) >= {"ndvi", "valid_count"}
    assert ds.valid_count.dtype == np.uint16
    items = json.loads(ds.attrs["ndvi_scale_items"])
    assert {it["processing_baseline"] for it in items} == {"03.01", "05.10"}
    assert {it["red"]["offset"] for it in items} == {0.0, -0.1}
    assert json.loads(ds.attrs["ndvi_scale_config"])["method"] == "median"
    ref = build(cfg).compute()
    np.testing.assert_array_equal(ds.ndvi.values, ref.ndvi.values)


def test_no_scene_in_range(tiny):
    with pytest.raises(NoScenesError, match="no Sentinel-2 L2A scenes found"):
        make_plan(_cfg(tiny, start="2023-01-01", end="2023-01-31"))


def test_periods_are_calendar_months():
    assert len(periods_between(dt.date(2024, 4, 1), dt.date(2024, 6, 10), "month")) == 3


def _readers_alive() -> tuple[int, int]:
    """(Reader objects, open rasterio datasets) alive in this process (run on a dask worker)."""
    import gc

    import rasterio.io

    from ndvi_scale.engine.reader import AssetReader

    gc.collect()
    objs = gc.get_objects()
    readers = sum(isinstance(o, AssetReader) for o in objs)
    return readers, sum(isinstance(o, rasterio.io.DatasetReader) and not o.closed for o in objs)


def test_a_distributed_worker_keeps_no_reader_per_task(tiny):
    """On a real worker process, with every result held (as write_cube holds its regions until the end): one
    reader per asset for the whole process, never one per task, and open files within the handle pool's cap.
    Once, each (period, chunk) task carried its own copy of the period's readers, which opened their own
    datasets and stayed alive with the task: memory grew with every task until dask paused the worker for good
    (a killed worker's share then hung the run)."""
    from distributed import Client, LocalCluster, wait

    from ndvi_scale.engine.handles import MAX_OPEN

    cfg = _cfg(tiny)
    plan = make_plan(cfg)
    ds = build(cfg, plan)
    n_chunks = len(ds.ndvi.chunks[1]) * len(ds.ndvi.chunks[2])
    n_readers = 3 * sum(len(p.items) for p in plan.plans if p)  # one reader per asset
    assert n_chunks >= 4
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        futures = client.compute([ds.ndvi.data, ds.valid_count.data])
        wait(futures)
        ((readers, datasets),) = client.run(_readers_alive).values()
        ndvi, count = (f.result() for f in futures)
    # Embedded in every task, the readers were n_chunks x n_readers, most of them with open datasets. Now the
    # process has one reader per asset (a handle per asset at most, one task at a time), whatever the tasks.
    assert 0 < readers <= n_readers and datasets <= min(n_readers, MAX_OPEN), (readers, datasets)
    ref = build(cfg, plan).compute()
    np.testing.assert_array_equal(ndvi, ref.ndvi.values)
    np.testing.assert_array_equal(count, ref.valid_count.values)


def test_default_mask_filters_cut_the_contamination_the_truth_knows(tiny):
    """End to end on the realistic sample: the share of composite pixels off the truth by > 0.02 (the SCL's errors
    leaking in), measured by the truth's contamination flags, drops with the default filters; what they cost in
    clear observations stays small; the oracle's idea of the mask agrees with every pixel's valid_count."""
    from ndvi_scale.config import DEFAULT_MASK_CLASSES
    from ndvi_scale.testing.quality import QualityRun, composite_quality

    runs = {
        name: QualityRun(build(_cfg(tiny, mask_filters=f)).compute(), "median", f)
        for name, f in (("none", ()), ("default", RunConfig.mask_filters))
    }
    q = composite_quality(SPEC, runs, DEFAULT_MASK_CLASSES)
    assert q["none"]["count_mismatch"] == 0 and q["default"]["count_mismatch"] == 0
    assert q["none"]["dirty_kept"] > 0.005  # the SCL lets contamination through
    assert q["none"]["contaminated"] > 0.005
    assert q["default"]["contaminated"] < q["none"]["contaminated"] / 3
    assert q["default"]["dirty_kept"] < q["none"]["dirty_kept"] / 3
    assert q["default"]["lost"] < 0.15
