"""Mask filters: the cloud/shadow part of the SCL mask reshaped by morphological operations on the output grid.

A chunk's SCL is read with the filters' reach around it (:func:`filter_reach`), so the filtered mask of a chunk
is the whole grid's mask cut to it. The filters are those of DEA's ``mask_filters`` (opening, closing, erosion,
dilation by a disk, as ``scipy.ndimage`` with ``skimage.morphology.disk``); the tests compare them with scipy.

The mask is packed 64 pixels to a word for the filters (:class:`_Packed`): a dilation by a disk is the OR of
its rows' dilations along x (windows of any length from doubled ones: shifts and ORs of words), shifted by the
row; an erosion is the negated dilation of the negation. A 2068-px square window (a 2048-px chunk with the default
filters' reach) goes through the default filters (opening 20 m, dilation 60 m) in ~5 ms, where running sums over
the unpacked pixels took ~60 ms; the SCL classification before (a compiled pass with numba, two lookups without)
and the combination after are most of the ~16 ms left (was ~87 ms).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from .config import MASK_FILTER_OPS
from .jit import njit, use_numba
from .mask import _lookup

__all__ = ["FILTERED_CLASSES", "FILTER_OPS", "apply_mask_filters", "dilate", "erode", "filter_reach",
           "filtered_clear"]

#: SCL classes the mask filters reshape (when masked): 3 cloud shadow, 8/9 cloud medium/high probability, 10 thin
#: cirrus. The other masked classes (0 no data, 1 defective, 2 dark area, 11 snow...) are masked as they are: an
#: opening must not drop an isolated defective pixel, and a dilation of no-data would only lose observations.
FILTERED_CLASSES: tuple[int, ...] = (3, 8, 9, 10)

#: Morphological operations a mask filter may apply (DEA ``mask_filters``' names); opening = erosion, dilation.
FILTER_OPS = MASK_FILTER_OPS


def _disk_half_widths(radius: float) -> np.ndarray:
    """int64[R + 1]: half-width of the disk ``dx^2 + dy^2 <= radius^2`` on row ``dy`` = 0..R (R = floor(radius)),
    the structuring element of ``skimage.morphology.disk`` (integer radius) and of any radius in pixels."""
    big = int(math.floor(radius + 1e-9))
    dy = np.arange(big + 1, dtype=np.float64)
    return np.floor(np.sqrt(np.maximum(radius * radius - dy * dy, 0.0)) + 1e-9).astype(np.int64)


def dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation of the 2-D bool ``mask`` by a disk of ``radius`` pixels; outside the array counts as False
    (``scipy.ndimage.binary_dilation(border_value=0)``). Returns a new bool array."""
    return apply_mask_filters(mask, [("dilation", radius)])


