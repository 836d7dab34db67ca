"""The per-chunk NDVI kernel, fast: lookup tables, no full-size temporaries, one compiled pass with numba.

:func:`ndvi_into` folds one item's red/nir/scl digital numbers into its day's NDVI layer (the streamed pass of
:mod:`ndvi_scale.engine.task`), with the same numbers, bit for bit, as the stage-by-stage reference of
:mod:`ndvi_scale.testing.reference` (mask, NDVI, same-day mosaic).

* **Tables (numpy path).** Reflectance ``max(DN * scale + offset, 0)`` is tabulated once per (scale,
  offset) for all 65536 DNs with the very expressions of :func:`~ndvi_scale.ndvi.reflectance` (so the float32
  values are identical), and DN 0 (no data) maps to NaN. The SCL test becomes a table of 0 (clear) or NaN
  (masked). NDVI is then ``(n - (r + s)) / (n + (r + s))``: NaN propagates from no-data DNs, from masked
  classes, and from ``0 / 0`` where both reflectances clip to 0 (the ``den <= 0`` case); no boolean mask pass.
* **Row blocks.** Whole-chunk numpy expressions allocate a fresh 16 MB temporary per operation (2048 x 2048
  float32): page faults and memory traffic cost more than the arithmetic. The numpy path works on blocks of
  :data:`ROWS` rows whose temporaries stay in the CPU cache.
* **Mosaic in place.** The first item of a day writes its day's layer directly; a later item of the same day
  (the overlapping granule) only fills the pixels still NaN, as :func:`~ndvi_scale.testing.reference.mosaic_days`.
* **One pass with numba, if installed.** One compiled loop per item (no temporaries, GIL released), which
  computes the reflectances itself in the very float32 operations of :func:`~ndvi_scale.ndvi.reflectance` and
  tests the SCL class against a 32-bit word of clear classes (:func:`clear_word`) instead of looking them up:
  table lookups are gathers, which LLVM does not vectorise, and a later item's "fill only NaN" as a branch
  mispredicts on clouds. Each band is handed over as the flat run of memory from its first pixel to its last,
  so every row is a contiguous 1-D slice, tiles and partial windows alike: LLVM vectorises the loop 8 pixels at
  a time. ~1.4x (first item of a day) and ~5x (later items) faster than the table loop it replaced, and bit for
  bit the numpy path (tests compare every uint16 DN, NaNs included; no fast-math: LLVM may vectorise but not
  reorder float operations). Without numba, or with ``NDVI_SCALE_NUMBA=0``, the numpy path runs. Compiled once
  per (DN, SCL) dtype pair and cached on disk (numba ``cache=True``).

:func:`reduce_days` is the temporal reducer of the fused pass, compiled the same way when numba is there
(median: a sorting network across a row of pixels; mean/max/min: one streamed pass), bit for bit
:func:`ndvi_scale.composite.reduce_days` (numpy and bottleneck), which runs otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from .jit import NUMBA
from .jit import njit as _njit
from .jit import use_numba as _use_numba
from .mask import _lookup
from .maskfilters import (
    FILTER_OPS,
    FILTERED_CLASSES,
    apply_mask_filters,
    dilate,
    erode,
    filter_reach,
    filtered_clear,
)
from .ndvi import reflectance

__all__ = [
    "FILTERED_CLASSES",
    "FILTER_OPS",
    "MAX_NETWORK_DAYS",
    "NUMBA",
    "ROWS",
    "apply_mask_filters",
    "dilate",
    "erode",
    "filter_reach",
    "filtered_clear",
    "ndvi_into",
    "reduce_days",
    "reflectance_table",
    "scl_table",
    "sorting_pairs",
]

#: Rows per block. 32 rows of a 2048-px chunk are 64k pixels: a few 256 kB float32 temporaries fit in L2.
ROWS = 32


@functools.lru_cache(maxsize=64)
def reflectance_table(scale: float, offset: float) -> np.ndarray:
    """float32[65536]: reflectance of every uint16 DN (:func:`~ndvi_scale.ndvi.reflectance`), NaN for DN 0."""
    table = reflectance(np.arange(65536, dtype=np.uint16), scale, offset)
    table[0] = np.nan
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=16)
def scl_table(mask_classes: tuple[int, ...]) -> np.ndarray:
    """float32[65536]: 0 where the SCL value is clear (:func:`~ndvi_scale.testing.reference.clear_mask`), else NaN."""
    clear = _lookup(mask_classes)  # 256 entries; values >= 256 are outside the legend, as 255 is
    table = np.full(65536, np.nan, dtype=np.float32)
    table[:256][clear] = 0.0
    table.setflags(write=False)
    return table


def ndvi_into(
    out: np.ndarray,
    red: np.ndarray,
    nir: np.ndarray,
    scl: np.ndarray,
    red_scale: float,
    red_offset: float,
    nir_scale: float,
    nir_offset: float,
    mask_classes: Sequence[int],
    first: bool,
    clear: np.ndarray | None = None,
) -> None:
    """One item's NDVI into its day's float32 layer ``out`` (y, x): all of it if ``first``, else only where
    ``out`` is still NaN. ``red``/``nir``/``scl`` are (y, x) uint8/uint16 digital numbers.

    ``clear``, if given, is the (y, x) bool mask of usable pixels that replaces the SCL test (the mask after the
    filters, :func:`filtered_clear`); ``scl`` and ``mask_classes`` are then not looked at."""
    if clear is not None:
        if clear.dtype != np.bool_ or clear.shape != out.shape:
            raise ValueError(f"clear mask {clear.dtype} {clear.shape} is not bool of the output shape {out.shape}")
        scl = clear.view(np.uint8)  # same item size: a view, strided or not
    for a in (red, nir, scl):
        if a.dtype not in (np.uint8, np.uint16) or a.shape != out.shape:
            raise ValueError(f"band {a.dtype} {a.shape} is not uint8/uint16 of the output shape {out.shape}")
    classes = tuple(int(c) for c in mask_classes)
    # The bands as they come, strided or not: an item covering part of the chunk hands over views, and copying
    # them contiguous first took longer than the loop itself (the compiled loop reads their rows where they lie;
    # numpy's take reads views as they are).
    word = _CLEAR_WORD if clear is not None else clear_word(classes)
    if _use_numba() and _ndvi_item_numba(
        red, nir, scl, (red_scale, red_offset, nir_scale, nir_offset), word, out, first
    ):
        return
    scl_t = _CLEAR_CODES if clear is not None else scl_table(classes)
    red_t = reflectance_table(float(red_scale), float(red_offset))
    nir_t = reflectance_table(float(nir_scale), float(nir_offset))
    with np.errstate(invalid="ignore", divide="ignore"):
        _ndvi_item_numpy(red, nir, scl, red_t, nir_t, scl_t, out, bool(first))


def _ndvi_item_numpy(
    red: np.ndarray,
    nir: np.ndarray,
    scl: np.ndarray,
    red_t: np.ndarray,
    nir_t: np.ndarray,
    scl_t: np.ndarray,
    out: np.ndarray,
    first: bool,
) -> None:
    """One item into its day's layer ``out`` with numpy, row block by row block."""
    height, width = red.shape
    rows = max(1, min(ROWS, height))
    r_buf = np.empty((rows, width), dtype=np.float32)
    n_buf = np.empty_like(r_buf)
    s_buf = np.empty_like(r_buf)
    for y0 in range(0, height, rows):
        y1 = min(y0 + rows, height)
        m = y1 - y0
        r, n, s = r_buf[:m], n_buf[:m], s_buf[:m]
        np.take(red_t, red[y0:y1], out=r)
        np.take(nir_t, nir[y0:y1], out=n)
        np.take(scl_t, scl[y0:y1], out=s)
        np.add(r, s, out=r)  # r + 0 is r exactly; NaN where the class is masked
        np.add(n, r, out=s)  # den
        np.subtract(n, r, out=n)  # num
        if first:
            np.divide(n, s, out=out[y0:y1])
        else:  # a later granule of the same day fills only what the earlier ones left as NaN
            np.divide(n, s, out=r)
            dst = out[y0:y1]
            np.copyto(dst, r, where=np.isnan(dst))


