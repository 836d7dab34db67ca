"""Zonal statistics of a cube over polygons (field parcels), with exact fractional coverage, chunk by chunk.

Rule (stated once, tested against an independent computation):

* The weight ``w`` of a pixel in a zone is the **exact fraction of the pixel's area covered by the polygon**
  (exactextract's coverage fraction, in the cube's CRS after reprojecting the zone). A pixel touched by the
  polygon (``w > 0``) belongs to the zone with that weight.
* A pixel is *clear* in a period when its ``ndvi`` is not NaN (``valid_count > 0``).
* ``mean`` = sum(w v) / sum(w) over clear pixels; ``std`` the weighted population standard deviation;
  ``median`` the weighted median (the smallest clear value at which the cumulative weight reaches half of the
  total, values sorted); ``min``/``max`` over clear pixels with ``w > 0``; ``count`` the number of clear pixels
  with ``w > 0``; ``valid_fraction`` = sum(w over clear pixels) / (zone area / pixel area): the share of the zone
  that was observed clear (a part of the zone outside the cube counts as not observed).

Computation: one Dask task per spatial chunk computes the coverage weights of the zones that intersect the chunk
(exactextract on a raster of the chunk's extent: the weight of a pixel does not depend on the extent, so a zone
split across chunks gets exactly the weights it would get whole), and one task per (time block, spatial chunk)
reduces the chunk's pixels to per-zone partials (sum w, weighted mean, sum w (v - mean)^2, min, max, count; the
(value, weight) pairs only if ``median`` is asked). The partials of a zone are merged on the client (sums; means and
variances by Chan's parallel formula), so a zone across chunk boundaries equals the same zone on an unchunked cube.
Memory: one block of the cube per running task plus the weights of one chunk; never the whole cube.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import shapely

from ..errors import InputError
from .grid import CubeGrid, as_cube, cube_grid
from .vectors import Zones, read_zones, to_crs

__all__ = ["ALL_STATS", "DEFAULT_STATS", "zonal", "coverage_weights"]

ALL_STATS = ("mean", "median", "std", "min", "max", "count", "valid_fraction")
DEFAULT_STATS = ("mean", "std", "min", "max", "count", "valid_fraction")


def parse_stats(stats: str | Iterable[str]) -> tuple[str, ...]:
    names = [s.strip() for s in (stats.split(",") if isinstance(stats, str) else stats) if s.strip()]
    bad = [s for s in names if s not in ALL_STATS]
    if bad or not names:
        raise InputError(f"stats {','.join(bad) or '(none)'} not known; give a comma list of {','.join(ALL_STATS)}")
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class _Weights:
    zone: np.ndarray  # int64, global zone index
    pixel: np.ndarray  # int64, flat index in the chunk (row * width + col)
    w: np.ndarray  # float64 coverage fraction in (0, 1]


def _wkb_features(geoms: Sequence[Any]) -> Any:
    """An exactextract feature source handing over WKB (no GeoJSON text round trip per feature)."""
    from exactextract.feature import Feature, FeatureSource

    class _Feature(Feature):
        def __init__(self, k: int = -1, wkb: bytes = b"") -> None:
            Feature.__init__(self)
            self.k, self.wkb = k, wkb

        def geometry(self) -> bytes:
            return self.wkb

        def set_geometry(self, wkb: bytes) -> None:
            self.wkb = wkb

        def set_geometry_format(self) -> str:
            return "wkb"

        def get(self, name: str) -> int:
            return self.k

        def set(self, name: str, value: Any) -> None:
            self.k = int(value)

        def fields(self) -> list[str]:
            return ["k"]

    class _Source(FeatureSource):
        def __init__(self, wkbs: Sequence[bytes]) -> None:
            super().__init__()
            self.wkbs = wkbs

        def count(self) -> int:
            return len(self.wkbs)

        def __iter__(self) -> Any:
            for k, w in enumerate(self.wkbs):
                yield _Feature(k, w)

        def srs_wkt(self) -> None:
            return None

    return _Source(list(shapely.to_wkb(np.asarray(geoms, dtype=object))))


def coverage_weights(
    geoms: Sequence[Any], bounds: tuple[float, float, float, float], shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(feature index, flat pixel index, coverage fraction)`` of ``geoms`` on the north-up raster of that
    extent and shape, by exactextract. Pixels with zero coverage are left out."""
    from exactextract import exact_extract
    from exactextract.raster import NumPyRasterSource

    if len(geoms) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    rast = NumPyRasterSource(np.zeros(shape, dtype=np.uint8), *bounds)
    res = exact_extract(rast, _wkb_features(geoms), ["cell_id", "coverage"], include_cols=["k"], output="pandas")
    cells = [np.asarray(c, dtype=np.int64) for c in res["cell_id"]]
    covs = [np.asarray(c, dtype=np.float64) for c in res["coverage"]]
    feat = np.repeat(res["k"].to_numpy(dtype=np.int64), [len(c) for c in cells])
    cell = np.concatenate(cells) if cells else np.zeros(0, np.int64)
    cov = np.concatenate(covs) if covs else np.zeros(0, np.float64)
    keep = cov > 0
    return feat[keep], cell[keep], cov[keep]


