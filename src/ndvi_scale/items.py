"""Sentinel-2 L2A STAC items from any provider -> one band model (red, nir, scl) with a per-item scale/offset.

Providers describe the same ESA product in different ways (asset keys, where the CRS is, where the
processing baseline is, whether a scale/offset is given and where). :func:`normalize_item` reads a plain STAC
item dict (any STAC version from 1.0.0-beta.1 to 1.1.0, without going through pystac and its extension
migrations) and returns an :class:`S2Item` with exactly the three bands NDVI needs, or a :class:`Skipped`
record saying why the item is not usable.

The radiometric rule (ESA, processing baseline 04.00, January 2022)::

    reflectance = DN * scale + offset,   scale = 0.0001,
    offset = -0.1 (BOA_ADD_OFFSET -1000 DN) if processing baseline >= 04.00, else 0

The baseline decides, not the acquisition date (old scenes are reprocessed with new baselines). When a
provider's raster metadata contradicts the baseline, the baseline wins and the item carries a warning. Without
any baseline the raster metadata is used (with a warning); without either, the offset is 0 (with a warning).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import posixpath
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import CatalogError, InputError, ItemError, shown

__all__ = [
    "BANDS",
    "BOA_OFFSET",
    "DEFAULT_ASSET_ALIASES",
    "DEFAULT_SCALE",
    "BandAsset",
    "S2Item",
    "Skipped",
    "epsg_from_mgrs",
    "expected_offset",
    "inspect",
    "inspect_line",
    "normalize_item",
    "normalize_items",
    "processing_baseline",
    "read_items",
]

#: The three bands every normalised item has, in this order.
BANDS: tuple[str, ...] = ("red", "nir", "scl")

#: Sentinel-2 L2A quantification: reflectance = DN / 10000.
DEFAULT_SCALE = 0.0001

#: Reflectance offset of processing baseline >= 04.00 (BOA_ADD_OFFSET = -1000 DN, times the scale).
BOA_OFFSET = -0.1

#: First processing baseline with the BOA offset.
OFFSET_BASELINE: tuple[int, int] = (4, 0)

#: Asset keys per band, in order of preference. This is the single default table: provider profiles
#: (:mod:`ndvi_scale.profiles`) put their own keys first and extend it, they never replace it.
#: ``nir`` is B08 (10 m). Earth Search / stactools ``nir08`` and the ``B8A`` keys are band 8A (20 m, narrow
#: NIR) and must never be used as ``nir``. JP2 duplicates (``red-jp2``) are last resorts: a COG is preferred.
DEFAULT_ASSET_ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "red": ("red", "B04", "B04_10m", "b04", "b04_10m", "red-jp2"),
        "nir": ("nir", "B08", "B08_10m", "b08", "b08_10m", "nir-jp2"),
        "scl": ("scl", "SCL", "SCL_20m", "scl_20m", "scl-jp2"),
    }
)

#: Asset keys that are band 8A (or other non-B08 NIR) and are refused as ``nir`` aliases.
NOT_NIR_KEYS = frozenset({"nir08", "nir08-jp2", "B8A", "b8a", "B8A_20m", "B8A_60m", "nir09", "B09"})

#: Collections known to hold Sentinel-2 L2A (Earth Search v1 + c1, Earth Search v0, Planetary Computer, CDSE).
L2A_COLLECTIONS = frozenset(
    {"sentinel-2-l2a", "sentinel-2-c1-l2a", "sentinel-s2-l2a-cogs", "sentinel-s2-l2a"}
)

_UTC = dt.UTC
_HTTP_TIMEOUT = 30.0

_PRODUCT_ID_KEYS = (
    "s2:product_uri",
    "sentinel:product_id",
    "s2:granule_id",
    "s2:tile_id",
    "s2:datastrip_id",
    "s2:datatake_id",
    "eopf:datastrip_id",
    "eopf:datatake_id",
)
_PRODUCT_TYPE_KEYS = ("s2:product_type", "product:type", "sentinel:product_type")
_LEVEL_KEYS = ("s2:processing_level", "processing:level", "sentinel:processing_level")

_BASELINE_DOTTED = re.compile(r"^\s*N?(\d{1,2})\.(\d{1,2})\s*$")
_BASELINE_COMPACT = re.compile(r"^\s*N?(\d{2})(\d{2})\s*$")
_BASELINE_IN_NAME = re.compile(r"(?:^|_)N(\d{2})\.?(\d{2})(?=$|[_.])")
_MGRS = re.compile(r"^(\d{1,2})([C-HJ-NP-X])([A-HJ-NP-Z]{2})$")
_TILE_IN_NAME = re.compile(r"_T(\d{2}[C-HJ-NP-X][A-HJ-NP-Z]{2})(?=$|[_.])")
_TILE_IN_ES_ID = re.compile(r"^S2[A-D]_(\d{1,2}[C-HJ-NP-X][A-HJ-NP-Z]{2})_\d{8}_")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


# ----------------------------------------------------------------------------------------------------
# data model


@dataclass(frozen=True)
class BandAsset:
    """One band of one item: where it is and how to turn its DN into physical values.

    For red/nir ``reflectance = DN * scale + offset``; for scl ``scale == 1``, ``offset == 0`` (class codes).
    """

    href: str
    scale: float
    offset: float
    nodata: float | None
    transform: tuple[float, ...] | None = None
    """``proj:transform`` (first 6 numbers, GDAL/affine order a, b, c, d, e, f) if the metadata gives it."""
    shape: tuple[int, int] | None = None
    """``proj:shape`` (rows, cols) if the metadata gives it."""
    epsg: int | None = None
    """CRS given on the asset itself (``proj:epsg`` or ``proj:code``); None if only the item has one."""
    media_type: str | None = None
    """The asset's media ``type`` (e.g. ``image/tiff; application=geotiff`` or ``image/jp2``)."""
    key: str | None = None
    """The provider's asset key this band was taken from (``red``, ``B04``, ``B04_10m``...)."""