@functools.lru_cache(maxsize=16)
def clear_word(mask_classes: tuple[int, ...]) -> int:
    """:func:`scl_table` as a 32-bit word: bit ``c`` set where SCL value ``c`` is clear. Every clear value is
    below 12 (SCL 0 and 12-255 are masked whatever the classes: :func:`ndvi_scale.mask._lookup`)."""
    return _word_of(scl_table(mask_classes))


def _word_of(scl_t: np.ndarray) -> int:
    """A table of 0 (clear) or NaN by SCL value as a 32-bit word: bit ``c`` set where value ``c`` is clear."""
    clear = np.flatnonzero(scl_t == 0)
    if clear.size and clear[-1] >= 32:  # cannot happen with the legend's 12 classes; a guard for a new legend
        raise ValueError(f"clear SCL value {int(clear[-1])} does not fit a 32-bit word")
    return int(sum(1 << int(c) for c in clear))


def _ndvi_rows_loop(
    red: np.ndarray,
    red_step: int,
    nir: np.ndarray,
    nir_step: int,
    scl: np.ndarray,
    scl_step: int,
    out: np.ndarray,
    out_step: int,
    height: int,
    width: int,
    red_scale: np.float32,
    red_offset: np.float32,
    nir_scale: np.float32,
    nir_offset: np.float32,
    clear: np.uint32,
    first: bool,
) -> None:  # pragma: no cover - compiled by numba (the numpy twin above is what plain Python runs)
    # Each 2-D band comes as the flat run of memory from its first pixel to its last, row y at y * step: the rows
    # are then 1-D contiguous slices, over which LLVM vectorises the loop (8 pixels at a time). On 2-D views numba
    # indexes with any stride and it does not, and the table lookups of the numpy path (gathers) it does not
    # vectorise either: so the arithmetic of reflectance() is repeated here, in the same float32 operations.
    zero = np.float32(0.0)
    nan = np.float32(np.nan)
    one = np.uint32(1)
    for y in range(height):
        rr = red[y * red_step : y * red_step + width]
        nr = nir[y * nir_step : y * nir_step + width]
        sr = scl[y * scl_step : y * scl_step + width]
        orow = out[y * out_step : y * out_step + width]
        for x in range(width):
            d = rr[x]
            e = nr[x]
            c = np.uint32(sr[x])
            r = np.float32(d) * red_scale + red_offset
            r = r if r > zero else zero
            n = np.float32(e) * nir_scale + nir_offset
            n = n if n > zero else zero
            ok = (d != 0) & (e != 0) & (c < 32) & (((clear >> (c & np.uint32(31))) & one) != 0)
            v = (n - r) / (n + r)
            v = v if ok else nan
            o = orow[x]
            # a select, not a branch: later items of a day meet NaN and values in no predictable order
            orow[x] = v if (first | (o != o)) else o


