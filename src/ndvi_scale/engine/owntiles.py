"""The engine's own COG reads: a window's tiles fetched in the I/O pool, decoded where the CPU is.

GDAL inflates a tile in the thread that fetched it. To hide object-storage latency the engine keeps tens of reads
in flight, so through GDAL tens of inflates ran at once on two cores (2.4x the CPU of two decoding threads,
measured in benchmarks/). Here a read has two halves:

* :func:`collect` (an I/O-pool thread): the tiles of the window, from the COG layout of :mod:`.cog`; their bytes
  fetched with one call (:func:`.ranges.fetch`: merged ranges, one round trip). Tiles another window of the output
  grid also needs (edge tiles) are decoded right away and put in the tile cache for that window; a tile another
  thread is loading is waited for. The rest stays compressed.
* :meth:`TileBatch.place` (called by the task when it folds the item): decodes the remaining tiles into the
  window. Until then a read in flight holds compressed bytes only, so the same memory keeps more reads in flight.

Every decode runs in :data:`DECODE_POOL`, one thread per core.

Waiting only ever happens in the first half, on work of the first half of other reads (which waits on nothing
else), so two tasks sharing tiles cannot wait on each other's second halves.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

from . import ranges
from .cog import CogLayout, decode_tile
from .fetch import LazyPool
from .tiles import TILE_CACHE, ScratchPool, TileCache, needed_elsewhere, paste, scratch, tile_extent, window_tiles

__all__ = [
    "DECODE_THREADS", "OWN_TILES", "TILE_BUFFERS", "Header", "NotCog", "TileBatch", "TiledRead", "collect", "gather",
]

#: Whether COGs over http(s) and on local disk are read by the engine itself instead of GDAL
#: (``NDVI_SCALE_OWN_TILES=0``: always GDAL, e.g. to compare the two).
OWN_TILES = os.environ.get("NDVI_SCALE_OWN_TILES", "1").strip().lower() not in ("0", "false", "no")

#: Tiles decoded at once per process (``NDVI_SCALE_DECODE_THREADS``; default one per core): every decode runs in
#: :data:`DECODE_POOL`, whether a task's thread finishes a read or an I/O thread decodes an edge tile for the cache.
#: The I/O pool has tens of threads waiting on sockets; only this many threads decode. A pool rather than the
#: task's own thread: a period of one chunk is one task, which alone would decode on one core.
DECODE_THREADS = max(1, int(os.environ.get("NDVI_SCALE_DECODE_THREADS", "0") or 0) or (os.cpu_count() or 2))

#: The decoding threads. They wait on nothing of the engine's, so threads waiting for them cannot deadlock.
DECODE_POOL = LazyPool(DECODE_THREADS, "ndvi-scale-decode")


class NotCog(Exception):
    """The header is too large for a COG's: read the file through GDAL."""


class Header:
    """A file's first bytes, fetched once and extended when the parser asks past them (rare for a COG, whose IFDs
    and tile offsets come first). ``read`` is what :func:`.cog.parse_cog` takes."""

    #: First fetch: the IFDs and tile offsets of a Sentinel-2 COG band fit in it (as GDAL_INGESTED_BYTES_AT_OPEN).
    FIRST = 65536
    #: Headers larger than this are not a COG's: let GDAL read the file.
    LIMIT = 16 * 2**20

    def __init__(self, url: str) -> None:
        self.url = url
        self.data = b""
        self.eof = False

    def read(self, offset: int, length: int) -> bytes:
        end = offset + length
        if end > len(self.data) and not self.eof:
            if end > self.LIMIT:
                raise NotCog()
            want = max(self.FIRST, 2 * end) - len(self.data)
            more = ranges.fetch(self.url, [(len(self.data), want)])[0]
            self.eof = len(more) < want
            self.data += bytes(more)
        return self.data[offset:end]


Tile = tuple[int, int]
T = TypeVar("T")