@dataclass(frozen=True)
class S2Item:
    """A Sentinel-2 L2A scene reduced to what the NDVI pipeline needs, the same for every provider."""

    id: str
    collection: str | None
    provider: str
    """``earth-search-v1``, ``earth-search-v0``, ``planetary-computer``, ``cdse``, ``stactools``, ``local`` or
    ``unknown`` (guessed from hrefs, links, collection and properties)."""
    datetime: dt.datetime
    """Acquisition time, timezone-aware UTC."""
    epsg: int | None
    """CRS of the bands (UTM zone); None if no metadata gives it (read it from the files then)."""
    processing_baseline: str | None
    """``NN.NN`` (e.g. ``05.10``), None if nothing in the metadata gives it."""
    cloud_cover: float | None
    tile: str | None
    """MGRS tile, e.g. ``13TDE`` (zone zero-padded to two digits)."""
    bbox: tuple[float, float, float, float] | None
    """WGS84 bounding box (west, south, east, north)."""
    geometry: dict | None
    bands: Mapping[str, BandAsset]
    """Exactly the keys ``red``, ``nir``, ``scl``."""
    warnings: tuple[str, ...]

    def to_stackstac(self) -> dict[str, Any]:
        """A plain STAC 1.0.0 item dict that stackstac 0.5.1 accepts.

        Only ``proj:epsg`` (an int) is written: stackstac reads no other CRS field, and pystac >= 1.12 would
        migrate it to ``proj:code`` (hence "Cannot pick a common CRS"), so do not pass this through pystac.
        There is no ``raster:bands``: scale/offset are applied by ndvi-scale from :attr:`bands`; stackstac
        must read raw DN (use ``rescale=False``).
        """
        props: dict[str, Any] = {"datetime": _format_datetime(self.datetime)}
        if self.epsg is not None:
            props["proj:epsg"] = int(self.epsg)
        if self.cloud_cover is not None:
            props["eo:cloud_cover"] = self.cloud_cover
        if self.tile is not None:
            props["s2:mgrs_tile"] = self.tile
        if self.processing_baseline is not None:
            props["s2:processing_baseline"] = self.processing_baseline
        assets: dict[str, Any] = {}
        for name in BANDS:
            band = self.bands[name]
            asset: dict[str, Any] = {
                "href": band.href,
                "type": band.media_type or _guess_media_type(band.href),
            }
            epsg = band.epsg if band.epsg is not None else self.epsg
            if epsg is not None:
                asset["proj:epsg"] = int(epsg)
            if band.transform is not None:
                asset["proj:transform"] = list(band.transform)
            if band.shape is not None:
                asset["proj:shape"] = list(band.shape)
            asset["roles"] = ["data"]
            assets[name] = asset
        out: dict[str, Any] = {
            "type": "Feature",
            "stac_version": "1.0.0",
            "stac_extensions": [],
            "id": self.id,
            "collection": self.collection,
            "geometry": self.geometry,
            "properties": props,
            "assets": assets,
            "links": [],
        }
        if self.bbox is not None:  # stackstac falls back to it for the extent; a None bbox would crash it
            out["bbox"] = list(self.bbox)
        return out

    def inspect_record(self) -> dict[str, Any]:
        """JSON-friendly summary for ``ndvi-scale inspect`` and provenance."""
        return {
            "id": self.id,
            "collection": self.collection,
            "provider": self.provider,
            "epsg": self.epsg,
            "processing_baseline": self.processing_baseline,
            "bands": {
                name: {"href": b.href, "scale": b.scale, "offset": b.offset, "nodata": b.nodata}
                for name, b in self.bands.items()
            },
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class Skipped:
    """An item that is not a usable Sentinel-2 L2A scene, and why."""

    id: str
    reason: str

    def inspect_record(self) -> dict[str, Any]:
        return {"id": self.id, "skipped": self.reason}


# ----------------------------------------------------------------------------------------------------
# processing baseline and offset


def _normalize_baseline(value: Any) -> str | None:
    """``"05.09"``, ``"5.09"``, ``"N0509"``, ``"0509"``, ``5.09`` -> ``"05.09"``; anything else -> None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            return None
        value = f"{value:.2f}"
    if not isinstance(value, str):
        return None
    m = _BASELINE_DOTTED.match(value)
    if m:
        major, minor = m.group(1), m.group(2)
        if len(minor) == 1:  # "5.1" is the number 5.10, not 05.01
            minor += "0"
        return f"{int(major):02d}.{minor}"
    m = _BASELINE_COMPACT.match(value)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    return None


def _baseline_candidates(item: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every (source, "NN.NN") the item states, most explicit first."""
    props = item.get("properties") or {}
    if not isinstance(props, Mapping):
        props = {}
    found: list[tuple[str, str]] = []
    for key in ("s2:processing_baseline", "sentinel:processing_baseline", "processing:version"):
        b = _normalize_baseline(props.get(key))
        if b is not None:
            found.append((key, b))
    names: list[tuple[str, Any]] = [(key, props.get(key)) for key in _PRODUCT_ID_KEYS]
    names.append(("id", item.get("id")))
    for key, name in names:
        if not isinstance(name, str):
            continue
        m = _BASELINE_IN_NAME.search(name)
        if m:
            found.append((key, f"{m.group(1)}.{m.group(2)}"))
    return found


def processing_baseline(item: Mapping[str, Any]) -> str | None:
    """The item's processing baseline as ``"NN.NN"``, from wherever its provider put it.

    Looked up in order: ``s2:processing_baseline`` (Earth Search v1, Planetary Computer, stactools),
    ``sentinel:processing_baseline``, ``processing:version`` (CDSE), then the ``Nxxxx`` / ``_NNN.NN`` field
    inside ``s2:product_uri``, ``sentinel:product_id`` (Earth Search v0: ``..._N0214_...`` -> ``02.14``),
    granule/tile/datastrip/datatake ids and the item id. None if nothing gives it.
    """
    if not isinstance(item, Mapping):
        raise ItemError(f"item {shown(item)} is not a STAC item mapping; expected a dict with 'properties'")
    found = _baseline_candidates(item)
    return found[0][1] if found else None


def _baseline_tuple(baseline: str) -> tuple[int, int]:
    norm = _normalize_baseline(baseline)
    if norm is None:
        raise InputError(
            f"processing baseline {shown(baseline)} is not a baseline; expected 'NN.NN' like '05.10' (or 'N0510')"
        )
    major, minor = norm.split(".")
    return int(major), int(minor)


def expected_offset(baseline: str) -> float:
    """Reflectance offset of a processing baseline: -0.1 if ``baseline >= 04.00`` else 0.0 (as numbers)."""
    return BOA_OFFSET if _baseline_tuple(baseline) >= OFFSET_BASELINE else 0.0


# ----------------------------------------------------------------------------------------------------
# small parsers


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            v = float(value)
        except ValueError:
            return None
        return v if math.isfinite(v) else None
    return None


def _parse_epsg(obj: Mapping[str, Any]) -> int | None:
    """``proj:epsg`` (int) or ``proj:code`` (``"EPSG:32655"``) of an item's properties or an asset."""
    v = obj.get("proj:epsg")
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    if isinstance(v, float) and v.is_integer() and v > 0:
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v.strip())
    code = obj.get("proj:code")
    if isinstance(code, str):
        m = re.fullmatch(r"\s*(?:EPSG|epsg):(\d+)\s*", code)
        if m:
            return int(m.group(1))
    return None


