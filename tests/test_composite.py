"""Reducers, periods and same-day mosaics against plain numpy references."""

from __future__ import annotations

import datetime as dt
import warnings

import numpy as np
import pytest

from ndvi_scale.composite import assign_periods, periods_between, reduce_days
from ndvi_scale.errors import InputError
from ndvi_scale.testing.reference import mosaic_days


def _days(seed: int = 0, n: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(-0.5, 0.95, size=(n, 5, 6)).astype(np.float32)
    a[rng.uniform(size=a.shape) < 0.35] = np.nan
    a[:, 0, 0] = np.nan  # a pixel never seen
    a[:, 1, 1] = np.nan
    a[3, 1, 1] = 0.42  # a pixel seen exactly once
    return a


@pytest.mark.parametrize(
    ("method", "ref"),
    [
        ("median", lambda a: np.nanmedian(a, axis=0)),
        ("mean", lambda a: np.nanmean(a, axis=0)),
        ("max", lambda a: np.nanmax(a, axis=0)),
        ("min", lambda a: np.nanmin(a, axis=0)),
        ("q25", lambda a: np.nanquantile(a, 0.25, axis=0)),
        ("q90", lambda a: np.nanquantile(a, 0.90, axis=0)),
    ],
)
def test_reducers_match_numpy(method, ref):
    a = _days()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: numpy warns, we expect NaN
        expected = ref(a.astype(np.float64))
    out = reduce_days(a, method, np.arange(100, 100 + a.shape[0]))
    value, count = out[0], out[1]
    np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(count, (~np.isnan(a)).sum(0))
    assert value.dtype == np.float32
    assert np.isnan(value[0, 0]) and count[0, 0] == 0
    assert value[1, 1] == np.float32(0.42) and count[1, 1] == 1


def test_max_carries_the_date_of_the_maximum():
    a = _days(3)
    numbers = np.array([19800 + 5 * i for i in range(a.shape[0])])
    value, count, date = reduce_days(a, "max", numbers)
    for y in range(a.shape[1]):
        for x in range(a.shape[2]):
            col = a[:, y, x]
            if np.isnan(col).all():
                assert np.isnan(date[y, x]) and np.isnan(value[y, x])
            else:
                i = int(np.nanargmax(col))
                assert date[y, x] == numbers[i]
                assert value[y, x] == col[i]


def test_empty_period_gives_nan_and_zero_count():
    value, count = reduce_days(np.empty((0, 3, 4), np.float32), "median")
    assert np.isnan(value).all() and (count == 0).all()


def test_unknown_method_is_refused():
    with pytest.raises(InputError, match="method"):
        reduce_days(_days(), "mode")


def test_mosaic_first_valid_wins_per_day():
    a = np.full((3, 2, 2), np.nan, np.float32)
    a[0, 0, 0] = 0.1  # day 0, granule A
    a[1, 0, 0] = 0.9  # day 0, granule B (same place): A wins
    a[1, 0, 1] = 0.5  # only B sees this pixel on day 0
    a[2] = 0.3  # day 1
    m = mosaic_days(a, [0, 0, 1])
    assert m.shape == (2, 2, 2)
    assert m[0, 0, 0] == np.float32(0.1)
    assert m[0, 0, 1] == np.float32(0.5)
    assert np.isnan(m[0, 1, 0])
    assert (m[1] == np.float32(0.3)).all()


def test_months_cover_range_with_calendar_bounds():
    ps = periods_between(dt.date(2024, 1, 15), dt.date(2024, 3, 2), "month")
    assert [(p.start, p.end) for p in ps] == [
        (dt.date(2024, 1, 1), dt.date(2024, 1, 31)),
        (dt.date(2024, 2, 1), dt.date(2024, 2, 29)),
        (dt.date(2024, 3, 1), dt.date(2024, 3, 31)),
    ]


@pytest.mark.parametrize("period", ["day", "week", "dekad", "month", "season", "year"])
def test_periods_tile_time_without_gaps(period):
    start, end = dt.date(2023, 11, 20), dt.date(2025, 2, 10)
    ps = periods_between(start, end, period)
    assert ps[0].start <= start and ps[-1].end >= end
    for a, b in zip(ps, ps[1:], strict=False):
        assert b.start == a.end + dt.timedelta(days=1)
    days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    idx = assign_periods(days, ps)
    assert min(idx) == 0 and all(ps[i].contains(d) for i, d in zip(idx, days, strict=True))


def test_dekads_and_seasons():
    d = periods_between(dt.date(2024, 2, 1), dt.date(2024, 2, 29), "dekad")
    assert [(p.start.day, p.end.day) for p in d] == [(1, 10), (11, 20), (21, 29)]
    s = periods_between(dt.date(2024, 1, 10), dt.date(2024, 1, 10), "season")
    assert (s[0].start, s[0].end) == (dt.date(2023, 12, 1), dt.date(2024, 2, 29))


@pytest.mark.parametrize("n_days", [1, 2, 3, 5, 12, 31, 65])
def test_quantiles_are_numpys_nanquantile_bit_for_bit(n_days):
    import warnings

    from ndvi_scale.composite import nanquantile

    rng = np.random.default_rng(n_days)
    days = rng.random((n_days, 48, 48), dtype=np.float32) * 2 - 1
    days[rng.random(days.shape) < 0.3] = np.nan
    days[:, :4] = np.round(days[:, :4], 1)  # ties
    days[:, 5] = np.nan  # never observed
    for q in (0.01, 0.05, 0.1, 0.25, 0.33, 0.5, 0.75, 0.9, 0.99):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = np.asarray(np.nanquantile(days, q, axis=0), dtype=np.float32)
        got = nanquantile(days, q)
        assert got.dtype == np.float32 and np.array_equal(got, ref, equal_nan=True), (n_days, q)
    assert np.isnan(nanquantile(days, 0.25)[5]).all()