class TileBatch:
    """The tiles of asset pixels [r0, r1) x [c0, c1): decoded ones (cached, or decoded for the cache) and the
    compressed bytes of the others."""

    def __init__(self, layout: CogLayout, nodata: int | None, r0: int, c0: int) -> None:
        self.layout, self.nodata, self.r0, self.c0 = layout, nodata, r0, c0
        self.ready: dict[Tile, np.ndarray] = {}
        self.raw: dict[Tile, bytes | memoryview | None] = {}
        """Tile -> its bytes (None: a sparse tile, all nodata)."""

    def extent(self, tile: Tile) -> tuple[int, int, int, int]:
        """Asset pixels (row0, row1, col0, col1) of ``tile``."""
        lay = self.layout
        return tile_extent(tile, (lay.tile_height, lay.tile_width), (lay.height, lay.width))

    def place(self, target: np.ndarray) -> None:
        """Decode the compressed tiles (in :data:`DECODE_POOL`, so a task alone on a worker still uses every core)
        and copy every tile's part into ``target`` (asset pixels [r0, r1) x [c0, c1)). Raises on bytes that do
        not decode (a corrupt or truncated file)."""
        for t, arr in self.ready.items():
            paste(target, self.r0, self.c0, arr, self.extent(t)[0], self.extent(t)[2])
        futures = [DECODE_POOL.submit(self._place_one, t, data, target) for t, data in self.raw.items()]
        try:
            for f in futures:
                f.result()
        finally:
            for f in futures:
                f.cancel()

    def _place_one(self, tile: Tile, data: bytes | memoryview | None, target: np.ndarray) -> None:
        with scratch((self.layout.tile_height, self.layout.tile_width), np.dtype(self.layout.dtype)) as buf:
            self._decode(tile, data, buf)
            t_r0, t_r1, t_c0, t_c1 = self.extent(tile)
            paste(target, self.r0, self.c0, buf[: t_r1 - t_r0, : t_c1 - t_c0], t_r0, t_c0)

    def _decode(self, tile: Tile, data: bytes | memoryview | None, buf: np.ndarray) -> None:
        if data is None:  # a sparse tile: GDAL reads it as nodata
            buf.fill(self.nodata if self.nodata is not None else 0)
        else:
            decode_tile(self.layout, data, out=buf)


#: Tile-sized buffers the tiles of a :class:`TiledRead` are decoded into, kept for the next ones: a task folds an
#: item's red and nir from up to 2 x 9 tiles at once (a 2048-px chunk on 1024-px tiles), two tasks run per
#: process; what is not kept is freed.
TILE_BUFFERS = ScratchPool(12 * max(2, os.cpu_count() or 2))


class TiledRead:
    """A fetched own-tile read whose pixels are the asset's own (factor 1, nodata = the fill value): its window
    on demand (call it: decoded and pasted, as any read), or its tiles where they lie.

    :meth:`rects` are the parts of the window the read covers, one per tile; :meth:`submit` starts getting their
    pixels (cached tiles as they are, read-only; the others decoded into :data:`TILE_BUFFERS`, in
    :data:`DECODE_POOL`; :func:`gather` collects them), and :meth:`release` gives those buffers back. The fold
    reads the tiles there: no window is filled, no tile copied into it (:mod:`.task`).
    """

    def __init__(self, window: Callable[[], np.ndarray], batch: TileBatch, inner: tuple[int, int, int, int]) -> None:
        self._window = window
        self.batch = batch
        self.inner = inner
        """Rows and columns of the window the asset covers (row0, row1, col0, col1)."""
        self._lent: list[np.ndarray] = []

    def __call__(self) -> np.ndarray:
        return self._window()

    def _tiles(self) -> list[tuple[Tile, tuple[int, int, int, int]]]:
        """Every tile and its part of the window (row0, row1, col0, col1), in tile order."""
        b = self.batch
        i_r0, i_r1, i_c0, i_c1 = self.inner
        a_r1, a_c1 = b.r0 + (i_r1 - i_r0), b.c0 + (i_c1 - i_c0)
        out = []
        for t in sorted({*b.ready, *b.raw}):
            t_r0, t_r1, t_c0, t_c1 = b.extent(t)
            r0, r1, c0, c1 = max(t_r0, b.r0), min(t_r1, a_r1), max(t_c0, b.c0), min(t_c1, a_c1)
            if r0 < r1 and c0 < c1:
                out.append((t, (i_r0 + r0 - b.r0, i_r0 + r1 - b.r0, i_c0 + c0 - b.c0, i_c0 + c1 - b.c0)))
        return out

    def rects(self) -> list[tuple[int, int, int, int]]:
        """The parts of the window (row0, row1, col0, col1) the tiles cover; together, :attr:`inner`."""
        return [rect for _, rect in self._tiles()]

    def submit(self) -> list[Future[np.ndarray]]:
        """The pixels of each of :meth:`rects`, one future each (:func:`gather`), decoded in :data:`DECODE_POOL`.
        Their results raise on bytes that do not decode (then :meth:`release`)."""
        b = self.batch
        tiles = self._tiles()
        shape = (b.layout.tile_height, b.layout.tile_width)
        dtype = np.dtype(b.layout.dtype)

        def one(t: Tile, rect: tuple[int, int, int, int]) -> np.ndarray:
            t_r0, _, t_c0, _ = b.extent(t)
            a_r0, a_c0 = b.r0 + rect[0] - self.inner[0], b.c0 + rect[2] - self.inner[2]
            rows = slice(a_r0 - t_r0, a_r0 - t_r0 + rect[1] - rect[0])
            cols = slice(a_c0 - t_c0, a_c0 - t_c0 + rect[3] - rect[2])
            cached = b.ready.get(t)
            if cached is not None:
                return cached[rows, cols]
            buf = TILE_BUFFERS.get(shape, dtype)
            self._lent.append(buf)
            b._decode(t, b.raw[t], buf)
            return buf[rows, cols]

        return [DECODE_POOL.submit(one, t, rect) for t, rect in tiles]

    def release(self) -> None:
        """Give the decode buffers back (once the tiles are folded)."""
        lent, self._lent = self._lent, []
        for buf in lent:
            TILE_BUFFERS.give(buf)


