"""The land surface of the synthetic sample (:mod:`ndvi_scale.sample`): an analytic agricultural landscape.

Every function here is a pure, vectorised function of ``(spec, x, y)`` (UTM metres in ``spec.epsg``; ``spec`` is a
:class:`ndvi_scale.sample.SampleSpec`) and, for the NDVI, of the day of year. The generator and
:class:`ndvi_scale.sample.Truth` evaluate the very same functions on pixel centres, so files and truth agree
exactly; :func:`parcel_polygons` gives the field parcels as polygons (what a land registry would publish).

Design (``u = x - x0`` east, ``v = y0 - y`` south of the spec's origin, ``H = 10 * size`` the granule side)
----------------------------------------------------------------------------------------------------------
* **Roads and blocks.** A jittered grid of road nodes, spaced ``B = 3 * field_size`` and moved up to 15 % of
  ``B`` each way by an integer hash of the node index, cuts the plain into convex quadrilateral blocks joined
  by slightly slanted straight roads (:data:`ROAD_HALF_WIDTH` either side of every block edge).
* **Fields.** Each block is either a wood (6 %: deciduous or coniferous) or cut into 2-5 elongated strips of
  varied widths along one of its two axes (picked by the block's hash), each strip split in two across with
  probability 0.45: fields from ~5 to ~60 ha at the default scale, like the Beauce. A strip boundary is where
  the ratio of the distances to two opposite block edges is constant: a straight line, so every field is a
  convex polygon. Each field draws a crop (:data:`_CROP_SHARES`), a shift of its calendar by -10..+10 days and
  an NDVI offset of +-0.03 from its own hash.
* **Overlays**, by size relative to ``H`` (so a tiny test granule holds them too), drawn in this order over the
  fields: two woods (wobbly ellipses, deciduous and coniferous); a village on the river's north bank and two
  hamlets (built-up, with 30 m cells of gardens and trees); a meandering river crossing the whole sample from
  west to east, :data:`RIVER_HALF_WIDTH` either side of its centre line (normal distance to first order),
  lined by riparian trees on 70 % of its 80 m stretches; the roads; the water last (so the river is one
  connected stream; road bridges are narrower than a pixel).
* **NDVI.** A piecewise-linear phenology per cover (:data:`_CALENDARS`: sowing, green-up, peak, senescence,
  harvest, stubble and bare soil as measured on Sentinel-2 over the Beauce), read at ``doy - shift``, plus the
  field's offset and a small smooth texture (``0.02 sin(x/97) cos(y/131)``, not on water).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely

if TYPE_CHECKING:
    from .sample import SampleSpec

__all__ = [
    "CROPS",
    "LandCover",
    "Surface",
    "cover_ndvi_table",
    "ndvi",
    "parcel_polygons",
    "parcels_geojson",
    "surface",
    "union_bounds",
]

# ---------------------------------------------------------------------------------------------------- hashing

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class _SplitMix:
    """SplitMix64 in pure Python: a few numbers per date, identical on every platform and numpy version
    (numpy's Generator streams are not guaranteed stable across versions, and a cached sample must match the
    truth)."""

    def __init__(self, *keys: int) -> None:
        state = _GOLDEN
        for k in keys:
            state = _mix64(((state ^ (k & _M64)) + _GOLDEN) & _M64)
        self.state = state

    def uniform(self, lo: float, hi: float) -> float:
        self.state = (self.state + _GOLDEN) & _M64
        return lo + (hi - lo) * (_mix64(self.state) >> 11) * 2.0**-53


def _hash2(i: Any, j: Any, seed: int) -> np.ndarray:
    """Vectorised SplitMix64 finaliser of two integer arrays (uint64 arithmetic wraps modulo 2**64)."""
    with np.errstate(over="ignore"):  # wrapping is the point; numpy only warns for 0-d (scalar) inputs
        z = (
            np.asarray(i).astype(np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            + np.asarray(j).astype(np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
            + np.uint64(seed & _M64)
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _byte(h: np.ndarray, k: int) -> np.ndarray:
    """Byte ``k`` (0-7) of a hash as a float in [0, 1): eight independent draws from one hash."""
    return ((h >> np.uint64(8 * k)) & np.uint64(0xFF)).astype(np.float64) / 256.0


# Salts separating the hash streams of road nodes, blocks, fields and village cells.
_NODE_SALT, _BLOCK_SALT, _FIELD_SALT, _CELL_SALT, _BANK_SALT = 0x51, 0xB10C, 0xF1E1D, 0xCE11, 0xBA4C

# ------------------------------------------------------------------------------------------------ land covers


class LandCover(IntEnum):
    """Land cover at a point; the value is the index in the arrays of :meth:`ndvi_scale.sample.Truth.land_cover`."""

    WINTER_WHEAT = 0
    WINTER_BARLEY = 1
    RAPESEED = 2
    MAIZE = 3
    SUNFLOWER = 4
    GRASSLAND = 5
    DECIDUOUS_FOREST = 6
    CONIFEROUS_FOREST = 7
    BUILT_UP = 8
    ROAD = 9
    WATER = 10


#: Arable crops: bare soil between harvest and emergence (what Sen2Cor may flag as cloud when bright).
CROPS: tuple[LandCover, ...] = (
    LandCover.WINTER_WHEAT,
    LandCover.WINTER_BARLEY,
    LandCover.RAPESEED,
    LandCover.MAIZE,
    LandCover.SUNFLOWER,
)

# Shares of the field parcels per cover, after the Eure-et-Loir crop statistics (Agreste 2020: winter cereals
# about half of the arable land, then rapeseed, maize, sunflower; some permanent grassland in the valleys).
_CROP_SHARES: tuple[tuple[LandCover, float], ...] = (
    (LandCover.WINTER_WHEAT, 0.36),
    (LandCover.WINTER_BARLEY, 0.14),
    (LandCover.RAPESEED, 0.13),
    (LandCover.MAIZE, 0.13),
    (LandCover.SUNFLOWER, 0.10),
    (LandCover.GRASSLAND, 0.14),
)
_CROP_CODES = np.array([c for c, _ in _CROP_SHARES], dtype=np.int8)
_CROP_CUMULATIVE = np.cumsum([s for _, s in _CROP_SHARES])

# NDVI through the year (day of year, NDVI), linear in between and periodic over 365 days. Winter crops are sown
# in autumn (emergence in the NDVI ~2 weeks later), green up in March, peak in May and are harvested in July
# (barley ~2 weeks before wheat); rapeseed stays green all winter and dips while it flowers yellow in April;
# maize and sunflower are sown in April-May, peak in August and early July, and are harvested in October and
# September. Stubble and ploughed soil read 0.14-0.20. Grassland is cut in early June and late August.
_CALENDARS: dict[LandCover, tuple[tuple[float, float], ...]] = {
    LandCover.WINTER_WHEAT: (
        (1, 0.38), (45, 0.42), (75, 0.55), (105, 0.78), (130, 0.86), (155, 0.80), (175, 0.55), (190, 0.30),
        (200, 0.18), (230, 0.20), (260, 0.16), (290, 0.14), (305, 0.16), (335, 0.30), (365, 0.37),
    ),
    LandCover.WINTER_BARLEY: (
        (1, 0.40), (40, 0.46), (70, 0.62), (95, 0.82), (118, 0.86), (140, 0.74), (160, 0.45), (178, 0.22),
        (185, 0.17), (240, 0.18), (270, 0.14), (285, 0.15), (300, 0.25), (335, 0.38), (365, 0.40),
    ),
    LandCover.RAPESEED: (
        (1, 0.62), (40, 0.60), (70, 0.72), (95, 0.82), (110, 0.66), (125, 0.64), (140, 0.80), (160, 0.65),
        (180, 0.35), (190, 0.20), (215, 0.17), (235, 0.16), (250, 0.30), (275, 0.62), (305, 0.72), (335, 0.68),
        (365, 0.63),
    ),
    LandCover.MAIZE: (
        (1, 0.17), (110, 0.15), (130, 0.15), (145, 0.20), (170, 0.45), (195, 0.82), (220, 0.88), (245, 0.76),
        (265, 0.50), (280, 0.28), (286, 0.18), (365, 0.17),
    ),
    LandCover.SUNFLOWER: (
        (1, 0.16), (100, 0.15), (115, 0.15), (130, 0.22), (155, 0.55), (180, 0.82), (195, 0.80), (215, 0.58),
        (235, 0.35), (255, 0.25), (262, 0.17), (365, 0.16),
    ),
    LandCover.GRASSLAND: (
        (1, 0.58), (60, 0.62), (100, 0.75), (140, 0.80), (155, 0.48), (175, 0.70), (215, 0.62), (235, 0.50),
        (260, 0.66), (300, 0.70), (365, 0.60),
    ),
    LandCover.DECIDUOUS_FOREST: (
        (1, 0.40), (95, 0.42), (115, 0.65), (135, 0.86), (245, 0.86), (285, 0.72), (310, 0.50), (330, 0.42),
        (365, 0.40),
    ),
    LandCover.CONIFEROUS_FOREST: ((1, 0.74), (130, 0.80), (200, 0.84), (300, 0.78), (365, 0.74)),
    LandCover.BUILT_UP: ((1, 0.18), (365, 0.18)),
    LandCover.ROAD: ((1, 0.15), (365, 0.15)),
    LandCover.WATER: ((1, -0.35), (365, -0.35)),
}

#: Largest shift of a field's calendar (days, either way): sowing and harvest dates differ between farms.
MAX_SHIFT = 10
#: Largest NDVI offset of a field (either way): soil and variety differences between fields of one crop.
_FIELD_OFFSET = 0.03

# Brightness s = red + nir per land cover (reflectance): 0.35-0.45 for crops, grass, forest and bare soil
# (typical red+nir sums), darker conifers and roads; water is dark, which keeps its NDVI error from DN
# rounding below 0.002 (0.5e-4 * 2 / 0.06), well inside the 0.005 tolerance promised to users.
# Every land surface keeps NDVI >= 0.09 (texture and field offset included): a thin-cirrus veil (+0.08 on both
# bands) moves NDVI by v * 0.16 / (s + 0.16), so above 0.07 it is always more than CONTAMINATION_TOLERANCE
# and every labelled cirrus pixel is really contaminated. Roads (0.15) and villages (0.18) are mixed pixels of
# asphalt, roofs and verges.
BRIGHTNESS = np.array([0.40, 0.40, 0.42, 0.40, 0.40, 0.42, 0.35, 0.30, 0.42, 0.36, 0.06])

# Geometry, in metres. Roads: a 12 m band (lane and verges), a thin line at 10 m. River: 36 m (3-4 pixels),
# riparian trees 30 m either side (a row of poplars and willows). Village gardens and trees in 30 m cells.
ROAD_HALF_WIDTH = 6.0
RIVER_HALF_WIDTH = 18.0
RIPARIAN_WIDTH = 30.0
_BANK_STRETCH = 80.0
_VILLAGE_CELL = 30.0
_JITTER = 0.15  # road node jitter, fraction of the block size: slanted roads, convex blocks
_WOOD_BLOCKS = 0.06  # share of blocks that are woods
_MIN_AREA = 5000.0  # m2: smaller pieces of parcels (slivers left by the overlays) are not published


def block_size(spec: SampleSpec) -> float:
    """Nominal side of a road block (metres): ``3 * spec.field_size``."""
    return 3.0 * float(spec.field_size)


# --------------------------------------------------------------------------------------------------- features


@dataclass(frozen=True)
class _Blob:
    """A wobbly ellipse: centre (u, v), semi-axes, rotation; outline ``1 + a3 sin(3t + p3) + a5 sin(5t + p5)``."""

    u: float
    v: float
    a: float
    b: float
    angle: float
    a3: float
    p3: float
    a5: float
    p5: float

    def rho(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Normalised radius: the point is inside where this is below 1."""
        du, dv = u - self.u, v - self.v
        c, s = math.cos(self.angle), math.sin(self.angle)
        p = (du * c + dv * s) / self.a
        q = (-du * s + dv * c) / self.b
        t = np.arctan2(q, p)
        return np.hypot(p, q) / (1.0 + self.a3 * np.sin(3.0 * t + self.p3) + self.a5 * np.sin(5.0 * t + self.p5))

    def outline(self, grow: float, n: int = 720) -> list[tuple[float, float]]:
        """(u, v) vertices of the outline, pushed out by ``grow`` metres (a polygon holding every inside point)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        pts = []
        for k in range(n):
            t = 2.0 * math.pi * k / n
            r = 1.0 + self.a3 * math.sin(3.0 * t + self.p3) + self.a5 * math.sin(5.0 * t + self.p5)
            p, q = (self.a * r + grow) * math.cos(t), (self.b * r + grow) * math.sin(t)
            pts.append((self.u + p * c - q * s, self.v + p * s + q * c))
        return pts


@dataclass(frozen=True)
class _Features:
    """The overlays of one spec, in metres relative to its origin."""

    river: tuple[tuple[float, float, float], ...]  # (amplitude, wavelength, phase) of the centre-line sines
    river_v: float  # mean position of the centre line (south of the origin)
    woods: tuple[tuple[_Blob, LandCover], ...]
    villages: tuple[_Blob, ...]


@lru_cache(maxsize=64)
def _features(spec: SampleSpec) -> _Features:
    h = 10.0 * spec.size
    rng = _SplitMix(spec.seed, 0x1A4D)
    river = (
        (0.05 * h, 0.55 * h, rng.uniform(0.0, 2.0 * math.pi)),
        (0.025 * h, 0.21 * h, rng.uniform(0.0, 2.0 * math.pi)),
        (0.01 * h, 0.083 * h, rng.uniform(0.0, 2.0 * math.pi)),
    )
    feats = _Features(river, 0.6 * h, (), ())

    def blob(u: float, v: float, a: float, b: float, angle: float, wobble: float) -> _Blob:
        return _Blob(
            u * h, v * h, a * h, b * h, angle,
            wobble, rng.uniform(0.0, 2.0 * math.pi), wobble / 2, rng.uniform(0.0, 2.0 * math.pi),
        )

    woods = (
        (blob(0.62, 0.28, 0.10, 0.055, 0.5, 0.12), LandCover.DECIDUOUS_FOREST),
        (blob(1.25, 0.80, 0.08, 0.045, -0.4, 0.12), LandCover.CONIFEROUS_FOREST),
    )
    village_u = 0.95
    village_v = (_river_centre(feats, np.asarray(village_u * h)).item() - 0.05 * h) / h
    villages = (
        blob(village_u, village_v, 0.06, 0.045, 0.2, 0.15),
        blob(1.45, 0.22, 0.022, 0.018, 0.9, 0.15),
        blob(0.45, 0.33, 0.02, 0.016, -0.6, 0.15),
    )
    return _Features(river, feats.river_v, woods, villages)


def _river_centre(f: _Features, u: np.ndarray) -> np.ndarray:
    v = np.full(np.shape(u), f.river_v)
    for amp, wavelength, phase in f.river:
        v = v + amp * np.sin(2.0 * math.pi * u / wavelength + phase)
    return v


def _river_slope(f: _Features, u: np.ndarray) -> np.ndarray:
    s = np.zeros(np.shape(u))
    for amp, wavelength, phase in f.river:
        k = 2.0 * math.pi / wavelength
        s = s + amp * k * np.cos(k * u + phase)
    return s


def _river_distance(f: _Features, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Distance from the river's centre line, to first order (vertical offset times the cosine of its slope)."""
    return np.abs(v - _river_centre(f, u)) / np.sqrt(1.0 + _river_slope(f, u) ** 2)