def _parse_transform(value: Any) -> tuple[float, ...] | None:
    if not isinstance(value, list | tuple) or len(value) not in (6, 9):
        return None
    nums = [_as_float(v) for v in value]
    if any(v is None for v in nums):
        return None
    return tuple(float(v) for v in nums[:6])  # type: ignore[arg-type]


def _parse_shape(value: Any) -> tuple[int, int] | None:
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    out = []
    for v in value:
        f = _as_float(v)
        if f is None or not f.is_integer() or f <= 0:
            return None
        out.append(int(f))
    return out[0], out[1]


def _parse_bbox(value: Any) -> tuple[float, float, float, float] | None:
    if not isinstance(value, list | tuple) or len(value) not in (4, 6):
        return None
    nums = [_as_float(v) for v in value]
    if any(v is None for v in nums):
        return None
    if len(nums) == 6:  # 3D bbox: west, south, min z, east, north, max z
        nums = [nums[0], nums[1], nums[3], nums[4]]
    return nums[0], nums[1], nums[2], nums[3]  # type: ignore[return-value]


def _parse_datetime(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        d = value
    elif isinstance(value, str) and value.strip():
        s = value.strip()
        if s[-1] in "zZ":
            s = s[:-1] + "+00:00"
        s = re.sub(r"(\.\d{6})\d+", r"\1", s)  # nanoseconds -> microseconds
        try:
            d = dt.datetime.fromisoformat(s)
        except ValueError:
            return None
    else:
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_UTC)
    return d.astimezone(_UTC)