def gather(futures: list[Future[T]]) -> list[T]:
    """The results of ``futures`` in order; on the first failure the others not started are cancelled and it
    raises."""
    try:
        return [f.result() for f in futures]
    finally:
        for f in futures:
            f.cancel()


def collect(url: str, layout: CogLayout, nodata: int | None, grid: tuple[int, int, int, int],
            r0: int, r1: int, c0: int, c1: int,
            others: Callable[[tuple[int, int, int, int]], int] | None = None) -> TileBatch:
    """The :class:`TileBatch` of asset pixels [r0, r1) x [c0, c1) of ``url``; ``grid`` = the output grid in asset
    pixels (row0, row1, col0, col1): a tile partly in the window and partly in the rest of the grid is needed by
    another window too, and goes through the tile cache. ``others(extent)``: how many other reads of this run
    need the tile of that extent (asset pixels), when known: the cache drops it once they have all taken it, and
    a tile no other read needs is not cached. Raises ``OSError``/``ValueError`` (fetch or decode)."""
    batch = TileBatch(layout, nodata, r0, c0)
    tiles = window_tiles(r0, r1, c0, c1, (layout.tile_height, layout.tile_width))
    cache: TileCache = TILE_CACHE
    uses: dict[Tile, int | None] = {}
    if cache.max_bytes > 0:
        for t in tiles:
            extent = batch.extent(t)
            if needed_elsewhere(extent, grid, r0, r1, c0, c1):
                n = others(extent) if others is not None else None
                if n is None or n > 0:
                    uses[t] = n
    shared = list(uses)
    have, mine, pending = cache.claim([(url, *t) for t in shared]) if shared else ({}, [], {})
    try:
        own = [key[1:] for key in mine]
        _fetch(url, batch, [t for t in tiles if t not in uses] + own)
        if own:
            _decode_for_cache(batch, {t: (key, uses[t]) for t, key in zip(own, mine, strict=True)})
    finally:
        cache.release(mine)  # no-op for the keys put
    batch.ready.update((key[1:], arr) for key, arr in have.items())
    for key, event in pending.items():
        event.wait()
        got = cache.take(key)
        if got is not None:
            batch.ready[key[1:]] = got
        else:  # the other thread failed, or the tile was evicted already: fetch it here
            _fetch(url, batch, [key[1:]])
    return batch


def _fetch(url: str, batch: TileBatch, tiles: list[Tile]) -> None:
    stored = [t for t in tiles if batch.layout.tile_range(*t)[1] > 0]
    blobs = ranges.fetch(url, [batch.layout.tile_range(*t) for t in stored])
    batch.raw.update(dict.fromkeys(tiles))
    batch.raw.update(zip(stored, blobs, strict=True))


def _decode_for_cache(batch: TileBatch, keys: dict[Tile, tuple[Any, int | None]]) -> None:
    """Decode the claimed tiles now (the other windows that need them wait for them) and cache them: tile ->
    (cache key, uses by other reads or None)."""

    def one(t: Tile, key: Any, uses: int | None, data: bytes | memoryview | None) -> None:
        layout = batch.layout
        t_r0, t_r1, t_c0, t_c1 = batch.extent(t)
        shape = (layout.tile_height, layout.tile_width)
        dtype = np.dtype(layout.dtype)
        if shape == (t_r1 - t_r0, t_c1 - t_c0):
            tile = TILE_CACHE.buffer(shape, dtype)
            batch._decode(t, data, tile)
        else:  # a tile cut by the file's edge: decoded whole in a scratch buffer, its part kept
            with scratch(shape, dtype) as buf:
                batch._decode(t, data, buf)
                tile = TILE_CACHE.buffer((t_r1 - t_r0, t_c1 - t_c0), dtype)
                np.copyto(tile, buf[: t_r1 - t_r0, : t_c1 - t_c0])
        TILE_CACHE.put(key, tile, uses)
        batch.ready[t] = tile

    futures = [DECODE_POOL.submit(one, t, key, uses, batch.raw.pop(t)) for t, (key, uses) in keys.items()]
    for f in futures:
        f.result()
