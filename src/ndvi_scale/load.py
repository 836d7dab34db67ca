"""Load stage: normalised Sentinel-2 items -> one lazy, chunked (time, band, y, x) uint16 stack (stackstac).

Only red, nir and scl are read. Digital numbers are kept raw (``rescale=False``, uint16): scale/offset
differ per item (processing baseline) and are applied by the index stage, in float32, inside the fused
per-chunk task. SCL (20 m) is read onto the 10 m output grid with nearest resampling, so each 10 m pixel takes
the class of the 20 m pixel that contains it.

Signed hrefs (Planetary Computer): items keep their unsigned hrefs from search to here; :func:`load_stack`
signs them (:func:`sign_items`, with :func:`ndvi_scale.profiles.sign_href`) right before building the stack,
so each run, and each retried run, gets fresh tokens (they expire after ~45 minutes). A read that outlives its
token (HTTP 403) is re-signed and tried again by the reader (:mod:`ndvi_scale.faults`).

The file is authoritative for the grid. stackstac reads every asset through a warped VRT built from the file's
own georeferencing, so a ``proj:transform``/``proj:shape`` that does not match the file (decimated or
re-gridded copies) does not change a pixel. The metadata only tells stackstac where an asset lies, to skip the
chunks it does not touch: when that footprint contradicts the item's bbox it is replaced by the bbox
(:func:`asset_footprints`), so a wrong ``proj:shape`` cannot silently drop pixels. :func:`with_crs_from_cog`
reads CRS and grid from the file header when the metadata gives no CRS.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Sequence
from fractions import Fraction
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio.enums
import stackstac
import xarray as xr
from pyproj import CRS, Transformer
from stackstac.rio_env import LayeredEnv

from .config import BBox
from .errors import InputError, ItemError
from .faults import ReadPolicy
from .http import gdal_retry_options
from .reader import FastReader

if TYPE_CHECKING:
    from .items import S2Item
    from .profiles import Profile

log = logging.getLogger(__name__)

#: The three assets read for NDVI, in stack order.
BANDS = ("red", "nir", "scl")

#: GDAL's block cache, MB per process, unless the environment says otherwise. GDAL's default is 5 % of the host's
#: RAM: 1.2 GB on 24 GiB, 13 GB on a 256 GB node, where it pushes a dask worker past its memory limit. The fast
#: reader reads whole tiles straight into its buffers and keeps shared tiles itself (ndvi_scale.reader), so GDAL's
#: cache only serves headers, the warped path and partly-read tiles. 128 MB: peak RSS 1.4-1.5 GB instead of 2.4 GB in
#: benchmarks/. Set in the process environment, read once by GDAL: as a GDAL_ENV option rasterio would set and
#: reset it around every open and read, which flushes the cache (GDAL then re-fetched ranges it had just read,
#: tests/test_real_raster.py).
GDAL_CACHEMAX_MB = 128
os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHEMAX_MB))

#: GDAL settings for reading COGs over HTTP/object storage.
GDAL_ENV = LayeredEnv(
    always=dict(
        # A 2048-px chunk covers 2x2 internal 1024-px tiles: merging consecutive ranges means fewer GETs.
        GDAL_HTTP_MERGE_CONSECUTIVE_RANGES="YES",
        GDAL_HTTP_MULTIRANGE="YES",
        # Transient 429/5xx and timeouts from object stores: GDAL retries with the one policy of
        # ndvi_scale.http (statuses, attempts, backoff, timeouts) before we see an error.
        **gdal_retry_options(),
        # Only the .tif is there; without this GDAL lists the "directory" looking for .aux/.msk/.ovr sidecars
        # (~22 requests per open instead of 3).
        GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR",
        CPL_VSIL_CURL_ALLOWED_EXTENSIONS=".tif,.tiff,.TIF,.jp2,.JP2",
        # One 64 kB header read covers the COG IFDs and tile offsets of an S2 band (default 16 kB needs 2-3).
        GDAL_INGESTED_BYTES_AT_OPEN="65536",
        # Dask already runs one read task per core; GDAL's own decode threads would oversubscribe them.
        GDAL_NUM_THREADS="1",
    ),
    open=dict(VSI_CACHE=True),  # re-opens of the same URL in other threads hit the header cache
    read=dict(VSI_CACHE=False),  # pixel tiles are read once: caching them would only evict headers
)


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS84 UTM zone containing (lon, lat): 326zz north of the equator (and on it), 327zz south.

    Regular 6-degree zones: zone 1 is 180W..174W, zone 60 is 174E..180E (lon 180 belongs to zone 60). The
    Norway/Svalbard exceptions of the MGRS are not applied.
    """
    zone = min(max(int(math.floor((lon + 180) / 6)) + 1, 1), 60)
    return (32600 if lat >= 0 else 32700) + zone


