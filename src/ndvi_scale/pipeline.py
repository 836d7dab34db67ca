"""The pipeline: search -> load -> mask -> index -> composite -> write. This module alone knows the order.

The per-pixel work is fused into ONE task per (period, spatial chunk) (:mod:`ndvi_scale.engine`): it reads the
items of the period for that chunk with many reads in flight (time-contiguous, no shuffle) and folds each into the
period's day layers: mask, NDVI, same-day mosaic; then reduces over time. The
graph therefore has O(periods x chunks) tasks whatever the number of items, and no task ever holds more than one
period of one chunk (never its uint16 stack). Reads follow a :class:`~ndvi_scale.faults.ReadPolicy` (retries, then
fail naming the assets, or skip and record them in the output).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import rioxarray  # noqa: F401  (registers the .rio accessor used to write the CRS)
import xarray as xr

from . import cf
from .composite import EXTRA_OUTPUTS, Period, assign_periods, periods_between
from .config import RunConfig, check_grid_extent
from .engine.graph import PeriodSources, composite_cube, cube_layer, release_buffers, start_reading
from .engine.grid import OutputGrid, output_grid
from .engine.sources import item_source
from .errors import InputError
from .faults import FaultLog, ReadPolicy, clean_href, describe_summary, scrub_value
from .items import S2Item
from .load import choose_epsg, sign_items, signers, with_crs_from_cog
from .mask import SCL_CLASSES
from .search import SearchResult, search
from .sizing import RunEstimate, check_size, estimate
from .write import WriteReport

_EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True)
class PeriodPlan:
    """The items of one non-empty period, with what the kernel needs to know about each."""

    period: Period
    items: tuple[S2Item, ...]
    red_scale: tuple[float, ...]
    red_offset: tuple[float, ...]
    nir_scale: tuple[float, ...]
    nir_offset: tuple[float, ...]
    day_index: tuple[int, ...]
    """Per item: index of its (solar) day within the period; same-day granules share one."""
    day_numbers: tuple[int, ...]
    """Per day: days since 1970-01-01 (for the date of the max/min)."""


@dataclass(frozen=True)
class Plan:
    """Everything decided before any pixel is read."""

    config: RunConfig
    search: SearchResult
    epsg: int
    chunk: int
    periods: tuple[Period, ...]
    plans: tuple[PeriodPlan | None, ...]
    """One entry per period; None where the period has no scene."""


def solar_day(when: dt.datetime, lon: float) -> dt.date:
    """Local solar date of an acquisition: overlapping granules of one pass fall on the same day."""
    return (when.astimezone(dt.UTC) + dt.timedelta(hours=lon / 15.0)).date()


def make_plan(cfg: RunConfig, result: SearchResult | None = None) -> Plan:
    """Search (unless given) and decide CRS, periods and how items are grouped."""
    result = result if result is not None else search(cfg)
    items = [it if it.epsg and all(b.epsg or it.epsg for b in it.bands.values()) else with_crs_from_cog(it)
             for it in result.items]
    epsg = choose_epsg(items, cfg.bbox, cfg.crs)
    check_grid_extent(cfg.bbox, epsg, cfg.resolution)  # a whole-world bbox: one clear error, before any read
    periods = periods_between(cfg.start, cfg.end, cfg.period)
    lon = (cfg.bbox.west + cfg.bbox.east) / 2
    days = [solar_day(it.datetime, lon) for it in items]
    where = assign_periods(days, periods)
    by_period: dict[int, list[int]] = {}
    for i, w in enumerate(where):
        if w is not None and w >= 0:
            by_period.setdefault(w, []).append(i)
    plans: list[PeriodPlan | None] = []
    for p_idx, period in enumerate(periods):
        members = by_period.get(p_idx, [])
        if not members:
            plans.append(None)
            continue
        p_items = tuple(items[i] for i in members)
        uniq = sorted({days[i] for i in members})
        day_of = {d: k for k, d in enumerate(uniq)}
        plans.append(
            PeriodPlan(
                period=period,
                items=p_items,
                red_scale=tuple(it.bands["red"].scale for it in p_items),
                red_offset=tuple(it.bands["red"].offset for it in p_items),
                nir_scale=tuple(it.bands["nir"].scale for it in p_items),
                nir_offset=tuple(it.bands["nir"].offset for it in p_items),
                day_index=tuple(day_of[days[i]] for i in members),
                day_numbers=tuple((d - _EPOCH).days for d in uniq),
            )
        )
    # The chunk is the user's at any area and period length: a task whose days would not fit in memory is
    # composited in strips of rows (ndvi_scale.engine.task.TASK_DAY_BYTES), never by shrinking the chunk.
    return Plan(cfg, dataclasses.replace(result, items=tuple(items)), epsg, cfg.chunk, tuple(periods), tuple(plans))


def plan_estimate(plan: Plan) -> RunEstimate:
    """What the planned run will cost (``ndvi-scale plan``; see :mod:`ndvi_scale.sizing`): nothing is read."""
    return estimate(plan.config, plan.search, plan_grid(plan), plan.chunk, plan.periods,
                    [p.items if p is not None else None for p in plan.plans])


def plan(bbox: Any, start: Any, end: Any, catalog: str = "sample", **options: Any) -> RunEstimate:
    """Python API mirroring ``ndvi-scale plan``: search and plan as :func:`compute` would (same arguments), read
    no pixel, and return the :class:`~ndvi_scale.sizing.RunEstimate` (``.summary()``, ``.to_json()``).

    Raises the input, catalog and no-scene errors :func:`compute` raises before reading.
    """
    options.pop("cluster", None)
    cfg = RunConfig.create(bbox=bbox, start=start, end=end, catalog=catalog, **options)
    return plan_estimate(make_plan(cfg))


def _days_to_datetime(days: np.ndarray) -> np.ndarray:
    """Float days since 1970-01-01 (NaN = none) -> datetime64[ns] (NaT = none)."""
    flat = days.reshape(-1)
    ns = np.empty(flat.shape, dtype=np.int64)
    for start in range(0, flat.size, cf.DATE_STEP):  # in pieces: no block-sized temporaries (see DATE_STEP)
        part = flat[start : start + cf.DATE_STEP]
        missing = np.isnan(part)
        got = np.where(missing, 0, part).astype(np.int64)  # whole days (day numbers), so the cast is exact
        got *= 86400 * 10**9
        got[missing] = np.iinfo(np.int64).min  # NaT
        ns[start : start + part.size] = got
    return ns.reshape(days.shape).view("datetime64[ns]")


def plan_grid(plan: Plan) -> OutputGrid:
    """The output grid of ``plan`` (a pure function of bbox, CRS and resolution; see :func:`choose_epsg`)."""
    cfg = plan.config
    return output_grid(cfg.bbox.as_tuple(), plan.epsg, cfg.resolution)


def plan_sources(plan: Plan, grid: OutputGrid | None = None) -> list[PeriodSources | None]:
    """The asset specs each period reads (hrefs signed now, where the provider needs it: tokens expire, so
    every build signs afresh), one entry per period of the calendar (None: no scene)."""
    grid = grid or plan_grid(plan)
    out: list[PeriodSources | None] = []
    for p in plan.plans:
        if p is None:
            out.append(None)
            continue
        signed = sign_items(p.items)
        items = tuple(item_source(it, d, grid, s) for it, d, s in zip(p.items, p.day_index, signed, strict=True))
        out.append(PeriodSources(items, p.day_numbers))
    return out


def read_policy(plan: Plan, policy: ReadPolicy | None = None) -> ReadPolicy:
    """``policy`` (default: the run's skip setting) with a re-signing function where the plan's hrefs are signed,
    so a retried read gets a fresh token."""
    policy = policy if policy is not None else ReadPolicy(skip=plan.config.skip_bad_assets)
    providers = sorted({it.provider for p in plan.plans if p is not None for it in p.items} & set(signers()))
    if providers and policy.resign is None:
        from .profiles import resign_href

        policy = dataclasses.replace(policy, resign=functools.partial(resign_href, providers[0]))
    return policy


def build(cfg: RunConfig, plan: Plan | None = None, policy: ReadPolicy | None = None) -> xr.Dataset:
    """The lazy composite Dataset for ``cfg``: nothing is read until it is computed or written.

    Reads follow ``policy`` (default: retries, then fail; or skip, with ``cfg.skip_bad_assets``, warning only:
    :func:`run` records skipped assets in the output).
    """
    plan = plan or make_plan(cfg)
    grid = plan_grid(plan)
    extras = EXTRA_OUTPUTS.get(cfg.method, ())
    n_out = 2 + len(extras)
    cube = composite_cube(
        plan_sources(plan, grid), grid, plan.chunk, method=cfg.method, mask_classes=cfg.mask_classes,
        n_out=n_out, policy=read_policy(plan, policy), mask_filters=cfg.mask_filters,
        aoi=cfg.aoi.in_crs(f"EPSG:{grid.epsg}") if cfg.aoi is not None else None,
    )

    times = pd.DatetimeIndex([np.datetime64(p.start, "ns") for p in plan.periods])
    coords = {
        "time": ("time", times, cf.time_attrs()),
        **cf.time_bounds_coord([p.start for p in plan.periods], [p.end for p in plan.periods]),
        "time_end": (
            "time",
            pd.DatetimeIndex([np.datetime64(p.end, "ns") for p in plan.periods]),
            {"long_name": "last day of the compositing period (inclusive)"},
        ),
        "y": ("y", grid.ys(), {"standard_name": "projection_y_coordinate", "units": "m", "axis": "Y"}),
        "x": ("x", grid.xs(), {"standard_name": "projection_x_coordinate", "units": "m", "axis": "X"}),
    }
    dims = ("time", "y", "x")
    data_vars: dict[str, Any] = {
        "ndvi": (
            dims,
            cube_layer(cube, 0, n_out, np.float32),
            cf.ndvi_attrs(cfg.method, cfg.period),
        ),
        "valid_count": (
            dims,
            cube_layer(cube, 1, n_out, np.uint16),
            cf.count_attrs(),
        ),
    }
    for j, name in enumerate(extras):
        data_vars[name] = (
            dims,
            cube_layer(cube, 2 + j, n_out, "datetime64[ns]", _days_to_datetime),
            cf.date_attrs(cfg.method),
        )
    ds = xr.Dataset(data_vars, coords=coords)
    ds = ds.rio.write_crs(plan.epsg).rio.write_coordinate_system()
    ds.attrs = provenance_attrs(plan)
    return ds


def asset_labels(plan: Plan) -> dict[str, tuple[str, str]]:
    """Clean href (no query string) -> (item id, band) of every asset the plan reads, to name faults."""
    return {
        clean_href(band.href): (it.id, name)
        for p in plan.plans
        if p is not None
        for it in p.items
        for name, band in it.bands.items()
    }


def provenance_attrs(plan: Plan) -> dict[str, Any]:
    """CF global attributes and provenance (JSON strings, so every Zarr/NetCDF writer keeps them)."""
    import importlib.metadata as md

    cfg = plan.config
    versions = {}
    for pkg in ("ndvi-scale", "numpy", "pandas", "xarray", "dask", "rasterio", "zarr", "pystac", "bottleneck"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "unknown"
    items = [
        {
            "id": it.id,
            "collection": it.collection,
            "datetime": it.datetime.isoformat(),
            "processing_baseline": it.processing_baseline,
            "red": {"scale": it.bands["red"].scale, "offset": it.bands["red"].offset},
            "nir": {"scale": it.bands["nir"].scale, "offset": it.bands["nir"].offset},
            "warnings": list(it.warnings),
        }
        for p in plan.plans
        if p is not None
        for it in p.items
    ]
    safe_config = cfg.to_dict()
    name = cf.attr_name  # ndvi_scale_<key>: CF attribute names allow no ":"
    return scrub_value({  # no URL credentials or query strings (API keys, signatures) in the provenance
        "Conventions": cf.CONVENTIONS,
        "title": f"Sentinel-2 L2A NDVI {cf.method_text(cfg.method)} composites per {cfg.period}",
        "source": f"Sentinel-2 L2A surface reflectance; {plan.search.source}",
        "history": cf.history_line(safe_config),
        "references": "reflectance = DN * scale + offset; offset -0.1 for processing baseline >= 04.00",
        "comment": "contains modified Copernicus Sentinel data",
        name("method"): cfg.method,
        name("period"): cfg.period,
        name("mask_classes"): json.dumps(
            {str(c): SCL_CLASSES[c] for c in cfg.mask_classes}
        ),
        name("mask_filters"): json.dumps(mask_filters_provenance(cfg)),
        name("config"): json.dumps(safe_config, sort_keys=True),
        name("items"): json.dumps(items),
        name("skipped"): json.dumps([{"id": s.id, "reason": s.reason} for s in plan.search.skipped]),
        name("search"): json.dumps({"source": plan.search.source, "notes": list(plan.search.notes)}),
        name("versions"): json.dumps(versions, sort_keys=True),
        **({name("aoi"): json.dumps(aoi_provenance(cfg.aoi))} if cfg.aoi is not None else {}),
    })


def mask_filters_provenance(cfg: RunConfig) -> list[dict[str, Any]]:
    """The run's mask filters as recorded in the cube (``ndvi_scale_mask_filters``) and its STAC item: in order,
    each op, its radius in metres and in output pixels, and the SCL classes whose mask it reshapes."""
    from .kernel import FILTERED_CLASSES

    classes = [c for c in FILTERED_CLASSES if c in cfg.mask_classes]
    return [
        {"op": op, "metres": metres, "pixels": metres / cfg.resolution, "classes": classes}
        for op, metres in cfg.mask_filters
    ]


def aoi_provenance(aoi: Any) -> dict[str, Any]:
    """The cube's ``ndvi_scale_aoi``: source, digest, polygon count, bbox, the masking rule and the AOI itself
    (GeoJSON, EPSG:4326: the footprint of the cube's STAC item)."""
    import shapely

    return {**aoi.provenance(), "rule": "a pixel is inside when its centre is inside the AOI; outside: NaN, count 0",
            "geometry": json.loads(shapely.to_geojson(aoi.geometry))}


@dataclass(frozen=True)
class RunReport:
    """What a run did."""

    config: RunConfig
    summary: str
    """One line on the scenes used (items, dates, tiles, CRSs)."""
    periods: int
    dataset: xr.Dataset
    """The lazy composite (also returned when nothing was written)."""
    write: WriteReport | None = None
    """What the write stage did, if ``config.out`` was set."""

    def describe(self) -> str:
        if self.write is None:
            return f"built {self.periods} {self.config.period} composite(s) (not written)"
        w = self.write
        parts = [f"wrote {w.url}: {len(w.periods_written)} {self.config.period} composite(s) of NDVI "
                 f"({self.config.method})"]
        if w.periods_skipped:
            parts.append(f"{len(w.periods_skipped)} already present, skipped")
        if w.resumed:
            parts.append(f"resumed: {w.regions_written} region(s) computed, {w.regions_skipped} kept")
        if w.stac_item_url:
            parts.append(f"STAC item {w.stac_item_url}")
        text = "; ".join(parts)
        if w.skipped_assets:
            text += (f"\nskipped {len(w.skipped_assets)} unreadable asset(s), recorded in the cube's "
                     "ndvi_scale_skipped_assets (their pixels count as not observed):")
            text += "".join(f"\n  - {describe_summary(e)}" for e in w.skipped_assets)
        return text


def run(
    cfg: RunConfig,
    *,
    cluster: str | None = None,
    echo: Callable[[str], Any] | None = None,
    show_progress: bool = False,
) -> RunReport:
    """Search, build and (if ``cfg.out``) write, on the Dask ``cluster`` (see :func:`ndvi_scale.cluster.connect`).

    The output is checked before anything is searched or read: an existing cube is refused (or appended to, or
    resumed) before any work is spent.
    """
    from .cluster import connect
    from .write import check_output, write_cube

    say = echo or (lambda msg: None)
    loc = (check_output(cfg.out, cfg.overwrite, append=cfg.append, zarr_format=cfg.zarr_format)
           if cfg.out is not None else None)
    if cfg.catalog == "sample":
        from .search import prepare_sample

        # generated once, in a minute: say so instead of a silent first run (on stderr for API callers too)
        prepare_sample(echo or (lambda msg: print(msg, file=sys.stderr, flush=True)))
    plan = make_plan(cfg)
    say(plan.search.summary())
    cost = plan_estimate(plan)
    say(cost.summary())
    check_size(cost, cfg.allow_large)  # before the graph is built and before anything is written
    faults = FaultLog(loc.spec()) if loc is not None else None
    ds = build(cfg, plan, ReadPolicy(skip=cfg.skip_bad_assets, log=faults))
    labels = asset_labels(plan)
    if loc is None:
        return RunReport(cfg, plan.search.summary(), len(plan.periods), ds)
    first_reads = functools.partial(start_reading, ds["ndvi"].data)
    with connect(cluster) as (_client, dashboard), _buffers_released():
        if dashboard:
            say(f"dask dashboard: {dashboard}")
        if show_progress:
            from .progress import region_progress

            with region_progress("composite + write") as advance:
                report = write_cube(ds, loc, overwrite=cfg.overwrite, append=cfg.append,
                                    zarr_format=cfg.zarr_format, progress=advance, faults=faults,
                                    asset_labels=labels, start_reading=first_reads)
        else:
            report = write_cube(ds, loc, overwrite=cfg.overwrite, append=cfg.append, zarr_format=cfg.zarr_format,
                                faults=faults, asset_labels=labels, start_reading=first_reads)
    return RunReport(cfg, plan.search.summary(), len(plan.periods), ds, report)


@contextlib.contextmanager
def _buffers_released() -> Iterator[None]:
    """Give back the buffers the engine kept between tasks once the write is over (a notebook's process keeps
    running; the next run allocates them again)."""
    try:
        yield
    finally:
        release_buffers()


def compute(
    bbox: Any = None,
    start: Any = None,
    end: Any = None,
    catalog: str = "sample",
    out: str | None = None,
    *,
    period: str = "month",
    method: str = "median",
    **options: Any,
) -> xr.Dataset:
    """Python API mirroring ``ndvi-scale compute``.

    A run above the size guard (:mod:`ndvi_scale.sizing`: 100 GB of output or 100,000 regions) raises
    :class:`~ndvi_scale.errors.RunTooLargeError` before anything is built or written, unless ``allow_large=True``.
    Without ``out`` it returns the lazy composite Dataset (nothing read yet: ``.compute()``, ``.hvplot()`` or
    ``.to_zarr()`` it yourself). With ``out`` it writes the Zarr and returns it opened lazily from the store.

    Parameters (each one is a :class:`~ndvi_scale.config.RunConfig` field; loose values are normalised by
    :meth:`RunConfig.create <ndvi_scale.config.RunConfig.create>`):

    * ``bbox``: W, S, E, N in degrees (EPSG:4326): a 4-sequence, ``"W S E N"`` or ``"W,S,E,N"``.
    * ``aoi`` (keyword, instead of ``bbox``): a polygon file (GeoJSON, GeoPackage, GeoParquet, Shapefile; any CRS),
      a GeoDataFrame or shapely polygons in EPSG:4326: the grid is its bounds, pixels whose centre is outside it
      are NaN (count 0).
    * ``start``, ``end``: first and last day (inclusive), ``YYYY-MM-DD``, ``datetime.date`` or ``datetime``.
    * ``catalog``: ``"sample"`` (embedded offline sample), a profile name (``earth-search``,
      ``planetary-computer``, ``cdse``, ...), a STAC API URL or a local item collection file.
    * ``out``: Zarr location (path, ``gs://bucket/path``, ``s3://bucket/path``); None = return the lazy Dataset.
    * ``period``: ``day``, ``week``, ``dekad``, ``month`` (default), ``season`` or ``year``.
    * ``method``: ``median`` (default), ``mean``, ``max``, ``min`` or a percentile ``qNN`` (e.g. ``q25``).

    Keyword ``**options``:

    * ``max_cloud`` (float, default 100): skip scenes whose ``eo:cloud_cover`` is above this percentage.
    * ``mask_classes`` (ints or ``"0,1,2"``, default 0,1,2,3,8,9,10): SCL classes masked as not observed.
    * ``mask_filters`` (default ``opening:20,dilation:60``): morphological filters of the cloud/shadow mask, in
      order, in metres (``"none"``: exactly the SCL classes); ``mask_opening`` / ``mask_dilation`` (metres) set
      DEA's pair instead.
    * ``resolution`` (metres, default 10): output pixel size.
    * ``crs`` (default ``"auto"``: the UTM zone covering most of the bbox): or ``"EPSG:XXXX"`` (projected).
    * ``chunk`` (pixels, default 2048): spatial chunk of processing and of the Zarr arrays.
    * ``zarr_format`` (3 or 2, default 3 for a new cube; an existing cube keeps its own).
    * ``codec`` (``zstd`` default, ``zlib``, ``lz4``, ``none``): compression of a new cube.
    * ``overwrite`` (bool, default False): replace an existing output (with ``append``: recompute its periods).
    * ``append`` (bool, default False): add this run's new periods to an existing cube on the same grid.
    * ``skip_bad_assets`` (bool, default False): go on past unreadable assets, recording them in the cube.
    * ``allow_local`` (bool, default False): accept local asset paths from any catalog.
    * ``allow_large`` (bool, default False): start a run above the size guard (else
      :class:`~ndvi_scale.errors.RunTooLargeError`, nothing written; see :func:`plan`).
    * ``cluster`` (str, default threads): ``local``, ``tcp://HOST:PORT``, ``gateway`` or ``kubernetes``
      (see :func:`ndvi_scale.cluster.connect`).
    * ``extra`` (mapping): free-form options kept in the provenance.

    Returns the lazy composite (no ``out``) or the written cube opened lazily. Raises
    :class:`~ndvi_scale.errors.InputError` for bad values (an unknown option included), and the errors of
    :func:`run` (:class:`~ndvi_scale.errors.NoScenesError`, :class:`~ndvi_scale.errors.OutputExistsError`, ...).
    """
    cluster = options.pop("cluster", None)
    cfg = RunConfig.create(bbox=bbox, start=start, end=end, catalog=catalog, out=out, period=period, method=method,
                           **options)
    report = run(cfg, cluster=cluster)
    if report.write is None:
        return report.dataset
    from .storage import open_location

    return xr.open_zarr(open_location(cfg.out or "").store, decode_coords="all", consolidated=None)


def stack(bbox: Any, start: Any, end: Any, catalog: str = "sample", **options: Any) -> xr.DataArray:
    """The lazy (time, band, y, x) uint16 stack of raw red, nir and scl digital numbers of the scenes a
    :func:`compute` with the same arguments would use, on its output grid, through ``stackstac.stack`` (one time
    chunk per period). Scale/offset are not applied (they differ per item: see the ``ndvi_scale_items``
    provenance of a cube, or :attr:`S2Item.bands`).

    ``**options`` are :func:`compute`'s (``max_cloud``, ``mask_classes``, ``resolution``, ``crs``, ``chunk``,
    ``allow_local``, ...; ``period`` sets the time chunks); output options are accepted and ignored.

    Needs the optional extra ``pip install "ndvi-scale[stackstac]"`` (stackstac 0.5.1 pins pandas<3). Raises
    :class:`InputError` for bad arguments or a missing stackstac, and the errors of :func:`make_plan`.
    """
    from .load import stack as load_stack

    cfg = RunConfig.create(bbox=bbox, start=start, end=end, catalog=catalog, **options)
    plan = make_plan(cfg)
    live = [p for p in plan.plans if p is not None]
    return load_stack(
        [it for p in live for it in p.items], epsg=plan.epsg, bbox=cfg.bbox, resolution=cfg.resolution,
        chunk=plan.chunk, time_chunks=[len(p.items) for p in live],
    )


__all__ = ["InputError", "build", "compute", "make_plan", "plan", "plan_estimate", "plan_grid", "plan_sources", "run",
           "stack"]
