"""Shared set-up of the engine tests: a small two-granule sample and bboxes over it."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pyproj import Transformer

from ndvi_scale.config import RunConfig
from ndvi_scale.engine.grid import OutputGrid
from ndvi_scale.pipeline import make_plan, plan_grid
from ndvi_scale.sample import SampleSpec

# Crosses the processing-baseline switch (1 May): items carry two different offsets.
START, END = dt.date(2024, 4, 1), dt.date(2024, 5, 20)
#: One COG tile per granule (the tile is bigger than the granule).
SPEC_ONE_TILE = SampleSpec(size=96, blocksize=128, start=START, end=END)
#: 3 x 3 tiles of 32 px (SCL: 2 x 2): chunk edges cut tiles, which exercises the tile cache.
SPEC_TILED = SampleSpec(size=96, blocksize=32, start=START, end=END)


def cfg(catalog: Any, bbox: tuple[float, float, float, float], **kw: Any) -> RunConfig:
    base: dict[str, Any] = dict(bbox=bbox, start=START.isoformat(), end=END.isoformat(), catalog=str(catalog))
    base.update(kw)
    return RunConfig.create(**base)


def lonlat_box(spec: SampleSpec, x0: float, x1: float, y0: float, y1: float) -> tuple[float, float, float, float]:
    """A lon/lat bbox inside the UTM box [x0, x1] x [y0, y1] m, relative to granule A's top-left corner."""
    tr = Transformer.from_crs(spec.epsg, 4326, always_xy=True)
    xs = [spec.x0 + x0, spec.x0 + x1, spec.x0 + x1, spec.x0 + x0]
    ys = [spec.y0 - y1, spec.y0 - y1, spec.y0 - y0, spec.y0 - y0]
    lon, lat = tr.transform(xs, ys)
    return (max(lon[0], lon[3]), max(lat[0], lat[1]), min(lon[1], lon[2]), min(lat[2], lat[3]))


def bboxes(spec: SampleSpec) -> dict[str, tuple[float, float, float, float]]:
    g = 10.0 * spec.size  # granule side, metres
    overlap_start = 10.0 * spec.shift
    return {
        "inside-A": lonlat_box(spec, 0.1 * g, 0.6 * g, 0.1 * g, 0.9 * g),
        "across-overlap": lonlat_box(spec, overlap_start - 0.3 * g, overlap_start + 0.4 * g, 0.2 * g, 0.8 * g),
        # reaches ~30 % of a granule beyond both on every side
        "partly-outside": lonlat_box(spec, -0.3 * g, overlap_start + 1.3 * g, -0.3 * g, 1.3 * g),
    }


def items_and_grid(catalog: Any, bbox: tuple[float, float, float, float], **kw: Any) -> tuple[list, OutputGrid]:
    """The plan's items (period after period) over ``bbox`` and the run's output grid."""
    plan = make_plan(cfg(catalog, bbox, **kw))
    return [it for p in plan.plans if p for it in p.items], plan_grid(plan)