def utm_zone_shares(bbox: BBox) -> dict[int, float]:
    """Fraction of the bbox's area in each UTM zone it touches (zone number -> share, summing to 1).

    On the sphere the area of a lon/lat box is ``R^2 (lon2 - lon1) (sin lat2 - sin lat1)``: every zone sees the
    same latitude span of the bbox, so its share of the area is its share of the longitude span.
    """
    width = bbox.east - bbox.west
    shares: dict[int, float] = {}
    # All 60 zones, not "from the zone of west": west + 180 may round to a zone boundary in floating point
    # (west = -3e-15 gives 180.0) and a sliver of the zone to the west would be lost.
    for zone in range(1, 61):
        lo, hi = -180.0 + 6 * (zone - 1), -180.0 + 6 * zone
        if lo >= bbox.east:
            break
        part = min(hi, bbox.east) - max(lo, bbox.west)
        if part > 0:
            shares[zone] = part / width
    return shares


def auto_epsg(bbox: BBox) -> int:
    """The output CRS of ``--crs auto``: the UTM zone covering most of ``bbox`` by area (see :func:`choose_epsg`)."""
    # Exact arithmetic on the (exactly representable) float inputs: a box symmetric about a zone boundary is an
    # exact tie, never decided by rounding; the western zone wins it.
    w, e = Fraction(bbox.west), Fraction(bbox.east)
    best_zone, best = 0, Fraction(-1)
    for zone in range(1, 61):  # all zones: see utm_zone_shares
        lo, hi = Fraction(-180 + 6 * (zone - 1)), Fraction(-180 + 6 * zone)
        if lo >= e:
            break
        part = min(hi, e) - max(lo, w)
        if part > best:  # strictly larger: on a tie the western zone (seen first) stays
            best_zone, best = zone, part
    # Hemisphere by area too: the part of the box north of the equator against the part south of it.
    s, n = math.radians(bbox.south), math.radians(bbox.north)
    north = math.sin(n) - math.sin(max(s, 0.0)) if n > 0 else 0.0
    south = math.sin(min(n, 0.0)) - math.sin(s) if s < 0 else 0.0
    return (32600 if north >= south else 32700) + best_zone


def choose_epsg(items: Sequence[S2Item], bbox: BBox, crs: str = "auto") -> int:
    """The output CRS of a run: ``crs`` if given as ``EPSG:XXXX``, else the UTM zone covering most of the bbox.

    Policy for areas across several UTM zones (Sentinel-2 granules come in the UTM zone of their MGRS tile, so
    a bbox across a zone boundary gets items in two or more CRSs):

    * ``crs="auto"`` (the default): the WGS84 UTM zone that covers the largest part of the bbox **by area**;
      on an exact tie, the western zone. The hemisphere is that of the larger part of the bbox (north on a
      tie): EPSG:326zz or EPSG:327zz. Regular 6-degree zones (the MGRS exceptions over Norway and Svalbard
      are not applied). The items are **not** consulted: the grid must not depend on which scenes a search
      returned (a month with more scenes from the neighbouring zone would otherwise move the whole cube to
      another CRS, and the monthly append to an existing cube would no longer match its grid). Same bbox, same
      resolution: same CRS and same grid, every run.
    * ``crs="EPSG:XXXX"``: that CRS for everything (a projected CRS in metres, since ``resolution`` is in
      metres). Use it to keep a cube in a CRS of your choice, e.g. to continue an existing cube.

    Every item in another CRS is reprojected **once**, straight from its native 10 m/20 m pixels onto the
    output grid (stackstac builds a GDAL WarpedVRT per asset), with **nearest** resampling: reflectances are
    not blended across pixels and SCL classes stay classes. Items already in the output CRS are not reprojected:
    at 10 or 20 m their pixels line up with the snapped grid (Sentinel-2 tile origins are multiples of 60 m), so
    nearest resampling copies them unchanged.

    The output grid is the bbox's four corners projected to the output CRS, their envelope snapped outwards to
    multiples of the resolution (stackstac's ``snap_bounds``: ``floor(min / res) * res``,
    ``ceil(max / res) * res``). Pixel edges therefore lie on multiples of the resolution (pixel centres on odd
    multiples of half of it) and the grid is a pure function of (bbox, CRS, resolution): it does not depend on
    the items, nor on ``--chunk`` (chunks are windows of that one grid, so chunked and unchunked runs agree).
    """
    if crs != "auto":
        try:
            epsg = int(CRS.from_user_input(crs).to_epsg() or 0) or _bad_crs(crs)
        except InputError:
            raise
        except Exception as e:  # pyproj raises its own CRSError
            raise InputError(
                f"crs {crs!r} is not a known CRS ({e}); expected EPSG:XXXX, e.g. EPSG:32631"
            ) from None
        try:
            bounds = projected_bounds(bbox, epsg)
        except Exception:  # pyproj's ProjError: the bbox is outside what the projection can represent
            bounds = (math.nan,) * 4
        if not all(math.isfinite(v) for v in bounds):
            raise InputError(
                f"crs {crs!r} cannot represent bbox {bbox} (projection gives {bounds}); choose a CRS that covers "
                "the area, or --crs auto"
            )
        return epsg
    epsg = auto_epsg(bbox)
    others = collections.Counter(it.epsg for it in items if it.epsg and it.epsg != epsg)
    if others:
        log.info(
            "output CRS EPSG:%d (UTM zone covering most of the bbox); reprojecting %s item(s) from %s",
            epsg, sum(others.values()), ", ".join(f"EPSG:{e}" for e in sorted(others)),
        )
    return epsg


