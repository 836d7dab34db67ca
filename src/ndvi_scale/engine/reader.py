"""Reading one asset (one band file of one item) onto the output grid, warp-free where the grids line up.

For Sentinel-2 cut to a bbox nothing needs warping in the common case: the output grid is the asset's CRS and
10 m grid shifted by whole pixels. An :class:`AssetReader` opens the file once per process and decides:

* **Same grid, integer shift** (same CRS, north-up, same pixel size, origin a whole number of output pixels
  away): a plain windowed ``read(window=..., boundless=False)`` of the part of the window the asset covers,
  straight into the output array. No VRT, no masked array.
* **Coarser by an integer factor k, aligned** (SCL 20 m on a 10 m grid): reads the covering window at native
  resolution and repeats each pixel k x k times. On such grids an output pixel centre never falls on an asset
  pixel edge, so this is exactly GDAL's nearest-neighbour warp.
* **Anything else** (another CRS, fractional shift, rotation, float or mask-band assets, other drivers): a
  rasterio ``WarpedVRT`` onto the output grid with **nearest** resampling (no blended reflectances, SCL classes
  stay classes), read as a masked array and filled with the fill value, with an alpha band where the file has
  no nodata so pixels outside it are never taken for data. These are the pixels stackstac's reader gives
  (tests/engine/test_reader.py compares them).

Pixels equal to the asset's nodata, and pixels outside the asset, are :data:`FILL` (0, Sentinel-2's no-data DN).
Digital numbers are returned raw (uint16): scale/offset differ per item and are applied by the kernel.

On the aligned paths, COGs over http(s) and on local disk are read by the engine itself: the header is fetched
once (:mod:`.cog` parses the tile offsets from it), a window's tiles are fetched with one call
(:mod:`.ranges`: merged ranges, many calls waiting at once in the I/O pool) and decoded with imagecodecs, at most
:data:`~.owntiles.DECODE_THREADS` at once. Other files (s3://, gs://, JPEG 2000, anything :mod:`.cog` does not decode
exactly as GDAL would) are read through GDAL.

Shared tiles go through :data:`~ndvi_scale.engine.tiles.TILE_CACHE`; handles through
:data:`~ndvi_scale.engine.handles.HANDLES` (capped open files). Every read follows a
:class:`~ndvi_scale.faults.ReadPolicy`: a failed read is tried again from scratch (handles dropped, GDAL's cached
state of the file cleared, href re-signed), then the asset is skipped for that window (fill, recorded) or fails
with :class:`~ndvi_scale.faults.AssetReadError`. A process out of file descriptors is not the asset's fault: it
raises :class:`~ndvi_scale.errors.ReadError` at once, without retries or skipping.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import MaskFlags, Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from ..errors import ReadError, exception_chain
from ..faults import AssetFault, AssetReadError, ReadPolicy, SkippedAssetWarning, clean_href, error_text
from . import owntiles, ranges
from .cog import CogLayout, parse_cog
from .fetch import LazyPool, PoolClosed
from .grid import OutputGrid
from .handles import GDAL_OPEN_OPTIONS, GDAL_READ_OPTIONS, HANDLES, gdal_env
from .tiles import (
    TILE_CACHE,
    WINDOWS,
    TileCache,
    needed_elsewhere,
    paste,
    scratch,
    tile_extent,
    upsample_into,
    window_tiles,
)

log = logging.getLogger(__name__)

__all__ = ["FILL", "AssetReader", "Finish", "GridMatch", "match_grid", "reader_for"]

#: Value of pixels outside the asset or equal to its nodata: Sentinel-2 L2A's no-data DN.
FILL = 0

#: Output dtype of every read: Sentinel-2 digital numbers (SCL classes fit too). An 8-bit file read on the aligned
#: path (the SCL) comes as uint8.
DTYPE = np.dtype("uint16")

#: Tolerance, in output pixels, for "the asset origin lies on the output grid" and "the pixel size ratio
#: is an integer". Transforms are decimal metres: anything further off is a real misalignment.
_ALIGN_TOL = 1e-6

#: Drivers read without a warp: GDAL's GTiff driver reads windows of a COG by tiles.
_ALIGNED_DRIVERS = frozenset({"GTiff"})



@dataclass(frozen=True)
class GridMatch:
    """How an asset grid sits on the output grid when it is an aligned, integer-scaled copy of it."""

    col_off: int
    """Output column of the asset's left edge (may be negative)."""
    row_off: int
    """Output row of the asset's top edge (may be negative)."""
    factor: int
    """Asset pixel size / output pixel size (1 for red/nir, 2 for SCL onto 10 m)."""
    width: int
    """Asset width in asset pixels."""
    height: int
    """Asset height in asset pixels."""

    @property
    def extent(self) -> tuple[int, int, int, int]:
        """Output-grid pixels (row0, row1, col0, col1) the asset covers (may reach outside the grid)."""
        k = self.factor
        return self.row_off, self.row_off + self.height * k, self.col_off, self.col_off + self.width * k


