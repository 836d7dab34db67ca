"""The kernel's compiled reducers against the numpy/bottleneck reference; its mask filters against scipy.ndimage."""

from __future__ import annotations

import numpy as np
import pytest

from ndvi_scale import kernel
from ndvi_scale.kernel import sorting_pairs
from ndvi_scale.testing.reference import clear_mask, disk, filtered_clear_mask, mask_filter


@pytest.mark.parametrize("method", ["median", "mean", "max", "min", "q25"])
def test_fast_reducers_are_bit_identical(method):
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


def test_written_out_median_networks_are_what_the_generator_writes():
    """ndvi_scale/_median_networks.py is generated (python -m ndvi_scale.kernel): it must not drift from its
    generator, whose networks the bit-identity test above checks (1, 2, 3, 6 and 13 days are written out)."""
    from pathlib import Path

    import ndvi_scale._median_networks as networks

    assert Path(networks.__file__).read_text() == kernel.median_networks_module()
    assert kernel.MAX_UNROLLED_DAYS >= 13


@pytest.mark.skipif(not kernel.NUMBA, reason="the written-out networks are numba's; numpy runs bottleneck")
def test_written_out_median_equals_the_loop_on_every_count_and_special_value():
    rng = np.random.default_rng(5)
    for n in range(1, kernel.MAX_UNROLLED_DAYS + 1):
        days = rng.random((n, 6, 33), dtype=np.float32) * 2 - 1
        days[rng.random(days.shape) < 0.4] = np.nan
        days[:, 0] = np.nan
        days[0, 1], days[-1, 2] = np.inf, -np.inf
        days[:, 3] = 0.25  # all equal
        days[:, 4, ::2] = -0.0
        want_v, want_c = np.empty((6, 33), np.float32), np.empty((6, 33), np.float32)
        kernel._NUMBA_MEDIAN(days, sorting_pairs(n), want_v, want_c)
        got_v, got_c = np.empty((6, 33), np.float32), np.empty((6, 33), np.float32)
        kernel.unrolled_median(n)(days, got_v, got_c)
        assert np.array_equal(got_v, want_v, equal_nan=True) and np.array_equal(got_c, want_c), n
        assert np.array_equal(np.signbit(got_v), np.signbit(want_v)), n


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




# ------------------------------------------------------------------------------------------------ mask filters


@pytest.mark.parametrize("radius", [0.5, 1, 1.5, 2, 2.5, 3, 6, 10, 70])
@pytest.mark.parametrize("density", [0.002, 0.05, 0.5])
def test_dilation_and_erosion_equal_scipy_on_random_masks(radius, density):
    """Widths around the 64-pixel words the masks are packed in (63, 64, 65, 128, 130), one pixel high or wide,
    radii beyond the array."""
    rng = np.random.default_rng(int(radius * 100) + int(density * 1000))
    for shape in ((1, 1), (7, 3), (57, 91), (130, 64), (3, 63), (65, 65), (1, 128), (40, 130), (150, 1)):
        mask = rng.random(shape) < density
        np.testing.assert_array_equal(kernel.dilate(mask, radius), mask_filter(mask, [("dilation", radius)]))
        np.testing.assert_array_equal(kernel.erode(mask, radius), mask_filter(mask, [("erosion", radius)]))


