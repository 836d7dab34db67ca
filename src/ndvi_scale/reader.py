"""A stackstac Reader that skips GDAL's warper when the asset grid is a pixel-aligned copy of the output grid.

stackstac's :class:`~stackstac.rio_reader.AutoParallelRioReader` reads an asset through a ``WarpedVRT`` unless
the asset grid *is* the output grid (same bounds and shape), and always as a masked array that it then fills.
For Sentinel-2 cut to a bbox the grids never match, yet nothing needs warping: the output grid is the asset's
CRS and 10 m grid shifted by whole pixels. The warper then costs as much CPU as the DEFLATE decoding.

:class:`FastReader` is a drop-in replacement, ``stackstac.stack(..., reader=FastReader)``. On its first read
it opens the asset and decides once:

* **Same grid, integer shift** (same CRS, north-up, same pixel size, origin a whole number of output pixels
  away): a plain windowed ``read(window=..., boundless=False)`` of the part of the window the asset covers,
  straight into a ``fill_value`` output array. No VRT, no masked array.
* **Coarser by an integer factor k, aligned** (SCL 20 m on a 10 m grid, ``resampling=nearest``): reads the
  covering window at native resolution and repeats each pixel k x k times. On such grids an output pixel
  centre never falls on an asset pixel edge, so this is exactly GDAL's nearest-neighbour warp.
* **Anything else** (other CRS, fractional shift, rotation, other resampling, float or mask-band assets,
  non-GTiff drivers): stackstac's own behaviour, unchanged (``super().read``).

Pixels equal to the asset's nodata become ``fill_value`` and scale/offset apply to the other pixels only, as
in stackstac. A read uses a dataset handle no other thread is using (GDAL datasets are not thread-safe): a
small pool per asset, opened lazily under the ``open`` layer of the ``gdal_env`` stackstac passes, read
under its ``read`` layer; rasterio releases the GIL for the whole ``RasterIO`` call, so reads run on every
core the scheduler gives.

**Tiles shared between chunks.** An output chunk whose edge cuts an internal COG tile makes GDAL fetch and
inflate that whole tile, and the neighbouring chunk does it again: with 2048-px chunks over 1024-px tiles
that is up to 2.25x the decoding and the bytes of a tile-aligned read. Granules of one UTM zone sit 10 000 px
apart (not a multiple of 1024), so no chunking aligns with the tiles of all of them. The fast path therefore
keeps the tiles that another window of the output grid also needs in :data:`TILE_CACHE`, a process-wide LRU
of decoded tiles keyed by URL and tile and shared by all threads (``NDVI_SCALE_TILE_CACHE_MB``, default
384; 0 turns it off). A tile that one thread is reading is waited for by the others, not read twice. Each
read is ONE ``RasterIO`` call over the tiles not in the cache, so GDAL still fetches exactly their byte
ranges (merged into few requests); tiles only this window needs go straight to the output, uncached.

**Faults.** Every read, on either path, follows the reader's :class:`~ndvi_scale.faults.ReadPolicy`: a failed
read is tried again from scratch (handles dropped, GDAL's cached state of the file cleared, href re-signed),
then the asset is either skipped for that window (fill value, recorded) or fails with
:class:`~ndvi_scale.faults.AssetReadError`. See :mod:`ndvi_scale.faults`.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import MaskFlags, Resampling
from rasterio.windows import Window
from stackstac.nodata_reader import exception_matches, nodata_for_window
from stackstac.rio_reader import MULTITHREADED_DRIVER_ALLOWLIST, AutoParallelRioReader

from .faults import AssetFault, AssetReadError, ReadPolicy, SkippedAssetWarning, clean_href, error_text

log = logging.getLogger(__name__)

__all__ = ["TILE_CACHE", "FastReader", "GridMatch", "TileCache", "match_grid"]

#: Tolerance, in output pixels, for "the asset origin lies on the output grid" and "the pixel size ratio
#: is an integer". Transforms are decimal metres: anything further off is a real misalignment.
_ALIGN_TOL = 1e-6

#: Default budget of :data:`TILE_CACHE` in MiB; ``NDVI_SCALE_TILE_CACHE_MB`` overrides it (0 disables it).
#: The edge tiles one 2048-px chunk of 12 two-band items leaves behind are ~150-400 MB of uint16.
DEFAULT_TILE_CACHE_MB = 384


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


class TileCache:
    """A thread-safe LRU of decoded tiles with a byte budget.

    Readers :meth:`claim` the tiles they need: they get the cached ones, the keys they must load themselves
    (marked as loading, so other threads wait instead of decoding them too) and events for the keys another
    thread is loading. They then :meth:`put` what they loaded, or :meth:`release` it on failure.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._data: collections.OrderedDict[Any, np.ndarray] = collections.OrderedDict()
        self._loading: dict[Any, threading.Event] = {}
        self._free: dict[Any, list[np.ndarray]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        """Drop every tile and reset the hit/miss counters."""
        with self._lock:
            self._data.clear()
            self._free.clear()
            self._bytes = 0
            self.hits = self.misses = 0

    def claim(self, keys: Any) -> tuple[dict[Any, np.ndarray], list[Any], dict[Any, threading.Event]]:
        """(cached arrays, keys now loading by the caller, events of keys another thread is loading)."""
        have: dict[Any, np.ndarray] = {}
        mine: list[Any] = []
        pending: dict[Any, threading.Event] = {}
        with self._lock:
            for key in keys:
                arr = self._data.get(key)
                if arr is not None:
                    self._data.move_to_end(key)
                    self.hits += 1
                    have[key] = arr
                elif key in self._loading:
                    pending[key] = self._loading[key]
                else:
                    self._loading[key] = threading.Event()
                    mine.append(key)
        return have, mine, pending

    def put(self, key: Any, arr: np.ndarray) -> None:
        """Store a tile the caller claimed (read-only from now on) and wake the threads waiting for it."""
        arr.setflags(write=False)
        with self._lock:
            self.misses += 1
            if 0 < arr.nbytes <= self.max_bytes and key not in self._data:
                self._data[key] = arr
                self._bytes += arr.nbytes
                while self._bytes > self.max_bytes:
                    _, old = self._data.popitem(last=False)
                    self._bytes -= old.nbytes
                    self._recycle(old)
                    del old
            event = self._loading.pop(key, None)
        if event is not None:
            event.set()

    def store(self, key: Any, tile: np.ndarray) -> None:
        """:meth:`put` a copy of ``tile`` (a view into a larger read), in a recycled buffer when one is free.

        Reusing the buffers of evicted tiles spares the page faults of fresh memory, which on some VMs cost as
        much as inflating the tile did.
        """
        spec = (tile.shape, tile.dtype.str)
        with self._lock:
            free = self._free.get(spec)
            arr = free.pop() if free else None
        if arr is None:
            arr = np.empty(tile.shape, dtype=tile.dtype)
        np.copyto(arr, tile)
        self.put(key, arr)

    def _recycle(self, old: np.ndarray) -> None:
        # Only if nobody holds it any more: the cache's reference was just dropped, so the count is ours
        # ("old" in put and the argument here) plus getrefcount's own.
        if sys.getrefcount(old) <= 3 and old.base is None:
            free = self._free.setdefault((old.shape, old.dtype.str), [])
            if len(free) < 8:
                old.setflags(write=True)
                free.append(old)

    def release(self, keys: Any) -> None:
        """Give up claimed keys not :meth:`put` (a failed read): their waiters load them themselves."""
        with self._lock:
            events = [self._loading.pop(k) for k in keys if k in self._loading]
        for event in events:
            event.set()

    def peek(self, key: Any) -> np.ndarray | None:
        with self._lock:
            return self._data.get(key)

    def get(self, key: Any, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array for ``key``, or ``load()``: called once even if several threads ask at once."""
        while True:
            have, mine, pending = self.claim([key])
            if key in have:
                return have[key]
            if mine:
                try:
                    arr = load()
                except BaseException:
                    self.release(mine)
                    raise
                self.put(key, arr)
                return arr
            pending[key].wait()
            cached = self.peek(key)
            if cached is not None:
                return cached


def _default_cache_bytes() -> int:
    raw = os.environ.get("NDVI_SCALE_TILE_CACHE_MB", "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_TILE_CACHE_MB
    except ValueError:
        mb = DEFAULT_TILE_CACHE_MB
    return max(0, int(mb * 2**20))


#: The process-wide cache of partly-needed tiles (one per dask worker process).
TILE_CACHE = TileCache(_default_cache_bytes())


class _DatasetPool:
    """Open rasterio datasets of one asset, each used by one thread at a time (GDAL datasets are not
    thread-safe): a read takes a free one, or opens another when all are busy, and gives it back.

    Threads seldom read the same asset at the same moment (neighbouring chunks visit the days from different
    starts, :mod:`ndvi_scale.fused`), so an asset is mostly opened once per process rather than once per
    thread (each open is a GDAL open and a header parse: ~6 % of a composite's time with one handle per
    thread), and reads of one asset go through the handle whose tiles GDAL's block cache holds.
    """

    def __init__(self, url: str, env: Any, first: Any) -> None:
        self._url = url
        self._env = env
        self._lock = threading.Lock()
        self._free: list[Any] = [first]  # the handle the read plan was made with
        self._generation = 0

    @contextlib.contextmanager
    def use(self) -> Iterator[Any]:
        with self._lock:
            ds = self._free.pop() if self._free else None
            generation = self._generation
        if ds is None or ds.closed:
            with self._env.open:
                ds = rasterio.open(self._url, sharing=False)
        try:
            yield ds
        finally:
            with self._lock:
                keep = generation == self._generation and not ds.closed
                if keep:
                    self._free.append(ds)
            if not keep:  # the pool was closed while this handle was in use: nobody else has it
                ds.close()

    def close(self) -> None:
        """Close the free handles; a handle in use is closed when its read gives it back."""
        with self._lock:
            free, self._free = self._free, []
            self._generation += 1
        for ds in free:
            ds.close()


@dataclass(frozen=True)
class _FastPlan:
    match: GridMatch
    nodata: int | None
    block: tuple[int, int]
    """Internal tile (rows, cols) of the asset."""
    src_dtype: np.dtype
    grid: tuple[int, int, int, int]
    """The output grid in asset pixels (row0, row1, col0, col1), clipped to the asset."""
    datasets: _DatasetPool


_FALLBACK = "fallback"


class FastReader(AutoParallelRioReader):
    """stackstac Reader with a warp-free path for aligned grids; see the module docstring.

    stackstac constructs it with the keyword arguments of the :class:`~stackstac.reader_protocol.Reader`
    protocol. It pickles like stackstac's reader; the decision is made again by the first read after
    unpickling.
    """

    #: Cache of partly-needed tiles; None reads every window straight from GDAL.
    tile_cache: TileCache | None = TILE_CACHE

    def __init__(self, *, policy: ReadPolicy | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.policy = policy if policy is not None else ReadPolicy()
        self._plan: Any = None  # None: not decided yet; _FALLBACK: stackstac's path; else a _FastPlan
        self._plan_lock = threading.Lock()

    @property
    def fast(self) -> bool | None:
        """True if reads take the aligned fast path, False if stackstac's, None before the first read."""
        plan = self._plan
        return None if plan is None else plan is not _FALLBACK

    def coverage(self) -> tuple[int, int, int, int] | None:
        """Output-grid pixels (row0, row1, col0, col1) the asset's raster covers, exactly, when reads take
        the aligned fast path (the asset is opened to decide, as the first read would); None otherwise (the
        warped path: only stackstac's approximate asset window is known)."""
        try:
            plan = self._plan if self._plan is not None else self._decide()
        except Exception:
            return None  # the read will meet the same error and apply the read policy
        return plan.match.extent if isinstance(plan, _FastPlan) else None

    # -- deciding -----------------------------------------------------------------------------------------

    def _decide(self) -> Any:
        """Open the asset once and choose the fast path or stackstac's (thread-safe, once per reader)."""
        with self._plan_lock:
            if self._plan is not None:
                return self._plan
            try:
                with self.gdal_env.open:
                    ds = rasterio.open(self.url, sharing=False)
            except Exception as e:
                if not exception_matches(e, self.errors_as_nodata):
                    raise RuntimeError(f"Error opening {self.url!r}: {e!r}") from e
                self._plan = _FALLBACK  # stackstac's reader warns and reads it as nodata
                return self._plan
            plan = self._plan_for(ds)
            if plan is _FALLBACK:
                ds.close()
            self._plan = plan
            return plan

    def _plan_for(self, ds: Any) -> Any:
        if ds.count != 1 or ds.driver not in MULTITHREADED_DRIVER_ALLOWLIST:
            return _FALLBACK  # stackstac raises for multi-band files and serialises other drivers: keep that
        src_dtype = np.dtype(ds.dtypes[0])
        out_dtype = np.dtype(self.dtype)
        # Integer assets only: GDAL tests float nodata with a tolerance and clamps float -> int conversions.
        if src_dtype.kind not in "ui" or not np.can_cast(src_dtype, out_dtype, "safe"):
            return _FALLBACK
        flags = ds.mask_flag_enums[0]
        nodata: int | None = None
        if flags == [MaskFlags.nodata]:
            if ds.nodata is None or not float(ds.nodata).is_integer():
                return _FALLBACK
            nodata = int(ds.nodata)
        elif flags != [MaskFlags.all_valid]:
            return _FALLBACK  # internal mask band or alpha: masked pixels are not a value test
        scale, offset = self.scale_offset
        if (scale != 1 or offset != 0) and out_dtype.kind not in "fc":
            return _FALLBACK  # stackstac's in-place rescale of an integer array raises: let it
        if self.resampling != Resampling.nearest:
            # Only nearest is a pure copy/repeat. Other kernels are the identity on aligned grids inside the
            # asset, but GDAL treats the asset edge and nodata neighbours its own way.
            return _FALLBACK
        if ds.crs is None:
            return _FALLBACK
        epsg = ds.crs.to_epsg()
        match = match_grid(ds.transform, (ds.height, ds.width), epsg, self.spec.transform, self.spec.epsg)
        if match is None:
            return _FALLBACK
        block = tuple(int(v) for v in ds.block_shapes[0])
        out_h, out_w = self.spec.shape
        k = match.factor
        grid = (
            max(0, -match.row_off // k),
            min(match.height, -(-(out_h - match.row_off) // k)),
            max(0, -match.col_off // k),
            min(match.width, -(-(out_w - match.col_off) // k)),
        )
        datasets = _DatasetPool(self.url, self.gdal_env, ds)
        return _FastPlan(match, nodata, (block[0], block[1]), src_dtype, grid, datasets)

    # -- reading ------------------------------------------------------------------------------------------

    def read(self, window: Window, **kwargs: Any) -> np.ndarray:
        """The asset's pixels in ``window`` of the output grid, under the reader's :class:`ReadPolicy`."""
        policy = self.policy
        # An asset given up on for another window of this run gets one attempt, not the whole backoff again:
        # a file that is gone is gone for every chunk (36 of them per 2048-px granule).
        given_up = _GIVEN_UP.get(clean_href(self.url))
        attempts = 1 if given_up is not None and time.monotonic() - given_up < GIVE_UP_MEMORY else policy.attempts
        attempt = 1
        while True:
            try:
                return self._read_once(window, **kwargs)
            except (MemoryError, TypeError, AttributeError, NameError, AssertionError):
                raise  # not a fault of the asset: a bug or the machine; retrying or skipping would hide it
            except Exception as e:
                if attempt >= attempts:
                    return self._give_up(window, e, attempt)
                log.info("read of %s failed (attempt %d of %d): %s", clean_href(self.url), attempt,
                         policy.attempts, error_text(e))
                self._reset(policy)
                time.sleep(policy.delay(attempt))
                attempt += 1

    def _give_up(self, window: Window, exc: Exception, attempts: int) -> np.ndarray:
        policy = self.policy
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
        return np.full((int(window.height), int(window.width)), self.fill_value, dtype=self.dtype)

    def _reset(self, policy: ReadPolicy) -> None:
        """Start the next attempt from scratch: new handles, no cached GDAL state, a fresh signature."""
        old = str(self.url)  # type: ignore[has-type]
        with self._plan_lock:
            if isinstance(self._plan, _FastPlan):
                self._plan.datasets.close()
            self._plan = None
        super().close()
        _clear_gdal_cache(old)
        if policy.resign is not None:
            try:
                self.url = policy.resign(old)
            except Exception as e:  # signing service down: retry with the old href, the read will tell
                log.warning("could not re-sign %s: %s", clean_href(old), error_text(e))

    def _read_once(self, window: Window, **kwargs: Any) -> np.ndarray:
        plan = self._plan if self._plan is not None else self._decide()
        if plan is _FALLBACK or kwargs:
            return super().read(window, **kwargs)
        try:
            return self._read_aligned(plan, window)
        except Exception as e:
            msg = f"Error reading {window} from {self.url!r}: {e!r}"
            if exception_matches(e, self.errors_as_nodata):
                warnings.warn(msg, stacklevel=2)
                return nodata_for_window(window, self.fill_value, self.dtype)
            raise RuntimeError(msg) from e

    def _read_aligned(self, plan: _FastPlan, window: Window) -> np.ndarray:
        m = plan.match
        k = m.factor
        r0, c0 = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        # The asset's extent in output pixels, clipped to the window.
        e_r0, e_r1, e_c0, e_c1 = m.extent
        rr0, rr1 = max(r0, e_r0), min(r0 + h, e_r1)
        cc0, cc1 = max(c0, e_c0), min(c0 + w, e_c1)
        if rr0 >= rr1 or cc0 >= cc1:
            return np.full((h, w), self.fill_value, dtype=self.dtype)
        out = np.empty((h, w), dtype=self.dtype)
        # fill only the margins the asset does not cover
        out[: rr0 - r0] = self.fill_value
        out[rr1 - r0 :] = self.fill_value
        out[rr0 - r0 : rr1 - r0, : cc0 - c0] = self.fill_value
        out[rr0 - r0 : rr1 - r0, cc1 - c0 :] = self.fill_value
        dst = out[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]
        # Asset pixels under it: output pixel j (from the asset's edge) has its centre in asset pixel j // k.
        sr0, sc0 = (rr0 - m.row_off) // k, (cc0 - m.col_off) // k
        sr1, sc1 = (rr1 - 1 - m.row_off) // k + 1, (cc1 - 1 - m.col_off) // k + 1
        if k == 1:
            self._read_into(plan, sr0, sr1, sc0, sc1, dst)
        else:
            src = np.empty((sr1 - sr0, sc1 - sc0), dtype=plan.src_dtype)
            self._read_into(plan, sr0, sr1, sc0, sc1, src)
            dr, dc = (rr0 - m.row_off) - sr0 * k, (cc0 - m.col_off) - sc0 * k
            _upsample_into(dst, src, k, dr, dc)
        scale, offset = self.scale_offset
        rescale = scale != 1 or offset != 0
        nod = (
            dst == plan.nodata
            if plan.nodata is not None and (rescale or plan.nodata != self.fill_value)
            else None
        )
        if rescale:
            if scale != 1:  # in place, in the output dtype, in stackstac's order (multiply, then add)
                dst *= scale
            if offset != 0:
                dst += offset
        if nod is not None:
            dst[nod] = self.fill_value
        return out

    def _read_into(self, plan: _FastPlan, r0: int, r1: int, c0: int, c1: int, target: np.ndarray) -> None:
        """Asset pixels [r0, r1) x [c0, c1) into ``target``; tiles the window only partly covers go through
        the tile cache (see the module docstring)."""
        with plan.datasets.use() as ds:
            self._read_tiles(plan, ds, r0, r1, c0, c1, target)

    def _read_tiles(
        self, plan: _FastPlan, ds: Any, r0: int, r1: int, c0: int, c1: int, target: np.ndarray
    ) -> None:
        cache = self.tile_cache
        if cache is None or cache.max_bytes <= 0:
            self._gdal_read(ds, r0, r1, c0, c1, target)
            return
        bh, bw = plan.block
        height, width = plan.match.height, plan.match.width
        tiles = [
            (tr, tc)
            for tr in range(r0 // bh, (r1 - 1) // bh + 1)
            for tc in range(c0 // bw, (c1 - 1) // bw + 1)
        ]

        def extent(tile: tuple[int, int]) -> tuple[int, int, int, int]:
            return tile[0] * bh, min((tile[0] + 1) * bh, height), tile[1] * bw, min((tile[1] + 1) * bw, width)

        g_r0, g_r1, g_c0, g_c1 = plan.grid

        def whole(tile: tuple[int, int]) -> bool:
            """No other window of the output grid needs this tile: do not cache it."""
            t_r0, t_r1, t_c0, t_c1 = extent(tile)
            t_r0, t_r1, t_c0, t_c1 = max(t_r0, g_r0), min(t_r1, g_r1), max(t_c0, g_c0), min(t_c1, g_c1)
            return r0 <= t_r0 and t_r1 <= r1 and c0 <= t_c0 and t_c1 <= c1

        partial = [t for t in tiles if not whole(t)]
        have, mine, pending = cache.claim([(self.url, *t) for t in partial])
        try:
            # ONE read for the whole tiles and the partial tiles nobody has: GDAL then fetches exactly their
            # byte ranges (merged into few requests) and inflates each tile once.
            todo = [t for t in tiles if whole(t)] + [k[1:] for k in mine]
            if todo:
                b_r0 = min(extent(t)[0] for t in todo)
                b_r1 = max(extent(t)[1] for t in todo)
                b_c0 = min(extent(t)[2] for t in todo)
                b_c1 = max(extent(t)[3] for t in todo)
                if not mine:  # whole tiles only: straight into the output (their part in the window)
                    b_r0, b_r1, b_c0, b_c1 = max(b_r0, r0), min(b_r1, r1), max(b_c0, c0), min(b_c1, c1)
                    self._gdal_read(
                        ds, b_r0, b_r1, b_c0, b_c1, target[b_r0 - r0 : b_r1 - r0, b_c0 - c0 : b_c1 - c0]
                    )
                else:
                    buf = _scratch((b_r1 - b_r0, b_c1 - b_c0), plan.src_dtype)
                    self._gdal_read(ds, b_r0, b_r1, b_c0, b_c1, buf)
                    _paste(target, r0, c0, buf, b_r0, b_c0)
                    for key in mine:
                        t_r0, t_r1, t_c0, t_c1 = extent(key[1:])
                        cache.store(key, buf[t_r0 - b_r0 : t_r1 - b_r0, t_c0 - b_c0 : t_c1 - b_c0])
        finally:
            cache.release(mine)  # no-op for the keys put
        for key, arr in have.items():
            t_r0, _, t_c0, _ = extent(key[1:])
            _paste(target, r0, c0, arr, t_r0, t_c0)
        for key, event in pending.items():
            event.wait()
            t_r0, t_r1, t_c0, t_c1 = extent(key[1:])
            got = cache.peek(key)
            if got is None:  # the other thread failed, or the tile was evicted already: read it here
                got = np.empty((t_r1 - t_r0, t_c1 - t_c0), dtype=plan.src_dtype)
                self._gdal_read(ds, t_r0, t_r1, t_c0, t_c1, got)
            _paste(target, r0, c0, got, t_r0, t_c0)

    def _gdal_read(self, ds: Any, r0: int, r1: int, c0: int, c1: int, out: np.ndarray) -> None:
        with self.gdal_env.read:
            ds.read(1, window=Window(c0, r0, c1 - c0, r1 - r0), out=out, boundless=False)

    def close(self) -> None:
        super().close()
        with self._plan_lock:
            if isinstance(self._plan, _FastPlan):
                self._plan.datasets.close()
            self._plan = None

    def __getstate__(self) -> Any:
        return {**super().__getstate__(), "policy": self.policy}

    def __setstate__(self, state: Any) -> None:
        self.__init__(**state)  # type: ignore[misc]


#: Clean hrefs this process gave up reading after every attempt, with when (see :meth:`FastReader.read`).
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


_scratch_local = threading.local()


def _scratch(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """A per-thread reusable buffer: a fresh 30 MB array per read costs page faults, not just memory."""
    need = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = getattr(_scratch_local, "buf", None)
    if buf is None or buf.nbytes < need:
        buf = _scratch_local.buf = np.empty(need, dtype=np.uint8)
    return buf[:need].view(dtype).reshape(shape)


def _upsample_into(dst: np.ndarray, src: np.ndarray, k: int, dr: int, dc: int) -> None:
    """``dst[i, j] = src[(i + dr) // k, (j + dc) // k]`` (nearest, e.g. 20 m SCL onto the 10 m grid).

    Two gathers (columns into a (rows of src, width) buffer, then rows straight into ``dst``) instead of
    ``np.repeat`` twice and a copy: one full-size temporary less, ~1.5x faster.
    """
    height, width = dst.shape
    cols = np.take(src, (np.arange(width) + dc) // k, axis=1, mode="clip")
    rows = (np.arange(height) + dr) // k
    if dst.dtype == cols.dtype:
        np.take(cols, rows, axis=0, out=dst, mode="clip")  # mode="clip": no buffering of ``out``
    else:
        np.copyto(dst, cols[rows], casting="safe")


def _paste(target: np.ndarray, t_r0: int, t_c0: int, src: np.ndarray, s_r0: int, s_c0: int) -> None:
    """Copy the overlap of ``src`` (top-left at asset pixel s_r0, s_c0) into ``target`` (at t_r0, t_c0)."""
    y0, x0 = max(t_r0, s_r0), max(t_c0, s_c0)
    y1 = min(t_r0 + target.shape[0], s_r0 + src.shape[0])
    x1 = min(t_c0 + target.shape[1], s_c0 + src.shape[1])
    if y0 < y1 and x0 < x1:
        np.copyto(
            target[y0 - t_r0 : y1 - t_r0, x0 - t_c0 : x1 - t_c0],
            src[y0 - s_r0 : y1 - s_r0, x0 - s_c0 : x1 - s_c0],
            casting="safe",
        )