# ------------------------------------------------------------------------------------------------------ roads


def _node(spec: SampleSpec, i: Any, j: Any) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) of road node (i, j): the grid point ``(i B, j B)`` moved up to ``_JITTER B`` each way."""
    b = block_size(spec)
    h = _hash2(i, j, spec.seed ^ _NODE_SALT)
    ju = (_byte(h, 0) + _byte(h, 1) / 256.0) * 2.0 - 1.0
    jv = (_byte(h, 2) + _byte(h, 3) / 256.0) * 2.0 - 1.0
    return np.asarray(i) * b + _JITTER * b * ju, np.asarray(j) * b + _JITTER * b * jv


def _cross(ax: Any, ay: Any, bx: Any, by: Any, px: Any, py: Any) -> Any:
    """Cross product (B - A) x (P - A): positive when P is on the inner side of the block edge A -> B."""
    return (bx - ax) * (py - ay) - (by - ay) * (px - ax)


def _corners(spec: SampleSpec, i: Any, j: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Corners of block (i, j) in order P00, P10, P11, P01 (inside: every edge cross product >= 0)."""
    return [_node(spec, i, j), _node(spec, i + 1, j), _node(spec, i + 1, j + 1), _node(spec, i, j + 1)]


def _edge_distances(corners: list[tuple[Any, Any]], u: Any, v: Any) -> list[Any]:
    """Signed distances (positive inside) from (u, v) to the block's edges: top, right, bottom, left."""
    out = []
    for k in range(4):
        (ax, ay), (bx, by) = corners[k], corners[(k + 1) % 4]
        out.append(_cross(ax, ay, bx, by, u, v) / np.hypot(bx - ax, by - ay))
    return out