def test_disk_is_skimage_disk():
    # skimage.morphology.disk(2) and disk(3), written out
    two = np.array([[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], bool)
    np.testing.assert_array_equal(disk(2), two)
    assert disk(3).sum() == 29 and disk(3).shape == (7, 7)
    mask = np.zeros((11, 11), dtype=bool)
    mask[5, 5] = True
    np.testing.assert_array_equal(kernel.dilate(mask, 2)[3:8, 3:8], two)
    assert kernel.dilate(mask, 2).sum() == two.sum()


@pytest.mark.parametrize(
    "filters",
    [
        [("opening", 2), ("dilation", 6)],
        [("closing", 3)],
        [("opening", 1.5), ("dilation", 2), ("erosion", 1), ("closing", 2.5)],
        [("dilation", 2), ("dilation", 6)],  # what the first grows past the edge must not come back in the second
    ],
)
def test_filter_chains_equal_scipy_and_reach_is_enough(filters):
    rng = np.random.default_rng(7)
    # blobs (a smoothed random field) with speckle: what a cloud mask looks like; masked up to the right edge
    field = rng.random((120, 150))
    for _ in range(3):
        field = (field + sum(np.roll(field, s, a) for s in (1, -1) for a in (0, 1))) / 5
    mask = (field > np.quantile(field, 0.7)) | (rng.random(field.shape) < 0.01)
    mask[[0, 60, 119], [149, 149, 0]] = True
    whole = kernel.apply_mask_filters(mask, filters)
    np.testing.assert_array_equal(whole, mask_filter(mask, filters))
    # a window read with the filters' reach gives the whole array's result inside it (chunk independence)
    reach = kernel.filter_reach(filters)
    r0, r1, c0, c1 = 40, 80, 50, 100
    part = kernel.apply_mask_filters(mask[r0 - reach : r1 + reach, c0 - reach : c1 + reach], filters)
    np.testing.assert_array_equal(part[reach:-reach, reach:-reach], whole[r0:r1, c0:c1])


@pytest.mark.parametrize("engine", ["numpy", *(["numba"] if kernel.NUMBA else [])])
def test_filtered_clear_reshapes_only_cloud_and_shadow(engine, monkeypatch):
    monkeypatch.setenv("NDVI_SCALE_NUMBA", "1" if engine == "numba" else "0")
    rng = np.random.default_rng(3)
    scl = rng.integers(0, 12, size=(64, 80)).astype(np.uint16)
    scl[rng.random(scl.shape) < 0.7] = 4  # mostly vegetation, scattered other classes
    classes = (0, 1, 2, 3, 8, 9, 10)
    filters = [("opening", 1), ("dilation", 2.5)]
    ones = np.ones_like(scl)
    np.testing.assert_array_equal(
        kernel.filtered_clear(scl, classes, filters), filtered_clear_mask(scl, ones, ones, classes, filters)
    )
    got = kernel.filtered_clear(scl, classes, filters)
    assert not got[np.isin(scl, (0, 1, 2))].any()  # never unmasked by the opening, never grown
    np.testing.assert_array_equal(kernel.filtered_clear(scl, classes, ()), clear_mask(scl, ones, ones, classes))
    # classes not masked are not filtered: with only no-data masked, nothing grows
    np.testing.assert_array_equal(kernel.filtered_clear(scl, (0,), [("dilation", 2)]), scl != 0)
    no_shadow = [0, 8, 9, 10]
    np.testing.assert_array_equal(
        kernel.filtered_clear(scl, no_shadow, [("dilation", 2)]),
        filtered_clear_mask(scl, ones, ones, no_shadow, [("dilation", 2)]),
    )


@pytest.mark.parametrize("engine", ["numpy", *(["numba"] if kernel.NUMBA else [])])
def test_ndvi_into_with_a_filtered_mask_equals_the_reference(engine, monkeypatch):
    from ndvi_scale.testing.reference import ndvi

    monkeypatch.setenv("NDVI_SCALE_NUMBA", "1" if engine == "numba" else "0")
    rng = np.random.default_rng(11)
    red = rng.integers(0, 3000, size=(40, 70)).astype(np.uint16)
    nir = rng.integers(0, 6000, size=(40, 70)).astype(np.uint16)
    scl = rng.choice(np.array([0, 3, 4, 5, 8, 9], dtype=np.uint16), size=(40, 70), p=[0.05, 0.1, 0.5, 0.2, 0.1, 0.05])
    filters = [("opening", 1), ("dilation", 2)]
    clear = kernel.filtered_clear(scl, (0, 1, 2, 3, 8, 9, 10), filters)
    want = ndvi(red, nir, 1e-4, -0.1, filtered_clear_mask(scl, red, nir, (0, 1, 2, 3, 8, 9, 10), filters))
    out = np.empty((40, 70), dtype=np.float32)
    kernel.ndvi_into(out, red, nir, scl, 1e-4, -0.1, 1e-4, -0.1, (0,), first=True, clear=clear)
    np.testing.assert_array_equal(out, want)
    assert np.isnan(out).any() and not np.isnan(out).all()


@pytest.mark.parametrize("engine", ["numpy", *(["numba"] if kernel.NUMBA else [])])
def test_ndvi_into_reads_views_as_they_are(engine, monkeypatch):
    """The part of a window an item covers is a strided view: folded as such (no contiguous copy), it gives the
    reference's numbers, for the first item of a day and for a later one that fills only what is still NaN."""
    from ndvi_scale.testing.reference import clear_mask, ndvi

    monkeypatch.setenv("NDVI_SCALE_NUMBA", "1" if engine == "numba" else "0")
    rng = np.random.default_rng(5)
    red = rng.integers(0, 3000, size=(50, 80)).astype(np.uint16)
    nir = rng.integers(0, 6000, size=(50, 80)).astype(np.uint16)
    scl = rng.choice(np.array([0, 3, 4, 5, 8], dtype=np.uint16), size=(50, 80))
    part = np.s_[7:41, 13:66]
    assert not red[part].flags.c_contiguous
    masked = (0, 3, 8)
    want = ndvi(red[part], nir[part], 1e-4, -0.1, clear_mask(scl[part], red[part], nir[part], masked))
    layer = np.full((50, 80), 5.0, dtype=np.float32)
    kernel.ndvi_into(layer[part], red[part], nir[part], scl[part], 1e-4, -0.1, 1e-4, -0.1, masked, first=True)
    np.testing.assert_array_equal(layer[part], want)
    assert (np.delete(layer, np.r_[7:41], axis=0) == 5.0).all()  # nothing written outside the part
    later = np.full((50, 80), np.nan, dtype=np.float32)
    later[::2] = 0.25
    kernel.ndvi_into(later[part], red[part], nir[part], scl[part], 1e-4, -0.1, 1e-4, -0.1, masked, first=False)
    got = later[part]  # part rows start at 7: its odd rows are the even rows set above, its even rows were NaN
    np.testing.assert_array_equal(got[1::2], np.full_like(want[1::2], 0.25))  # an earlier item's, kept
    np.testing.assert_array_equal(got[::2], want[::2])  # filled by this one


@pytest.mark.skipif(not kernel.NUMBA, reason="compares the compiled loop with the numpy path")
@pytest.mark.parametrize("scales", [(1e-4, -0.1, 1e-4, -0.1), (1e-4, 0.0, 1e-4, 0.0), (2.75e-5, -0.2, 1e-4, -0.1)])
def test_compiled_ndvi_equals_the_numpy_tables_bit_for_bit_on_every_dn(scales, monkeypatch):
    """The compiled loop computes reflectance itself (vectorised) where the numpy path looks it up in tables: every
    uint16 DN of red against every other of nir (in a shuffled 256 x 256 tile), every SCL byte and SCL values past
    the legend, the first item of a day and a later one, bands as strided read-only views and whole; the float32
    bits are the same, NaNs included."""
    rng = np.random.default_rng(3)
    dn = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    red, nir = dn.copy(), rng.permutation(dn.ravel()).reshape(256, 256)
    scl16 = rng.integers(0, 300, size=(256, 256)).astype(np.uint16)
    scl16[::3] = rng.choice(np.array([4, 5, 6, 7, 11], dtype=np.uint16), size=scl16[::3].shape)
    tile = np.zeros((300, 400), dtype=np.uint16)
    tile[20:276, 30:286] = nir
    tile.setflags(write=False)  # a cached tile, folded where it lies
    nir_view = tile[20:276, 30:286]
    masked = (3, 8, 9, 10)
    for scl in (scl16, scl16.astype(np.uint8), scl16[:, ::-1]):
        results = []
        for engine in ("0", "1"):
            monkeypatch.setenv("NDVI_SCALE_NUMBA", engine)
            first = np.empty((256, 256), dtype=np.float32)
            kernel.ndvi_into(first, red, nir_view, scl, *scales, masked, first=True)
            later = np.full((256, 300), np.nan, dtype=np.float32)
            later[::2, ::3] = 0.25
            kernel.ndvi_into(later[:, 7:263], red, nir, scl, *scales, masked, first=False)
            results.append((first.view(np.uint32), later.view(np.uint32)))
        (f0, l0), (f1, l1) = results
        np.testing.assert_array_equal(f1, f0)
        np.testing.assert_array_equal(l1, l0)
        assert 0.2 < np.isnan(f0.view(np.float32)).mean() < 0.9
    u8 = np.full((1, 5), 200, dtype=np.uint8)
    out = np.zeros((1, 5), dtype=np.float32)
    kernel.ndvi_into(out, u8, u8 + 10, np.full((1, 5), 4, dtype=np.uint8), *scales, masked, first=True)
    want = np.empty_like(out)
    monkeypatch.setenv("NDVI_SCALE_NUMBA", "0")
    kernel.ndvi_into(want, u8, u8 + 10, np.full((1, 5), 4, dtype=np.uint8), *scales, masked, first=True)
    np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))
