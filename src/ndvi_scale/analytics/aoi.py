"""Polygon areas of interest for ``compute --aoi FILE`` (the pieces the pipeline needs; the hook is the engine's).

* :func:`load_aoi` reads one or many polygons (GeoJSON, GeoPackage, GeoParquet, Shapefile; any CRS), refuses
  missing/unreadable/non-polygon/invalid/empty/tiny ones with one line naming the file and the fix, and returns an
  :class:`Aoi`: the union in EPSG:4326, its bbox (W, S, E, N, the ``--bbox`` of the run), a digest for provenance.
* :func:`aoi_mask` gives the boolean mask of one output chunk (rule: **a pixel is inside when its centre is inside
  the AOI**, GDAL's rasterisation rule, ``all_touched=False``), so pixels outside can be set to NaN / count 0.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from pyproj import CRS

from ..errors import InputError
from .vectors import read_zones, to_crs

__all__ = ["Aoi", "aoi_mask", "load_aoi"]

WGS84 = CRS.from_epsg(4326)


@dataclass(frozen=True)
class Aoi:
    geometry: Any
    """Union of the polygons, EPSG:4326 (lon, lat)."""
    bbox: tuple[float, float, float, float]
    """W, S, E, N in degrees: the bbox of the run."""
    digest: str
    """``sha256:`` of the normalised union's WKB (6 decimals of a degree ~ 0.1 m): provenance."""
    source: str
    n_polygons: int

    def provenance(self) -> dict[str, Any]:
        return {"source": self.source, "digest": self.digest, "polygons": self.n_polygons, "bbox": list(self.bbox)}

    def in_crs(self, crs: Any) -> Any:
        """The union in ``crs`` (e.g. the output grid's)."""
        return to_crs(np.asarray([self.geometry], dtype=object), WGS84, CRS.from_user_input(crs))[0]


def load_aoi(path: Any, resolution: float = 10.0, crs: Any = None) -> Aoi:
    """The AOI of ``path`` (or a GeoDataFrame / shapely polygons in ``crs``, default EPSG:4326); refused when its
    area is below one ``resolution`` x ``resolution`` pixel."""
    try:
        zones = read_zones(path, crs=crs)
    except InputError as exc:  # the same checks as for zones, named for what the user gave
        text = str(exc)
        raise InputError("aoi " + text.removeprefix("zones ") if text.startswith("zones ") else text) from None
    geoms = to_crs(zones.geoms, zones.crs, WGS84)
    union = shapely.union_all(geoms)
    w, s, e, n = shapely.bounds(union).tolist()
    if w < -180 or e > 180 or s < -90 or n > 90:
        raise InputError(f"aoi {zones.source} extends beyond lon/lat limits ({w}, {s}, {e}, {n}); check its CRS")
    lon0, lat0 = (w + e) / 2, (s + n) / 2
    laea = CRS.from_proj4(f"+proj=laea +lat_0={lat0} +lon_0={lon0} +datum=WGS84 +units=m")
    area = float(shapely.area(to_crs(np.asarray([union], dtype=object), WGS84, laea)[0]))
    if area < resolution * resolution:
        raise InputError(
            f"aoi {zones.source} covers {area:.1f} m2, less than one {resolution:g} m pixel; give a larger polygon "
            "or use --bbox"
        )
    norm = shapely.set_precision(shapely.normalize(union), 1e-6)
    digest = "sha256:" + hashlib.sha256(shapely.to_wkb(norm, hex=False)).hexdigest()
    return Aoi(geometry=union, bbox=(w, s, e, n), digest=digest, source=zones.source, n_polygons=len(geoms))


def aoi_mask(geometry_in_grid_crs: Any, left: float, top: float, res: float, shape: tuple[int, int]) -> np.ndarray:
    """``True`` where the pixel centre of the north-up block (top-left corner ``left, top``, pixel ``res``) is
    inside the geometry (already in the grid's CRS: :meth:`Aoi.in_crs`)."""
    from affine import Affine
    from rasterio.features import geometry_mask

    if not all(math.isfinite(v) for v in (left, top, res)) or res <= 0:
        raise InputError(f"grid {left, top, res} is invalid; expected finite numbers and res > 0")
    if shapely.is_empty(geometry_in_grid_crs):
        return np.zeros(shape, dtype=bool)
    return ~geometry_mask([geometry_in_grid_crs], out_shape=shape, transform=Affine(res, 0, left, 0, -res, top),
                          all_touched=False, invert=False)
