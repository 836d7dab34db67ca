"""Load stage: normalised Sentinel-2 items -> one lazy, chunked (time, band, y, x) uint16 stack (stackstac).

Only red, nir and scl are read. Digital numbers are kept raw (``rescale=False``, uint16): scale/offset differ per item
(processing baseline) and are applied by the index stage, in float32, inside the fused per-chunk task. SCL (20 m) is
read onto the 10 m output grid with nearest resampling, so each 10 m pixel takes the class of the 20 m pixel that
contains it.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio.enums
import stackstac
import xarray as xr
from pyproj import CRS, Transformer
from stackstac.rio_env import LayeredEnv

from .config import BBox
from .errors import InputError, ItemError

if TYPE_CHECKING:
    from .items import S2Item

#: The three assets read for NDVI, in stack order.
BANDS = ("red", "nir", "scl")

#: GDAL settings for reading COGs over HTTP/object storage.
GDAL_ENV = LayeredEnv(
    always=dict(
        # A 2048-px chunk covers 2x2 internal 1024-px tiles: merging consecutive ranges turns them into fewer GETs.
        GDAL_HTTP_MERGE_CONSECUTIVE_RANGES="YES",
        GDAL_HTTP_MULTIRANGE="YES",
        # Transient 429/5xx from object stores: let GDAL retry with its own backoff before we see an error.
        GDAL_HTTP_MAX_RETRY="5",
        GDAL_HTTP_RETRY_DELAY="1",
        GDAL_HTTP_TIMEOUT="60",
        # Only the .tif is there; without this GDAL lists the "directory" looking for .aux/.msk/.ovr sidecars
        # (~22 requests per open instead of 3).
        GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR",
        CPL_VSIL_CURL_ALLOWED_EXTENSIONS=".tif,.tiff,.TIF,.jp2,.JP2",
        # One header read of 64 kB covers the COG IFDs and tile offsets of an S2 band (default 16 kB needs 2-3).
        GDAL_INGESTED_BYTES_AT_OPEN="65536",
        # Dask already runs one read task per core; GDAL's own decode threads would only oversubscribe them.
        GDAL_NUM_THREADS="1",
    ),
    open=dict(VSI_CACHE=True),  # re-opens of the same URL in other threads hit the header cache
    read=dict(VSI_CACHE=False),  # pixel tiles are read once: caching them would only evict headers
)


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS84 UTM zone containing (lon, lat)."""
    zone = min(max(int(math.floor((lon + 180) / 6)) + 1, 1), 60)
    return (32600 if lat >= 0 else 32700) + zone


def choose_epsg(items: Sequence[S2Item], bbox: BBox, crs: str = "auto") -> int:
    """The output CRS: ``crs`` if given as EPSG:XXXX, else the CRS shared by most items.

    Ties are broken by the UTM zone of the bbox centre, then the smallest code, so the choice is deterministic.
    """
    if crs != "auto":
        try:
            return int(CRS.from_user_input(crs).to_epsg() or 0) or _bad_crs(crs)
        except Exception as e:  # pyproj raises its own CRSError
            raise InputError(f"crs {crs!r} is not a known CRS ({e}); expected EPSG:XXXX, e.g. EPSG:32631") from None
    counts = collections.Counter(it.epsg for it in items if it.epsg)
    if not counts:
        return utm_epsg((bbox.west + bbox.east) / 2, (bbox.south + bbox.north) / 2)
    best = max(counts.values())
    tied = sorted(e for e, c in counts.items() if c == best)
    centre = utm_epsg((bbox.west + bbox.east) / 2, (bbox.south + bbox.north) / 2)
    return centre if centre in tied else tied[0]


def _bad_crs(crs: str) -> int:
    raise InputError(f"crs {crs!r} has no EPSG code; expected EPSG:XXXX, e.g. EPSG:32631")


def projected_bounds(bbox: BBox, epsg: int) -> tuple[float, float, float, float]:
    """The bbox reprojected to ``epsg`` (densified edges, so curved edges are covered)."""
    tr = Transformer.from_crs(4326, epsg, always_xy=True)
    return tr.transform_bounds(*bbox.as_tuple(), densify_pts=21)


def with_crs_from_cog(item: S2Item) -> S2Item:
    """Fill a missing CRS/transform/shape from the red COG header (one small read). Items without proj metadata."""
    import dataclasses

    import rasterio

    bands = dict(item.bands)
    epsg: int | None = item.epsg
    for key, band in item.bands.items():
        if band.epsg or (epsg and band.transform and band.shape):
            continue
        with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(band.href) as src:
            code = src.crs.to_epsg() if src.crs else None
            if code is None:
                raise ItemError(
                    f"item {item.id}: asset {key} ({band.href}) has no EPSG CRS in its metadata nor in the file; "
                    "use items with proj:epsg/proj:code or pass --crs"
                )
            bands[key] = dataclasses.replace(
                band, epsg=code, transform=tuple(src.transform)[:6], shape=(src.height, src.width)
            )
            epsg = epsg or code
    return dataclasses.replace(item, bands=bands, epsg=epsg)


def load_stack(
    items: Sequence[S2Item],
    *,
    epsg: int,
    bbox: BBox,
    resolution: float,
    chunk: int,
    time_chunks: Sequence[int],
) -> xr.DataArray:
    """A lazy (time, band, y, x) uint16 stack of red, nir, scl for ``items`` (in the given order) on the output grid.

    ``time_chunks`` groups consecutive items into one dask chunk each: all items of one period are read by one task
    per spatial chunk, so the graph has periods x chunks reads, not items x chunks (stackstac's default).
    """
    if sum(time_chunks) != len(items):
        raise ValueError(f"time_chunks {tuple(time_chunks)} do not add up to {len(items)} items")
    dicts: list[dict[str, Any]] = [it.to_stackstac() for it in items]
    stack = stackstac.stack(
        dicts,
        assets=list(BANDS),
        epsg=epsg,
        resolution=resolution,
        bounds_latlon=bbox.as_tuple(),
        snap_bounds=True,
        resampling=rasterio.enums.Resampling.nearest,
        chunksize=(tuple(time_chunks), len(BANDS), chunk, chunk),
        dtype=np.dtype("uint16"),
        fill_value=np.uint16(0),  # numpy 2: a Python int does not "safely cast" to uint16 for stackstac
        rescale=False,
        sortby_date=False,
        xy_coords="center",
        properties=False,
        band_coords=False,
        gdal_env=GDAL_ENV,
    )
    return stack
