"""The pixel grid of a cube (from its x/y coordinates and spatial_ref), and opening a cube given as a path/URL."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
from pyproj import CRS

from ..errors import InputError, shown

__all__ = ["CubeGrid", "as_cube", "cube_grid"]


@dataclass(frozen=True)
class CubeGrid:
    """North-up grid: pixel (row, col) covers x in [left + col*res, left + (col+1)*res), y likewise downwards."""

    crs: CRS
    left: float
    top: float
    res: float
    height: int
    width: int

    def bounds(self, row0: int, row1: int, col0: int, col1: int) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of the pixel block rows [row0, row1) x cols [col0, col1)."""
        return (self.left + col0 * self.res, self.top - row1 * self.res,
                self.left + col1 * self.res, self.top - row0 * self.res)


def as_cube(cube: Any, storage_options: Any = None) -> xr.Dataset:
    """``cube`` itself if it is a Dataset, else the cube at that path or gs:// / s3:// URL, opened lazily."""
    if isinstance(cube, xr.Dataset):
        return cube
    if isinstance(cube, str | os.PathLike):
        from ..viz import open_cube

        return open_cube(cube, storage_options)
    raise InputError(f"cube {shown(cube)} is neither an xarray Dataset nor a path/URL; give the --out of compute")


def cube_grid(ds: xr.Dataset) -> CubeGrid:
    """The grid of ``ds`` (x increasing, y decreasing, square pixels) and its CRS."""
    if "x" not in ds.coords or "y" not in ds.coords or ds.sizes.get("x", 0) < 1 or ds.sizes.get("y", 0) < 1:
        raise InputError("cube has no x/y coordinates; give a cube written by ndvi-scale compute")
    x = np.asarray(ds["x"].values, dtype=np.float64)
    y = np.asarray(ds["y"].values, dtype=np.float64)
    crs = None
    if "spatial_ref" in ds.variables:
        attrs = ds["spatial_ref"].attrs
        wkt = attrs.get("crs_wkt") or attrs.get("spatial_ref")
        if wkt:
            crs = CRS.from_wkt(wkt)
    if crs is None:
        rio_crs = ds.rio.crs if hasattr(ds, "rio") else None
        if rio_crs is None:
            raise InputError("cube has no CRS (no spatial_ref); give a cube written by ndvi-scale compute")
        crs = CRS.from_user_input(rio_crs.to_wkt())
    if len(x) > 1:
        res = float(x[1] - x[0])
    else:  # one pixel wide: the y spacing
        res = float(y[0] - y[1]) if len(y) > 1 else 0.0
    if res <= 0 or (len(y) > 1 and not np.isclose(y[0] - y[1], res)):
        raise InputError("cube grid is not north-up with square pixels (x increasing, y decreasing)")
    return CubeGrid(crs=crs, left=float(x[0] - res / 2), top=float(y[0] + res / 2), res=res,
                    height=len(y), width=len(x))
