"""Which regions of a written cube hold computed data: a picture must not show an interrupted write as "no clear
observation".

A cube whose write state (``ndvi_scale_write``) is not ``complete`` was interrupted: of the periods that write was
computing, only the regions (one period x one spatial chunk) with a progress marker (``.ndvi-scale/done/...``, see
:mod:`ndvi_scale.write`) hold data; the others read as the fill value (NaN), exactly like pixels without any clear
observation. :func:`completeness` tells them apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from .cf import get_attr
from .write import MARKER_DIR, _labels, _marker_name

__all__ = ["Completeness", "completeness"]


@dataclass(frozen=True)
class Completeness:
    """Computed regions of a cube (one boolean per period and spatial chunk)."""

    computed: np.ndarray
    """bool (time, y blocks, x blocks): True where the region holds computed data."""
    chunk_y: int
    """Chunk height in pixels (the region grid)."""
    chunk_x: int
    """Chunk width in pixels."""
    state: str
    """The cube's write state: ``complete``, ``template`` or ``regions``."""

    @property
    def complete(self) -> bool:
        return bool(self.computed.all())

    def periods_missing(self) -> list[int]:
        """Indices of periods with at least one region not computed."""
        return [int(i) for i in np.flatnonzero(~self.computed.all(axis=(1, 2)))]

    def pixel_mask(self, index: int, ny: int, nx: int) -> np.ndarray:
        """bool (ny, nx) of period ``index``: True where the pixel was computed."""
        block = self.computed[index]
        rows = np.minimum(np.arange(ny) // self.chunk_y, block.shape[0] - 1)
        cols = np.minimum(np.arange(nx) // self.chunk_x, block.shape[1] - 1)
        return block[np.ix_(rows, cols)]

    def banner(self) -> str:
        """One line for a picture of an incomplete cube (empty for a complete one)."""
        missing = self.periods_missing()
        if not missing:
            return ""
        share = 1.0 - float(self.computed[missing].mean())
        return (f"INCOMPLETE CUBE (interrupted write): {len(missing)} of {self.computed.shape[0]} period(s) not fully "
                f"computed ({share:.0%} of their area missing, drawn hatched); re-run the same command to finish it")


def _chunks(ds: xr.Dataset) -> tuple[int, int]:
    enc = ds["ndvi"].encoding
    chunks = enc.get("chunks") or enc.get("preferred_chunks")
    if isinstance(chunks, dict):
        return int(chunks.get("y", ds.sizes["y"])), int(chunks.get("x", ds.sizes["x"]))
    if isinstance(chunks, tuple | list) and len(chunks) == 3:
        return int(chunks[1]), int(chunks[2])
    if ds["ndvi"].chunks:
        return int(ds["ndvi"].chunks[1][0]), int(ds["ndvi"].chunks[2][0])
    return ds.sizes["y"], ds.sizes["x"]


def completeness(ds: xr.Dataset, location: Any = None) -> Completeness:
    """The computed regions of cube ``ds`` (opened from ``location``, a :class:`~ndvi_scale.storage.Location`,
    default: its ``ndvi_scale_url`` attribute, as set by :func:`ndvi_scale.viz.open_cube`). A Dataset without a
    write state (a lazy composite, not written) is complete. Raises :class:`~ndvi_scale.errors.StorageError`
    when the markers cannot be listed."""
    nt = ds.sizes.get("time", 1)
    cy, cx = _chunks(ds)
    by, bx = -(-ds.sizes["y"] // max(cy, 1)), -(-ds.sizes["x"] // max(cx, 1))
    computed = np.ones((nt, by, bx), dtype=bool)
    raw = get_attr(ds.attrs, "write")
    try:
        state = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        state = None
    if not isinstance(state, dict) or state.get("state") in (None, "complete"):
        return Completeness(computed, cy, cx, "complete")
    if location is None:
        url = ds.attrs.get("ndvi_scale_url")
        if not url:
            return Completeness(computed, cy, cx, str(state.get("state")))
        from .storage import open_location

        location = open_location(str(url))
    from .storage import storage_error

    root = location.join(MARKER_DIR)
    try:
        found = location.fs.find(root)
    except FileNotFoundError:
        found = []
    except Exception as exc:
        raise storage_error(exc, location, "listing the progress markers of") from None
    prefix = root.rstrip("/") + "/"
    done = {p[len(prefix):] for p in found if p.startswith(prefix)}
    pending = set(map(str, state.get("periods") or []))
    for t, label in enumerate(_labels(ds["time"].values) if "time" in ds.coords else []):
        if label not in pending:
            continue
        for j in range(by):
            for k in range(bx):
                computed[t, j, k] = f"{_marker_name(label)}/{j}-{k}" in done
    return Completeness(computed, cy, cx, str(state.get("state")))