def _bad_crs(crs: str) -> int:
    raise InputError(f"crs {crs!r} has no EPSG code; expected EPSG:XXXX, e.g. EPSG:32631")


def projected_bounds(bbox: BBox, epsg: int) -> tuple[float, float, float, float]:
    """The bbox reprojected to ``epsg`` (densified edges, so curved edges are covered)."""
    tr = Transformer.from_crs(4326, epsg, always_xy=True)
    return tr.transform_bounds(*bbox.as_tuple(), densify_pts=21)


def _signers() -> dict[str, Profile]:
    """Profiles whose hrefs need signing, by name (an item's ``provider`` is the profile name)."""
    from .profiles import list_profiles

    return {p.name: p for p in list_profiles() if p.signing}


def sign_items(items: Sequence[S2Item]) -> list[S2Item]:
    """Copies of ``items`` with their band hrefs signed (:func:`ndvi_scale.profiles.sign_href`) where the
    provider needs it; other items are returned as they are. The given items keep their unsigned hrefs.

    Signs on every call, so calling it again (a retried or resumed run) gets fresh tokens: the Planetary
    Computer SDK caches a token per storage container and fetches a new one when it is about to expire.
    """
    from .profiles import sign_href

    signers = _signers()
    out: list[S2Item] = []
    for it in items:
        prof = signers.get(it.provider)
        if prof is None:
            out.append(it)
            continue
        bands = {name: dataclasses.replace(b, href=sign_href(prof, b.href)) for name, b in it.bands.items()}
        out.append(dataclasses.replace(it, bands=MappingProxyType(bands)))
    return out


#: GDAL options for the header reads of :func:`with_crs_from_cog` (the pixel reads use :data:`GDAL_ENV`).
_HEADER_ENV = dict(
    GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR",
    CPL_VSIL_CURL_ALLOWED_EXTENSIONS=".tif,.tiff,.TIF,.jp2,.JP2",
    GDAL_INGESTED_BYTES_AT_OPEN="65536",
    **gdal_retry_options(),
)


def with_crs_from_cog(item: S2Item) -> S2Item:
    """Fill a missing CRS (and the grid: transform, shape) from the band files' headers (one small read each).

    For items whose metadata gives no CRS (no ``proj:epsg``/``proj:code`` on the item or the assets). The file
    is authoritative: a band's transform and shape are replaced by the file's whenever its header is read.
    Hrefs are signed for the read when the provider needs it (the returned item keeps the unsigned hrefs).
    """
    import rasterio
    import rasterio.errors

    bands = dict(item.bands)
    epsg: int | None = item.epsg
    signed = sign_items([item])[0].bands
    for key, band in item.bands.items():
        if band.epsg or (epsg and band.transform and band.shape):
            continue
        try:
            with rasterio.Env(**_HEADER_ENV), rasterio.open(signed[key].href) as src:
                code = src.crs.to_epsg() if src.crs else None
                transform, shape = tuple(src.transform)[:6], (src.height, src.width)
        except rasterio.errors.RasterioIOError as e:
            raise ItemError(
                f"item {item.id}: asset {key} ({band.href}) has no CRS in its metadata and the file cannot "
                f"be opened to read it ({str(e)[:200]}); check the href and credentials, or use items with "
                "proj:epsg/proj:code"
            ) from None
        if code is None:
            raise ItemError(
                f"item {item.id}: asset {key} ({band.href}) has no EPSG CRS in its metadata nor in the file; "
                "use items with proj:epsg/proj:code or pass --crs"
            )
        bands[key] = dataclasses.replace(band, epsg=code, transform=transform, shape=shape)
        epsg = epsg or code
    return dataclasses.replace(item, bands=MappingProxyType(bands), epsg=epsg)


