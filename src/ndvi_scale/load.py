"""Load stage: where the pixels come from. CRS policy, href signing, CRS from COG headers, and the public raw stack.

* :func:`choose_epsg` decides the output CRS (the UTM zone covering most of the bbox, or the user's); the grid
  itself is :func:`ndvi_scale.engine.grid.output_grid`.
* :func:`sign_items`: items keep their unsigned hrefs from search to the build, which signs them (Planetary
  Computer tokens expire after ~45 minutes: each run, and each retried read, gets fresh ones).
* :func:`with_crs_from_cog` reads CRS and grid from the file header when the metadata gives no CRS.
* :func:`stack`: the lazy (time, band, y, x) raw DN stack of normalised items through stackstac's public API,
  for users who want the bands themselves (and the tests' oracle). Optional: ``pip install ndvi-scale[stackstac]``;
  the composites never go through it (:mod:`ndvi_scale.engine` reads the pixels).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Sequence
from fractions import Fraction
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr
from pyproj import CRS, Transformer

from .config import BBox
from .engine.handles import GDAL_OPEN_OPTIONS
from .engine.sources import BANDS, _contains_bbox, _transformer_bounds
from .errors import InputError, ItemError
from .http import gdal_retry_options

if TYPE_CHECKING:
    from .items import S2Item
    from .profiles import Profile

log = logging.getLogger(__name__)

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


def signers() -> dict[str, Profile]:
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

    signers_ = signers()
    out: list[S2Item] = []
    for it in items:
        prof = signers_.get(it.provider)
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
        if _contains_bbox(tf, (int(shape[0]), int(shape[1])), int(epsg), bbox):
            continue
        try:
            w, s, e, n = _transformer_bounds(bbox, int(epsg))
        except Exception:
            continue
        log.warning(
            "item %s: asset %s: proj:transform/proj:shape %s give a footprint that does not contain the "
            "item bbox (%s in EPSG:%s); using the bbox (the pixels and their grid come from the file)",
            item.get("id"), name, (tf, shape), (round(w), round(s), round(e), round(n)), epsg,
        )
        asset.pop("proj:transform", None)
        asset.pop("proj:shape", None)
        asset["proj:bbox"] = [w, s, e, n]
    return item


def stack(
    items: Sequence[S2Item],
    *,
    epsg: int,
    bbox: BBox,
    resolution: float,
    chunk: int = 2048,
    time_chunks: Sequence[int] | None = None,
) -> xr.DataArray:
    """A lazy (time, band, y, x) uint16 stack of raw red, nir, scl digital numbers of ``items`` (in the given
    order) on the run's output grid, through ``stackstac.stack`` (its public API only).

    For users who want the bands themselves, and the tests' oracle; the composites never go through it. Digital
    numbers are raw (no scale/offset: they differ per item, see each item's bands). ``time_chunks`` groups
    consecutive items into one dask chunk each. Hrefs are signed here and asset footprints checked
    (:func:`asset_footprints`). Needs stackstac (``pip install ndvi-scale[stackstac]``); raises
    :class:`~ndvi_scale.errors.InputError` saying so when it is missing.
    """
    try:
        import stackstac
    except ImportError:
        raise InputError(
            "ndvi_scale.stack needs stackstac, which is not installed; pip install 'ndvi-scale[stackstac]' (it "
            "pins pandas<3), or use ndvi_scale.compute for composites, which does not need it"
        ) from None
    import rasterio.enums

    time_chunks = tuple(time_chunks) if time_chunks is not None else (len(items),)
    if sum(time_chunks) != len(items):
        raise ValueError(f"time_chunks {time_chunks} do not add up to {len(items)} items")
    dicts: list[dict[str, Any]] = [asset_footprints(it.to_stackstac()) for it in sign_items(items)]
    return stackstac.stack(
        dicts,
        assets=list(BANDS),
        epsg=epsg,
        resolution=resolution,
        bounds_latlon=bbox.as_tuple(),
        snap_bounds=True,
        resampling=rasterio.enums.Resampling.nearest,
        chunksize=(time_chunks, len(BANDS), chunk, chunk),
        dtype=np.dtype("uint16"),
        fill_value=np.uint16(0),  # numpy 2: a Python int does not "safely cast" to uint16 for stackstac
        rescale=False,
        sortby_date=False,
        xy_coords="center",
        properties=False,
        band_coords=False,
        gdal_env=stackstac.DEFAULT_GDAL_ENV.updated(always=GDAL_OPEN_OPTIONS),
        errors_as_nodata=(),
    )
