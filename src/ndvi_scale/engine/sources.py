"""Asset specs: what a (period, chunk) task reads, as plain values (no reader objects in the graph).

An :class:`AssetSource` is one band file of one item: its href (signed, for providers that need it), and the
part of the output grid its metadata says it covers (to skip, per chunk, the assets that do not reach it, without
opening them). A :class:`ItemSource` groups the red, nir and scl sources of an item with its scale/offset and
the index of its solar day in the period. Tasks receive tuples of them; readers are made, cached and closed
inside the worker process (:mod:`ndvi_scale.engine.reader`), like odc-loader's ``RasterSource``.

The file is authoritative for pixels and grid: the metadata footprint only decides which chunks an asset is
considered for. Where it contradicts the item's bbox (a wrong ``proj:shape``) it is replaced by the bbox, so a
metadata error never drops pixels.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .grid import OutputGrid, affine_envelope, reproject_corners

if TYPE_CHECKING:
    from ..items import BandAsset, S2Item

log = logging.getLogger(__name__)

__all__ = ["FOOTPRINT_TOLERANCE", "AssetSource", "ItemSource", "asset_source", "item_source"]

#: The three assets read for NDVI, in fold order.
BANDS = ("red", "nir", "scl")

#: How far (fraction of the asset's width/height, per side) the item's bbox may stick out of the footprint
#: that ``proj:transform``/``proj:shape`` give before that footprint is distrusted. A lon/lat bbox
#: re-projected to UTM overshoots a correct footprint by up to ~5 % at high latitudes (grid convergence); a
#: wrong ``proj:shape`` (e.g. the 20 m band's shape with the 10 m band's transform) is off by 50 %.
FOOTPRINT_TOLERANCE = 0.1


@dataclass(frozen=True)
class AssetSource:
    """One band file of one item, as a task reads it."""

    href: str
    """Where to read it (signed where the provider needs it; never logged with its query string)."""
    item_id: str
    """The item it belongs to (to name it in faults)."""
    band: str
    """``red``, ``nir`` or ``scl``."""
    window: tuple[float, float, float, float] | None
    """(row0, row1, col0, col1), fractional, of the output grid the metadata says the file covers; None if
    nothing is known (then every chunk reads it)."""

    def reaches(self, rows: slice, cols: slice) -> bool:
        """Whether the metadata footprint overlaps the chunk [rows, cols] (strictly: touching is not enough)."""
        if self.window is None:
            return True
        r0, r1, c0, c1 = self.window
        return r0 < rows.stop and rows.start < r1 and c0 < cols.stop and cols.start < c1


@dataclass(frozen=True)
class ItemSource:
    """The red, nir and scl of one item, with what the kernel needs to know."""

    red: AssetSource
    nir: AssetSource
    scl: AssetSource
    red_scale: float
    red_offset: float
    nir_scale: float
    nir_offset: float
    day: int
    """Index of the item's solar day within its period (same-day granules share one)."""

    @property
    def assets(self) -> tuple[AssetSource, AssetSource, AssetSource]:
        return self.red, self.nir, self.scl


def _footprint(item: S2Item, band: BandAsset, grid: OutputGrid) -> tuple[float, float, float, float] | None:
    """The band's bounds in the grid's CRS from its metadata: ``proj:transform`` x ``proj:shape`` when they
    agree with the item's bbox, else the item's bbox; None when neither is known or projectable."""
    epsg = band.epsg if band.epsg is not None else item.epsg
    bbox = tuple(item.bbox) if item.bbox is not None else None
    tf = tuple(band.transform) if band.transform is not None else None
    bounds, distrusted = _footprint_of(tf, band.shape, epsg, bbox, grid.epsg)
    if distrusted:
        assert bbox is not None
        _warn_footprint(item.id, str(band.key), bbox)
    return bounds


