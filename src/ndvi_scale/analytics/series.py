"""Per-point time series of a cube: the pixel containing each point (or the mean of an odd window around it)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from ..errors import InputError, shown
from .grid import as_cube, cube_grid
from .vectors import parse_points, to_crs

__all__ = ["series"]


def series(
    cube: Any, points: Any, window: int = 1, *, crs: Any = None, storage_options: Any = None
) -> pd.DataFrame:
    """One row per (point, period): ``point, lon, lat, x, y, row, col, time, ndvi, valid_count``.

    ``cube``: a Dataset or the path/URL (local, gs://, s3://) of a cube. ``points``: ``"LON,LAT"`` strings,
    ``(lon, lat)`` pairs, shapely Points, a CSV (lon,lat[,id]) or a vector file of Points; ``crs`` is their CRS
    (default EPSG:4326, or the file's). Each point takes the pixel that contains it (a point on a pixel edge
    takes the pixel to its east/south). With ``window`` = 3, 5, ... ``ndvi`` is the mean of the clear pixels
    of the window x window block centred on that pixel (clipped at the cube's edge), ``valid_count`` the
    centre pixel's and ``window_pixels`` the number of window pixels with an NDVI. Only the chunks holding the
    points are read. Points outside the cube raise :class:`InputError` naming them.
    """
    if not isinstance(window, int | np.integer) or window < 1 or window % 2 == 0:
        raise InputError(f"window {shown(window)} is invalid; expected an odd number of pixels >= 1, e.g. 1 or 3")
    ds = as_cube(cube, storage_options)
    grid = cube_grid(ds)
    ids, px, py, pcrs = parse_points(points, crs)
    x, y = (np.asarray(a, dtype=np.float64) for a in _transform(px, py, pcrs, grid.crs))
    col = np.floor((x - grid.left) / grid.res).astype(np.int64)
    row = np.floor((grid.top - y) / grid.res).astype(np.int64)
    outside = (col < 0) | (col >= grid.width) | (row < 0) | (row >= grid.height) | ~np.isfinite(x + y)
    if outside.any():
        bad = "; ".join(f"{i} ({a:.6f},{b:.6f})" for i, a, b in zip(ids[outside][:5], px[outside][:5],
                                                                      py[outside][:5], strict=True))
        more = f" and {int(outside.sum()) - 5} more" if outside.sum() > 5 else ""
        raise InputError(
            f"points outside the cube: {bad}{more}; the cube covers {_extent(grid)} - give points inside it"
        )
    half = window // 2
    offs = np.arange(-half, half + 1)
    rr = (row[:, None, None] + offs[None, :, None]) + np.zeros((1, 1, window), dtype=np.int64)
    cc = (col[:, None, None] + offs[None, None, :]) + np.zeros((1, window, 1), dtype=np.int64)
    rr = rr.reshape(len(row), -1)
    cc = cc.reshape(len(col), -1)
    inside = (rr >= 0) & (rr < grid.height) & (cc >= 0) & (cc < grid.width)
    ri = xr.DataArray(np.clip(rr, 0, grid.height - 1), dims=("point", "k"))
    ci = xr.DataArray(np.clip(cc, 0, grid.width - 1), dims=("point", "k"))
    centre = xr.DataArray(row, dims="point"), xr.DataArray(col, dims="point")
    with np.errstate(all="ignore"):
        ndvi_win = ds["ndvi"].isel(y=ri, x=ci).values.astype(np.float64)  # (time, point, k)
        counts = ds["valid_count"].isel(y=centre[0], x=centre[1]).values  # (time, point)
    ndvi_win = np.where(inside[None], ndvi_win, np.nan)
    n_ok = np.sum(~np.isnan(ndvi_win), axis=2)
    with np.errstate(all="ignore"):
        ndvi = np.where(n_ok > 0, np.nansum(ndvi_win, axis=2) / np.maximum(n_ok, 1), np.nan)
    if window == 1:
        ndvi = ndvi_win[:, :, 0]
    times = ds["time"].values
    nt, npnt = ndvi.shape
    out = pd.DataFrame({
        "point": np.tile(ids, nt),
        "lon": np.tile(px, nt),
        "lat": np.tile(py, nt),
        "x": np.tile(x, nt),
        "y": np.tile(y, nt),
        "row": np.tile(row, nt),
        "col": np.tile(col, nt),
        "time": np.repeat(times, npnt),
        "ndvi": ndvi.reshape(-1),
        "valid_count": counts.reshape(-1).astype(np.int64),
    })
    if window > 1:
        out["window_pixels"] = n_ok.reshape(-1).astype(np.int64)
    return out.sort_values(["point", "time"], kind="stable", key=_order_key(ids)).reset_index(drop=True)


def _order_key(ids: np.ndarray) -> Any:
    order = {v: k for k, v in enumerate(ids.tolist())}

    def key(s: pd.Series) -> pd.Series:
        return s.map(order) if s.name == "point" else s

    return key


def _transform(x: np.ndarray, y: np.ndarray, src: Any, dst: Any) -> tuple[np.ndarray, np.ndarray]:
    import shapely

    pts = shapely.points(x, y)
    out = to_crs(pts, src, dst)
    return shapely.get_x(out), shapely.get_y(out)


def _extent(grid: Any) -> str:
    from pyproj import Transformer

    tr = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True)
    xmin, ymin, xmax, ymax = grid.bounds(0, grid.height, 0, grid.width)
    w, s, e, n = tr.transform_bounds(xmin, ymin, xmax, ymax)
    return f"lon {w:.5f}..{e:.5f}, lat {s:.5f}..{n:.5f}"