@functools.cache
def _numba_rows() -> Any:
    """The compiled :func:`_ndvi_rows_loop`: ONE signature per (DN dtype, SCL dtype), read-only bands, which
    writeable ones convert to: no mix of layouts or flags compiles anew in a run."""
    from numba import types

    def band(dtype: Any) -> Any:
        return types.Array(dtype, 1, "C", readonly=True)

    i64, f32 = types.int64, types.float32
    out = types.Array(types.float32, 1, "C")
    signatures = [
        types.void(band(dn), i64, band(dn), i64, band(scl), i64, out, i64, i64, i64, f32, f32, f32, f32,
                   types.uint32, types.boolean)
        for dn in (types.uint16, types.uint8)
        for scl in (types.uint16, types.uint8)
    ]
    return _njit(_ndvi_rows_loop, signatures)


def _flat_rows(a: np.ndarray, writeable: bool = False) -> tuple[np.ndarray, int] | None:
    """``a`` (y, x) as the 1-D run of memory from its first pixel to its last and its row step in items, or None
    when its pixels are not contiguous along x (or rows run backwards)."""
    size = a.itemsize
    if a.strides[1] != size or a.strides[0] < 0 or a.strides[0] % size:
        return None
    step = a.strides[0] // size
    n = (a.shape[0] - 1) * step + a.shape[1]
    return np.lib.stride_tricks.as_strided(a, shape=(n,), strides=(size,), writeable=writeable), step


