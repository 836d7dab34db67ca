"""The embedded sample's field parcels as polygons, with their land cover: zones whose NDVI is known
(:class:`ndvi_scale.sample.Truth`), for trying ``ndvi-scale zonal`` and for testing it against truth."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import shapely

from ..sample import LandCover, SampleSpec, Truth
from .vectors import to_crs

__all__ = ["sample_parcels", "write_sample_parcels"]


def sample_parcels(
    spec: SampleSpec | None = None, inset: float = 0.0, bounds: tuple[float, float, float, float] | None = None
) -> list[dict[str, Any]]:
    """Every parcel of ``spec`` (default: the embedded sample) lying fully inside ``bounds`` (UTM metres in
    ``spec.epsg``; default: the union of the two granules), shrunk by ``inset`` metres on every side.

    Each parcel: ``{"id": "i-j", "i", "j", "cover": LandCover name, "geometry": shapely Polygon in spec.epsg}``.
    The parcel (i, j) spans x in [x0 + i f, x0 + (i+1) f], y in [y0 - (j+1) f, y0 - j f] (f = ``field_size``).
    """
    spec = spec or SampleSpec()
    if bounds is None:
        a, b = spec.granules()
        bounds = (a.bounds[0], min(a.bounds[1], b.bounds[1]), b.bounds[2], a.bounds[3])
    xmin, ymin, xmax, ymax = bounds
    f = spec.field_size
    i0, i1 = int(np.ceil((xmin - spec.x0) / f)), int(np.floor((xmax - spec.x0) / f))
    j0, j1 = int(np.ceil((spec.y0 - ymax) / f)), int(np.floor((spec.y0 - ymin) / f))
    out = []
    for j in range(j0, j1):
        for i in range(i0, i1):
            x0, y1 = spec.x0 + i * f, spec.y0 - j * f
            cover = int(Truth.land_cover(spec, x0 + f / 2, y1 - f / 2))
            out.append({"id": f"{i}-{j}", "i": i, "j": j, "cover": LandCover(cover).name.lower(),
                        "geometry": shapely.box(x0 + inset, y1 - f + inset, x0 + f - inset, y1 - inset)})
    return out


def write_sample_parcels(path: str | os.PathLike[str], spec: SampleSpec | None = None, inset: float = 0.0) -> str:
    """The parcels of :func:`sample_parcels` as a GeoJSON FeatureCollection in EPSG:4326 (``id``, ``cover``)."""
    spec = spec or SampleSpec()
    parcels = sample_parcels(spec, inset)
    from pyproj import CRS

    geoms = to_crs(np.asarray([p["geometry"] for p in parcels], dtype=object), CRS.from_epsg(spec.epsg),
                   CRS.from_epsg(4326))
    feats = [{"type": "Feature", "properties": {"id": p["id"], "cover": p["cover"]},
              "geometry": shapely.geometry.mapping(g)} for p, g in zip(parcels, geoms, strict=True)]
    with open(path, "w") as fh:
        json.dump({"type": "FeatureCollection", "features": feats}, fh)
    return os.fspath(path)
