"""Open GDAL datasets, shared by the threads of a process, with a cap on how many files are open at once.

GDAL datasets are not thread-safe: a read takes a handle no other thread is using (a free one of that file, or a
new one when all are busy) and gives it back. Threads seldom read the same file at the same moment, so a file is
mostly opened once per process (an open is a GDAL open and a header parse: over object storage, one or two
round trips of 20-100 ms), and reads of a file go through the handle whose tiles GDAL's block cache holds.

The pool is process-wide and holds at most :data:`MAX_OPEN` handles (``NDVI_SCALE_MAX_OPEN_FILES``): beyond it the
least recently used free handles are closed. A run over 10,000 items therefore never meets the process's open
file limit, whatever the number of assets (each open handle is one file descriptor or socket).
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import rasterio

from ..http import gdal_retry_options
from .fetch import env_number

__all__ = ["GDAL_OPEN_OPTIONS", "GDAL_READ_OPTIONS", "HANDLES", "MAX_OPEN", "HandlePool", "gdal_env"]

#: GDAL's block cache, MB per process, unless the environment says otherwise. GDAL's default is 5 % of the host's
#: RAM: 1.2 GB on 24 GiB, 13 GB on a 256 GB node, where it pushes a dask worker past its memory limit. The reader
#: reads whole tiles straight into its buffers and keeps shared tiles itself (:mod:`.tiles`), so GDAL's cache only
#: serves headers, the warped path and partly-read tiles. 128 MB: peak RSS 1.4-1.5 GB instead of 2.4 GB in
#: benchmarks/. Set in the process environment, read once by GDAL: as an Env option rasterio would set and reset it
#: around every open and read, which flushes the cache (GDAL then re-fetched ranges it had just read).
GDAL_CACHEMAX_MB = 128
os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHEMAX_MB))

_ALWAYS = dict(
    # A 2048-px chunk covers 2x2 internal 1024-px tiles: merging consecutive ranges means fewer GETs.
    GDAL_HTTP_MERGE_CONSECUTIVE_RANGES="YES",
    GDAL_HTTP_MULTIRANGE="YES",
    # Transient 429/5xx and timeouts from object stores: GDAL retries with the one policy of ndvi_scale.http
    # (statuses, attempts, backoff, timeouts) before we see an error.
    **gdal_retry_options(),
    # Only the .tif is there; without this GDAL lists the "directory" looking for .aux/.msk/.ovr sidecars
    # (~22 requests per open instead of 3).
    GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR",
    CPL_VSIL_CURL_ALLOWED_EXTENSIONS=".tif,.tiff,.TIF,.jp2,.JP2",
    # One 64 kB header read covers the COG IFDs and tile offsets of an S2 band (default 16 kB needs 2-3).
    GDAL_INGESTED_BYTES_AT_OPEN="65536",
    # The engine runs many reads at once in its own threads; GDAL's decode threads would oversubscribe the cores.
    GDAL_NUM_THREADS="1",
)

#: GDAL options of an open: re-opens of the same URL in other threads hit the header cache.
GDAL_OPEN_OPTIONS: dict[str, Any] = {**_ALWAYS, "VSI_CACHE": True}

#: GDAL options of a pixel read: tiles are read once, caching them would only evict headers.
GDAL_READ_OPTIONS: dict[str, Any] = {**_ALWAYS, "VSI_CACHE": False}


def gdal_env(options: dict[str, Any]) -> rasterio.Env:
    """A rasterio Env with ``options``; the process environment's ``GDAL_*`` settings win (they were set for a
    reason: a proxy, a slower store)."""
    return rasterio.Env(**{k: v for k, v in options.items() if k not in os.environ})


#: Most handles open at once per process. 256: far under the usual 1024 file limit (sockets, Zarr writes and
#: dask's own connections need the rest), and more than the assets one period of one chunk reads at a time.
MAX_OPEN = env_number("NDVI_SCALE_MAX_OPEN_FILES", 256, 8)


class HandlePool:
    """Open handles by key (a file, or a file warped to a grid), each used by one thread at a time."""

    def __init__(self, max_open: int) -> None:
        self.max_open = int(max_open)
        self._lock = threading.Lock()
        self._free: collections.OrderedDict[Hashable, list[Any]] = collections.OrderedDict()
        self._generation: dict[Hashable, int] = {}
        self._open = 0
        self.opened = 0
        """Handles opened since the process started (a test and benchmark counter)."""

    @property
    def open_count(self) -> int:
        return self._open

    @contextlib.contextmanager
    def use(self, key: Hashable, opener: Callable[[], Any]) -> Iterator[Any]:
        """A handle of ``key`` for this thread alone (``opener()`` makes one when none is free); given back after.

        A handle is anything with ``close()``; ``opener`` may raise, then nothing is counted.
        """
        with self._lock:
            free = self._free.get(key)
            handle = free.pop() if free else None
            if free is not None and not free:
                del self._free[key]
            generation = self._generation.get(key, 0)
        if handle is None:
            handle = opener()
            with self._lock:
                self._open += 1
                self.opened += 1
            self._evict()
        try:
            yield handle
        finally:
            with self._lock:
                keep = generation == self._generation.get(key, 0)
                if keep:
                    self._free.setdefault(key, []).append(handle)
                    self._free.move_to_end(key)
                else:
                    self._open -= 1
            if not keep:  # the key was reset while this handle was in use
                _close(handle)
            self._evict()

    def reset(self, key: Hashable) -> None:
        """Close the free handles of ``key``; handles of it in use are closed when given back."""
        with self._lock:
            free = self._free.pop(key, [])
            self._generation[key] = self._generation.get(key, 0) + 1
            self._open -= len(free)
        for h in free:
            _close(h)

    def clear(self) -> None:
        """Close every free handle (handles in use close when given back)."""
        for key in list(self._free):
            self.reset(key)

    def _evict(self) -> None:
        victims = []
        with self._lock:
            while self._open > self.max_open and self._free:
                key, handles = next(iter(self._free.items()))
                victims.append(handles.pop(0))
                self._open -= 1
                if not handles:
                    del self._free[key]
        for h in victims:
            _close(h)


def _close(handle: Any) -> None:
    try:
        handle.close()
    except Exception:  # closing a broken handle must not hide the error being handled
        pass


#: The process's pool (one per dask worker process).
HANDLES = HandlePool(MAX_OPEN)