def _ndvi_item_numba(
    red: np.ndarray,
    nir: np.ndarray,
    scl: np.ndarray,
    scales: tuple[float, float, float, float],
    word: int,
    out: np.ndarray,
    first: bool,
) -> bool:
    """One item into ``out`` with the compiled rows loop; False (nothing done) where it does not apply: ``out``
    not contiguous along x. Bands that are not are copied first; red and nir of different DN types are widened."""
    height, width = out.shape
    if height == 0 or width == 0:
        return True
    flat_out = _flat_rows(out, writeable=True)
    if flat_out is None:
        return False
    if red.dtype != nir.dtype:
        red, nir = red.astype(np.uint16), nir.astype(np.uint16)
    bands = []
    for a in (red, nir, scl):
        flat = _flat_rows(a)
        bands.append(flat if flat is not None else _flat_rows(np.ascontiguousarray(a)))
    (r, rs), (n, ns), (s, ss) = bands  # type: ignore[misc]
    red_scale, red_offset, nir_scale, nir_offset = (np.float32(v) for v in scales)
    _numba_rows()(r, rs, n, ns, s, ss, flat_out[0], flat_out[1], height, width, red_scale, red_offset,
                  nir_scale, nir_offset, np.uint32(word), bool(first))
    return True


# ------------------------------------------------------------------------------------------------ reducers


def reduce_days(
    days: np.ndarray, method: str, day_numbers: np.ndarray | None = None, out: np.ndarray | None = None
) -> list[np.ndarray]:
    """:func:`ndvi_scale.composite.reduce_days`, bit for bit, faster where it can be: the method's
    :class:`~ndvi_scale.reducers.Reducer` (:meth:`~ndvi_scale.reducers.Reducer.reduce_into`).

    ``out``, if given, is the (layers, y, x) float32 array the layers are written into (their views are
    returned): the fused pass gives its output block, so no layer is allocated and stacked afterwards.

    With numba, two compiled passes that keep a row of pixels in the CPU cache and vectorise across it:

    * **median**: a sorting network (Batcher's merge exchange, Knuth's Algorithm M) run on every pixel of
      the row at once: compare-exchange is a branch-free min/max over the row, NaN sorted last as +inf.
      6-12x faster than bottleneck's ``nanmedian`` over axis 0 (a strided selection per pixel, with
      branches the data decides), for up to :data:`MAX_NETWORK_DAYS` days; bottleneck beyond.
    * **mean, max, min**: one day-major streaming pass (sum or running extreme, count, date): ~8x faster
      than bottleneck's ``nanmean``/numpy's argmax over axis 0.

    The value, count and date are those of the reference (tests/test_reader.py compares them bit for bit):
    the median is the middle value, or the float64 mean of the two middle ones cast to float32, as
    bottleneck; the mean is a float32 sum in day order divided by the count, as bottleneck; max/min take the
    first day holding the extreme, as numpy's argmax/argmin. Quantiles, or no numba, go to the reference.
    """
    from .reducers import reducer

    r = reducer(method)
    if out is None:
        out = np.empty((r.n_out, *days.shape[1:]), dtype=np.float32)
    r.reduce_into(days, day_numbers, out)
    return list(out)