#: How far (fraction of the asset's width/height, per side) the item's bbox may stick out of the footprint
#: that ``proj:transform``/``proj:shape`` give before that footprint is distrusted. A lon/lat bbox
#: re-projected to UTM overshoots a correct footprint by up to ~5 % at high latitudes (grid convergence); a
#: wrong ``proj:shape`` (e.g. the 20 m band's shape with the 10 m band's transform) is off by 50 %.
FOOTPRINT_TOLERANCE = 0.1


@functools.lru_cache(maxsize=64)
def _from_lonlat(epsg: int) -> Transformer:
    return Transformer.from_crs(4326, epsg, always_xy=True)


def asset_footprints(item: dict[str, Any]) -> dict[str, Any]:
    """Check each asset's footprint (``proj:transform`` x ``proj:shape``) against the item's lon/lat bbox.

    stackstac skips, per output chunk, the assets whose footprint does not touch it; a footprint smaller than
    the file (wrong ``proj:shape``) would silently leave pixels out. An asset whose footprint does not contain
    the item's bbox (re-projected, within :data:`FOOTPRINT_TOLERANCE`) loses its transform and shape and gets
    ``proj:bbox`` = the re-projected item bbox instead: stackstac then takes the pixels from the file's own
    grid, over the whole area the item claims. Items without bbox, and rotated transforms, are left alone.
    Returns ``item`` (a ``to_stackstac()`` dict), changed in place.
    """
    bbox = item.get("bbox")
    if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not bbox[0] < bbox[2] or not bbox[1] < bbox[3]:
        return item
    for name, asset in item.get("assets", {}).items():
        epsg, tf, shape = asset.get("proj:epsg"), asset.get("proj:transform"), asset.get("proj:shape")
        if not epsg or not tf or not shape or tf[1] != 0 or tf[3] != 0:
            continue
        xs = (tf[2], tf[2] + tf[0] * shape[1])
        ys = (tf[5], tf[5] + tf[4] * shape[0])
        left, right, bottom, top = min(xs), max(xs), min(ys), max(ys)
        try:
            w, s, e, n = _from_lonlat(int(epsg)).transform_bounds(
                bbox[0], bbox[1], bbox[2], bbox[3], densify_pts=21
            )
        except Exception:  # pyproj errors for a bbox outside the CRS's area: nothing to compare with
            continue
        if not all(math.isfinite(v) for v in (w, s, e, n)):
            continue
        mx, my = FOOTPRINT_TOLERANCE * (right - left), FOOTPRINT_TOLERANCE * (top - bottom)
        if w >= left - mx and e <= right + mx and s >= bottom - my and n <= top + my:
            continue
        log.warning(
            "item %s: asset %s: proj:transform/proj:shape give the footprint %s, which does not contain the "
            "item bbox (%s in EPSG:%s); using the bbox (the pixels and their grid come from the file)",
            item.get("id"), name, (left, bottom, right, top), (round(w), round(s), round(e), round(n)), epsg,
        )
        asset.pop("proj:transform", None)
        asset.pop("proj:shape", None)
        asset["proj:bbox"] = [w, s, e, n]
    return item


def load_stack(
    items: Sequence[S2Item],
    *,
    epsg: int,
    bbox: BBox,
    resolution: float,
    chunk: int,
    time_chunks: Sequence[int],
    policy: ReadPolicy | None = None,
) -> xr.DataArray:
    """A lazy (time, band, y, x) uint16 stack of red, nir, scl for ``items`` (in the given order) on the
    output grid.

    ``time_chunks`` groups consecutive items into one dask chunk each: all items of one period are read by one
    task per spatial chunk, so the graph has periods x chunks reads, not items x chunks (stackstac's default).
    Hrefs are signed here (:func:`sign_items`) and asset footprints checked (:func:`asset_footprints`).
    Reads follow ``policy`` (retries, skip or fail, where faults are recorded; see :mod:`ndvi_scale.faults`);
    for signed hrefs it gets a re-signing function, so a retried read gets a fresh token.
    """
    if sum(time_chunks) != len(items):
        raise ValueError(f"time_chunks {tuple(time_chunks)} do not add up to {len(items)} items")
    # Sign here, at the last moment (tokens expire): the items keep their unsigned hrefs, a re-run re-signs.
    dicts: list[dict[str, Any]] = [asset_footprints(it.to_stackstac()) for it in sign_items(items)]
    policy = policy if policy is not None else ReadPolicy()
    signed = sorted({it.provider for it in items if it.provider in _signers()})
    if signed and policy.resign is None:
        from .profiles import resign_href

        policy = dataclasses.replace(policy, resign=functools.partial(resign_href, signed[0]))
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
        # stackstac's default turns an HTTP 404 into silent no-data (a warning at most): a removed file must go
        # through the read policy like any other fault (fail naming it, or skip and record it).
        errors_as_nodata=(),
        reader=functools.partial(FastReader, policy=policy),
    )
    return stack
