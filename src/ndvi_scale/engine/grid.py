"""The output grid: CRS, snapped bounds, transform, shape, pixel-centre coordinates and chunk windows.

A pure function of (bbox, CRS, resolution): it does not depend on the items, nor on the chunk size (chunks are
windows of the one grid, so chunked and unchunked runs give identical arrays), and a monthly append over the same
bbox lands on the same grid. The numbers are those stackstac computes for ``stackstac.stack(bounds_latlon=...,
snap_bounds=True, xy_coords="center")``, float for float, so cubes written before the engine had its own grid
keep appending (tests/test_stackstac_compat.py checks it against stackstac's own stack).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from pyproj import Transformer

__all__ = ["OutputGrid", "output_grid", "reproject_corners"]


@functools.lru_cache(maxsize=128)
def _transformer(src: int, dst: int) -> Transformer:
    return Transformer.from_crs(src, dst, always_xy=True)


def reproject_corners(
    bounds: tuple[float, float, float, float], src_epsg: int, dst_epsg: int
) -> tuple[float, float, float, float]:
    """The envelope of the four corners of ``bounds`` (minx, miny, maxx, maxy) in ``dst_epsg``.

    Corners only, not densified edges: this is the rule cubes were written with (stackstac's
    ``reproject_bounds``); changing it would move the grid of existing cubes by a pixel. Raises pyproj's
    ``ProjError`` where a corner cannot be projected.
    """
    if src_epsg == dst_epsg:
        return bounds
    minx, miny, maxx, maxy = bounds
    xs, ys = _transformer(src_epsg, dst_epsg).transform(
        [minx, minx, maxx, maxx], [maxy, miny, miny, maxy], errcheck=True
    )
    return min(xs), min(ys), max(xs), max(ys)


def affine_envelope(
    transform: tuple[float, ...], shape: tuple[int, int], src_epsg: int, dst_epsg: int
) -> tuple[float, float, float, float]:
    """The envelope in ``dst_epsg`` of the four corners of a raster (``transform`` a..f, ``shape`` rows, cols)."""
    af = Affine(*transform[:6])
    rows, cols = shape
    corners = [af * (0, 0), af * (0, rows), af * (cols, rows), af * (cols, 0)]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    if src_epsg != dst_epsg:
        xs, ys = _transformer(src_epsg, dst_epsg).transform(xs, ys, errcheck=True)
    return min(xs), min(ys), max(xs), max(ys)


@dataclass(frozen=True)
class OutputGrid:
    """A north-up grid of square pixels in a projected CRS."""

    epsg: int
    """The CRS (EPSG code)."""
    bounds: tuple[float, float, float, float]
    """(minx, miny, maxx, maxy) in metres, snapped to multiples of :attr:`resolution`."""
    resolution: float
    """Pixel size in metres."""

    @property
    def transform(self) -> Affine:
        """Affine of the top-left pixel corner (rasterio order)."""
        return Affine(self.resolution, 0.0, self.bounds[0], 0.0, -self.resolution, self.bounds[3])

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width), rounded as GDAL's warper does (``int((max - min + res / 2) / res)``)."""
        minx, miny, maxx, maxy = self.bounds
        res = self.resolution
        return int((maxy - miny + res / 2) / res), int((maxx - minx + res / 2) / res)

    def xs(self) -> np.ndarray:
        """x of the pixel centres, float64 (as ``np.linspace``: the very values cubes were written with)."""
        minx, _, maxx, _ = self.bounds
        half = self.resolution / 2
        return np.linspace(minx + half, maxx + half, self.shape[1], endpoint=False)

    def ys(self) -> np.ndarray:
        """y of the pixel centres, float64, north to south."""
        _, miny, _, maxy = self.bounds
        half = self.resolution / 2
        return np.linspace(maxy - half, miny - half, self.shape[0], endpoint=False)

    def chunks(self, chunk: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Chunk sizes along y and x for square chunks of ``chunk`` pixels (the last ones smaller)."""
        height, width = self.shape
        return _split(height, chunk), _split(width, chunk)

    def windows(self, chunk: int) -> Iterator[tuple[int, int, tuple[slice, slice]]]:
        """(i, j, (row slice, column slice)) of every chunk, row-major."""
        cy, cx = self.chunks(chunk)
        ys, xs = np.cumsum((0, *cy)), np.cumsum((0, *cx))
        for i in range(len(cy)):
            for j in range(len(cx)):
                yield i, j, (slice(int(ys[i]), int(ys[i + 1])), slice(int(xs[j]), int(xs[j + 1])))

    def pixel_window(self, bounds: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """(row0, row1, col0, col1), fractional, of ``bounds`` (in this grid's CRS) on this grid."""
        minx, miny, maxx, maxy = bounds
        x0, y0 = self.bounds[0], self.bounds[3]
        res = self.resolution
        return (y0 - maxy) / res, (y0 - miny) / res, (minx - x0) / res, (maxx - x0) / res

    def to_dict(self) -> dict[str, Any]:
        return {"epsg": self.epsg, "bounds": list(self.bounds), "resolution": self.resolution}


def _split(n: int, chunk: int) -> tuple[int, ...]:
    full, rest = divmod(n, chunk)
    return (chunk,) * full + ((rest,) if rest else ())


def output_grid(bbox: tuple[float, float, float, float], epsg: int, resolution: float) -> OutputGrid:
    """The grid of a run: ``bbox`` (WGS84 west, south, east, north) projected to ``epsg`` (its four corners),
    the envelope snapped outwards to multiples of ``resolution`` (``floor(min / res) * res``,
    ``ceil(max / res) * res``).

    Raises ValueError when the projected bbox is not finite (outside the CRS's domain) or empty.
    """
    minx, miny, maxx, maxy = reproject_corners(tuple(float(v) for v in bbox), 4326, epsg)  # type: ignore[arg-type]
    if not all(math.isfinite(v) for v in (minx, miny, maxx, maxy)):
        raise ValueError(f"bbox {bbox} does not project to finite bounds in EPSG:{epsg}")
    res = float(resolution)
    snapped = (
        math.floor(minx / res) * res,
        math.floor(miny / res) * res,
        math.ceil(maxx / res) * res,
        math.ceil(maxy / res) * res,
    )
    if not (snapped[0] < snapped[2] and snapped[1] < snapped[3]):
        raise ValueError(f"bbox {bbox} is empty in EPSG:{epsg}")
    return OutputGrid(int(epsg), snapped, res)