class _Lattice:
    """The road nodes around a set of points, hashed once on a small table and gathered per point (hashing 16
    nodes per point would hold 32 full-size arrays at once)."""

    def __init__(self, spec: SampleSpec, i0: np.ndarray, j0: np.ndarray) -> None:
        self.imin, self.jmin = int(i0.min()) - 1, int(j0.min()) - 1
        ii, jj = np.meshgrid(
            np.arange(self.imin, int(i0.max()) + 3), np.arange(self.jmin, int(j0.max()) + 3), indexing="ij"
        )
        self.nu, self.nv = _node(spec, ii, jj)

    def node(self, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) of nodes (i, j): the same numbers as :func:`_node` (same arithmetic, element by element)."""
        k = (i - self.imin, j - self.jmin)
        return self.nu[k], self.nv[k]

    def corners(self, i: np.ndarray, j: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """As :func:`_corners`."""
        return [self.node(i, j), self.node(i + 1, j), self.node(i + 1, j + 1), self.node(i, j + 1)]


def _locate_block(spec: SampleSpec, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, _Lattice]:
    """Index (i, j) of the block holding each point: the one of the 3 x 3 candidates around ``floor(u/B)``,
    ``floor(v/B)`` whose four edges all have the point on their inner side (the first one on a shared edge)."""
    b = block_size(spec)
    i0 = np.asarray(np.floor(u / b), dtype=np.int64)  # arrays even for 0-d input: edited in place below
    j0 = np.asarray(np.floor(v / b), dtype=np.int64)
    lattice = _Lattice(spec, i0, j0)
    bi, bj = i0.copy(), j0.copy()
    found = np.zeros(u.shape, dtype=bool)
    for di in (0, -1, 1):
        for dj in (0, -1, 1):
            c = lattice.corners(i0 + di, j0 + dj)
            inside = ~found
            for k in range(4):
                (ax, ay), (bx, by) = c[k], c[(k + 1) % 4]
                inside &= _cross(ax, ay, bx, by, u, v) >= 0
            bi[inside], bj[inside] = i0[inside] + di, j0[inside] + dj
            found |= inside
    return bi, bj, lattice


@dataclass(frozen=True)
class _BlockPlan:
    """What a block holds, from its hash: a wood, or strips of fields."""

    wood: np.ndarray  # 0: fields, else the LandCover of the wood
    axis: np.ndarray  # 0: strips cut across u (boundaries run north-south), 1: across v
    cuts: np.ndarray  # (..., 4) inner strip boundaries in (0, 1), ascending; 1.0 where unused


def _block_plan(spec: SampleSpec, bi: np.ndarray, bj: np.ndarray) -> _BlockPlan:
    h = _hash2(bi, bj, spec.seed ^ _BLOCK_SALT)
    w0 = _byte(h, 0)
    wood = np.where(
        w0 < _WOOD_BLOCKS,
        np.where(w0 < 0.6 * _WOOD_BLOCKS, LandCover.DECIDUOUS_FOREST, LandCover.CONIFEROUS_FOREST),
        0,
    ).astype(np.int8)
    axis = (_byte(h, 1) < 0.5).astype(np.int8)
    n = 2 + np.floor(_byte(h, 2) * 4).astype(np.int64)  # 2-5 strips
    weights = np.stack([0.5 + _byte(h, 3 + k) for k in range(5)], axis=-1)  # widths vary by up to 3x
    weights = np.where(np.arange(5) < n[..., None], weights, 0.0)
    cum = np.cumsum(weights, axis=-1) / np.sum(weights, axis=-1, keepdims=True)
    cuts = np.where(np.arange(4) < (n[..., None] - 1), cum[..., :4], 1.0)
    return _BlockPlan(wood, axis, cuts)


def _field_hash(spec: SampleSpec, bi: Any, bj: Any, strip: Any, half: Any) -> np.ndarray:
    block = _hash2(bi, bj, spec.seed ^ _FIELD_SALT)
    return _hash2(block.astype(np.int64), np.asarray(strip) * 4 + np.asarray(half), spec.seed ^ _FIELD_SALT)


def _split_at(h_strip: np.ndarray) -> np.ndarray:
    """Where a strip is split across (fraction along its length), or 2.0 (never) for 55 % of strips."""
    return np.where(_byte(h_strip, 0) < 0.45, 0.3 + 0.4 * _byte(h_strip, 1), 2.0)


def _field_props(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cover, calendar shift in days, NDVI offset) of fields from their hash."""
    crop = _CROP_CODES[np.searchsorted(_CROP_CUMULATIVE, _byte(h, 2) * _CROP_CUMULATIVE[-1], side="right")]
    shift = (np.floor(_byte(h, 3) * (2 * MAX_SHIFT + 1)) - MAX_SHIFT).astype(np.int8)
    offset = _FIELD_OFFSET * (2.0 * _byte(h, 4) - 1.0)
    return crop, shift, offset


