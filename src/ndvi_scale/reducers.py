"""Temporal reducers as method objects: a period's (days, y, x) float32 NDVI into its value, count[, date] layers.

One class per reducer (the rio-tiler ``MosaicMethodBase`` pattern): :meth:`Reducer.reference` is the plain
numpy/bottleneck implementation (what runs without numba, and what :func:`ndvi_scale.composite.reduce_days` and the
test oracle compute), :meth:`Reducer.reduce_into` the fused pass's, which writes straight into the task's output
block and uses a compiled pass of :mod:`ndvi_scale.kernel` where there is one, bit for bit the reference
(tests/test_kernel.py). :func:`reducer` maps a method name (median, mean, max, min, qNN) to its object.
"""

from __future__ import annotations

import functools
import re

import bottleneck as bn
import numpy as np

from .errors import InputError, shown

__all__ = ["Extreme", "Mean", "Median", "Quantile", "Reducer", "reducer"]


class Reducer:
    """Reduces (n_days, y, x) float32 NDVI (NaN = invalid) over the days."""

    method: str = ""
    """The method's name, as in ``--method``."""
    extra_outputs: tuple[str, ...] = ()
    """Layers after value and valid_count (the date of the extreme for max/min)."""

    @property
    def n_out(self) -> int:
        """Layers this reducer writes: value, count, then :attr:`extra_outputs`."""
        return 2 + len(self.extra_outputs)

    def reference(self, days: np.ndarray, count: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(value, *extra)`` of days with at least one valid observation (``count`` > 0) by numpy/bottleneck."""
        raise NotImplementedError

    def fast(self, days: np.ndarray, numbers: np.ndarray, out: np.ndarray) -> bool:
        """Write every layer into ``out`` by a compiled pass and return True, or return False (none applies)."""
        return False

    def reduce(self, days: np.ndarray, day_numbers: np.ndarray | None = None) -> list[np.ndarray]:
        """``[value, count, *extra]`` by :meth:`reference`: value float32, NaN where count is 0; count float32;
        dates (day numbers from ``day_numbers``, default 0..n-1) float32, NaN where count is 0."""
        shape = days.shape[1:]
        if days.shape[0] == 0:
            nan = np.full(shape, np.nan, dtype=np.float32)
            return [nan, np.zeros(shape, dtype=np.float32), *(nan.copy() for _ in self.extra_outputs)]
        count = (~np.isnan(days)).sum(axis=0, dtype=np.uint16)
        numbers = np.arange(days.shape[0]) if day_numbers is None else np.asarray(day_numbers)
        value, *extra = self.reference(days, count, numbers)
        value = np.asarray(value, dtype=np.float32)
        value[count == 0] = np.nan
        return [value, count.astype(np.float32), *extra]

    def reduce_into(self, days: np.ndarray, day_numbers: np.ndarray | None, out: np.ndarray) -> None:
        """Every layer into ``out`` ((n_out, y, x) float32), by a compiled pass where :meth:`fast` has one, else
        by :meth:`reduce`; the same bytes either way."""
        from .kernel import _use_numba

        if out.shape != (self.n_out, *days.shape[1:]) or out.dtype != np.float32:
            raise ValueError(f"out is {out.dtype} {out.shape}; expected float32 {(self.n_out, *days.shape[1:])}")
        n_days = days.shape[0]
        numbers = np.arange(n_days, dtype=np.float64) if day_numbers is None else np.asarray(day_numbers, np.float64)
        compiled = _use_numba() and days.ndim == 3 and n_days > 0 and days.dtype == np.float32
        if compiled and self.fast(np.ascontiguousarray(days), numbers, out):
            return
        for k, layer in enumerate(self.reduce(days, day_numbers)):
            out[k] = layer


class Median(Reducer):
    """The median: the middle value, or the float64 mean of the two middle ones cast to float32 (bottleneck).
    Compiled: a sorting network, written out per day count up to :data:`ndvi_scale.kernel.MAX_UNROLLED_DAYS`
    days, run across a row of pixels up to :data:`ndvi_scale.kernel.MAX_NETWORK_DAYS` days."""

    method = "median"

    def reference(self, days: np.ndarray, count: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, ...]:
        return (bn.nanmedian(days, axis=0),)

    def fast(self, days: np.ndarray, numbers: np.ndarray, out: np.ndarray) -> bool:
        from .kernel import _NUMBA_MEDIAN, MAX_NETWORK_DAYS, sorting_pairs, unrolled_median

        if days.shape[0] > MAX_NETWORK_DAYS or _NUMBA_MEDIAN is None:
            return False
        unrolled = unrolled_median(days.shape[0])
        if unrolled is not None:  # up to MAX_UNROLLED_DAYS: the network written out, vectorised across pixels
            unrolled(days, out[0], out[1])
        else:
            _NUMBA_MEDIAN(days, sorting_pairs(days.shape[0]), out[0], out[1])
        return True


class _Streamed(Reducer):
    """Reducers of the compiled streaming pass (one day-major pass: sum or running extreme, count, date)."""

    code = 0
    """The pass's code for this reducer (:func:`ndvi_scale.kernel._stream_loop`)."""

    def fast(self, days: np.ndarray, numbers: np.ndarray, out: np.ndarray) -> bool:
        from .kernel import _NUMBA_STREAM

        if _NUMBA_STREAM is None:
            return False
        date = out[2] if self.n_out > 2 else out[1]  # mean writes no date (the loop does not touch it)
        _NUMBA_STREAM(days, self.code, numbers, out[0], out[1], date)
        return True


class Mean(_Streamed):
    """The mean: a float32 sum in day order divided by the count (bottleneck's ``nanmean``)."""

    method = "mean"
    code = 1

    def reference(self, days: np.ndarray, count: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, ...]:
        return (bn.nanmean(days, axis=0),)


class Extreme(_Streamed):
    """The maximum or minimum, with the day number of the first day holding it (numpy's argmax/argmin)."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.code = 2 if method == "max" else 3
        self.extra_outputs = (f"{method}_date",)

    def reference(self, days: np.ndarray, count: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, ...]:
        valid = ~np.isnan(days)
        filled = np.where(valid, days, np.float32(-np.inf if self.method == "max" else np.inf))
        arg = filled.argmax(axis=0) if self.method == "max" else filled.argmin(axis=0)
        value = np.take_along_axis(days, arg[None], axis=0)[0]
        date = numbers[arg].astype(np.float32)
        date[count == 0] = np.nan
        return value, date


class Quantile(Reducer):
    """A percentile ``qNN``: ``np.nanquantile`` (linear), bit for bit, by :func:`ndvi_scale.composite.nanquantile`."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.q = int(method[1:]) / 100.0

    def reference(self, days: np.ndarray, count: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, ...]:
        from .composite import nanquantile

        return (nanquantile(days, self.q, count),)


@functools.cache
def reducer(method: str) -> Reducer:
    """The :class:`Reducer` of ``method`` (median, mean, max, min or qNN). Raises :class:`InputError` otherwise."""
    if method == "median":
        return Median()
    if method == "mean":
        return Mean()
    if method in ("max", "min"):
        return Extreme(method)
    if re.fullmatch(r"q\d+", method):
        return Quantile(method)
    raise InputError(f"method {shown(method)} is unknown; expected median, mean, max, min or a percentile like q25")
