"""The quality oracle: how far composites of the synthetic sample are from its truth, and what their mask cost.

Not used by the product. For composites of a :class:`~ndvi_scale.sample.SampleSpec` (cubes on a north-up grid in
the spec's CRS), :func:`composite_quality` gives, per run:

* ``contaminated``: share of the composite pixels with a value that are off by more than
  :data:`~ndvi_scale.sample.CONTAMINATION_TOLERANCE` from the same reducer applied to the **true surface NDVI of
  the very observations the run kept** (so a filter that drops observations is not blamed for the phenology of the
  dates it dropped: only what the kept observations carried counts);
* ``lost``: share of the clean observations (a granule has data, :meth:`~ndvi_scale.sample.Truth.contaminated` is
  False) that the mask dropped;
* ``empty``: share of the composite pixels with no observation at all;
* ``dirty_kept``: share of the kept observations that are contaminated (the SCL errors let through);
* ``count_mismatch``: pixels whose ``valid_count`` differs from the observations the oracle says the run keeps
  (0 unless the engine and this oracle disagree on the mask: the figures are only meaningful at 0).

Which observations a run keeps is decided per granule from the truth's SCL through the scipy reference of the
filters (:func:`ndvi_scale.testing.reference.filtered_clear_mask`), then mosaicked (the first clear granule wins).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..sample import CONTAMINATION_TOLERANCE, SampleSpec, Truth
from .reference import filtered_clear_mask

__all__ = ["QualityRun", "composite_quality", "reduce_reference"]


@dataclass(frozen=True)
class QualityRun:
    """One cube to judge: its Dataset (``ndvi``, ``valid_count``, ``time``, ``time_end``, ``x``, ``y``), its
    composite method and its mask filters (``(op, metres)``, as in the run's configuration)."""

    ds: Any
    method: str
    mask_filters: tuple[tuple[str, float], ...]


def reduce_reference(stack: np.ndarray, method: str) -> np.ndarray:
    """``method`` (median, mean, max, min, qNN) over axis 0 of ``stack``, ignoring NaN (all-NaN: NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if method == "median":
            return np.nanmedian(stack, axis=0)
        if method == "mean":
            return np.nanmean(stack, axis=0)
        if method == "max":
            return np.nanmax(stack, axis=0)
        if method == "min":
            return np.nanmin(stack, axis=0)
        return np.nanpercentile(stack, float(method[1:]), axis=0)


def composite_quality(
    spec: SampleSpec,
    runs: Mapping[str, QualityRun],
    mask_classes: Sequence[int],
    tolerance: float = CONTAMINATION_TOLERANCE,
) -> dict[str, dict[str, float]]:
    """The figures of the module docstring for each run (all on the same grid and periods). The truth of each date
    is computed once for every run; memory is a period's dates x the grid."""
    first = next(iter(runs.values())).ds
    xs, ys = first.x.values, first.y.values
    resolution = float(abs(xs[1] - xs[0]))
    x, y = np.meshgrid(xs, ys)
    classes = tuple(int(c) for c in mask_classes)
    filter_sets = sorted({r.mask_filters for r in runs.values()})
    acc = {name: dict.fromkeys(("off", "seen", "empty", "pixels", "lost", "clean", "dirty_kept", "kept",
                                "count_mismatch"), 0) for name in runs}
    dates = [d.date() for d in spec.dates()]
    truth = Truth.at(spec, x, y)  # the land surface once for every date
    for t, (t0, t1) in enumerate(zip(first.time.values, first.time_end.values, strict=True)):
        lo, hi = np.datetime64(t0, "D"), np.datetime64(t1, "D")
        period = [d for d in dates if lo <= np.datetime64(d, "D") <= hi]
        n = len(period)
        surface = np.empty((n, *x.shape), dtype=np.float32)
        clean = np.empty((n, *x.shape), dtype=bool)
        dirty = np.empty((n, *x.shape), dtype=bool)
        kept = {f: np.zeros((n, *x.shape), dtype=bool) for f in filter_sets}
        for k, d in enumerate(period):
            surface[k] = truth.ndvi(d)
            dirty[k] = truth.contaminated(d)
            clean[k] = (truth.scl(d) != 0) & ~dirty[k]
            for g in spec.granules():
                scl = truth.scl(d, g)
                data = (scl != 0).astype(np.uint8)
                for f in filter_sets:
                    px = [(op, metres / resolution) for op, metres in f]
                    kept[f][k] |= filtered_clear_mask(scl, data, data, classes, px)
        for name, run in runs.items():
            a = acc[name]
            keep = kept[run.mask_filters]
            got = np.asarray(run.ds.ndvi[t].values, dtype=np.float64)
            count = np.asarray(run.ds.valid_count[t].values, dtype=np.int64)
            a["count_mismatch"] += int(np.count_nonzero(count != keep.sum(axis=0)))
            a["pixels"] += count.size
            a["empty"] += int(np.count_nonzero(count == 0))
            a["lost"] += int(np.count_nonzero(clean & ~keep))
            a["clean"] += int(np.count_nonzero(clean))
            a["dirty_kept"] += int(np.count_nonzero(dirty & keep))
            a["kept"] += int(np.count_nonzero(keep))
            if n == 0:
                continue
            ref = reduce_reference(np.where(keep, surface, np.nan), run.method)
            seen = count > 0
            a["seen"] += int(np.count_nonzero(seen))
            with np.errstate(invalid="ignore"):
                a["off"] += int(np.count_nonzero(np.abs(got - ref)[seen] > tolerance))
    return {
        name: {
            "contaminated": a["off"] / max(a["seen"], 1),
            "lost": a["lost"] / max(a["clean"], 1),
            "empty": a["empty"] / max(a["pixels"], 1),
            "dirty_kept": a["dirty_kept"] / max(a["kept"], 1),
            "count_mismatch": float(a["count_mismatch"]),
        }
        for name, a in acc.items()
    }
