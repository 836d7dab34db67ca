"""CF-1.8 metadata of the cube, and what GDAL needs besides CF to georeference it.

Everything here describes data; nothing computes it. Checked by the tests with the real readers: cfchecker on a
netCDF export of the cube (0 errors), GDAL through rasterio and Debian's gdal-bin, stac-validator on the STAC item.

* ``cell_methods`` name CF methods only (``time: median|mean|maximum|minimum``); a percentile has no CF method, so
  a ``qNN`` cube carries none and says what it is in ``long_name`` and ``comment``. The compositing period is
  given by ``time_bnds`` (CF cell bounds: first day, and the day after the last), not by an ``interval`` (which
  CF reserves for the spacing of the *input* samples: irregular here).
* Dates of the extremes (``max_date``/``min_date``) are stored as int32 ``days since 1970-01-01`` with an
  explicit fill value (no observation), so that udunits, netCDF tools and GDAL read them right.
* Attribute names are CF-legal (``ndvi_scale_*``, no ``:``); :data:`LEGACY_PREFIX` names those of cubes written
  before, which the writer still reads (appending to an old cube keeps working).
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: The CF version the cube conforms to (and the newest cfchecker 4.1 checks: the cube uses nothing newer).
CONVENTIONS = "CF-1.8"
#: Prefix of the package's own global attributes (CF attribute names allow letters, digits and ``_`` only).
PREFIX = "ndvi_scale_"
#: Prefix of the same attributes in cubes written by ndvi-scale before CF-legal names.
LEGACY_PREFIX = "ndvi_scale:"
#: Name of the CF bounds variable of ``time`` (dims time, bnds).
TIME_BOUNDS = "time_bnds"
#: Stored encoding of the dates of the extremes: whole days since the epoch, fill value = no observation.
DATE_UNITS = "days since 1970-01-01"
DATE_FILL = np.int32(-2147483647)  # NC_FILL_INT, netCDF's default fill of an int
#: Zarr ``fill_value`` of integer counts: never reached (at most 366 days per period), so 0 stays a value for
#: every reader that takes the Zarr fill value as no-data (GDAL); no CF ``_FillValue`` (nothing is missing).
COUNT_FILL = 65535

_CF_METHODS = {"median": "median", "mean": "mean", "max": "maximum", "min": "minimum"}


def attr_name(key: str) -> str:
    """The cube attribute holding ``key`` (``config`` -> ``ndvi_scale_config``)."""
    return PREFIX + key


def get_attr(attrs: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """Attribute ``key`` of a cube, under its CF-legal name or, for cubes written before, its legacy one."""
    if PREFIX + key in attrs:
        return attrs[PREFIX + key]
    return attrs.get(LEGACY_PREFIX + key, default)


def cell_methods(method: str) -> str | None:
    """CF ``cell_methods`` of an NDVI composite by ``method``; None for a percentile (no CF method for it)."""
    cf = _CF_METHODS.get(method)
    if cf is None and method == "q50":
        cf = "median"
    return f"time: {cf}" if cf else None


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def method_text(method: str) -> str:
    """What a composite by ``method`` is, in words (``q25`` -> ``25th percentile``)."""
    if method.startswith("q") and method[1:].isdigit():
        return f"{_ordinal(int(method[1:]))} percentile"
    return {"max": "maximum", "min": "minimum"}.get(method, method)


def ndvi_attrs(method: str, period: str) -> dict[str, Any]:
    """CF attributes of the ``ndvi`` variable of a ``method`` composite per ``period``."""
    attrs: dict[str, Any] = {
        "long_name": f"normalized difference vegetation index, {method_text(method)} composite per {period}",
        "units": "1",
        "valid_min": np.float32(-1.0),
        "valid_max": np.float32(1.0),
    }
    cm = cell_methods(method)
    if cm:
        attrs["cell_methods"] = cm
    what = (
        f"{method_text(method)} over time (linear interpolation between order statistics, numpy's default)"
        if method.startswith("q")
        else method_text(method)
    )
    attrs["comment"] = (
        f"{what} of the NDVI of the clear observation days of each period (Sentinel-2 L2A, SCL-masked; "
        f"granules of one pass mosaicked per day); the period is given by {TIME_BOUNDS}; NaN where no day was clear"
    )
    return attrs


def count_attrs() -> dict[str, Any]:
    return {"long_name": "number of clear observation days in the period", "units": "1"}


def date_attrs(method: str) -> dict[str, Any]:
    """Attributes of ``max_date``/``min_date`` (the units are its encoding, see :func:`date_encoding`)."""
    return {"long_name": f"acquisition date of the {method_text(method)} NDVI"}


#: Dates converted at a time (``pipeline._days_to_datetime``, ``write._encode_epoch_dates``): a 2048^2 block
#: converted whole made int64 temporaries of 32 MB each, ~100 MB at once in fresh pages for every region of a
#: max/min run, and took ~250 ms a block; in pieces of 2 MB they stay in the CPU's cache.
DATE_STEP = 2**18


def date_encoding() -> dict[str, Any]:
    """Zarr/netCDF encoding of the dates of the extremes (datetime64 in memory)."""
    return {"units": DATE_UNITS, "calendar": "proleptic_gregorian", "dtype": "int32", "_FillValue": DATE_FILL}


def time_attrs() -> dict[str, Any]:
    return {
        "long_name": "start of the compositing period",
        "standard_name": "time",
        "axis": "T",
        "bounds": TIME_BOUNDS,
    }


def time_bounds(starts: Sequence[dt.date], ends: Sequence[dt.date]) -> np.ndarray:
    """CF cell bounds (n, 2) of periods given by first and last day (inclusive): [first day, day after last)."""
    lo = np.array([np.datetime64(s, "ns") for s in starts], dtype="datetime64[ns]")
    hi = np.array([np.datetime64(e + dt.timedelta(days=1), "ns") for e in ends], dtype="datetime64[ns]")
    return np.stack([lo, hi], axis=1) if len(lo) else np.empty((0, 2), "datetime64[ns]")


def time_bounds_coord(starts: Sequence[dt.date], ends: Sequence[dt.date]) -> dict[str, Any]:
    """``{"time_bnds": (dims, values, attrs)}`` to add to a Dataset's coordinates."""
    return {TIME_BOUNDS: (("time", "bnds"), time_bounds(starts, ends), {})}