def erode(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary erosion by a disk of ``radius`` pixels; outside the array counts as True
    (``scipy.ndimage.binary_erosion(border_value=1)``): a mask reaching the edge of the read is not eaten from
    outside, where nothing is known. Returns a new bool array."""
    return apply_mask_filters(mask, [("erosion", radius)])


def apply_mask_filters(mask: np.ndarray, filters: Sequence[tuple[str, float]]) -> np.ndarray:
    """``mask`` (2-D bool, True = masked) through ``filters``, in order: ``(op, radius in pixels)`` with ``op`` one
    of :data:`FILTER_OPS` (opening = erosion then dilation, closing = dilation then erosion). Returns a new array.

    On the mask packed 64 pixels to a word (:class:`_Packed`): every operation is a few dozen numpy passes over
    1/64 of the pixels, and the mask is packed and unpacked once for the whole chain."""
    mask = np.asarray(mask, dtype=bool)
    for op, _ in filters:
        if op not in FILTER_OPS:
            raise ValueError(f"mask filter {op!r} is unknown; expected one of {', '.join(FILTER_OPS)}")
    if mask.ndim != 2 or mask.size == 0 or not filters:
        return mask.copy()
    reach = max(len(_disk_half_widths(radius)) for _, radius in filters)
    packed = _Packed(mask, margin=reach)
    for op, radius in filters:
        if op == "dilation":
            packed.dilate(radius)
        elif op == "erosion":
            packed.erode(radius)
        elif op == "opening":
            packed.erode(radius)
            packed.dilate(radius)
        else:  # closing
            packed.dilate(radius)
            packed.erode(radius)
    return packed.unpack()


class _Packed:
    """A 2-D bool mask as rows of little-endian uint64 words (pixel x = bit x % 64 of word x // 64), with at least
    ``margin`` pixels of zero bits after the last column: a window reaching past the edge finds False there, as
    ``scipy.ndimage`` with ``border_value=0`` does. Dilation and erosion by a disk work in place."""

    def __init__(self, mask: np.ndarray, margin: int) -> None:
        height, self.width = mask.shape
        words = -(-(self.width + margin + 1) // 64)
        buf = np.zeros((height, words * 8), dtype=np.uint8)
        packed = np.packbits(mask, axis=1, bitorder="little")
        buf[:, : packed.shape[1]] = packed
        self.words = buf.view("<u8")
        valid = np.zeros(words * 64, dtype=bool)
        valid[: self.width] = True
        self.valid = np.packbits(valid, bitorder="little").view("<u8")
        """The bits of real pixels: what an erosion's negation sets in the margin is cleared with it."""

    def unpack(self) -> np.ndarray:
        return np.unpackbits(self.words.view(np.uint8), axis=1, count=self.width, bitorder="little").view(bool)

    def erode(self, radius: float) -> None:
        """Erosion = not dilate(not mask), outside the array True: the margin is False in ``not mask``."""
        np.invert(self.words, out=self.words)
        self.words &= self.valid
        self.dilate(radius)
        np.invert(self.words, out=self.words)
        self.words &= self.valid

    def dilate(self, radius: float) -> None:
        """The OR over the disk's rows dy of the rows dilated along x by that row's half-width, shifted by dy.
        Along x: windows of 2^k pixels by doubling, a window of any length as two overlapping ones."""
        widths = _disk_half_widths(radius)
        if widths[0] == 0:  # a radius under one pixel: the disk is the pixel itself
            return
        ends = {1: self.words}  # ends[n][x] = any of x - n + 1 .. x
        n = 1
        while 2 * n <= 2 * int(widths[0]) + 1:
            ends[2 * n] = ends[n] | _shift(ends[n], n)
            n *= 2
        along: dict[int, np.ndarray] = {}
        for w in sorted(set(widths.tolist())):
            length = 2 * w + 1
            n = 1 << (length.bit_length() - 1)
            window = ends[n] if n == length else ends[n] | _shift(ends[n], length - n)
            along[w] = _shift(window, -w) if w else window  # any of x - w .. x + w
        out = along[int(widths[0])].copy()
        height = out.shape[0]
        for dy in range(1, min(len(widths) - 1, height - 1) + 1):  # rows further than the height add nothing
            row = along[int(widths[dy])]
            out[dy:] |= row[: height - dy]
            out[: height - dy] |= row[dy:]
        out &= self.valid  # outside the array is False again for the next operation, as in scipy
        self.words = out


def _shift(words: np.ndarray, by: int) -> np.ndarray:
    """Rows of packed pixels moved ``by`` pixels towards higher x (``by`` < 0: towards lower x); zeros come in."""
    out = np.zeros_like(words)
    n = words.shape[1]
    q, r = divmod(abs(by), 64)
    if q >= n:
        return out
    if by > 0:
        src, dst = words[:, : n - q], out[:, q:]
        if r:
            np.left_shift(src, r, out=dst)
            dst[:, 1:] |= src[:, :-1] >> (64 - r)
        else:
            dst[...] = src
    else:
        src, dst = words[:, q:], out[:, : n - q]
        if r:
            np.right_shift(src, r, out=dst)
            dst[:, :-1] |= src[:, 1:] << (64 - r)
        else:
            dst[...] = src
    return out


def filter_reach(filters: Sequence[tuple[str, float]]) -> int:
    """Pixels around a window whose SCL the filtered mask of the window depends on: a chunk reads that margin, so
    its mask equals the one of the whole grid (results do not depend on the chunk size)."""
    reach = 0
    for op, radius in filters:
        r = len(_disk_half_widths(radius)) - 1
        reach += 2 * r if op in ("opening", "closing") else r
    return reach


@functools.lru_cache(maxsize=16)
def _class_tables(mask_classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(clear, filtered) bool[65536] tables of an SCL value: clear as :func:`scl_table`; filtered where it is a
    masked class of :data:`FILTERED_CLASSES`."""
    clear = np.zeros(65536, dtype=bool)
    clear[:256] = _lookup(mask_classes)
    filtered = np.zeros(65536, dtype=bool)
    filtered[[c for c in FILTERED_CLASSES if c in mask_classes]] = True
    clear.setflags(write=False)
    filtered.setflags(write=False)
    return clear, filtered


def filtered_clear(
    scl: np.ndarray, mask_classes: Sequence[int], filters: Sequence[tuple[str, float]]
) -> np.ndarray:
    """Bool (y, x): True where the SCL ``scl`` (uint8/uint16, on the output grid) is clear once the cloud/shadow
    mask (:data:`FILTERED_CLASSES` among ``mask_classes``) went through ``filters`` (radii in output pixels).

    The other masked classes stay masked exactly; a cloud/shadow pixel an opening removes becomes clear, a pixel
    a dilation reaches becomes masked. Without filters: the plain SCL test (:func:`scl_table`)."""
    clear_t, filtered_t = _class_tables(tuple(sorted({int(c) for c in mask_classes})))
    if use_numba() and scl.ndim == 2 and scl.dtype in (np.uint8, np.uint16):
        assert _CLASSIFY is not None and _COMBINE is not None
        clear = np.empty(scl.shape, dtype=bool)
        cloud = np.empty(scl.shape, dtype=bool)
        if not _CLASSIFY(scl, clear_t, filtered_t, clear, cloud) or not filters:
            return clear  # nothing to grow; an opening or erosion of an empty mask is empty too
        _COMBINE(clear, cloud, apply_mask_filters(cloud, filters))
        return clear
    clear = clear_t[scl]
    if not filters:
        return clear
    cloud = filtered_t[scl]
    if not cloud.any():
        # nothing to grow; an opening or erosion of an empty mask is empty too
        return clear
    return (clear | cloud) & ~apply_mask_filters(cloud, filters)


def _classify_loop(scl: np.ndarray, clear_t: np.ndarray, filtered_t: np.ndarray, clear: np.ndarray,
                   cloud: np.ndarray) -> bool:  # pragma: no cover - compiled by numba
    """clear = clear_t[scl], cloud = filtered_t[scl]; True if any pixel is cloud."""
    height, width = scl.shape
    found = False
    for y in range(height):
        for x in range(width):
            v = scl[y, x]
            clear[y, x] = clear_t[v]
            c = filtered_t[v]
            cloud[y, x] = c
            found |= c
    return found


def _combine_loop(clear: np.ndarray, cloud: np.ndarray, masked: np.ndarray) -> None:  # pragma: no cover
    """clear = (clear | cloud) & ~masked, in place."""
    height, width = clear.shape
    for y in range(height):
        for x in range(width):
            clear[y, x] = (clear[y, x] | cloud[y, x]) & (not masked[y, x])


_CLASSIFY = njit(_classify_loop)
_COMBINE = njit(_combine_loop)