# ---------------------------------------------------------------------------------------------------- surface


@dataclass(frozen=True)
class Surface:
    """The static surface at some points: what :func:`ndvi` needs for any date."""

    cover: np.ndarray
    """:class:`LandCover` index (int8)."""
    shift: np.ndarray
    """Days by which the point's calendar is late (int8, -10..+10; 0 off the fields)."""
    texture: np.ndarray
    """NDVI added to the cover's calendar: the field's offset plus the smooth texture (0 on water)."""


def surface(spec: SampleSpec, x: Any, y: Any) -> Surface:
    """The static surface of ``spec`` at UTM points ``x``, ``y`` (any broadcastable arrays)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    shape = np.broadcast_shapes(x.shape, y.shape)
    u = np.broadcast_to(x - spec.x0, shape)
    v = np.broadcast_to(spec.y0 - y, shape)
    f = _features(spec)
    bi, bj, lattice = _locate_block(spec, u, v)
    corners = lattice.corners(bi, bj)
    top, right, bottom, left = _edge_distances(corners, u, v)
    plan = _block_plan(spec, bi, bj)
    across = np.where(plan.axis == 0, left / (left + right), top / (top + bottom))
    along = np.where(plan.axis == 0, top / (top + bottom), left / (left + right))
    strip = np.sum(across[..., None] > plan.cuts, axis=-1)
    half = (along > _split_at(_field_hash(spec, bi, bj, strip, 2))).astype(np.int64)
    cover, shift, offset = _field_props(_field_hash(spec, bi, bj, strip, half))
    cover = np.where(plan.wood != 0, plan.wood, cover).astype(np.int8)
    field = plan.wood == 0  # still a field parcel (not drawn over): its shift and offset apply
    for wood, kind in f.woods:
        inside = wood.rho(u, v) < 1.0
        cover[inside] = kind
        field &= ~inside
    cells = _hash2(np.floor(u / _VILLAGE_CELL), np.floor(v / _VILLAGE_CELL), spec.seed ^ _CELL_SALT)
    garden = _byte(cells, 0)
    for village in f.villages:
        inside = village.rho(u, v) < 1.0
        cover[inside] = np.where(
            garden[inside] < 0.25,
            LandCover.GRASSLAND,
            np.where(garden[inside] < 0.37, LandCover.DECIDUOUS_FOREST, LandCover.BUILT_UP),
        )
        field &= ~inside
    dist = _river_distance(f, u, v)
    bank = _byte(_hash2(np.floor(u / _BANK_STRETCH), v > _river_centre(f, u), spec.seed ^ _BANK_SALT), 0) < 0.7
    riparian = (dist < RIVER_HALF_WIDTH + RIPARIAN_WIDTH) & bank
    cover[riparian] = LandCover.DECIDUOUS_FOREST
    road = np.minimum(np.minimum(top, bottom), np.minimum(left, right)) < ROAD_HALF_WIDTH
    cover[road] = LandCover.ROAD
    water = dist < RIVER_HALF_WIDTH
    cover[water] = LandCover.WATER
    field &= ~(riparian | road | water)
    shift = np.where(field, shift, 0).astype(np.int8)
    smooth = 0.02 * np.sin(x / 97.0) * np.cos(y / 131.0)  # periods ~600 and ~820 m: visible inside a field
    texture = np.where(water, 0.0, np.where(field, offset, 0.0) + smooth)
    return Surface(cover, shift, np.broadcast_to(texture, shape))


@lru_cache(maxsize=512)
def cover_ndvi_table(doy: int) -> np.ndarray:
    """NDVI of each cover (rows, :class:`LandCover`) for each calendar shift (columns: -MAX_SHIFT..MAX_SHIFT days)
    on day of year ``doy``, before the field offset and texture. Read-only."""
    t = doy - np.arange(-MAX_SHIFT, MAX_SHIFT + 1, dtype=np.float64)
    table = np.empty((len(LandCover), t.size))
    for cover in LandCover:
        days, values = zip(*_CALENDARS[cover], strict=True)
        table[cover] = np.interp(t, np.asarray(days, dtype=np.float64), values, period=365.0)
    table.flags.writeable = False
    return table


def ndvi(s: Surface, doy: int) -> np.ndarray:
    """Surface NDVI on day of year ``doy`` (unclipped)."""
    return cover_ndvi_table(doy)[s.cover, s.shift.astype(np.int64) + MAX_SHIFT] + s.texture


# ---------------------------------------------------------------------------------------------------- parcels


def _clip(poly: list[tuple[float, float]], a: float, b: float, c: float) -> list[tuple[float, float]]:
    """Sutherland-Hodgman: the part of convex ``poly`` where ``a u + b v + c >= 0``."""
    out: list[tuple[float, float]] = []
    for k, p in enumerate(poly):
        q = poly[(k + 1) % len(poly)]
        fp, fq = a * p[0] + b * p[1] + c, a * q[0] + b * q[1] + c
        if fp >= 0:
            out.append(p)
        if (fp >= 0) != (fq >= 0):
            t = fp / (fp - fq)
            out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return out


def _line(corners: list[tuple[float, float]], k: int) -> tuple[float, float, float]:
    """Coefficients (a, b, c) with ``a u + b v + c`` = signed distance to block edge ``k`` (positive inside)."""
    (ax, ay), (bx, by) = corners[k], corners[(k + 1) % 4]
    n = math.hypot(bx - ax, by - ay)
    return (-(by - ay) / n, (bx - ax) / n, ((by - ay) * ax - (bx - ax) * ay) / n)


def _ratio_halfplane(
    e1: tuple[float, float, float], e2: tuple[float, float, float], c: float, above: bool
) -> tuple[float, float, float]:
    """Half-plane ``d1 / (d1 + d2) >= c`` (or ``<`` when not ``above``) inside a block: linear in (u, v)."""
    coef = tuple((1.0 - c) * p - c * q for p, q in zip(e1, e2, strict=True))
    return coef if above else (-coef[0], -coef[1], -coef[2])  # type: ignore[return-value]


def parcel_polygons(
    spec: SampleSpec, bounds: tuple[float, float, float, float], margin: float = 0.5
) -> list[dict[str, Any]]:
    """The field parcels and woods of the road blocks of ``spec`` meeting ``bounds`` (UTM xmin, ymin, xmax, ymax).

    Each: ``{"id": "b<i>.<j>-<strip><a|b>", "cover": LandCover, "shift": days, "geometry": shapely Polygon in
    spec.epsg}``: the exact field (a convex polygon) minus the road band, the river with its trees, the
    villages and the woods drawn over it (each grown by ``margin`` metres, and the result shrunk by ``margin``),
    so every point inside a polygon has the parcel's cover in :func:`surface`. A parcel the overlays cut into
    pieces keeps its largest piece; pieces under 0.5 ha are left out.
    """
    b = block_size(spec)
    f = _features(spec)
    xmin, ymin, xmax, ymax = bounds
    umin, umax, vmin, vmax = xmin - spec.x0, xmax - spec.x0, spec.y0 - ymax, spec.y0 - ymin
    # overlays, in (u, v), each a polygon holding every point of the feature plus the margin
    du = 5.0
    us = np.arange(umin - 3 * b, umax + 3 * b + du, du)  # every block meeting the bounds, whole
    centre, slope = _river_centre(f, us), _river_slope(f, us)
    reach = (RIVER_HALF_WIDTH + RIPARIAN_WIDTH) * np.sqrt(1.0 + slope**2)
    # a chord of the sampled band may cut inside the curved band: a few metres more cover it
    grow = margin + 3.0
    upper = list(zip(us, centre - reach - grow, strict=True))
    lower = list(zip(us[::-1], (centre + reach + grow)[::-1], strict=True))
    overlays = [shapely.Polygon(upper + lower).buffer(0)]
    overlays += [shapely.Polygon(w.outline(grow)) for w, _ in f.woods]
    overlays += [shapely.Polygon(v.outline(grow)) for v in f.villages]
    blocked = shapely.union_all(overlays)
    out: list[dict[str, Any]] = []
    for i in range(int(math.floor(umin / b)) - 1, int(math.floor(umax / b)) + 2):
        for j in range(int(math.floor(vmin / b)) - 1, int(math.floor(vmax / b)) + 2):
            corners = [(float(p), float(q)) for p, q in _corners(spec, np.asarray(i), np.asarray(j))]
            quad = shapely.Polygon(corners)
            if not quad.intersects(shapely.box(umin, vmin, umax, vmax)):
                continue
            lines = [_line(corners, k) for k in range(4)]
            top, right, bottom, left = lines
            plan = _block_plan(spec, np.asarray(i), np.asarray(j))
            inner = corners
            for e in lines:  # off the road band
                inner = _clip(inner, e[0], e[1], e[2] - ROAD_HALF_WIDTH - margin)
            if plan.wood != 0:
                pieces = [("w", inner, LandCover(int(plan.wood)), 0)]
            else:
                e1, e2 = (left, right) if plan.axis == 0 else (top, bottom)
                a1, a2 = (top, bottom) if plan.axis == 0 else (left, right)
                cuts = [0.0] + [float(c) for c in plan.cuts if c < 1.0] + [1.0]
                pieces = []
                for k in range(len(cuts) - 1):
                    strip = _clip(inner, *_ratio_halfplane(e1, e2, cuts[k], True))
                    strip = _clip(strip, *_ratio_halfplane(e1, e2, cuts[k + 1], False))
                    split = float(_split_at(_field_hash(spec, i, j, k, 2)))
                    for half, name in ((0, "a"), (1, "b")):
                        part = strip
                        if split < 1.0:
                            part = _clip(part, *_ratio_halfplane(a1, a2, split, half == 1))
                        elif half == 1:
                            continue
                        crop, delay, _ = _field_props(_field_hash(spec, i, j, k, half))
                        pieces.append((f"{k}{name}", part, LandCover(int(crop)), int(delay)))
            for name, ring, cover, shift in pieces:
                if len(ring) < 3:
                    continue
                poly = shapely.Polygon(ring).difference(blocked).buffer(-margin, join_style="mitre")
                if poly.is_empty:
                    continue
                if isinstance(poly, shapely.MultiPolygon):
                    poly = max(poly.geoms, key=lambda g: g.area)
                if poly.area < _MIN_AREA:
                    continue
                geom = shapely.transform(poly, lambda p: np.column_stack([p[:, 0] + spec.x0, spec.y0 - p[:, 1]]))
                out.append({"id": f"b{i}.{j}-{name}", "cover": cover, "shift": shift, "geometry": geom})
    return out


def union_bounds(spec: SampleSpec) -> tuple[float, float, float, float]:
    """UTM (xmin, ymin, xmax, ymax) of the union of the spec's two granules."""
    a, b = spec.granules()
    return (a.bounds[0], min(a.bounds[1], b.bounds[1]), b.bounds[2], max(a.bounds[3], b.bounds[3]))


