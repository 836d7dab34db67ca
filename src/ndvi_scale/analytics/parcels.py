"""The embedded sample's field parcels as polygons, with their land cover: zones whose NDVI is known
(:class:`ndvi_scale.sample.Truth`), for trying ``ndvi-scale zonal`` and for testing it against truth."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import shapely

from ..landscape import parcel_polygons, union_bounds
from ..sample import SampleSpec
from .vectors import to_crs

__all__ = ["sample_parcels", "write_sample_parcels"]


def sample_parcels(
    spec: SampleSpec | None = None, inset: float = 0.0, bounds: tuple[float, float, float, float] | None = None
) -> list[dict[str, Any]]:
    """Every field parcel and wood of ``spec`` (default: the embedded sample) lying fully inside ``bounds`` (UTM
    metres in ``spec.epsg``; default: the union of the two granules), shrunk by ``inset`` metres on every side.

    Each parcel: ``{"id": "b<i>.<j>-<strip><a|b>", "cover": LandCover name in lower case (e.g. "winter_wheat"),
    "shift": days its crop calendar is late, "geometry": shapely Polygon in spec.epsg}``. The polygons are the real
    irregular fields of :mod:`ndvi_scale.landscape` (off roads, river, villages and woods): every point inside one
    has its cover in :meth:`ndvi_scale.sample.Truth.land_cover`. Parcels emptied by the inset are left out.
    """
    spec = spec or SampleSpec()
    bounds = bounds or union_bounds(spec)
    box = shapely.box(*bounds)
    out = []
    for p in parcel_polygons(spec, bounds):
        if not box.contains(p["geometry"]):
            continue
        geom = p["geometry"].buffer(-inset, join_style="mitre") if inset else p["geometry"]
        if geom.is_empty:
            continue
        out.append({"id": p["id"], "cover": p["cover"].name.lower(), "shift": p["shift"], "geometry": geom})
    return out


def write_sample_parcels(path: str | os.PathLike[str], spec: SampleSpec | None = None, inset: float = 0.0) -> str:
    """The parcels of :func:`sample_parcels` as a GeoJSON FeatureCollection in EPSG:4326 (``id``, ``cover``,
    ``shift_days``). Returns ``path``."""
    spec = spec or SampleSpec()
    parcels = sample_parcels(spec, inset)
    from pyproj import CRS

    geoms = to_crs(np.asarray([p["geometry"] for p in parcels], dtype=object), CRS.from_epsg(spec.epsg),
                   CRS.from_epsg(4326))
    feats = [{"type": "Feature", "properties": {"id": p["id"], "cover": p["cover"], "shift_days": p["shift"]},
              "geometry": shapely.geometry.mapping(g)} for p, g in zip(parcels, geoms, strict=True)]
    with open(path, "w") as fh:
        json.dump({"type": "FeatureCollection", "features": feats}, fh)
    return os.fspath(path)