#: Most days a period's median is sorted by the network for: it makes ~n log2(n)^2 / 4 compare-exchanges
#: (191 for 32 days, 1471 for 128), bottleneck's selection ~n per pixel; the network still wins ~10x at 48 days
#: (measured, 2048^2 px, 30 % NaN). Longer periods (a year of 5-day revisits) go to bottleneck.
MAX_NETWORK_DAYS = 64


@functools.lru_cache(maxsize=128)
def sorting_pairs(n: int) -> np.ndarray:
    """(comparators, 2) int64 index pairs (i < j) that sort any ``n`` values when each pair is put in order,
    in sequence: Batcher's merge exchange (Knuth, TAOCP vol. 3, 5.2.2, Algorithm M), for any ``n``."""
    pairs: list[tuple[int, int]] = []
    if n > 1:
        t = (n - 1).bit_length()
        p = 1 << (t - 1)
        while p > 0:
            q, r, d = 1 << (t - 1), 0, p
            while d > 0:
                pairs.extend((i, i + d) for i in range(n - d) if i & p == r)
                d, q, r = q - p, q // 2, p
            p //= 2
    table = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    table.setflags(write=False)
    return table


#: Most days a period's median is sorted by a network written out in full (:mod:`ndvi_scale._median_networks`):
#: with the values of a pixel in registers, LLVM vectorises the whole network across a row of pixels, which the
#: loop over a day-major row buffer below does not get (its compare-exchanges read and write two rows of one
#: array: ~0.5 ns each, scalar). Measured on 2048^2 px, 30 % NaN: 6 days 13 ms instead of 60, 12 days 32 instead of
#: 138. Each day count is compiled on first use (~1 s for 6 days, ~4 s for 16; then numba's disk cache).
MAX_UNROLLED_DAYS = 16

#: Day counts whose written-out median :func:`warm_up` compiles: a month of one Sentinel-2 tile has 6 or 7 dates
#: (5-day revisit), fewer where scenes are missing.
WARM_MEDIAN_DAYS = 8


def median_network_source(n: int) -> str:
    """Python source of ``median_<n>(days, value, count)``: the median (and count) of ``n`` float32 days per
    pixel, as :func:`_median_loop` (NaN sorted last as +inf; the float64 mean of the two middle values, which for
    an odd count is the middle value itself, exactly), with :func:`sorting_pairs`' network written out and the
    middle values picked without branches. ``python -m ndvi_scale.kernel`` writes :mod:`ndvi_scale._median_networks`."""
    lines = [
        f"def median_{n}(days, value, count):  # pragma: no cover - compiled by numba",
        "    height, width = days.shape[1], days.shape[2]",
        "    inf = np.float32(np.inf)",
        "    nan = np.float32(np.nan)",
        "    for y in range(height):",
        "        for x in range(width):",
    ]
    body = [f"v{d} = days[{d}, y, x]" for d in range(n)]
    body.append("c = 0 + " + " + ".join(f"(v{d} == v{d})" for d in range(n)))
    body += [f"s{d} = v{d} if v{d} == v{d} else inf" for d in range(n)]
    for i, j in sorting_pairs(n):
        body += [f"a, b = s{i}, s{j}", f"s{i} = a if a < b else b", f"s{j} = b if a < b else a"]
    body += ["ilo = (c - 1) // 2 if c > 0 else 0", "ihi = c // 2", "lo = s0", "hi = s0"]
    for k in range(1, n):
        body += [f"lo = s{k} if ilo == {k} else lo", f"hi = s{k} if ihi == {k} else hi"]
    body += [
        "mid = np.float32(0.5 * (np.float64(lo) + np.float64(hi)))",
        "value[y, x] = mid if c > 0 else nan",
        "count[y, x] = c",
    ]
    return "\n".join([*lines, *("            " + b for b in body)]) + "\n"