def parcels_geojson(spec: SampleSpec, inset: float = 0.0) -> dict[str, Any]:
    """The parcels of :func:`parcel_polygons` over the union of the granules (cut at its edges), shrunk by ``inset``
    metres, as a
    GeoJSON FeatureCollection in EPSG:4326 (properties ``id``, ``cover`` (lower-case :class:`LandCover` name),
    ``shift_days`` (the field's calendar delay), ``area_ha``); polygons emptied by the inset are left out."""
    from pyproj import Transformer

    to_ll = Transformer.from_crs(spec.epsg, 4326, always_xy=True)
    features = []
    box = shapely.box(*union_bounds(spec))
    for p in parcel_polygons(spec, union_bounds(spec)):
        geom = p["geometry"].buffer(-inset, join_style="mitre") if inset else p["geometry"]
        geom = geom.intersection(box)
        if isinstance(geom, shapely.MultiPolygon):
            geom = max(geom.geoms, key=lambda g: g.area)
        if not isinstance(geom, shapely.Polygon) or geom.area < _MIN_AREA:
            continue
        area = geom.area
        ll = shapely.transform(geom, lambda c: np.column_stack(to_ll.transform(c[:, 0], c[:, 1])))
        features.append({
            "type": "Feature",
            "properties": {"id": p["id"], "cover": p["cover"].name.lower(), "shift_days": p["shift"],
                           "area_ha": round(area / 1e4, 2)},
            "geometry": shapely.geometry.mapping(shapely.set_precision(ll, 1e-9)),
        })
    return {"type": "FeatureCollection", "features": features}