def _chunk_weights(wkb: np.ndarray, zone_index: np.ndarray, bounds: tuple[float, float, float, float],
                   shape: tuple[int, int]) -> _Weights:
    feat, cell, cov = coverage_weights(shapely.from_wkb(wkb), bounds, shape)
    return _Weights(zone=zone_index[feat], pixel=cell, w=cov)


# ---------------------------------------------------------------------------------------------- partials


@dataclass
class _Partial:
    zone: np.ndarray  # unique global zone indices of this chunk
    t0: int  # first period of the block
    sw: np.ndarray  # (nt, nz) sum of w over clear pixels
    mean: np.ndarray  # weighted mean over the chunk's clear pixels (0 where none)
    m2: np.ndarray  # sum of w (v - mean)^2: merged by Chan's parallel formula (no E[v^2] - mean^2 cancellation)
    vmin: np.ndarray
    vmax: np.ndarray
    count: np.ndarray  # clear pixels with w > 0
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None  # per period: (zone, value, weight)


def _block_stats(ndvi: np.ndarray, weights: _Weights, t0: int, want_pairs: bool) -> _Partial:
    zones, local = np.unique(weights.zone, return_inverse=True)
    nz = len(zones)
    nt = ndvi.shape[0]
    flat = np.asarray(ndvi).reshape(nt, -1)
    sw = np.zeros((nt, nz))
    mean = np.zeros((nt, nz))
    m2 = np.zeros((nt, nz))
    vmin = np.full((nt, nz), np.inf)
    vmax = np.full((nt, nz), -np.inf)
    count = np.zeros((nt, nz), dtype=np.int64)
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = [] if want_pairs else None
    order = np.argsort(local, kind="stable")
    for t in range(nt):
        v = flat[t, weights.pixel].astype(np.float64)
        ok = ~np.isnan(v)
        w = np.where(ok, weights.w, 0.0)
        vz = np.where(ok, v, 0.0)
        sw[t] = np.bincount(local, w, nz)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean[t] = np.where(sw[t] > 0, np.bincount(local, w * vz, nz) / sw[t], 0.0)
        dev = np.where(ok, vz - mean[t][local], 0.0)
        m2[t] = np.bincount(local, w * dev * dev, nz)
        count[t] = np.bincount(local, ok, nz).astype(np.int64)
        if len(order):
            lo = np.where(ok, v, np.inf)[order]
            hi = np.where(ok, v, -np.inf)[order]
            starts = np.flatnonzero(np.r_[True, np.diff(local[order]) != 0])
            vmin[t] = np.minimum.reduceat(lo, starts)
            vmax[t] = np.maximum.reduceat(hi, starts)
        if pairs is not None:
            pairs.append((zones[local[ok]], v[ok], weights.w[ok]))
    return _Partial(zones, t0, sw, mean, m2, vmin, vmax, count, pairs)


def _weighted_median(zone: np.ndarray, value: np.ndarray, weight: np.ndarray, nzones: int) -> np.ndarray:
    out = np.full(nzones, np.nan)
    if len(zone) == 0:
        return out
    order = np.lexsort((value, zone))
    z, v, w = zone[order], value[order], weight[order]
    starts = np.flatnonzero(np.r_[True, np.diff(z) != 0])
    ends = np.r_[starts[1:], len(z)]
    cum = np.cumsum(w)
    before = np.r_[0.0, cum][starts]
    total = cum[ends - 1] - before
    for s, e, b, tot, zz in zip(starts, ends, before, total, z[starts], strict=True):
        k = int(np.searchsorted(cum[s:e] - b, 0.5 * tot - 1e-12 * tot, side="left"))
        out[zz] = v[s + min(k, e - s - 1)]
    return out


# ------------------------------------------------------------------------------------------------- zonal


def zonal(
    cube: Any,
    zones: Any,
    id_field: str | None = None,
    stats: str | Iterable[str] = DEFAULT_STATS,
    *,
    crs: Any = None,
    storage_options: Any = None,
) -> pd.DataFrame:
    """One row per (zone, period): ``zone, time`` and the ``stats`` asked (see the module docstring's rule).

    ``cube``: a Dataset (Dask-backed or in memory) or the path/URL of a cube (local, gs://, s3://). ``zones``:
    a GeoJSON/GeoPackage/GeoParquet/Shapefile path, a GeoDataFrame or shapely polygons (``crs``, default
    EPSG:4326); reprojected to the cube's CRS. ``id_field`` names the zones (default: feature index).
    """
    wanted = parse_stats(stats)
    ds = as_cube(cube, storage_options)
    if "ndvi" not in ds:
        raise InputError("cube has no 'ndvi' variable; give a cube written by ndvi-scale compute")
    grid = cube_grid(ds)
    z = zones if isinstance(zones, Zones) else read_zones(zones, id_field, crs)
    geoms = to_crs(z.geoms, z.crs, grid.crs)
    if not shapely.is_valid(geoms).all():  # reprojection can fold a sliver polygon onto itself
        geoms = np.asarray(shapely.make_valid(geoms), dtype=object)
    ndvi = ds["ndvi"].data
    if not isinstance(ndvi, da.Array):
        ndvi = da.from_array(np.asarray(ndvi), chunks=(1, -1, -1))
    ndvi = ndvi.astype(np.float32, copy=False) if ndvi.dtype != np.float32 else ndvi
    want_pairs = "median" in wanted
    parts = _graph(ndvi, grid, geoms, want_pairs)
    results = dask.compute(*parts) if parts else ()
    nt = ndvi.shape[0]
    return _merge(results, z.ids, geoms, grid, ds["time"].values, nt, wanted, want_pairs)


