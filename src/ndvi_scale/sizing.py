"""What a run will cost, before any pixel is read: the ``ndvi-scale plan`` numbers and the size guard.

:func:`estimate` turns a plan (items per period, grid, chunk) into a :class:`RunEstimate`: items, grid, chunks,
regions, tasks, output bytes (raw and compressed), input bytes to fetch, CPU-hours and warnings. :func:`check_size`
refuses a run above :data:`MAX_OUTPUT_BYTES` or :data:`MAX_REGIONS` unless it is confirmed (``--yes``, config
``allow_large``), so a Europe-size bbox typed by mistake never starts writing terabytes.

Rules (the numbers are estimates, stated as such):

* **Output**: every pixel of every period: ``ndvi`` float32 + ``valid_count`` uint16 (+ the int32 date of
  ``max``/``min``), times the codec's measured compression ratio (:data:`COMPRESSION`).
* **Input**: per asset (red, nir, scl of every item used), the internal COG tiles (:data:`COG_TILE` px a side)
  its own grid has over the output grid's bounds, times :data:`BYTES_PER_PIXEL` of that band. Reads are whole
  tiles, so a bbox smaller than a tile still fetches the tile. Assets without ``proj:transform``/``proj:shape``
  count the output pixels their item's footprint covers, at the band's resolution. Full-resolution reads are
  assumed: at a coarser ``--resolution`` GDAL reads overviews, so the estimate is an upper bound there.
* **CPU**: pixel-observations (output pixels x items reaching them) / :data:`PX_OBS_PER_CORE_SECOND`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .composite import EXTRA_OUTPUTS
from .engine.grid import OutputGrid, reproject_corners
from .engine.sources import asset_source
from .errors import RunTooLargeError

if TYPE_CHECKING:
    from .config import RunConfig
    from .items import S2Item
    from .search import SearchResult

__all__ = [
    "COMPRESSION", "MAX_OUTPUT_BYTES", "MAX_REGIONS", "RunEstimate", "RunTooLargeError", "check_size", "estimate",
]

#: Output size above which a run must be confirmed: 100 GB is ~1,500 Sentinel-2 tiles-months of monthly
#: composites; nobody writes that by accident on purpose.
MAX_OUTPUT_BYTES = 100 * 10**9
#: Regions (period x chunk) above which a run must be confirmed: 100,000 regions are 200,000 tasks, where a
#: single Dask scheduler starts to spend more time on bookkeeping than the workers on pixels.
MAX_REGIONS = 100_000

#: Compressed / raw size of a cube's chunks per codec, measured on the sample's monthly median cube (12 x 854 x
#: 1289 px, ndvi + valid_count: 75.7 MiB raw; sample version 3, irregular fields) through write_cube, Zarr v3:
#: zstd 13.16, zlib 13.81, lz4 31.23 MiB (README "Codec" table). Real scenes have more texture than the sample:
#: expect somewhat more.
COMPRESSION = {"zstd": 13.16 / 75.68, "zlib": 13.81 / 75.68, "lz4": 31.23 / 75.68, "none": 1.0}

#: Side of a COG's internal tiles (px): Earth Search's and the sample's full-granule COGs use 1024.
COG_TILE = 1024
#: Stored bytes per pixel of each band's COG (DEFLATE). An assumption from typical Earth Search L2A files (a
#: 10980 px 10 m band is 150-220 MB; the 20 m SCL 3-6 MB for 5490 px), not measured on this machine (it has no
#: network); the synthetic COGs of sample version 3 measure 1.12 (red, nir) and 0.11 (SCL) B/px (file bytes, overviews
#: included, per full-resolution pixel), smoother than real scenes.
BYTES_PER_PIXEL = {"red": 1.5, "nir": 1.5, "scl": 0.15}
#: Native resolution (m) of each band, for assets whose metadata gives no transform.
NATIVE_RESOLUTION = {"red": 10.0, "nir": 10.0, "scl": 20.0}
#: Pixel-observations (output pixels x items reaching them) one core composites per second: measured for the
#: median at 0 ms latency, benchmarks/RESULTS.md session 12 (402 M px-obs in 8.4 CPU s on this 2-core machine,
#: reads and decoding included). Latency adds wall time, not CPU.
PX_OBS_PER_CORE_SECOND = 48e6


@dataclass(frozen=True)
class RunEstimate:
    """What a run will read, compute and write (``ndvi-scale plan``): built by :func:`estimate`."""

    items_found: int
    """Items the search returned, skipped ones included."""
    items_used: int
    """Items in some period of the run (the ones read)."""
    items_skipped: int
    """Items skipped by the search, with a reason (see ``ndvi-scale plan`` without ``--json``)."""
    crs: str
    """Output CRS, ``EPSG:XXXX``."""
    resolution: float
    """Pixel size in metres."""
    grid_shape: tuple[int, int]
    """Output grid (height, width) in pixels."""
    chunk: int
    """Spatial chunk (px), processing and Zarr."""
    chunks: tuple[int, int]
    """Chunks along y and x."""
    periods: int
    """Compositing periods of the calendar."""
    periods_with_scenes: int
    """Periods with at least one scene."""
    regions: int
    """Written regions: periods x chunks."""
    tasks: int
    """Dask tasks of the graph: a composite and a write per region, one per period with scenes."""
    output_bytes: int
    """Raw size of the cube's arrays."""
    output_bytes_compressed: int
    """Estimated stored size with the run's codec (:data:`COMPRESSION`)."""
    input_bytes: int
    """Estimated bytes fetched from the COGs (whole internal tiles; see the module's rules)."""
    px_obs: int
    """Output pixels x items reaching them: the work."""
    cpu_hours: float
    """Estimated CPU-hours (:data:`PX_OBS_PER_CORE_SECOND`)."""
    warnings: tuple[str, ...]
    """Multi-UTM areas, reprojected scenes, periods without scenes, size guard."""
    over_limit: bool
    """Whether the run is above the size guard (:func:`check_size`)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid_shape"], d["chunks"] = list(self.grid_shape), list(self.chunks)
        d["warnings"] = list(self.warnings)
        return d

    def to_json(self) -> str:
        """One JSON object (``ndvi-scale plan --json``)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def summary(self) -> str:
        """One line (``compute`` prints it before starting)."""
        h, w = self.grid_shape
        ny, nx = self.chunks
        text = (
            f"plan: {self.items_used:,} of {self.items_found:,} items; grid {h:,} x {w:,} px {self.crs} at "
            f"{self.resolution:g} m, chunk {self.chunk} ({ny} x {nx}); {self.periods} period(s) "
            f"({self.periods_with_scenes} with scenes); {self.regions:,} regions, {self.tasks:,} tasks; output "
            f"{human_bytes(self.output_bytes)} raw (~{human_bytes(self.output_bytes_compressed)} stored); input "
            f"~{human_bytes(self.input_bytes)}; ~{self.cpu_hours:,.1f} CPU-hours"
        )
        if self.warnings:
            text += f"; {len(self.warnings)} warning(s): " + "; ".join(self.warnings)
        return text


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units (kB, MB, GB, TB, PB), 3 significant digits."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 999.5:  # else .3g would print 1e+03
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def estimate(
    cfg: RunConfig,
    search: SearchResult,
    grid: OutputGrid,
    chunk: int,
    periods: Sequence[Any],
    items_per_period: Sequence[Sequence[S2Item] | None],
) -> RunEstimate:
    """The :class:`RunEstimate` of a planned run (``items_per_period``: the items of each period, None where it has
    no scene). Pure arithmetic on the metadata: nothing is read. Raises nothing."""
    height, width = grid.shape
    cy, cx = grid.chunks(chunk)
    n_periods = len(periods)
    live = [p for p in items_per_period if p]
    regions = n_periods * len(cy) * len(cx)
    per_px = 4 + 2 + 4 * len(EXTRA_OUTPUTS.get(cfg.method, ()))
    out_bytes = height * width * n_periods * per_px
    used = [it for p in live for it in p]
    corners: dict[int, tuple[float, float, float, float]] = {}
    input_bytes = 0.0
    px_obs = 0.0
    for it in used:
        for name in ("red", "nir", "scl"):
            native, stored = _asset_cost(it, name, grid, corners)
            input_bytes += stored
            if name == "red":
                px_obs += native * (NATIVE_RESOLUTION["red"] / grid.resolution) ** 2
    warnings = _warnings(grid, used, periods, items_per_period)
    over = out_bytes > MAX_OUTPUT_BYTES or regions > MAX_REGIONS
    if over:
        warnings.append(f"above the size guard ({human_bytes(MAX_OUTPUT_BYTES)} or {MAX_REGIONS:,} regions): "
                        "compute needs --yes (allow_large=True)")
    return RunEstimate(
        items_found=len(search.items) + len(search.skipped),
        items_used=len(used),
        items_skipped=len(search.skipped),
        crs=f"EPSG:{grid.epsg}",
        resolution=grid.resolution,
        grid_shape=(height, width),
        chunk=chunk,
        chunks=(len(cy), len(cx)),
        periods=n_periods,
        periods_with_scenes=len(live),
        regions=regions,
        tasks=2 * regions + len(live),
        output_bytes=out_bytes,
        output_bytes_compressed=int(out_bytes * COMPRESSION.get(cfg.codec, 1.0)),
        input_bytes=int(input_bytes),
        px_obs=int(px_obs),
        cpu_hours=px_obs / PX_OBS_PER_CORE_SECOND / 3600,
        warnings=tuple(warnings),
        over_limit=over,
    )