Box = tuple[int, int, int, int]


def _overlap(m: GridMatch, r0: int, r1: int, c0: int, c1: int) -> tuple[Box, Box] | None:
    """Where the asset meets output pixels [r0, r1) x [c0, c1): (the output pixels it covers there, the asset
    pixels under them), each (row0, row1, col0, col1); None when it does not reach them. Output pixel j (from the
    asset's edge) has its centre in asset pixel j // k."""
    k = m.factor
    e_r0, e_r1, e_c0, e_c1 = m.extent
    rr0, rr1 = max(r0, e_r0), min(r1, e_r1)
    cc0, cc1 = max(c0, e_c0), min(c1, e_c1)
    if rr0 >= rr1 or cc0 >= cc1:
        return None
    return (rr0, rr1, cc0, cc1), ((rr0 - m.row_off) // k, (rr1 - 1 - m.row_off) // k + 1,
                                  (cc0 - m.col_off) // k, (cc1 - 1 - m.col_off) // k + 1)


def _asset_span(m: GridMatch, r0: int, r1: int, c0: int, c1: int) -> Box | None:
    """Asset pixels (row0, row1, col0, col1) under output pixels [r0, r1) x [c0, c1), or None (:func:`_overlap`)."""
    both = _overlap(m, r0, r1, c0, c1)
    return None if both is None else both[1]


def _others(expected: tuple[Box, ...] | None, match: GridMatch, window: Box) -> Callable[[Box], int] | None:
    """For a read of output pixels ``window`` (row0, row1, col0, col1): a tile extent (asset pixels) -> how many
    of the other ``expected`` windows (:meth:`AssetReader.expect`) need that tile; None when nothing is expected."""
    if expected is None:
        return None
    spans = [span for win in expected if win != window for span in [_asset_span(match, *win)] if span is not None]

    def others(extent: Box) -> int:
        t_r0, t_r1, t_c0, t_c1 = extent
        return sum(1 for r0, r1, c0, c1 in spans if r0 < t_r1 and t_r0 < r1 and c0 < t_c1 and t_c0 < c1)

    return others


def _as_int(value: float) -> int | None:
    n = round(value)
    return int(n) if abs(value - n) <= _ALIGN_TOL else None


def match_grid(
    asset_transform: Any,
    asset_shape: tuple[int, int],
    asset_epsg: int | None,
    out_transform: Any,
    out_epsg: int,
) -> GridMatch | None:
    """The :class:`GridMatch` of an asset on the output grid, or None when reading it needs a real warp.

    Transforms are affine ``a b c d e f`` (rasterio order); ``asset_shape`` is (height, width).
    """
    if asset_epsg is None or asset_epsg != out_epsg:
        return None
    a, b, c, d, e, f = tuple(asset_transform)[:6]
    oa, ob, oc, od, oe, of = tuple(out_transform)[:6]
    if b != 0 or d != 0 or ob != 0 or od != 0 or a <= 0 or e >= 0 or oa <= 0 or oe >= 0:
        return None
    kx, ky = _as_int(a / oa), _as_int(e / oe)
    if kx is None or ky is None or kx != ky or kx < 1:
        return None
    col_off, row_off = _as_int((c - oc) / oa), _as_int((f - of) / oe)
    if col_off is None or row_off is None:
        return None
    height, width = asset_shape
    return GridMatch(col_off, row_off, kx, int(width), int(height))


@dataclass(frozen=True)
class _Aligned:
    match: GridMatch
    nodata: int | None
    block: tuple[int, int]
    """Internal tile (rows, cols) of the asset."""
    src_dtype: np.dtype
    grid: tuple[int, int, int, int]
    """The output grid in asset pixels (row0, row1, col0, col1), clipped to the asset."""
    layout: CogLayout | None = None
    """Where the tiles are, when the engine fetches and decodes them itself (:mod:`.cog`); None: through GDAL."""


@dataclass(frozen=True)
class _Warped:
    same_grid: bool
    """The file's grid is the output grid: read it as it is, no VRT."""


class _Warp:
    """A dataset and its WarpedVRT onto the output grid: one handle of the pool."""

    def __init__(self, ds: Any, vrt: Any | None) -> None:
        self.ds, self.vrt = ds, vrt

    def close(self) -> None:
        if self.vrt is not None:
            self.vrt.close()
        self.ds.close()


class AssetReader:
    """Reads one asset onto one output grid; made once per process by :func:`reader_for`, used by all threads."""

    def __init__(self, url: str, grid: OutputGrid) -> None:
        self.url = url
        """The href read (changes when a retry re-signs it)."""
        self.grid = grid
        self._plan: _Aligned | _Warped | None = None
        self._lock = threading.Lock()
        self._expected: tuple[Box, ...] | None = None
        self._opening: Future[Any] | None = None

    def expect(self, windows: Iterable[Window]) -> None:
        """The windows (of the output grid) the tasks of this run read the asset on, as far as this process knows:
        a COG tile that several of them need leaves the tile cache once the last of them has taken it
        (:meth:`.tiles.TileCache.put`'s ``uses``). Replaces what an earlier run expected."""
        self._expected = tuple(sorted({(int(w.row_off), int(w.row_off + w.height), int(w.col_off),
                                        int(w.col_off + w.width)) for w in windows}))

    @property
    def fast(self) -> bool | None:
        """True if reads take the aligned path, False if the warped one, None before the first read."""
        plan = self._plan
        return None if plan is None else isinstance(plan, _Aligned)

    @property
    def path(self) -> str | None:
        """``"tiles"`` (aligned, tiles fetched and decoded by the engine), ``"gdal"`` (aligned, GDAL reads the
        window), ``"warped"``, or None before the first read."""
        plan = self._plan
        if plan is None:
            return None
        if isinstance(plan, _Aligned):
            return "tiles" if plan.layout is not None else "gdal"
        return "warped"

    def cost(self, window: Window) -> int:
        """Bytes a read of ``window`` holds between :meth:`start` and its finisher: the compressed tiles on the
        engine's own COG path (once the file's header is known), else the uint16 window."""
        plan = self._plan
        h, w = int(window.height), int(window.width)
        if not isinstance(plan, _Aligned) or plan.layout is None:
            return 2 * h * w
        r0, c0 = int(window.row_off), int(window.col_off)
        span = _asset_span(plan.match, r0, r0 + h, c0, c0 + w)
        if span is None:
            return 0
        return sum(plan.layout.tile_range(*t)[1] for t in window_tiles(*span, plan.block))

    def coverage(self) -> tuple[int, int, int, int] | None:
        """Output-grid pixels (row0, row1, col0, col1) the asset's raster covers, exactly, on the aligned path
        (the asset is opened to decide, as the first read would); None on the warped path or when the open
        fails (the read then meets the error and applies the read policy)."""
        if self._plan is None and self._given_up():
            return None  # do not ask a server that failed every attempt again just for the extent
        try:
            plan = self._plan if self._plan is not None else self._decide()
        except Exception:
            return None
        return plan.match.extent if isinstance(plan, _Aligned) else None

    def open_ahead(self, pool: LazyPool) -> None:
        """Open the asset in ``pool`` (its header read: a round trip), without waiting, unless it is open or an
        earlier call's open has not finished: the period's sources ask for every asset several times (for this
        period and as the next one), and a queue of opens already made would hold up the header reads still
        needed behind them."""
        opening = self._opening
        if self._plan is not None or (opening is not None and not opening.done()):
            return
        self._opening = pool.submit(self.coverage)

    # -- deciding -----------------------------------------------------------------------------------------

    def _open(self) -> Any:
        return _open(self.url)

    def _decide(self) -> _Aligned | _Warped:
        """Open the asset once and choose the path (thread-safe, once per reader and attempt): from the COG's
        header read by the engine itself where it can (http(s) and local files, see :mod:`.cog`), else through
        GDAL."""
        with self._lock:
            if self._plan is not None:
                return self._plan
            plan: _Aligned | _Warped | None = None
            if owntiles.OWN_TILES and ranges.supported(self.url):
                plan = _plan_from_header(self.url, self.grid)
            if plan is None:
                with HANDLES.use(self.url, self._open) as ds:
                    plan = _plan_for(ds, self.url, self.grid)
            self._plan = plan
            return plan

    # -- reading ------------------------------------------------------------------------------------------

    def read(self, window: Window, policy: ReadPolicy) -> np.ndarray:
        """The asset's uint16 pixels in ``window`` of the output grid (:data:`FILL` outside it and at its
        nodata), under ``policy``. Raises :class:`AssetReadError` (policy without skip) or
        :class:`~ndvi_scale.errors.ReadError` (the process is out of file descriptors)."""
        got = self._with_policy(window, policy, self._read_once)
        return got if isinstance(got, np.ndarray) else got()

    def start(self, window: Window, policy: ReadPolicy) -> Callable[[], np.ndarray]:
        """Fetch what :meth:`read` of ``window`` needs, under ``policy`` (in an I/O thread), and return the
        function that finishes it (in the task's thread): on the engine's own COG path the tiles are decoded
        there, elsewhere it returns what was read. Same results and errors as :meth:`read`; a finisher whose
        bytes do not decode (a file changed or corrupt since) reads the window again under ``policy``."""
        return self._finisher(self._with_policy(window, policy, self._fetch_once), window, policy)

    def try_start(self, window: Window, policy: ReadPolicy) -> Callable[[], np.ndarray]:
        """One attempt of :meth:`start`, outside the policy: no retry, nothing recorded, never skipped; raises
        at once for an asset given up on. For reads made ahead of their task (:mod:`.warm`): a failure there is
        met again by the task's own read, under the policy."""
        if self._given_up():
            raise OSError(f"{clean_href(self.url)} was given up on")
        return self._finisher(self._fetch_once(window), window, policy)

    def try_read(self, window: Window) -> np.ndarray:
        """:meth:`try_start` and its decode at once, both outside the policy (a failed decode is not read again
        here): for reads decoded ahead of their task, whose own read meets any failure again under the policy."""
        if self._given_up():
            raise OSError(f"{clean_href(self.url)} was given up on")
        return self._read_once(window)

    def _given_up(self) -> bool:
        """Whether this process gave up reading this asset less than :data:`GIVE_UP_MEMORY` seconds ago."""
        when = _GIVEN_UP.get(clean_href(self.url))
        return when is not None and time.monotonic() - when < GIVE_UP_MEMORY

    def _finisher(self, got: Any, window: Window, policy: ReadPolicy) -> Callable[[], np.ndarray]:
        if isinstance(got, np.ndarray):
            return lambda: got
        return Finish(self, got, window, policy)

    def _with_policy(self, window: Window, policy: ReadPolicy,
                     once: Callable[[Window], Any]) -> Any:
        """``once(window)`` with the read policy's attempts; the fill array when the asset is skipped."""
        # An asset given up on for another window of this run gets one attempt, not the whole backoff again:
        # a file that is gone is gone for every chunk (36 of them per 2048-px granule).
        attempts = 1 if self._given_up() else policy.attempts
        attempt = 1
        while True:
            try:
                return once(window)
            except _NOT_THE_ASSETS_FAULT:
                raise  # a bug or the machine; retrying or skipping would hide it
            except Exception as e:
                if any(isinstance(x, PoolClosed) for x in exception_chain(e)):
                    raise  # the process is exiting (a run that failed): nothing to retry or record
                if _out_of_files(e):
                    raise ReadError(
                        f"this process ran out of file descriptors while reading {clean_href(self.url)} (not a "
                        "fault of the asset); raise the limit (ulimit -n) or lower NDVI_SCALE_MAX_OPEN_FILES "
                        f"(now {HANDLES.max_open})"
                    ) from None
                if attempt >= attempts:
                    return self._give_up(window, e, attempt, policy)
                log.info("read of %s failed (attempt %d of %d): %s", clean_href(self.url), attempt,
                         policy.attempts, error_text(e))
                self._reset(policy)
                time.sleep(policy.delay(attempt))
                attempt += 1

    def _give_up(self, window: Window, exc: Exception, attempts: int, policy: ReadPolicy) -> np.ndarray:
        fault = AssetFault(
            href=clean_href(self.url),
            window=(int(window.row_off), int(window.col_off), int(window.height), int(window.width)),
            error=error_text(exc),
            attempts=attempts,
            skipped=policy.skip,
        )
        _GIVEN_UP[fault.href] = time.monotonic()
        _clear_gdal_cache(self.url)  # the next read of it (another chunk, a later run) asks the server again
        if policy.log is not None:
            try:
                policy.log.record(fault)
            except Exception as rec:  # the output store is failing too: the read error still wins
                log.warning("could not record the read fault of %s: %s", fault.href, error_text(rec))
        if not policy.skip:
            raise AssetReadError(fault) from exc
        warnings.warn(f"skipped unreadable asset {fault.describe()}", SkippedAssetWarning, stacklevel=3)
        return np.full((int(window.height), int(window.width)), FILL, dtype=DTYPE)

    def _reset(self, policy: ReadPolicy) -> None:
        """Start the next attempt from scratch: new handles, no cached GDAL state, a fresh signature."""
        old = self.url
        with self._lock:
            self._plan = None
            HANDLES.reset(old)
            HANDLES.reset(("warp", old, self.grid))
            _clear_gdal_cache(old)
            if policy.resign is not None:
                try:
                    self.url = policy.resign(old)
                except Exception as e:  # signing service down: retry with the old href, the read will tell
                    log.warning("could not re-sign %s: %s", clean_href(old), error_text(e))

    def _read_once(self, window: Window) -> np.ndarray:
        """:meth:`_fetch_once`, then its finisher, both in this thread."""
        got = self._fetch_once(window)
        if isinstance(got, np.ndarray):
            return got
        try:
            return got()
        except Exception as e:
            raise RuntimeError(f"Error reading {window} from {clean_href(self.url)!r}: {e!r}") from e

    def _fetch_once(self, window: Window) -> Callable[[], np.ndarray] | np.ndarray:
        plan = self._plan if self._plan is not None else self._decide()
        try:
            if isinstance(plan, _Aligned):
                return self._aligned(plan, window)
            return _read_warped(self.url, self.grid, plan, window)
        except Exception as e:
            raise RuntimeError(f"Error reading {window} from {clean_href(self.url)!r}: {e!r}") from e

    # -- the aligned path ---------------------------------------------------------------------------------

    def _aligned(self, plan: _Aligned, window: Window) -> Callable[[], np.ndarray]:
        """Fetch ``window`` on the aligned path; the finisher makes the output window. Through GDAL everything is
        read here; on the engine's own path the tiles are fetched here and decoded by the finisher."""
        m = plan.match
        k = m.factor
        r0, c0 = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        both = _overlap(m, r0, r0 + h, c0, c0 + w)
        if both is None:
            return functools.partial(_filled, (h, w), _out_dtype(plan))
        (rr0, rr1, cc0, cc1), (sr0, sr1, sc0, sc1) = both  # the asset's extent in output pixels, in the window
        inner = (rr0 - r0, rr1 - r0, cc0 - c0, cc1 - c0)
        shift = ((rr0 - m.row_off) - sr0 * k, (cc0 - m.col_off) - sc0 * k)
        if plan.layout is not None:
            batch = owntiles.collect(self.url, plan.layout, plan.nodata, plan.grid, sr0, sr1, sc0, sc1,
                                     _others(self._expected, m, (r0, r0 + h, c0, c0 + w)))
            finish = functools.partial(_finish_aligned, plan, (h, w), inner, shift, batch.place)
            if k == 1 and plan.nodata in (None, FILL):  # the file's own pixels: foldable tile by tile
                return owntiles.TiledRead(finish, batch, inner)
            return finish

        def gdal(target: np.ndarray) -> None:
            with HANDLES.use(self.url, self._open) as ds:
                _read_gdal_tiles(self.url, plan, ds, sr0, sr1, sc0, sc1, target)

        out = _finish_aligned(plan, (h, w), inner, shift, gdal)
        return lambda: out


# -- an asset's path, from its header or opened by GDAL (AssetReader._decide) -------------------------------


def _open(url: str) -> Any:
    """The file opened by GDAL (rasterio) with the engine's open options."""
    with gdal_env(GDAL_OPEN_OPTIONS):
        return rasterio.open(url, sharing=False)


def _plan_from_header(url: str, grid: OutputGrid) -> _Aligned | _Warped | None:
    """The plan from the file's own header (one range request); None when GDAL must read this file."""
    try:
        layout = parse_cog(owntiles.Header(url).read)
    except owntiles.NotCog:
        return None
    if layout is None:
        return None
    shape = (layout.height, layout.width)
    src_dtype = np.dtype(layout.dtype)
    if not np.can_cast(src_dtype, DTYPE, "safe"):
        return None
    nodata: int | None = None
    if layout.nodata is not None:
        if not float(layout.nodata).is_integer():
            return None
        nodata = int(layout.nodata)
    match = match_grid(layout.transform, shape, layout.epsg, grid.transform, grid.epsg)
    if match is None:
        same = layout.epsg == grid.epsg and layout.transform == tuple(grid.transform)[:6] and shape == grid.shape
        return _Warped(same_grid=bool(same))
    return _Aligned(match, nodata, (layout.tile_height, layout.tile_width), src_dtype,
                    _clip(match, grid.shape), layout)


def _plan_for(ds: Any, url: str, grid: OutputGrid) -> _Aligned | _Warped:
    """The plan from the file opened by GDAL: the aligned path where its pixels can be taken as they are."""
    if ds.count != 1:
        raise RuntimeError(
            f"Assets must have exactly 1 band, but file {clean_href(url)!r} has {ds.count}; exclude "
            "this asset (each band has to be a separate STAC asset)"
        )
    same = ds.crs is not None and ds.crs.to_epsg() == grid.epsg and ds.transform == grid.transform and (
        ds.height, ds.width) == grid.shape
    warped = _Warped(same_grid=bool(same))
    if ds.driver not in _ALIGNED_DRIVERS:
        return warped
    src_dtype = np.dtype(ds.dtypes[0])
    # Integer assets only: GDAL tests float nodata with a tolerance and clamps float -> int conversions.
    if src_dtype.kind not in "ui" or not np.can_cast(src_dtype, DTYPE, "safe"):
        return warped
    flags = ds.mask_flag_enums[0]
    nodata: int | None = None
    if flags == [MaskFlags.nodata]:
        if ds.nodata is None or not float(ds.nodata).is_integer():
            return warped
        nodata = int(ds.nodata)
    elif flags != [MaskFlags.all_valid]:
        return warped  # internal mask band or alpha: masked pixels are not a value test
    if ds.crs is None:
        return warped
    match = match_grid(ds.transform, (ds.height, ds.width), ds.crs.to_epsg(), grid.transform, grid.epsg)
    if match is None:
        return warped
    block = tuple(int(v) for v in ds.block_shapes[0])
    return _Aligned(match, nodata, (block[0], block[1]), src_dtype, _clip(match, grid.shape))


# -- reading through GDAL: the warped path, and the aligned path's tiles ---------------------------------------


def _open_warp(url: str, grid: OutputGrid, plan: _Warped) -> _Warp:
    """The file and, unless it is on the output grid already, its WarpedVRT onto it."""
    ds = _open(url)
    if plan.same_grid:
        return _Warp(ds, None)
    try:
        with gdal_env(GDAL_OPEN_OPTIONS):
            height, width = grid.shape
            vrt = WarpedVRT(
                ds, sharing=False, resampling=Resampling.nearest, add_alpha=ds.nodata is None,
                crs=grid.epsg, transform=grid.transform, height=height, width=width,
            )
    except Exception:
        ds.close()
        raise
    return _Warp(ds, vrt)


def _read_warped(url: str, grid: OutputGrid, plan: _Warped, window: Window) -> np.ndarray:
    """``window`` through GDAL's warper (nearest neighbour), :data:`FILL` where the file has no data."""
    with HANDLES.use(("warp", url, grid), functools.partial(_open_warp, url, grid, plan)) as pair:
        with gdal_env(GDAL_READ_OPTIONS):
            src = pair.vrt if pair.vrt is not None else pair.ds
            result = src.read(window=window, out_dtype=DTYPE, masked=True)
    # Without a nodata value, pixels outside the file are 0 in the VRT: its alpha band says which are data.
    if result.shape[0] == 2:
        result = np.ma.masked_array(result[0], mask=result[1] == 0)
    else:
        result = result[0]
    return np.ma.filled(result, fill_value=FILL).astype(DTYPE, copy=False)


def _read_gdal_tiles(
    url: str, plan: _Aligned, ds: Any, r0: int, r1: int, c0: int, c1: int, target: np.ndarray
) -> None:
    """The asset pixels [r0, r1) x [c0, c1) through GDAL into ``target``; tiles other windows need too go
    through the tile cache (each fetched and inflated once)."""
    cache: TileCache = TILE_CACHE
    if cache.max_bytes <= 0:
        _gdal_read(ds, r0, r1, c0, c1, target)
        return
    tiles = window_tiles(r0, r1, c0, c1, plan.block)
    shape = (plan.match.height, plan.match.width)

    def extent(tile: tuple[int, int]) -> tuple[int, int, int, int]:
        return tile_extent(tile, plan.block, shape)

    def whole(tile: tuple[int, int]) -> bool:
        """No other window of the output grid needs this tile: do not cache it."""
        return not needed_elsewhere(extent(tile), plan.grid, r0, r1, c0, c1)

    partial = [t for t in tiles if not whole(t)]
    have, mine, pending = cache.claim([(url, *t) for t in partial])
    try:
        # ONE read for the whole tiles and the partial tiles nobody has: GDAL then fetches exactly their
        # byte ranges (merged into few requests) and inflates each tile once.
        todo = [t for t in tiles if whole(t)] + [key[1:] for key in mine]
        if todo:
            b_r0 = min(extent(t)[0] for t in todo)
            b_r1 = max(extent(t)[1] for t in todo)
            b_c0 = min(extent(t)[2] for t in todo)
            b_c1 = max(extent(t)[3] for t in todo)
            if not mine:  # whole tiles only: straight into the output (their part in the window)
                b_r0, b_r1, b_c0, b_c1 = max(b_r0, r0), min(b_r1, r1), max(b_c0, c0), min(b_c1, c1)
                _gdal_read(ds, b_r0, b_r1, b_c0, b_c1, target[b_r0 - r0 : b_r1 - r0, b_c0 - c0 : b_c1 - c0])
            else:
                with scratch((b_r1 - b_r0, b_c1 - b_c0), plan.src_dtype) as buf:
                    _gdal_read(ds, b_r0, b_r1, b_c0, b_c1, buf)
                    paste(target, r0, c0, buf, b_r0, b_c0)
                    for key in mine:
                        t_r0, t_r1, t_c0, t_c1 = extent(key[1:])
                        cache.store(key, buf[t_r0 - b_r0 : t_r1 - b_r0, t_c0 - b_c0 : t_c1 - b_c0])
    finally:
        cache.release(mine)  # no-op for the keys put
    for key, arr in have.items():
        t_r0, _, t_c0, _ = extent(key[1:])
        paste(target, r0, c0, arr, t_r0, t_c0)
    for key, event in pending.items():
        event.wait()
        t_r0, t_r1, t_c0, t_c1 = extent(key[1:])
        got = cache.take(key)
        if got is None:  # the other thread failed, or the tile was evicted already: read it here
            got = np.empty((t_r1 - t_r0, t_c1 - t_c0), dtype=plan.src_dtype)
            _gdal_read(ds, t_r0, t_r1, t_c0, t_c1, got)
        paste(target, r0, c0, got, t_r0, t_c0)


class Finish:
    """The second half of a read (:meth:`AssetReader.start`): call it for the window. A finisher whose bytes do
    not decode (a file changed or corrupt since) reads the window again under the read policy.

    ``tiled`` is the own-tile read behind it when its tiles can be folded where they lie
    (:class:`.owntiles.TiledRead`), else None: a fold that takes them, and fails to decode them, calls the
    finisher instead, which decodes again and reads again under the policy as any read.
    """

    def __init__(self, reader: AssetReader, got: Callable[[], np.ndarray], window: Window,
                 policy: ReadPolicy) -> None:
        self.reader, self.got, self.window, self.policy = reader, got, window, policy
        self.tiled: owntiles.TiledRead | None = got if isinstance(got, owntiles.TiledRead) else None

    def __call__(self) -> np.ndarray:
        try:
            return self.got()
        except _NOT_THE_ASSETS_FAULT:
            raise
        except Exception as e:
            reader = self.reader
            log.info("decoding %s failed, reading it again: %s", clean_href(reader.url), error_text(e))
            reader._reset(self.policy)
            return reader.read(self.window, self.policy)


def _finish_aligned(plan: _Aligned, shape: tuple[int, int], inner: tuple[int, int, int, int],
                    shift: tuple[int, int], fill: Callable[[np.ndarray], None]) -> np.ndarray:
    """The output window of ``shape``: :data:`FILL` outside ``inner`` (rows/cols the asset covers, relative to the
    window), inside it the asset pixels that ``fill(target)`` writes (from asset pixel (sr0, sc0) on), repeated
    ``k`` x ``k`` from ``shift`` (the offset of the window's first pixel in that first asset pixel) if the asset
    is coarser, its nodata made :data:`FILL`."""
    i_r0, i_r1, i_c0, i_c1 = inner
    out = WINDOWS.get(shape, _out_dtype(plan))  # the task gives it back once folded
    # fill only the margins the asset does not cover
    out[:i_r0] = FILL
    out[i_r1:] = FILL
    out[i_r0:i_r1, :i_c0] = FILL
    out[i_r0:i_r1, i_c1:] = FILL
    dst = out[i_r0:i_r1, i_c0:i_c1]
    k = plan.match.factor
    if k == 1:
        fill(dst)
    else:
        dr, dc = shift
        with WINDOWS.take(((dr + dst.shape[0] - 1) // k + 1, (dc + dst.shape[1] - 1) // k + 1), plan.src_dtype) as src:
            fill(src)
            upsample_into(dst, src, k, dr, dc)
    if plan.nodata is not None and plan.nodata != FILL:
        dst[dst == plan.nodata] = FILL
    return out


def _filled(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """A window the asset does not reach: all :data:`FILL`, in a pooled window (the task gives it back once
    folded, as any other: a fresh one is 4-8 MB of page faults)."""
    out = WINDOWS.get(shape, dtype)
    out.fill(FILL)
    return out


def _out_dtype(plan: _Aligned) -> np.dtype:
    """uint8 for an 8-bit file (the SCL: half the bytes to fill, upsample and fold, no cast), else :data:`DTYPE`."""
    return np.dtype(np.uint8) if plan.src_dtype == np.uint8 else DTYPE


def _clip(match: GridMatch, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The output grid of ``shape`` in asset pixels (row0, row1, col0, col1), clipped to the asset."""
    out_h, out_w = shape
    k = match.factor
    return (
        max(0, -match.row_off // k),
        min(match.height, -(-(out_h - match.row_off) // k)),
        max(0, -match.col_off // k),
        min(match.width, -(-(out_w - match.col_off) // k)),
    )


def _gdal_read(ds: Any, r0: int, r1: int, c0: int, c1: int, out: np.ndarray) -> None:
    with gdal_env(GDAL_READ_OPTIONS):
        ds.read(1, window=Window(c0, r0, c1 - c0, r1 - r0), out=out, boundless=False)


def _out_of_files(exc: BaseException) -> bool:
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno == errno.EMFILE:
            return True
        if "Too many open files" in str(e):
            return True
    return False


#: Errors that are not the asset's fault (a bug or the machine): never retried, skipped or blamed on a file.
_NOT_THE_ASSETS_FAULT = (MemoryError, TypeError, AttributeError, NameError, AssertionError, PoolClosed)

#: Readers of this process by (href, grid): an asset is opened and decided once per process, whatever the number
#: of chunks and tasks that read it. Bounded (least recently used dropped first); handles are capped separately.
_READERS: collections.OrderedDict[tuple[str, OutputGrid], AssetReader] = collections.OrderedDict()
_READERS_LOCK = threading.Lock()
_MAX_READERS = 8192


def reader_for(href: str, grid: OutputGrid) -> AssetReader:
    """This process's :class:`AssetReader` of ``href`` on ``grid``."""
    key = (href, grid)
    with _READERS_LOCK:
        reader = _READERS.get(key)
        if reader is None:
            reader = _READERS[key] = AssetReader(href, grid)
            while len(_READERS) > _MAX_READERS:
                _READERS.popitem(last=False)
        else:
            _READERS.move_to_end(key)
        return reader


def forget_readers() -> None:
    """Drop this process's readers and close their free handles (tests; a long-lived notebook between runs)."""
    with _READERS_LOCK:
        _READERS.clear()
    HANDLES.clear()


#: Clean hrefs this process gave up reading after every attempt, with when (see :meth:`AssetReader.read`).
_GIVEN_UP: dict[str, float] = {}

#: Seconds an asset given up on gets a single attempt per read: the rest of a run, not a notebook session.
GIVE_UP_MEMORY = 600.0


@functools.lru_cache(maxsize=1)
def _gdal_clear_function() -> Any:
    """GDAL's ``VSICurlPartialClearCache`` (not exposed by rasterio), or None if it cannot be found."""
    try:
        import rasterio._base as base

        # dlsym on rasterio's own extension module finds the libgdal it is linked against (wheel or system).
        fn = ctypes.CDLL(base.__file__).VSICurlPartialClearCache
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_char_p]
    fn.restype = None
    return fn


def _clear_gdal_cache(url: str) -> None:
    """Forget what GDAL's /vsicurl/ (and /vsis3/, /vsigs/, ...) cache knows of ``url``.

    GDAL caches a file's size and existence, including a failed answer: without this, the next attempt at a
    file that answered 500, or that was truncated, fails again without a single request to the server.
    """
    fn = _gdal_clear_function()
    if fn is None:
        return
    try:
        from rasterio._path import _parse_path

        vsi = _parse_path(url).as_vsi()
    except Exception:
        return
    if vsi.startswith("/vsi"):
        fn(vsi.encode())
