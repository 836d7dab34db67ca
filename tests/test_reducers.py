"""ndvi_scale.reducers: one method object per reducer; the compiled and the numpy paths give the same bytes."""

from __future__ import annotations

import numpy as np
import pytest

from ndvi_scale import kernel
from ndvi_scale.composite import EXTRA_OUTPUTS
from ndvi_scale.errors import InputError
from ndvi_scale.reducers import Extreme, Mean, Median, Quantile, reducer


def test_names_map_to_their_reducers_and_layers() -> None:
    assert isinstance(reducer("median"), Median) and isinstance(reducer("mean"), Mean)
    assert isinstance(reducer("max"), Extreme) and reducer("max").extra_outputs == ("max_date",)
    assert isinstance(reducer("q25"), Quantile) and reducer("q25").q == 0.25
    for method in ("median", "mean", "max", "min", "q25"):
        assert reducer(method).method == method
        assert reducer(method).n_out == 2 + len(EXTRA_OUTPUTS.get(method, ()))
    with pytest.raises(InputError, match="method 'mode' is unknown; expected median, mean, max, min"):
        reducer("mode")


@pytest.mark.parametrize("method", ["median", "mean", "max", "min", "q90"])
def test_reduce_into_equals_reduce_with_and_without_the_compiled_pass(method, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    days = rng.random((9, 24, 30), dtype=np.float32) * 2 - 1
    days[rng.random(days.shape) < 0.4] = np.nan
    days[:, 5, 5] = np.nan
    numbers = np.arange(19900, 19909)
    r = reducer(method)
    want = r.reduce(days, numbers)
    for numba in ("1", "0"):
        monkeypatch.setenv("NDVI_SCALE_NUMBA", numba)
        out = np.full((r.n_out, 24, 30), 9.0, dtype=np.float32)
        r.reduce_into(days, numbers, out)
        for a, b in zip(want, out, strict=True):
            assert np.array_equal(a, b, equal_nan=True)
    assert np.isnan(want[0][5, 5]) and want[1][5, 5] == 0
    if kernel.NUMBA and method in ("median", "mean", "max", "min"):  # these have a compiled pass, and use it
        monkeypatch.setenv("NDVI_SCALE_NUMBA", "1")
        assert r.fast(np.ascontiguousarray(days), numbers.astype(np.float64), out)
    with pytest.raises(ValueError, match="expected float32"):
        r.reduce_into(days, numbers, np.empty((r.n_out + 1, 24, 30), dtype=np.float32))