def check_size(est: RunEstimate, confirmed: bool) -> None:
    """Raise :class:`RunTooLargeError` (one line: how big, how to proceed) when ``est`` is above the size guard
    and the run is not ``confirmed``."""
    if not est.over_limit or confirmed:
        return
    raise RunTooLargeError(
        f"run too large to start unconfirmed: {human_bytes(est.output_bytes)} of output "
        f"(~{human_bytes(est.output_bytes_compressed)} stored), {est.regions:,} regions, ~{est.cpu_hours:,.0f} "
        f"CPU-hours; expected at most {human_bytes(MAX_OUTPUT_BYTES)} and {MAX_REGIONS:,} regions: check "
        "'ndvi-scale plan', then re-run with --yes (allow_large=True) or give a smaller bbox or a longer --period"
    )


def _asset_cost(
    item: S2Item, name: str, grid: OutputGrid, corners: dict[int, tuple[float, float, float, float]]
) -> tuple[float, float]:
    """(native pixels of the asset over the grid, bytes fetched: whole internal tiles) of one band of an item."""
    band = item.bands[name]
    epsg = band.epsg or item.epsg
    bpp = BYTES_PER_PIXEL[name]
    if band.transform is not None and band.shape is not None and epsg:
        a, _, c, _, e, f = band.transform[:6]
        if epsg not in corners:
            try:
                corners[epsg] = reproject_corners(grid.bounds, grid.epsg, epsg)
            except Exception:  # the grid does not project to the asset's CRS: count it as unknown below
                corners[epsg] = (math.nan,) * 4
        minx, miny, maxx, maxy = corners[epsg]
        if all(math.isfinite(v) for v in (minx, miny, maxx, maxy)) and a and e:
            rows, cols = band.shape
            c0, c1 = sorted(((minx - c) / a, (maxx - c) / a))
            r0, r1 = sorted(((maxy - f) / e, (miny - f) / e))
            c0, c1, r0, r1 = max(c0, 0), min(c1, cols), max(r0, 0), min(r1, rows)
            if c0 >= c1 or r0 >= r1:
                return 0.0, 0.0
            t = COG_TILE
            tile_cols = min(math.ceil(c1 / t) * t, cols) - math.floor(c0 / t) * t
            tile_rows = min(math.ceil(r1 / t) * t, rows) - math.floor(r0 / t) * t
            return (c1 - c0) * (r1 - r0), tile_cols * tile_rows * bpp
    window = asset_source(item, name, grid).window
    h, w = grid.shape
    if window is None:
        out_px = float(h * w)
    else:
        r0, r1, c0, c1 = window
        out_px = max(0.0, min(r1, h) - max(r0, 0)) * max(0.0, min(c1, w) - max(c0, 0))
    native = out_px * (grid.resolution / NATIVE_RESOLUTION[name]) ** 2
    return native, native * bpp


def _warnings(
    grid: OutputGrid,
    used: Sequence[S2Item],
    periods: Sequence[Any],
    items_per_period: Sequence[Sequence[S2Item] | None],
) -> list[str]:
    out: list[str] = []
    zones = sorted({it.epsg for it in used if it.epsg})
    if len(zones) > 1:
        out.append("area across UTM zones: scenes in " + ", ".join(f"EPSG:{z}" for z in zones))
    other = sum(1 for it in used if it.epsg and it.epsg != grid.epsg)
    if other:
        out.append(f"{other:,} scene(s) reprojected to EPSG:{grid.epsg} (nearest)")
    empty = [p for p, items in zip(periods, items_per_period, strict=True) if not items]
    if empty:
        shown = ", ".join(str(p.start) for p in empty[:6]) + (", ..." if len(empty) > 6 else "")
        out.append(f"{len(empty)} period(s) without scenes (NaN, count 0): {shown}")
    return out
