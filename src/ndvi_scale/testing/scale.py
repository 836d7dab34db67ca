"""Synthetic STAC items over many MGRS-size tiles, without pixels: for planning at country scale.

Real Sentinel-2 granules are 109.8 km squares (10980 px at 10 m) laid every 100 km in the UTM zone of their tile
(neighbours overlap by 9.8 km); a tile is seen every 5 days (73 dates a year). These builders give STAC item dicts
with that geometry and metadata (``proj:epsg``, ``proj:shape``/``proj:transform`` per band, ``raster:bands``,
processing baseline), hrefs on an unreachable host (``https://tiles.invalid/``): the plan, the size estimate and
the graph need no pixel, and nothing can be read by accident.

Used by tests/test_sizing.py and benchmarks/scale.py; never by the product.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pyproj import Transformer

__all__ = ["TILE_M", "TILE_STEP_M", "bbox_items", "revisit_dates", "tile_grid_items", "write_items"]

#: Side of an MGRS granule in metres (10980 px at 10 m).
TILE_M = 109_800
#: Distance between neighbouring granules' origins (they overlap by 9.8 km).
TILE_STEP_M = 100_000
#: Revisit of one tile by Sentinel-2A + 2B: every 5 days.
REVISIT_DAYS = 5


def revisit_dates(year: int, years: int = 1) -> list[dt.datetime]:
    """73 acquisition times a year, every :data:`REVISIT_DAYS` days from 1 January of ``year`` at 10:56 UTC (a
    European morning pass), for ``years`` years (the 5-day steps run on across year ends)."""
    start = dt.datetime(year, 1, 1, 10, 56, tzinfo=dt.UTC)
    return [start + dt.timedelta(days=REVISIT_DAYS * k) for k in range(73 * years)]


def _item(epsg: int, x0: float, y1: float, when: dt.datetime, name: str, to_ll: Transformer) -> dict[str, Any]:
    """One item: the granule whose top-left corner is (x0, y1) in ``epsg``."""
    x1, y0 = x0 + TILE_M, y1 - TILE_M
    xs = [x0, x1, x1, x0, x0]
    ys = [y1, y1, y0, y0, y1]
    lons, lats = to_ll.transform(xs, ys)
    ring = [[round(lo, 7), round(la, 7)] for lo, la in zip(lons, lats, strict=True)]
    bbox = [min(lons), min(lats), max(lons), max(lats)]
    item_id = f"S2B_{name}_{when:%Y%m%d}_0_L2A"
    base = f"https://tiles.invalid/{name}/{when:%Y/%m/%d}"

    def band(file: str, res: int, dtype: str, scaled: bool) -> dict[str, Any]:
        side = TILE_M // res
        raster: dict[str, Any] = {"nodata": 0, "data_type": dtype, "spatial_resolution": res}
        if scaled:
            raster.update(scale=0.0001, offset=-0.1)
        return {
            "href": f"{base}/{file}",
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "proj:shape": [side, side],
            "proj:transform": [res, 0, x0, 0, -res, y1],
            "raster:bands": [raster],
            "roles": ["data"],
        }

    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [],
        "id": item_id,
        "bbox": bbox,
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "datetime": f"{when:%Y-%m-%dT%H:%M:%S}Z",
            "platform": "sentinel-2b",
            "constellation": "sentinel-2",
            "eo:cloud_cover": 10.0,
            "proj:epsg": epsg,
            "s2:processing_baseline": "05.10",
            "grid:code": f"MGRS-{name}",
        },
        "links": [],
        "assets": {
            "red": band("B04.tif", 10, "uint16", True),
            "nir": band("B08.tif", 10, "uint16", True),
            "scl": band("SCL.tif", 20, "uint8", False),
        },
        "collection": "sentinel-2-l2a",
    }


def tile_grid_items(
    n: int | tuple[int, int],
    dates: Sequence[dt.datetime],
    *,
    epsg: int = 32631,
    origin: tuple[float, float] | None = None,
) -> Iterator[dict[str, Any]]:
    """Items of an ``n`` x ``n`` (or rows x cols) block of granules in ``epsg``, one per granule and date.

    ``origin`` is the top-left corner (x, y) of the block in ``epsg``; granules step :data:`TILE_STEP_M` east and
    south. Default: the block centred on the zone's central meridian (x 500 km), its top at y 5500 km (50 N):
    central France for zone 31. Yields ``rows * cols * len(dates)`` item dicts, date by date (a catalog's usual
    order).
    """
    rows, cols = (n, n) if isinstance(n, int) else n
    if origin is None:
        origin = (500_000.0 - cols * TILE_STEP_M / 2, 5_500_000.0)
    to_ll = Transformer.from_crs(epsg, 4326, always_xy=True)
    zone = epsg % 100
    for when in dates:
        for i in range(rows):
            for j in range(cols):
                x0, y1 = origin[0] + j * TILE_STEP_M, origin[1] - i * TILE_STEP_M
                yield _item(epsg, x0, y1, when, f"{zone:02d}T{i:03d}{j:03d}", to_ll)


def bbox_items(
    bbox: tuple[float, float, float, float], dates: Sequence[dt.datetime]
) -> Iterator[dict[str, Any]]:
    """Items of granules covering the WGS84 ``bbox`` (north of the equator), each in the UTM zone of the part it
    covers, like real MGRS tiles across zone boundaries: one block of granules per 6-degree zone."""
    west, south, east, north = bbox
    zone0, zone1 = int((west + 180) // 6) + 1, int((min(east, 179.999) + 180) // 6) + 1
    for zone in range(zone0, zone1 + 1):
        lo, hi = max(west, -180 + 6 * (zone - 1)), min(east, -180 + 6 * zone)
        epsg = 32600 + zone
        to_utm = Transformer.from_crs(4326, epsg, always_xy=True)
        xs, ys = to_utm.transform([lo, lo, hi, hi, (lo + hi) / 2], [south, north, south, north, north])
        x0 = math.floor(min(xs) / TILE_STEP_M) * TILE_STEP_M
        y1 = math.ceil(max(ys) / TILE_STEP_M) * TILE_STEP_M
        cols = max(1, math.ceil((max(xs) - x0) / TILE_STEP_M))
        rows = max(1, math.ceil((y1 - min(ys)) / TILE_STEP_M))
        yield from tile_grid_items((rows, cols), dates, epsg=epsg, origin=(float(x0), float(y1)))


def write_items(items: Iterator[dict[str, Any]] | Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write ``items`` as one GeoJSON FeatureCollection (a local catalog for ``--catalog PATH``)."""
    path = Path(path)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(items)}))
    return path
