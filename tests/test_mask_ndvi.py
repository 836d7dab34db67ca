"""SCL masking and NDVI arithmetic against hand-computed references."""

from __future__ import annotations

import numpy as np

from ndvi_scale.config import DEFAULT_MASK_CLASSES
from ndvi_scale.ndvi import reflectance
from ndvi_scale.testing.reference import clear_mask, ndvi


def test_every_scl_class_follows_the_recipe():
    scl = np.arange(13, dtype=np.uint16)[None, :]
    dn = np.full_like(scl, 3000)
    clear = clear_mask(scl, dn, dn, DEFAULT_MASK_CLASSES)[0]
    assert clear.tolist() == [c in (4, 5, 6, 7, 11) for c in range(13)]


def test_band_nodata_is_never_clear_even_if_scl_says_vegetation():
    scl = np.array([4, 4, 4], dtype=np.uint16)
    red = np.array([0, 500, 500], dtype=np.uint16)
    nir = np.array([3000, 0, 3000], dtype=np.uint16)
    assert clear_mask(scl, red, nir, DEFAULT_MASK_CLASSES).tolist() == [False, False, True]


def test_scl_zero_is_masked_even_when_not_listed():
    scl = np.array([0, 4], dtype=np.uint16)
    dn = np.array([100, 100], dtype=np.uint16)
    assert clear_mask(scl, dn, dn, (3,)).tolist() == [False, True]


def test_ndvi_with_and_without_baseline_offset_agree():
    red_r, nir_r = 0.05, 0.40
    truth = (nir_r - red_r) / (nir_r + red_r)
    old = ndvi(np.array([500], np.uint16), np.array([4000], np.uint16), 1e-4, 0.0)
    new = ndvi(np.array([1500], np.uint16), np.array([5000], np.uint16), 1e-4, -0.1)
    assert old.dtype == np.float32
    np.testing.assert_allclose(old, truth, atol=1e-6)
    np.testing.assert_allclose(new, truth, atol=1e-6)
    # forgetting the offset would be a large error: the reason the baseline rule matters
    wrong = ndvi(np.array([1500], np.uint16), np.array([5000], np.uint16), 1e-4, 0.0)
    assert abs(float(wrong[0]) - truth) > 0.1


def test_negative_reflectance_is_clipped_and_masked_where_empty():
    r = reflectance(np.array([900, 1000, 1200], np.uint16), 1e-4, -0.1)
    np.testing.assert_allclose(r, [0.0, 0.0, 0.02], atol=1e-7)
    v = ndvi(np.array([900, 1200], np.uint16), np.array([950, 900], np.uint16), 1e-4, -0.1)
    assert np.isnan(v[0])  # both reflectances <= 0: no NDVI
    assert v[1] == np.float32(-1.0)  # nir clipped to 0


def test_not_clear_is_nan():
    v = ndvi(np.array([500, 500], np.uint16), np.array([4000, 4000], np.uint16), 1e-4, 0.0, np.array([True, False]))
    assert np.isfinite(v[0]) and np.isnan(v[1])