def history_line(config: Mapping[str, Any], now: dt.datetime | None = None) -> str:
    """One CF ``history`` line: UTC timestamp, software and the command or API call that made the cube."""
    from . import __version__

    when = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{when} ndvi-scale {__version__}: {invocation(config)}"


def invocation(config: Mapping[str, Any]) -> str:
    """The command line if ndvi-scale runs as its command (``ndvi-scale compute ...``), else the API call with
    the run's ``config`` (a secret-free dict, :meth:`ndvi_scale.config.RunConfig.to_dict`)."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    from .storage import redact  # no user:password@ of a URL, no secret of the environment

    if prog in ("ndvi-scale", "__main__.py") and len(sys.argv) > 1 and sys.argv[1] == "compute":
        return redact("ndvi-scale " + shlex.join(sys.argv[1:]))
    return redact(api_call(config))


def api_call(config: Mapping[str, Any]) -> str:
    """``ndvi_scale.compute(...)`` with the non-empty fields of a (secret-free) config dict."""
    skip = {"extra"}
    args = ", ".join(f"{k}={v!r}" for k, v in config.items() if k not in skip and v not in (None, {}, []))
    return f"ndvi_scale.compute({args})"


def merge_history(new: str | None, old: str | None) -> str | None:
    """CF history after one more run: the newest line first (as NCO and CDO do), no line twice."""
    if not old:
        return new
    if not new:
        return old
    old_lines = old.splitlines()
    fresh = [line for line in new.splitlines() if line not in old_lines]
    return "\n".join([*fresh, *old_lines])


def gdal_crs_attr(crs: Any) -> dict[str, str]:
    """GDAL's ``_CRS`` array attribute (``wkt`` and, with an EPSG code, ``url``): the only place where the Zarr
    driver of older GDAL (3.6, Debian 12's) looks for the CRS of an array; it ignores CF ``grid_mapping``."""
    from pyproj import CRS

    c = CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    out = {"wkt": c.to_wkt()}
    epsg = c.to_epsg()
    if epsg:
        out["url"] = f"http://www.opengis.net/def/crs/EPSG/0/{epsg}"
    return out


__all__ = [
    "CONVENTIONS",
    "PREFIX",
    "LEGACY_PREFIX",
    "TIME_BOUNDS",
    "attr_name",
    "get_attr",
    "cell_methods",
    "ndvi_attrs",
    "count_attrs",
    "date_attrs",
    "date_encoding",
    "time_attrs",
    "time_bounds",
    "time_bounds_coord",
    "history_line",
    "merge_history",
    "gdal_crs_attr",
]
