"""The oracle: obviously-correct, stage-by-stage implementations that the engine is tested against.

Not used by the product. The engine (:mod:`ndvi_scale.engine`, :mod:`ndvi_scale.kernel`) must give the same numbers,
bit for bit, as:

* :func:`reference_stack`: the raw (items, red/nir/scl, y, x) uint16 stack on the output grid, each asset warped
  whole onto the grid by GDAL (``WarpedVRT``, nearest), as stackstac reads it: no windows, no tile cache, no
  aligned shortcut.
* :func:`clear_mask`, :func:`ndvi`, :func:`mosaic_days`, :func:`ndvi_days`: mask, index and same-day mosaic on
  whole arrays, then :func:`ndvi_scale.composite.reduce_days` (numpy/bottleneck).
* :func:`stack_then_reduce`: all of it for a run configuration: the composites as plain arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..kernel import ndvi_into
from ..mask import _lookup
from ..ndvi import reflectance

__all__ = [
    "clear_mask",
    "disk",
    "filtered_clear_mask",
    "mask_filter",
    "mosaic_days",
    "ndvi",
    "ndvi_days",
    "reference_stack",
    "stack_then_reduce",
]

#: The classes mask filters reshape, written out here (not imported): the oracle states the contract itself.
FILTERED = (3, 8, 9, 10)


def clear_mask(scl: np.ndarray, red: np.ndarray, nir: np.ndarray, mask_classes: Sequence[int]) -> np.ndarray:
    """True where an observation is usable: SCL not in ``mask_classes`` and both bands hold data (DN != 0).

    ``scl`` may be any unsigned integer dtype (stackstac reads it into the common uint16 stack).
    """
    table = _lookup(mask_classes)
    scl_idx = np.minimum(scl, 255).astype(np.uint8, copy=False)
    return table[scl_idx] & (red != 0) & (nir != 0)


def disk(radius: float) -> np.ndarray:
    """The structuring element of a disk of ``radius`` pixels: ``dx^2 + dy^2 <= radius^2`` (skimage's ``disk`` for an
    integer radius), as a bool (2R + 1, 2R + 1) array."""
    big = int(np.floor(radius + 1e-9))
    dy, dx = np.mgrid[-big : big + 1, -big : big + 1]
    return (dx * dx + dy * dy) <= radius * radius + 1e-9


def mask_filter(mask: np.ndarray, filters: Sequence[tuple[str, float]]) -> np.ndarray:
    """``mask`` through ``filters`` (``(op, radius in pixels)``) with ``scipy.ndimage``: dilation with outside =
    False, erosion with outside = True (so a mask is never eaten from beyond the array)."""
    from scipy import ndimage

    def dil(m: np.ndarray, se: np.ndarray) -> np.ndarray:
        return np.asarray(ndimage.binary_dilation(m, structure=se, border_value=0))

    def ero(m: np.ndarray, se: np.ndarray) -> np.ndarray:
        return np.asarray(ndimage.binary_erosion(m, structure=se, border_value=1))

    out = np.asarray(mask, dtype=bool)
    for op, radius in filters:
        se = disk(radius)
        if op == "dilation":
            out = dil(out, se)
        elif op == "erosion":
            out = ero(out, se)
        elif op == "opening":
            out = dil(ero(out, se), se)
        elif op == "closing":
            out = ero(dil(out, se), se)
        else:
            raise ValueError(f"unknown mask filter {op!r}")
    return out


def filtered_clear_mask(
    scl: np.ndarray, red: np.ndarray, nir: np.ndarray, mask_classes: Sequence[int], filters: Sequence[tuple[str, float]]
) -> np.ndarray:
    """:func:`clear_mask` once the cloud/shadow part of the mask (classes 3, 8, 9, 10 among ``mask_classes``) went
    through ``filters`` (radii in pixels): the other masked classes and no-data stay masked as they are."""
    clear = clear_mask(scl, red, nir, mask_classes)
    if not filters:
        return clear
    cloud = np.isin(scl, [c for c in FILTERED if c in mask_classes])
    filtered = mask_filter(cloud, filters)
    return (clear | (cloud & (red != 0) & (nir != 0))) & ~filtered


def ndvi(
    red_dn: np.ndarray,
    nir_dn: np.ndarray,
    scale: float,
    offset: float,
    clear: np.ndarray | None = None,
    nir_scale: float | None = None,
    nir_offset: float | None = None,
) -> np.ndarray:
    """NDVI = (nir - red) / (nir + red) as float32, NaN where not ``clear`` or where both reflectances are 0."""
    red = reflectance(red_dn, scale, offset)
    nir = reflectance(nir_dn, scale if nir_scale is None else nir_scale, offset if nir_offset is None else nir_offset)
    den = nir + red
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (nir - red) / den
    bad = den <= 0
    if clear is not None:
        bad |= ~clear
    out[bad] = np.nan
    return out


def mosaic_days(ndvi: np.ndarray, day_index: Sequence[int]) -> np.ndarray:
    """Merge observations of the same day (overlapping granules of one pass): first valid value wins.

    ``ndvi`` is (n_items, y, x) with NaN for invalid; ``day_index`` gives each item's day number (0..n_days-1, items
    of a day contiguous or not). Returns (n_days, y, x). Counting a pixel seen by two granules of the same pass twice
    would bias medians and valid counts.
    """
    idx = np.asarray(day_index)
    n_days = int(idx.max()) + 1 if idx.size else 0
    if n_days == len(idx):
        order = np.argsort(idx, kind="stable")
        return ndvi[order]
    out = np.full((n_days,) + ndvi.shape[1:], np.nan, dtype=ndvi.dtype)
    for i, d in enumerate(idx):
        hole = np.isnan(out[d])
        np.copyto(out[d], ndvi[i], where=hole)
    return out


def ndvi_days(
    block: np.ndarray,
    day_index: Sequence[int],
    red_scale: Sequence[float],
    red_offset: Sequence[float],
    nir_scale: Sequence[float],
    nir_offset: Sequence[float],
    mask_classes: Sequence[int],
    n_days: int | None = None,
) -> np.ndarray:
    """(items, 3 = red/nir/scl, y, x) unsigned DNs -> (days, y, x) float32 NDVI, NaN where not observed clear.

    Item ``i`` belongs to day ``day_index[i]``; within a day the first item with a valid value wins.
    Days without any item (if ``n_days`` says there are more) are all NaN.
    """
    if block.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"block dtype {block.dtype} is not uint8/uint16 digital numbers")
    n_items, n_bands, height, width = block.shape
    if n_bands < 3:
        raise ValueError(f"block has {n_bands} bands; expected red, nir, scl")
    idx = [int(d) for d in day_index]
    if len(idx) != n_items:
        raise ValueError(f"{len(idx)} day indices for {n_items} items")
    n_days = (max(idx) + 1 if idx else 0) if n_days is None else n_days
    days = np.empty((n_days, height, width), dtype=np.float32)
    started = np.zeros(n_days, dtype=bool)
    for i, d in enumerate(idx):
        ndvi_into(days[d], block[i, 0], block[i, 1], block[i, 2], red_scale[i], red_offset[i], nir_scale[i],
                  nir_offset[i], mask_classes, first=not started[d])
        started[d] = True
    if not started.all():
        days[~started] = np.nan
    return days


def reference_stack(items: Sequence[Any], grid: Any) -> np.ndarray:
    """(items, 3, y, x) uint16 raw DNs of red, nir, scl of ``items`` on ``grid`` (an
    :class:`~ndvi_scale.engine.grid.OutputGrid`): every asset warped whole onto the grid (nearest), 0 outside the
    file and at its nodata (an alpha band decides where the file has no nodata value)."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    height, width = grid.shape
    out = np.zeros((len(items), 3, height, width), dtype=np.uint16)
    for i, it in enumerate(items):
        for b, band in enumerate(("red", "nir", "scl")):
            with rasterio.open(it.bands[band].href) as ds, WarpedVRT(
                ds, crs=grid.epsg, transform=grid.transform, width=width, height=height,
                resampling=Resampling.nearest, add_alpha=ds.nodata is None,
            ) as vrt:
                data = vrt.read(out_dtype="uint16", masked=True)
            arr = np.ma.masked_array(data[0], mask=data[1] == 0) if data.shape[0] == 2 else data[0]
            out[i, b] = np.ma.filled(arr, 0)
    return out