#: Footprints computed once per (transform, shape, CRS, bbox, grid CRS): the items of one tile on its 73 dates a
#: year share them, and a country-year plans 10^4-10^5 items (each projection costs ~0.3 ms).
@functools.lru_cache(maxsize=2**16)
def _footprint_of(
    tf: tuple[float, ...] | None,
    shape: tuple[int, int] | None,
    epsg: int | None,
    bbox: tuple[float, ...] | None,
    grid_epsg: int,
) -> tuple[tuple[float, float, float, float] | None, bool]:
    """(bounds in ``grid_epsg`` or None, whether the transform/shape footprint was distrusted for the bbox)."""
    valid_bbox = bbox is not None and all(math.isfinite(v) for v in bbox) and bbox[0] < bbox[2] and bbox[1] < bbox[3]
    try:
        if tf is not None and shape is not None and epsg:
            if tf[1] == 0 and tf[3] == 0 and valid_bbox and not _contains_bbox(tf, shape, int(epsg), bbox):
                assert bbox is not None
                native = _transformer_bounds(bbox, int(epsg))
                return reproject_corners(native, int(epsg), grid_epsg), True
            return affine_envelope(tf, shape, int(epsg), grid_epsg), False
        if valid_bbox:
            assert bbox is not None
            return reproject_corners(bbox, 4326, grid_epsg), False  # type: ignore[arg-type]
    except Exception:  # pyproj errors: a footprint outside the CRS's domain; the file decides
        return None, False
    return None, False


@functools.lru_cache(maxsize=4096)
def _warn_footprint(item_id: str, key: str, bbox: tuple[float, ...]) -> None:
    """Say once per asset (plans and builds look at footprints several times) that its metadata is distrusted."""
    log.warning(
        "item %s: asset %s: proj:transform/proj:shape give a footprint that does not contain the item bbox %s; "
        "using the bbox (the pixels and their grid come from the file)", item_id, key, bbox,
    )


def _transformer_bounds(bbox: Sequence[float], epsg: int) -> tuple[float, float, float, float]:
    from .grid import _transformer

    w, s, e, n = _transformer(4326, epsg).transform_bounds(bbox[0], bbox[1], bbox[2], bbox[3], densify_pts=21)
    return float(w), float(s), float(e), float(n)


def _contains_bbox(tf: Sequence[float], shape: tuple[int, int], epsg: int, bbox: Sequence[float] | None) -> bool:
    """Whether the footprint of ``tf`` x ``shape`` contains the lon/lat ``bbox`` within the tolerance."""
    assert bbox is not None
    xs = (tf[2], tf[2] + tf[0] * shape[1])
    ys = (tf[5], tf[5] + tf[4] * shape[0])
    left, right, bottom, top = min(xs), max(xs), min(ys), max(ys)
    try:
        w, s, e, n = _transformer_bounds(bbox, epsg)
    except Exception:
        return True  # nothing to compare with
    if not all(math.isfinite(v) for v in (w, s, e, n)):
        return True
    mx, my = FOOTPRINT_TOLERANCE * (right - left), FOOTPRINT_TOLERANCE * (top - bottom)
    return w >= left - mx and e <= right + mx and s >= bottom - my and n <= top + my


def asset_source(item: S2Item, band_name: str, grid: OutputGrid, href: str | None = None) -> AssetSource:
    """The :class:`AssetSource` of ``item``'s band ``band_name`` on ``grid`` (``href`` overrides, e.g. signed)."""
    band = item.bands[band_name]
    bounds = _footprint(item, band, grid)
    window = None
    if bounds is not None and all(math.isfinite(v) for v in bounds):
        window = grid.pixel_window(bounds)
    return AssetSource(href if href is not None else band.href, item.id, band_name, window)


def item_source(item: S2Item, day: int, grid: OutputGrid, signed: S2Item | None = None) -> ItemSource:
    """The :class:`ItemSource` of ``item`` (``signed``: the same item with signed hrefs, read instead)."""
    hrefs = signed if signed is not None else item
    red, nir, scl = (asset_source(item, b, grid, hrefs.bands[b].href) for b in BANDS)
    return ItemSource(
        red, nir, scl,
        float(item.bands["red"].scale), float(item.bands["red"].offset),
        float(item.bands["nir"].scale), float(item.bands["nir"].offset),
        int(day),
    )
