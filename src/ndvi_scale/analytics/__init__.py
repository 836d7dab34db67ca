"""What NDVI users do next with a cube: per-point time series (:func:`series`) and zonal statistics over
polygons such as field parcels (:func:`zonal`), chunk by chunk with Dask, on local, gs:// or s3:// cubes."""

from __future__ import annotations

from .series import series
from .zonal import zonal

__all__ = ["series", "zonal"]