def median_networks_module() -> str:
    """The whole of :mod:`ndvi_scale._median_networks` (1 to :data:`MAX_UNROLLED_DAYS` days)."""
    head = (
        f'"""Medians of 1 to {MAX_UNROLLED_DAYS} days by sorting networks written out (kernel.MAX_UNROLLED_DAYS).\n\n'
        "Generated by ``python -m ndvi_scale.kernel`` from ndvi_scale.kernel.median_network_source: do not edit.\n"
        '"""\n\n# ruff: noqa: E501, F841\n\nimport numpy as np\n'
    )
    return head + "".join("\n\n" + median_network_source(n) for n in range(1, MAX_UNROLLED_DAYS + 1))


@functools.cache
def unrolled_median(n: int) -> Any:
    """The compiled ``median_<n>`` of :mod:`ndvi_scale._median_networks`, or None (no numba, or more than
    :data:`MAX_UNROLLED_DAYS` days)."""
    if not NUMBA or not 1 <= n <= MAX_UNROLLED_DAYS:
        return None
    from . import _median_networks

    return _njit(getattr(_median_networks, f"median_{n}"))


def _median_loop(
    days: np.ndarray, pairs: np.ndarray, value: np.ndarray, count: np.ndarray
) -> None:  # pragma: no cover - compiled by numba
    n_days, height, width = days.shape
    buf = np.empty((n_days, width), dtype=np.float32)  # one image row, day-major: each pass is a vector op
    cnt = np.empty(width, dtype=np.int64)
    inf = np.float32(np.inf)
    for y in range(height):
        for x in range(width):
            cnt[x] = 0
        for d in range(n_days):
            for x in range(width):
                v = days[d, y, x]
                ok = v == v
                buf[d, x] = v if ok else inf  # NaN sorts last; a real +inf among the valid ones is equal anyway
                cnt[x] += ok
        for p in range(pairs.shape[0]):
            i = pairs[p, 0]
            j = pairs[p, 1]
            for x in range(width):
                a = buf[i, x]
                b = buf[j, x]
                buf[i, x] = a if a < b else b
                buf[j, x] = b if a < b else a
        for x in range(width):
            n = cnt[x]
            count[y, x] = n
            if n == 0:
                value[y, x] = np.nan
            elif n % 2:
                value[y, x] = buf[n // 2, x]
            else:  # as bottleneck: the mean of the two middle values in float64
                value[y, x] = np.float32(0.5 * (np.float64(buf[n // 2 - 1, x]) + np.float64(buf[n // 2, x])))


def _stream_loop(
    days: np.ndarray, code: int, numbers: np.ndarray, value: np.ndarray, count: np.ndarray, date: np.ndarray
) -> None:  # pragma: no cover - compiled by numba
    n_days, height, width = days.shape
    acc = np.empty(width, dtype=np.float32)  # sum (mean) or extreme so far (max, min)
    cnt = np.empty(width, dtype=np.int64)
    best = np.empty(width, dtype=np.int64)  # day of the extreme, -1 before the first valid one
    zero = np.float32(0.0)
    for y in range(height):
        for x in range(width):
            acc[x] = zero
            cnt[x] = 0
            best[x] = -1
        for d in range(n_days):
            if code == 1:
                for x in range(width):
                    v = days[d, y, x]
                    ok = v == v
                    acc[x] += v if ok else zero  # +0.0 leaves a sum started at +0.0 exactly as it was
                    cnt[x] += ok
            else:
                for x in range(width):
                    v = days[d, y, x]
                    ok = v == v
                    cur = acc[x]
                    # the first day holding the extreme wins, as numpy's argmax/argmin
                    better = ok and (best[x] < 0 or (v > cur if code == 2 else v < cur))
                    acc[x] = v if better else cur
                    best[x] = d if better else best[x]
                    cnt[x] += ok
        for x in range(width):
            n = cnt[x]
            count[y, x] = n
            if n == 0:
                value[y, x] = np.nan
            elif code == 1:
                value[y, x] = acc[x] / np.float32(n)
            else:
                value[y, x] = acc[x]
            if code != 1:
                date[y, x] = np.float32(numbers[best[x]]) if n else np.float32(np.nan)


_NUMBA_MEDIAN = _njit(_median_loop)
_NUMBA_STREAM = _njit(_stream_loop)


def warm_up() -> bool:
    """Compile (or load from numba's disk cache) the compiled loops now, on tiny arrays; False without numba.

    Call it once per worker process before timing anything: the first call otherwise pays ~1 s of compilation
    (or ~0.1-0.3 s of cache loading) inside the first task. The medians of 1 to :data:`WARM_MEDIAN_DAYS` days are
    compiled too (~5 s the first time on a machine; other day counts compile when first met).
    """
    if not _use_numba():
        return False
    layer = np.empty((2, 3), dtype=np.float32)
    part = np.empty((3, 4), dtype=np.float32)[1:, 1:]  # the part of a day layer an item covers: a view
    # bands whole, or the part of their windows an item covers (views), as the tasks hand them over
    for shape, cut in (((2, 3), np.s_[:, :]), ((3, 4), np.s_[1:, 1:])):
        dn = np.full(shape, 1, dtype=np.uint16)[cut]
        clear = np.ones(shape, dtype=bool)[cut]
        for out in (layer, part):
            for scl_dtype in (np.uint16, np.uint8):  # the SCL comes as the file has it (8-bit on the aligned path)
                scl = np.full(shape, 4, dtype=scl_dtype)[cut]
                ndvi_into(out, dn, dn, scl, 1e-4, 0.0, 1e-4, 0.0, (0,), first=True)
                ndvi_into(out, dn, dn, scl, 1e-4, 0.0, 1e-4, 0.0, (0,), first=False)
            # the mask-filter path hands the loop a uint8 mask instead of the uint16 SCL (the uint8 signature)
            ndvi_into(out, dn, dn, scl, 1e-4, 0.0, 1e-4, 0.0, (0,), first=True, clear=clear)
    cached = np.full((3, 4), 1, dtype=np.uint16)
    cached.setflags(write=False)  # a tile of the tile cache, folded where it lies
    ndvi_into(part, cached[1:, 1:], cached[1:, 1:], np.full((2, 3), 4, dtype=np.uint16), 1e-4, 0.0, 1e-4, 0.0, (0,),
              first=True)
    for method in ("median", "mean", "max"):
        reduce_days(np.stack([layer, layer]), method, np.arange(2))
    for n in range(1, WARM_MEDIAN_DAYS + 1):  # the written-out networks of the day counts of a month of one tile
        reduce_days(np.stack([layer] * n), "median", np.arange(n))
    for scl_dtype in (np.uint16, np.uint8):  # a cloud: the mask filters' classification and combination
        filtered_clear(np.full((3, 4), 8, dtype=scl_dtype), (8,), (("dilation", 1.0),))
    return True


#: float32[65536] of a ``clear`` mask viewed as uint8: 1 (clear) -> 0, 0 (masked) -> NaN, as :func:`scl_table`.
_CLEAR_CODES = np.full(65536, np.nan, dtype=np.float32)
_CLEAR_CODES[1] = 0.0
_CLEAR_CODES.setflags(write=False)
#: :data:`_CLEAR_CODES` as the compiled loop's word (only 1 is clear).
_CLEAR_WORD = _word_of(_CLEAR_CODES)


if __name__ == "__main__":  # python -m ndvi_scale.kernel: regenerate the written-out sorting networks
    from pathlib import Path

    target = Path(__file__).with_name("_median_networks.py")
    target.write_text(median_networks_module())
    print(f"wrote {target}")