def _graph(ndvi: da.Array, grid: CubeGrid, geoms: np.ndarray, want_pairs: bool) -> list[Any]:
    tree = shapely.STRtree(geoms)
    blocks = ndvi.to_delayed()  # (time blocks, y blocks, x blocks)
    ystarts = np.r_[0, np.cumsum(ndvi.chunks[1])]
    xstarts = np.r_[0, np.cumsum(ndvi.chunks[2])]
    tstarts = np.r_[0, np.cumsum(ndvi.chunks[0])]
    wkb = shapely.to_wkb(geoms)  # an object array: dask passes it as one value (a list it would walk item by item)
    out = []
    for iy in range(len(ndvi.chunks[1])):
        for ix in range(len(ndvi.chunks[2])):
            r0, r1, c0, c1 = ystarts[iy], ystarts[iy + 1], xstarts[ix], xstarts[ix + 1]
            bounds = grid.bounds(r0, r1, c0, c1)
            hit = tree.query(shapely.box(*bounds), predicate="intersects")
            if len(hit) == 0:
                continue
            hit = np.sort(hit)
            weights = dask.delayed(_chunk_weights, pure=True)(
                wkb[hit], hit.astype(np.int64), bounds, (int(r1 - r0), int(c1 - c0))
            )
            for it in range(len(ndvi.chunks[0])):
                out.append(dask.delayed(_block_stats, pure=True)(blocks[it, iy, ix], weights, int(tstarts[it]),
                                                                 want_pairs))
    return out


def _merge(results: Sequence[_Partial], ids: np.ndarray, geoms: np.ndarray, grid: CubeGrid, times: np.ndarray,
           nt: int, wanted: tuple[str, ...], want_pairs: bool) -> pd.DataFrame:
    nz = len(ids)
    sw = np.zeros((nt, nz))
    mean = np.zeros((nt, nz))
    m2 = np.zeros((nt, nz))
    vmin = np.full((nt, nz), np.inf)
    vmax = np.full((nt, nz), -np.inf)
    count = np.zeros((nt, nz), dtype=np.int64)
    pairs: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(nt)]
    for p in results:
        ts = slice(p.t0, p.t0 + p.sw.shape[0])
        wa, wb = sw[ts, p.zone], p.sw
        tot = wa + wb
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(tot > 0, wb / tot, 0.0)
        delta = p.mean - mean[ts, p.zone]
        mean[ts, p.zone] = mean[ts, p.zone] + delta * frac
        m2[ts, p.zone] = m2[ts, p.zone] + p.m2 + delta * delta * wa * frac
        sw[ts, p.zone] = tot
        vmin[ts, p.zone] = np.minimum(vmin[ts, p.zone], p.vmin)
        vmax[ts, p.zone] = np.maximum(vmax[ts, p.zone], p.vmax)
        count[ts, p.zone] += p.count
        if p.pairs is not None:
            for k, pr in enumerate(p.pairs):
                pairs[p.t0 + k].append(pr)
    area_px = shapely.area(geoms) / (grid.res * grid.res)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(sw > 0, m2 / sw, np.nan)
        mean = np.where(sw > 0, mean, np.nan)
    cols: dict[str, Any] = {
        "zone": np.tile(ids, nt),
        "time": np.repeat(times, nz),
    }
    for name in wanted:
        if name == "mean":
            cols[name] = mean
        elif name == "std":
            cols[name] = np.sqrt(var)
        elif name == "min":
            cols[name] = np.where(count > 0, vmin, np.nan)
        elif name == "max":
            cols[name] = np.where(count > 0, vmax, np.nan)
        elif name == "count":
            cols[name] = count
        elif name == "valid_fraction":
            cols[name] = np.minimum(sw / area_px[None, :], 1.0)
        elif name == "median" and want_pairs:
            med = np.full((nt, nz), np.nan)
            for t in range(nt):
                if pairs[t]:
                    zz = np.concatenate([q[0] for q in pairs[t]])
                    vv = np.concatenate([q[1] for q in pairs[t]])
                    ww = np.concatenate([q[2] for q in pairs[t]])
                    med[t] = _weighted_median(zz, vv, ww, nz)
            cols[name] = med
    for name in wanted:
        cols[name] = np.asarray(cols[name]).reshape(-1)
    df = pd.DataFrame(cols)
    order = np.lexsort((np.repeat(np.arange(nt), nz), np.tile(np.arange(nz), nt)))
    return df.iloc[order].reset_index(drop=True)