def _format_datetime(d: dt.datetime) -> str:
    return d.astimezone(_UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _norm_name(value: Any) -> str:
    return re.sub(r"[\s_]+", "-", str(value).strip().lower()) if isinstance(value, str) else ""


def _normalize_tile(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    v = value.strip().upper()
    if v.startswith("MGRS-"):
        v = v[5:]
    if v.startswith("T") and len(v) == 6:
        v = v[1:]
    m = _MGRS.match(v)
    return f"{int(m.group(1)):02d}{m.group(2)}{m.group(3)}" if m else None


def _tile(item: Mapping[str, Any], props: Mapping[str, Any]) -> str | None:
    for key in ("s2:mgrs_tile", "grid:code", "mgrs:tile"):
        t = _normalize_tile(props.get(key))
        if t:
            return t
    for prefix in ("mgrs", "sentinel"):
        zone, band, square = (
            props.get(f"{prefix}:{k}") for k in ("utm_zone", "latitude_band", "grid_square")
        )
        if zone is not None and isinstance(band, str) and isinstance(square, str):
            t = _normalize_tile(f"{zone}{band}{square}")
            if t:
                return t
    names = [props.get(k) for k in _PRODUCT_ID_KEYS] + [item.get("id")]
    for name in names:
        if isinstance(name, str):
            m = _TILE_IN_NAME.search(name)
            if m:
                return _normalize_tile(m.group(1))
    item_id = item.get("id")
    if isinstance(item_id, str):
        m = _TILE_IN_ES_ID.match(item_id)
        if m:
            return _normalize_tile(m.group(1))
    return None


def epsg_from_mgrs(tile: str) -> int:
    """EPSG code of the UTM zone of a Sentinel-2 MGRS tile (``13TDE`` -> 32613, ``22HBD`` -> 32722).

    Sentinel-2 tiles are always delivered in the UTM zone named by the tile, so this is a safe fallback for
    the loader when an item carries no CRS. :func:`normalize_item` does not use it (``S2Item.epsg`` stays None
    then).
    """
    t = _normalize_tile(tile)
    if t is None:
        raise InputError(
            f"MGRS tile {shown(tile)} is not a tile id; expected e.g. '13TDE' (zone, latitude band, square)"
        )
    zone, band = int(t[:2]), t[2]
    if not 1 <= zone <= 60:
        raise InputError(f"MGRS tile {shown(tile)} has UTM zone {zone}; expected 1-60")
    return (32600 if band >= "N" else 32700) + zone


# ----------------------------------------------------------------------------------------------------
# hrefs


def _is_absolute_href(href: str) -> bool:
    return (
        bool(_SCHEME.match(href)) or href.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", href))
    )


def _file_url_to_path(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    return urllib.request.url2pathname(urllib.parse.unquote(parsed.path))


def _resolve_href(href: str, base: str | None) -> str:
    """Resolve a relative asset href against ``base`` (a folder, a file, or an item's self URL)."""
    if not href or _is_absolute_href(href) or not base:
        return href
    if base.startswith("file://"):
        base = _file_url_to_path(base) + ("/" if base.endswith("/") else "")
    if _SCHEME.match(base):
        parts = urllib.parse.urlsplit(base)
        folder = parts.path if parts.path.endswith("/") else posixpath.dirname(parts.path) + "/"
        path = posixpath.normpath(posixpath.join(folder, href))
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    folder = base if base.endswith(("/", os.sep)) or os.path.isdir(base) else os.path.dirname(base)
    return os.path.normpath(os.path.join(folder, href))


def _self_href(item: Mapping[str, Any]) -> str | None:
    links = item.get("links")
    if not isinstance(links, list):
        return None
    for link in links:
        if isinstance(link, Mapping) and link.get("rel") == "self" and isinstance(link.get("href"), str):
            href = link["href"]
            if _is_absolute_href(href):
                return href
    return None


def _guess_media_type(href: str) -> str:
    path = href.split("?", 1)[0].lower()
    if path.endswith((".tif", ".tiff")):
        return "image/tiff; application=geotiff"
    if path.endswith(".jp2"):
        return "image/jp2"
    return "application/octet-stream"


def _format_rank(asset: Mapping[str, Any]) -> int:
    """0 = GeoTIFF/COG, 1 = unknown, 2 = JPEG2000 (slow to read remotely; only when nothing else exists)."""
    media = str(asset.get("type") or "").lower()
    href = str(asset.get("href") or "").split("?", 1)[0].lower()
    if "tiff" in media or href.endswith((".tif", ".tiff")):
        return 0
    if "jp2" in media or href.endswith(".jp2"):
        return 2
    return 1


# ----------------------------------------------------------------------------------------------------
# asset selection and raster metadata


def _band_entries(asset: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    for key in ("bands", "eo:bands", "raster:bands"):
        v = asset.get(key)
        if isinstance(v, list):
            return [b for b in v if isinstance(b, Mapping)]
    return []


def _asset_gsd(asset: Mapping[str, Any]) -> float | None:
    gsd = _as_float(asset.get("gsd"))
    if gsd is not None:
        return gsd
    tr = _parse_transform(asset.get("proj:transform"))
    return abs(tr[0]) if tr else None


def _band_by_description(assets: Mapping[str, Any], band: str) -> str | None:
    """Fallback when no known key matches: a single-band asset whose bands say B04 (red) or B08 (nir)."""
    wanted = {"red": ("b04", "red"), "nir": ("b08", "nir")}.get(band)
    if wanted is None:
        return None
    name_wanted, common_wanted = wanted
    found: list[tuple[float, int, str]] = []
    for key, asset in assets.items():
        if not isinstance(asset, Mapping) or not asset.get("href") or key in NOT_NIR_KEYS:
            continue
        entries = [
            b for b in _band_entries(asset) if "name" in b or "common_name" in b or "eo:common_name" in b
        ]
        if len(entries) != 1:
            continue
        b = entries[0]
        name = str(b.get("name") or "").lower()
        common = str(b.get("common_name") or b.get("eo:common_name") or "").lower()
        if name == name_wanted or (common == common_wanted and name in ("", common_wanted, name_wanted)):
            gsd = _asset_gsd(asset)
            found.append((abs((gsd or 10.0) - 10.0), _format_rank(asset), key))
    return min(found)[2] if found else None


def _pick_asset(
    assets: Mapping[str, Any], band: str, aliases: Mapping[str, Iterable[str]]
) -> tuple[str | None, bool]:
    """The asset key for ``band`` (and whether it was found by band description rather than by key)."""
    candidates = []
    for i, key in enumerate(aliases.get(band, ())):
        if band == "nir" and key in NOT_NIR_KEYS:
            continue
        asset = assets.get(key)
        if isinstance(asset, Mapping) and isinstance(asset.get("href"), str) and asset["href"]:
            candidates.append((_format_rank(asset), i, key))
    if candidates:
        return min(candidates)[2], False
    found = _band_by_description(assets, band)
    return found, found is not None


def _raster_meta(asset: Mapping[str, Any]) -> tuple[float | None, float | None, float | None]:
    """(scale, offset, nodata) as stated by the asset: raster:bands[0] (raster v1), asset-level raster:scale /
    raster:offset / nodata (STAC 1.1, raster v2), or bands[0] (STAC 1.1 band objects)."""
    scale = offset = nodata = None
    rb = asset.get("raster:bands")
    if isinstance(rb, list) and rb and isinstance(rb[0], Mapping):
        scale = _as_float(rb[0].get("scale"))
        offset = _as_float(rb[0].get("offset"))
        nodata = _as_float(rb[0].get("nodata"))
    bands = asset.get("bands")
    first = bands[0] if isinstance(bands, list) and len(bands) == 1 and isinstance(bands[0], Mapping) else {}
    for src in (asset, first):
        if scale is None:
            scale = _as_float(src.get("raster:scale"))
        if offset is None:
            offset = _as_float(src.get("raster:offset"))
        if nodata is None:
            nodata = _as_float(src.get("nodata", src.get("raster:nodata")))
    return scale, offset, nodata


def _fmt(x: float) -> str:
    return f"{x:g}"


# ----------------------------------------------------------------------------------------------------
# classification (is it Sentinel-2 L2A?) and provider


def _skip_reason(item: Mapping[str, Any], props: Mapping[str, Any]) -> str | None:
    coll = str(item.get("collection") or "").strip().lower()
    platform = _norm_name(props.get("platform"))
    constellation = _norm_name(props.get("constellation"))
    item_id = str(item.get("id") or "")
    if any(x.startswith("landsat") for x in (coll, platform, constellation)):
        return (
            f"Landsat item (collection {coll or '-'}, platform {platform or '-'}), not Sentinel-2 L2A; "
            "search only a Sentinel-2 L2A collection"
        )
    if any(x.startswith("sentinel-1") for x in (coll, platform, constellation)):
        return (
            f"Sentinel-1 (radar) item (collection {coll or '-'}, platform {platform or '-'}), not Sentinel-2 "
            "L2A; search only a Sentinel-2 L2A collection"
        )
    if platform and not platform.startswith("sentinel-2"):
        return (
            f"platform {shown(props.get('platform'))} is not Sentinel-2; expected sentinel-2a/2b/2c/2d L2A items"
        )
    if constellation and not constellation.startswith("sentinel-2") and not platform:
        return (
            f"constellation {shown(props.get('constellation'))} is not Sentinel-2; expected Sentinel-2 L2A items"
        )

    product_types = [str(props.get(k)).upper() for k in _PRODUCT_TYPE_KEYS if isinstance(props.get(k), str)]
    levels = [
        str(props.get(k)).upper().replace("LEVEL-", "L") for k in _LEVEL_KEYS if isinstance(props.get(k), str)
    ]
    names = [str(props.get(k)) for k in _PRODUCT_ID_KEYS if isinstance(props.get(k), str)] + [item_id]

    l1c = []
    if "l1c" in coll:
        l1c.append(f"collection {coll}")
    l1c += [f"product type {p}" for p in product_types if p.startswith("S2MSI1C")]
    l1c += [f"processing level {lv}" for lv in levels if lv == "L1C"]
    l1c += [f"product id {n}" for n in names if "MSIL1C" in n.upper()]
    if item_id.upper().endswith("_L1C"):
        l1c.append(f"id {item_id}")
    if l1c:
        return (
            f"Sentinel-2 L1C (top-of-atmosphere) item ({l1c[0]}), not L2A; NDVI composites need L2A surface "
            "reflectance with SCL: search an L2A collection such as sentinel-2-l2a"
        )

    l2a = (
        coll in L2A_COLLECTIONS
        or ("l2a" in coll and ("sentinel" in coll or "s2" in coll))
        or any(p.startswith("S2MSI2A") for p in product_types)
        or any(lv == "L2A" for lv in levels)
        or any("MSIL2A" in n.upper() for n in names)
        or item_id.upper().endswith("_L2A")
    )
    if not l2a:
        return (
            "not recognisable as Sentinel-2 L2A: no collection like sentinel-2-l2a, no s2:product_type "
            "S2MSI2A, no product id with MSIL2A, id not ending in _L2A, no processing level L2A; pass "
            "Sentinel-2 L2A items"
        )
    return None


def _guess_provider(item: Mapping[str, Any], props: Mapping[str, Any], raw_hrefs: Iterable[str]) -> str:
    coll = str(item.get("collection") or "").lower()
    hrefs = [h for h in raw_hrefs if isinstance(h, str)]
    links_value = item.get("links")
    links: list[Any] = links_value if isinstance(links_value, list) else []
    link_hrefs = [str(lk.get("href") or "") for lk in links if isinstance(lk, Mapping)]
    everything = " ".join(hrefs + link_hrefs).lower()
    # pixels on local disk (offline sample, downloaded data, stactools output): where they are read matters
    if hrefs and all(not _is_absolute_href(h) for h in hrefs) and any("GRANULE/" in h for h in hrefs):
        return "stactools"
    if hrefs and all(not _SCHEME.match(h) or h.startswith("file://") for h in hrefs):
        return "local"
    if coll == "sentinel-s2-l2a-cogs" or "earth-search.aws.element84.com/v0" in everything:
        return "earth-search-v0"
    if (
        "blob.core.windows.net" in everything
        or "planetarycomputer" in everything
        or any(k.startswith("msft:") for k in props)
    ):
        return "planetary-computer"
    if "dataspace.copernicus.eu" in everything or any(h.startswith("s3://eodata/") for h in hrefs):
        return "cdse"
    if (
        "element84.com/v1" in everything
        or "sentinel-cogs" in everything
        or "e84-earth-search" in everything
        or any(k.startswith("earthsearch:") for k in props)
    ):
        return "earth-search-v1"
    return "unknown"


# ----------------------------------------------------------------------------------------------------
# normalize


def _item_to_dict(item: Any) -> Mapping[str, Any]:
    if isinstance(item, Mapping):
        return item
    to_dict = getattr(item, "to_dict", None)
    if callable(to_dict):  # pystac.Item (already migrated by pystac: proj:code is understood below)
        try:
            d = to_dict(include_self_link=True, transform_hrefs=False)
        except TypeError:
            d = to_dict()
        if isinstance(d, Mapping):
            return d
    raise ItemError(f"item {shown(item)} is not a STAC item; expected a dict (parsed JSON) or a pystac.Item")


def normalize_item(
    item: Mapping[str, Any] | Any,
    *,
    base_href: str | None = None,
    aliases: Mapping[str, Iterable[str]] | None = None,
) -> S2Item | Skipped:
    """Reduce one STAC item of any provider to an :class:`S2Item` (red, nir, scl + scale/offset), or say
    why not.

    ``base_href`` resolves relative asset hrefs (stactools items: ``./GRANULE/...``): the folder of the file
    the item came from (as returned by :func:`read_items`), a file path, or a URL; without it the item's
    absolute ``self`` link is used. ``aliases`` is an asset-key table like :data:`DEFAULT_ASSET_ALIASES` (a
    provider profile's ``assets``); the default table is used when None.

    Returns :class:`Skipped` (never raises) for items that are valid STAC but not usable Sentinel-2 L2A scenes
    (Landsat, Sentinel-1, L1C, a band missing, no datetime). Raises :class:`ItemError` only for things that
    are not STAC items at all.
    """
    d = _item_to_dict(item)
    item_type = d.get("type")
    if item_type not in (None, "Feature"):
        raise ItemError(
            f"item {shown(d.get('id'))} has type {shown(item_type)}; expected a STAC Item (type 'Feature'). "
            "Pass the items of an item collection, not the collection itself"
        )
    item_id = d.get("id")
    item_id = str(item_id) if item_id not in (None, "") else "<no id>"
    props = d.get("properties")
    props = props if isinstance(props, Mapping) else {}
    assets = d.get("assets")
    assets = assets if isinstance(assets, Mapping) else {}
    table: Mapping[str, Iterable[str]] = DEFAULT_ASSET_ALIASES if aliases is None else aliases

    reason = _skip_reason(d, props)
    if reason:
        return Skipped(item_id, reason)

    warnings: list[str] = []

    # --- bands
    picked: dict[str, str] = {}
    for band in BANDS:
        key, by_description = _pick_asset(assets, band, table)
        if key is None:
            wanted = ", ".join(k for k in table.get(band, ()) if not k.endswith("-jp2"))
            return Skipped(item_id, f"missing asset {band}; expected one of {wanted}")
        if by_description:
            warnings.append(f"{band} taken from asset '{key}' by its band description (no known asset key)")
        picked[band] = key

    # --- time
    when = _parse_datetime(props.get("datetime")) or _parse_datetime(props.get("start_datetime"))
    if when is None:
        return Skipped(
            item_id,
            f"no acquisition time: properties.datetime is {shown(props.get('datetime'))}; expected an RFC 3339 "
            "datetime such as 2024-04-22T17:53:02Z",
        )

    # --- baseline (several sources may state it; they should agree)
    candidates = _baseline_candidates(d)
    baseline = candidates[0][1] if candidates else None
    distinct = {v for _, v in candidates}
    if len(distinct) > 1:
        listed = ", ".join(f"{src} {v}" for src, v in candidates)
        warnings.append(
            f"processing baseline sources disagree ({listed}); using {baseline} from {candidates[0][0]}"
        )
    expected = expected_offset(baseline) if baseline is not None else None

    # --- CRS
    item_epsg = _parse_epsg(props)
    asset_epsgs = {band: _parse_epsg(assets[picked[band]]) for band in BANDS}
    given = {e for e in asset_epsgs.values() if e is not None}
    if len(given) > 1:
        listed = ", ".join(f"{b} EPSG:{e}" for b, e in asset_epsgs.items() if e is not None)
        warnings.append(f"bands are in different CRSs ({listed}); using the red band's")
    epsg = asset_epsgs["red"] or next(iter(sorted(given)), None) or item_epsg
    if item_epsg is not None and given and item_epsg not in given:
        warnings.append(f"item proj EPSG:{item_epsg} differs from the assets' EPSG:{epsg}; using the assets'")

    # --- hrefs
    base = base_href or _self_href(d)
    raw_hrefs = {band: str(assets[picked[band]]["href"]) for band in BANDS}
    unresolved = [b for b, h in raw_hrefs.items() if not _is_absolute_href(h) and not base]
    if unresolved:
        warnings.append(
            f"relative hrefs for {', '.join(unresolved)} could not be resolved (no base_href, no absolute "
            "self link); pass base_href (the folder of the item file)"
        )

    # --- radiometry
    band_assets: dict[str, BandAsset] = {}
    contradictions: dict[float, list[str]] = {}
    meta_used: dict[str, float] = {}
    odd_scales: list[str] = []
    assumed_zero = False
    for band in BANDS:
        key = picked[band]
        asset = assets[key]
        meta_scale, meta_offset, meta_nodata = _raster_meta(asset)
        if band == "scl":
            scale, offset, nodata = 1.0, 0.0, 0.0
        else:
            scale = meta_scale if meta_scale is not None else DEFAULT_SCALE
            if not math.isclose(scale, DEFAULT_SCALE, rel_tol=1e-9):
                odd_scales.append(f"{band} {_fmt(scale)}")
            if expected is not None:
                offset = expected
                if meta_offset is not None and not math.isclose(meta_offset, expected, abs_tol=1e-9):
                    contradictions.setdefault(meta_offset, []).append(band)
            elif meta_offset is not None:
                offset = meta_offset
                meta_used[band] = meta_offset
            else:
                offset = 0.0
                assumed_zero = True
            offset = float(offset) + 0.0  # no -0.0
            nodata = meta_nodata if meta_nodata is not None else 0.0
        band_assets[band] = BandAsset(
            href=_resolve_href(raw_hrefs[band], base),
            scale=float(scale),
            offset=offset,
            nodata=nodata,
            transform=_parse_transform(asset.get("proj:transform")),
            shape=_parse_shape(asset.get("proj:shape")),
            epsg=asset_epsgs[band],
            media_type=str(asset["type"]) if isinstance(asset.get("type"), str) else None,
            key=key,
        )
    for meta_offset, bands in contradictions.items():
        warnings.append(
            f"raster offset {_fmt(meta_offset)} on {', '.join(bands)} contradicts processing baseline "
            f"{baseline} (offset {_fmt(expected or 0.0)}); following the baseline: offset "
            f"{_fmt(expected or 0.0)}"
        )
    if meta_used:
        listed = ", ".join(f"{b} {_fmt(v)}" for b, v in meta_used.items())
        warnings.append(
            f"no processing baseline in the metadata; using the raster offset of the assets ({listed})"
        )
    if assumed_zero:
        warnings.append(
            "no processing baseline and no raster offset in the metadata; assuming offset 0 (pre-04.00 "
            "data). If this is baseline >= 04.00 data, reflectances will be 0.1 too high"
        )
    if odd_scales:
        warnings.append(
            f"unusual scale for Sentinel-2 L2A ({', '.join(odd_scales)}; expected {_fmt(DEFAULT_SCALE)}); "
            "using the metadata's scale"
        )

    # --- Earth Search's flag: informative only (wrong on some items, earth-search #66 / #71)
    for flag_key in ("earthsearch:boa_offset_applied", "sentinel:boa_offset_applied"):
        flag = props.get(flag_key)
        if flag is True and baseline is not None:
            if expected:
                warnings.append(
                    f"{flag_key} is true (Earth Search: the -1000 DN offset was already subtracted from the "
                    f"COG pixels, i.e. offset 0), but processing baseline {baseline} gives offset "
                    f"{_fmt(expected)}; following the baseline (the flag is wrong on some items, "
                    "earth-search #66/#71)"
                )
            else:
                warnings.append(
                    f"{flag_key} is true but processing baseline {baseline} (< 04.00) has no BOA offset; "
                    "following the baseline: offset 0"
                )

    cloud = _as_float(props.get("eo:cloud_cover"))
    geometry = d.get("geometry")
    collection = d.get("collection")
    return S2Item(
        id=item_id,
        collection=str(collection) if isinstance(collection, str) and collection else None,
        provider=_guess_provider(d, props, raw_hrefs.values()),
        datetime=when,
        epsg=epsg,
        processing_baseline=baseline,
        cloud_cover=cloud,
        tile=_tile(d, props),
        bbox=_parse_bbox(d.get("bbox")),
        geometry=dict(geometry) if isinstance(geometry, Mapping) else None,
        bands=MappingProxyType(band_assets),
        warnings=tuple(warnings),
    )


def normalize_items(
    items: Iterable[Mapping[str, Any] | Any],
    *,
    base_href: str | None = None,
    aliases: Mapping[str, Iterable[str]] | None = None,
) -> tuple[list[S2Item], list[Skipped]]:
    """:func:`normalize_item` over many items, split into usable items and skipped ones (order kept)."""
    ok: list[S2Item] = []
    skipped: list[Skipped] = []
    for item in items:
        r = normalize_item(item, base_href=base_href, aliases=aliases)
        (ok if isinstance(r, S2Item) else skipped).append(r)  # type: ignore[arg-type]
    return ok, skipped


# ----------------------------------------------------------------------------------------------------
# reading item documents


def _describe(doc: Any) -> str:
    if isinstance(doc, Mapping):
        keys = ", ".join(list(map(str, doc.keys()))[:8])
        return f"a JSON object with type {shown(doc.get('type'))} and keys {keys}"
    return f"a JSON {type(doc).__name__}"


def _is_item_like(obj: Any) -> bool:
    if not isinstance(obj, Mapping):
        return False
    t = obj.get("type")
    return t == "Feature" or (t is None and isinstance(obj.get("assets"), Mapping) and "properties" in obj)


def _items_from_document(doc: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(doc, list):
        items: list[Any] = doc
    elif isinstance(doc, Mapping):
        t = doc.get("type")
        if _is_item_like(doc):
            return [doc]  # type: ignore[list-item]
        if t == "FeatureCollection" or (t is None and isinstance(doc.get("features"), list)):
            items = doc.get("features") or []
            if not isinstance(items, list):
                raise CatalogError(
                    f"{where} has 'features' that is not a list; expected a list of STAC Items"
                )
        elif t == "Collection" or (t is None and "extent" in doc and "license" in doc):
            raise CatalogError(
                f"{where} is a STAC Collection, not items; pass an item collection or a STAC API URL"
            )
        elif t == "Catalog":
            if "conformsTo" in doc:
                raise CatalogError(
                    f"{where} is a STAC API landing page, not items; pass its URL as the catalog so "
                    "ndvi-scale searches it, or pass an item collection (FeatureCollection JSON)"
                )
            raise CatalogError(
                f"{where} is a STAC Catalog, not items; pass an item collection or a STAC API URL"
            )
        else:
            raise CatalogError(
                f"{where} is not STAC items: found {_describe(doc)}; expected a STAC Item, an "
                "ItemCollection / FeatureCollection (e.g. a saved /search response) or a JSON array of items"
            )
    else:
        raise CatalogError(
            f"{where} is not STAC items: found {_describe(doc)}; expected a STAC Item, an ItemCollection / "
            "FeatureCollection or a JSON array of items"
        )
    out: list[dict[str, Any]] = []
    for i, it in enumerate(items):
        if hasattr(it, "to_dict") and not isinstance(it, Mapping):
            it = _item_to_dict(it)
        if not _is_item_like(it):
            raise CatalogError(
                f"{where}: element {i} is not a STAC Item (found {_describe(it)}); expected objects with "
                "type 'Feature', properties and assets"
            )
        out.append(it)
    return out


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CatalogError(
            f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; expected a STAC item "
            "collection (JSON). Fix or re-download the file"
        ) from None


def _read_local(path: Path, label: str) -> tuple[Any, str]:
    if not path.exists():
        raise CatalogError(
            f"catalog file {label} does not exist; give an existing item-collection JSON path, a STAC API "
            "URL, a profile name (ndvi-scale catalogs) or 'sample'"
        )
    if path.is_dir():
        raise CatalogError(f"catalog file {label} is a folder; expected a JSON file holding STAC items")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CatalogError(
            f"catalog file {label} is not a text (UTF-8 JSON) file; expected STAC items as JSON"
        ) from None
    except OSError as e:
        raise CatalogError(
            f"catalog file {label} cannot be read ({e.strerror}); check its permissions"
        ) from None
    base = str(path.resolve().parent) + os.sep
    return _parse_json(text, f"catalog file {label}"), base


def _read_http(url: str, timeout: float) -> tuple[Any, str]:
    req = urllib.request.Request(
        url, headers={"Accept": "application/geo+json, application/json", "User-Agent": "ndvi-scale"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            charset = resp.headers.get_content_charset() or "utf-8"
    except urllib.error.HTTPError as e:
        raise CatalogError(
            f"catalog URL {url} answered HTTP {e.code} {e.reason}; check the URL (it must return STAC items "
            "as JSON)"
        ) from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CatalogError(
            f"catalog URL {url} could not be reached ({reason}); check the URL and the network, or pass a "
            "local item-collection file"
        ) from None
    try:
        text = raw.decode(charset, errors="strict")
    except (UnicodeDecodeError, LookupError):
        raise CatalogError(
            f"catalog URL {url} did not return text JSON; expected STAC items as JSON"
        ) from None
    parts = urllib.parse.urlsplit(url)
    folder = parts.path if parts.path.endswith("/") else posixpath.dirname(parts.path) + "/"
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, folder, "", ""))
    return _parse_json(text, f"catalog URL {url}"), base


def read_items(
    source: str | os.PathLike[str] | Mapping[str, Any] | list[Any], *, timeout: float = _HTTP_TIMEOUT
) -> tuple[list[dict[str, Any]], str | None]:
    """Read STAC items from a file, a URL or an already parsed document.

    ``source`` may be a local path, a ``file://`` URL, an ``http(s)://`` URL (fetched with a timeout), a
    parsed JSON document (dict) or a list of item dicts / pystac Items. The document may be a single Item, an
    ItemCollection / FeatureCollection, one page of a STAC API ``/search`` response (only that page is read;
    ``next`` links are not followed) or a bare JSON array of items.

    Returns ``(items, base_href)``: the item dicts (not modified, not migrated) and the folder the document
    was read from (ending in ``/``), to resolve relative asset hrefs with :func:`normalize_item`; None for
    in-memory input.
    """
    if isinstance(source, Mapping):
        return _items_from_document(source, "the given STAC document"), None
    if isinstance(source, list | tuple):
        return _items_from_document(list(source), "the given item list"), None
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise InputError(
            f"catalog source {shown(source)} is not a path, URL or STAC document; give an item-collection JSON "
            "path, a file:// or http(s):// URL"
        )
    src = source.strip()
    if src.startswith(("http://", "https://")):
        doc, base = _read_http(src, timeout)
        return _items_from_document(doc, f"catalog URL {src}"), base
    if src.startswith("file://"):
        path = Path(_file_url_to_path(src))
    elif _SCHEME.match(src):
        scheme = src.split("://", 1)[0]
        raise CatalogError(
            f"catalog {src} uses {scheme}://, which cannot be read here; give a local path, a file:// or "
            "an http(s):// URL (download the item collection first)"
        )
    else:
        path = Path(src).expanduser()
    doc, base = _read_local(path, src)
    return _items_from_document(doc, f"catalog file {src}"), base


def inspect(source: str | os.PathLike[str] | Mapping[str, Any] | list[Any]) -> list[dict[str, Any]]:
    """Read items from ``source`` and describe how each one is interpreted (or why it is skipped)."""
    items, base = read_items(source)
    return [normalize_item(it, base_href=base).inspect_record() for it in items]


def inspect_line(record: Mapping[str, Any]) -> str:
    """One readable line of an :func:`inspect` record (``ndvi-scale inspect --no-json``): the id, then why it is
    skipped, or its CRS, baseline, the scale/offset of red and nir, and its warnings."""
    if "skipped" in record:
        return f"{record.get('id')}  skipped: {record['skipped']}"
    bands = record.get("bands") or {}
    scales = "  ".join(
        f"{name} x{b.get('scale'):g}{float(b.get('offset') or 0):+g}"
        for name, b in bands.items()
        if name in ("red", "nir") and isinstance(b, Mapping) and b.get("scale") is not None
    )
    warnings = record.get("warnings") or []
    tail = f"  warnings: {'; '.join(map(str, warnings))}" if warnings else ""
    return (f"{record.get('id')}  EPSG:{record.get('epsg')}  baseline {record.get('processing_baseline') or '?'}"
            f"  {scales}{tail}")