def stack_then_reduce(cfg: Any) -> dict[str, np.ndarray]:
    """The composites of run configuration ``cfg`` the slow, plain way: the plan's items as a
    :func:`reference_stack` per period, then mask, NDVI, same-day mosaic and the reducer on whole arrays.
    Returns ``ndvi`` (periods, y, x), ``valid_count`` (uint16) and, for max/min, ``date`` (days since 1970)."""
    from ..composite import EXTRA_OUTPUTS, reduce_days
    from ..pipeline import make_plan, plan_grid

    plan = make_plan(cfg)
    grid = plan_grid(plan)
    n_out = 2 + len(EXTRA_OUTPUTS.get(cfg.method, ()))
    layers: list[list[np.ndarray]] = [[] for _ in range(n_out)]
    for p in plan.plans:
        if p is None:
            empty = np.full(grid.shape, np.nan, dtype=np.float32)
            for k in range(n_out):
                layers[k].append(np.zeros(grid.shape, np.float32) if k == 1 else empty)
            continue
        block = reference_stack(p.items, grid)
        filters = [(op, metres / grid.resolution) for op, metres in getattr(cfg, "mask_filters", ())]
        per_item = np.stack([
            ndvi(block[i, 0], block[i, 1], p.red_scale[i], p.red_offset[i],
                 filtered_clear_mask(block[i, 2], block[i, 0], block[i, 1], cfg.mask_classes, filters),
                 p.nir_scale[i], p.nir_offset[i])
            for i in range(len(p.items))
        ])
        out = reduce_days(mosaic_days(per_item, p.day_index), cfg.method, np.asarray(p.day_numbers))
        for k in range(n_out):
            layers[k].append(out[k])
    result = {"ndvi": np.stack(layers[0]), "valid_count": np.stack(layers[1]).astype(np.uint16)}
    if n_out > 2:
        result["date"] = np.stack(layers[2])
    return result
