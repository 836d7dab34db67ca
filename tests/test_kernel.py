"""The kernel's compiled reducers against the numpy/bottleneck reference."""

from __future__ import annotations

import numpy as np
import pytest

from ndvi_scale.kernel import sorting_pairs


@pytest.mark.parametrize("method", ["median", "mean", "max", "min", "q25"])
def test_fast_reducers_are_bit_identical(method):
    from ndvi_scale import kernel
    from ndvi_scale.composite import reduce_days

    rng = np.random.default_rng(7)
    # 65 days: beyond kernel.MAX_NETWORK_DAYS, the median goes to bottleneck
    for n_days in (1, 2, 3, 6, 13, 31, 64, 65):
        days = (rng.random((n_days, 40, 50), dtype=np.float32) * 2 - 1).astype(np.float32)
        days[rng.random(days.shape) < 0.35] = np.nan
        days[:, 0, 0] = np.nan  # never observed
        days[:, 2, :] = np.round(days[:, 2, :], 1)  # many equal values in a row of pixels
        if n_days > 2:
            days[1, 1, 1] = days[2, 1, 1] = 0.5  # a tie: the first day wins, as argmax
            days[0, 1, 1] = np.nan
        numbers = np.arange(19800, 19800 + n_days)
        ref = reduce_days(days, method, numbers)
        got = kernel.reduce_days(days, method, numbers)
        assert len(got) == len(ref)
        for a, b in zip(ref, got, strict=True):
            assert b.dtype == np.float32
            assert np.array_equal(np.asarray(a, dtype=np.float32), b, equal_nan=True)
        out = np.full((len(ref), 40, 50), 7.0, dtype=np.float32)  # written in place, every pixel
        kernel.reduce_days(days, method, numbers, out=out)
        for a, b in zip(ref, out, strict=True):
            assert np.array_equal(np.asarray(a, dtype=np.float32), b, equal_nan=True)


def test_sorting_network_sorts_anything():
    """Knuth's 0-1 principle: a comparator network sorts every input iff it sorts every 0/1 input."""

    for n in range(1, 13):
        pairs = sorting_pairs(n)
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # every 0/1 input, one per row
        for i, j in pairs:
            lo, hi = np.minimum(bits[:, i], bits[:, j]), np.maximum(bits[:, i], bits[:, j])
            bits[:, i], bits[:, j] = lo, hi
        assert (np.diff(bits, axis=1) >= 0).all(), n
    rng = np.random.default_rng(3)
    for n in (13, 31, 32, 33, 64):
        vals = rng.random((200, n))
        for i, j in sorting_pairs(n):
            lo, hi = np.minimum(vals[:, i], vals[:, j]), np.maximum(vals[:, i], vals[:, j])
            vals[:, i], vals[:, j] = lo, hi
        assert (np.diff(vals, axis=1) >= 0).all(), n


