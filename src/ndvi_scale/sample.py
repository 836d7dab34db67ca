"""A deterministic, realistic synthetic Sentinel-2 L2A catalog, with its analytic truth.

:func:`generate` writes real Cloud-Optimized GeoTIFFs (``B04.tif``, ``B08.tif``, ``SCL.tif``) and STAC items
shaped like Element84 Earth Search v1 ``sentinel-2-l2a`` items; :class:`Truth` gives, for any UTM coordinates
and date, the NDVI and scene class that the files contain, so a whole NDVI pipeline can be checked against
exact expectations. :func:`sample_catalog` builds the default sample once into a cache and returns its
``items.json``.

Scene design
------------
* **Grid.** UTM 31N (EPSG:32631) near Chartres, France. Two overlapping granules per date: A (``31UCQ``) with
  its top-left corner at ``(x0, y0)`` and B (``31UDQ``) shifted east by ``2 * round(0.4 * size)`` 10 m pixels
  (about 80 % of the granule, kept even so the 20 m grids of A and B coincide), i.e. about 20 % overlap.
  B04/B08 are 10 m (``size`` x ``size``), SCL is 20 m (``size/2`` x ``size/2``). One *global 20 m grid*
  anchored at ``(x0, y0)`` carries everything about clouds and no-data; a 10 m pixel takes the class of the
  20 m pixel that contains it.
* **Surface** (:mod:`ndvi_scale.landscape`). A farmed plain like the Beauce: a network of slightly slanted
  straight roads (a jittered grid of nodes every ``3 * field_size``) cuts it into convex blocks; each block is a
  wood or is cut into 2-5 elongated fields of varied widths and orientation (some split across), 5-60 ha at the
  default scale. Every field draws a crop (winter wheat, winter barley, rapeseed, maize, sunflower, grassland, in
  the shares of the Eure-et-Loir) with its calendar shifted by -10..+10 days and an NDVI offset of +-0.03. Over
  the fields: two woods (deciduous, coniferous), a village on the north bank of the river and two hamlets
  (built-up with gardens and trees), a meandering river 36 m wide crossing the whole sample west to east with
  riparian trees, the roads (12 m). River, woods and villages are placed relative to the granule size, so a
  tiny test granule holds the same landscape. Default shares: ~92 % fields, ~5 % woods, 2 % roads, ~0.5 % water,
  ~0.4 % built-up. NDVI follows each cover's piecewise-linear phenology of the day of year (sowing, green-up,
  peak, harvest, bare soil; deciduous leaf-out and fall), read at the field's shift, plus its offset and a small
  smooth texture (``0.02 sin(x/97) cos(y/131)``, not on water), clipped to [-0.9, 0.95]. Red and NIR are
  derived from the NDVI and a per-cover brightness ``s = red + nir``: ``red = s(1-v)/2``, ``nir = s(1+v)/2``.
  :func:`sample_catalog` publishes the fields and woods as ``parcels.geojson`` beside ``items.json``.
* **Sky.** Each date has a cloudiness kind from a fixed 7-step schedule indexed by the acquisition number
  ``ordinal // revisit_days`` (clear, scattered, overcast, few, broken, clear, mostly cloudy), so every 7
  consecutive acquisitions hold two clear dates and one nearly overcast date. The clouds themselves are
  Gaussian blobs drawn by a SplitMix64 generator seeded by ``(seed, date ordinal)``, laid over the global 20 m
  grid (the same sky over both granules): SCL 9 in blob cores, 8 on their rims, 10 in a thin-cirrus band, 3
  where the blob field shifted by the sun direction is cloudy. Cloud/cirrus/shadow pixels get reflectances
  that move NDVI far from the truth, so any leak of a masked pixel into a composite is detectable.
* **SCL errors** (``scl_errors``, on by default since sample version 2): the SCL misses what Sen2Cor misses.
  Beyond every labelled cloud rim, haze (up to 30 % cloud mixed in, fading over 60 m) labelled as the surface;
  beyond a cirrus band its fringe (40 m), beyond a shadow its penumbra (40 m); 20 % of rim and cirrus pixels
  labelled as their surface (thin cloud called vegetation or bare soil), 15 % of shadow pixels labelled dark area
  (2) and 15 % water (6); 0.1 % of pixels on every date saturated (SCL 1, both bands at reflectance 1); 3 % of the
  clean bare-soil pixels (arable fields between harvest and emergence, :meth:`Truth.bare_soil`) flagged as cloud
  (8, single 20 m pixels). :meth:`Truth.contaminated` says which
  observations are off the surface NDVI by more than :data:`CONTAMINATION_TOLERANCE`, whatever the SCL says;
  :meth:`Truth.apparent_ndvi` is what the files hold.
* **No-data.** On every second acquisition ("the other relative orbit") granule A loses a slanted strip on its
  east side, entirely inside the A/B overlap (B still sees it), and B loses its north-east corner (a real hole
  with no data from any granule). Beyond those edges every band is 0 and SCL is 0.
* **Radiometry.** ``DN = round(reflectance * 10000) + 1000`` for processing baseline >= 04.00 (dates on or
  after ``baseline_switch``), ``+ 0`` before; STAC ``raster:bands`` carry ``scale 0.0001`` and ``offset -0.1``
  or ``0``.

Everything is a pure function of ``(spec, x, y, date)``; the generator evaluates the very same functions on
the pixel-centre grids (the static land surface once per granule), so :class:`Truth` and the files agree exactly.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS

from .config import DEFAULT_MASK_CLASSES, normalise_method, parse_date
from .errors import CatalogError, InputError
from .landscape import (
    _GOLDEN,
    _M64,
    BRIGHTNESS,
    CROPS,
    LandCover,
    Surface,
    _hash2,
    _mix64,
    _SplitMix,
    parcels_geojson,
    surface,
)
from .landscape import ndvi as landscape_ndvi

__all__ = [
    "CONTAMINATION_TOLERANCE",
    "COG_MEDIA_TYPE",
    "Granule",
    "LandCover",
    "PARCELS_FILE",
    "SAMPLE_BBOX",
    "SAMPLE_END",
    "SAMPLE_START",
    "SAMPLE_VERSION",
    "SampleSpec",
    "Truth",
    "TruthAt",
    "generate",
    "generate_zones",
    "pixel_centres",
    "sample_catalog",
    "straddling_specs",
]

#: Bump whenever the generated scene changes: it names the cache folder of :func:`sample_catalog`.
SAMPLE_VERSION = 3

#: W, S, E, N (degrees) well inside the union of the two granules of the default sample (``size=1024``):
#: about 404-417 km E, 5351-5359.5 km N in UTM 31N. It spans the east of granule A, the whole A/B overlap
#: (where A's swath edge falls) and the west of B, reaching into B's north-east no-data corner (~2.6 % of the
#: box has no data on swath-edge dates), so a composite over it meets overlap, swath edges and real holes.
SAMPLE_BBOX: tuple[float, float, float, float] = (1.706, 48.307, 1.878, 48.382)

#: Name of the parcels file :func:`sample_catalog` writes beside ``items.json``.
PARCELS_FILE = "parcels.geojson"

#: Period of interest that covers every acquisition of the default sample.
SAMPLE_START = "2024-01-01"
SAMPLE_END = "2024-12-31"

#: STAC media type of a Cloud-Optimized GeoTIFF, as Earth Search writes it.
COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"

STAC_EXTENSIONS = [
    "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "https://stac-extensions.github.io/grid/v1.0.0/schema.json",
    "https://stac-extensions.github.io/mgrs/v1.0.0/schema.json",
]

# Scene classification (SCL) values used by the sample.
SCL_NODATA = 0
SCL_DEFECTIVE = 1
SCL_DARK = 2
SCL_CLOUD_SHADOW = 3
SCL_VEGETATION = 4
SCL_NOT_VEGETATED = 5
SCL_WATER = 6
SCL_CLOUD_MEDIUM = 8
SCL_CLOUD_HIGH = 9
SCL_THIN_CIRRUS = 10
#: Classes counted in ``eo:cloud_cover`` (cloud, cirrus and cloud shadow).
CLOUDY_CLASSES: tuple[int, ...] = (SCL_CLOUD_SHADOW, SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_THIN_CIRRUS)

_ACQUISITION_TIME = dt.time(10, 56, 19, tzinfo=dt.UTC)
_OFFSET_BASELINE = "04.00"  # from this processing baseline on, L2A DNs carry a +1000 offset
_DN_OFFSET = 1000
_SCALE = 0.0001


#: Surface NDVI below which an arable field is bare soil (stubble, ploughed or sown): bright enough for Sen2Cor
#: to flag some of it as cloud (the SCL's commission errors).
BARE_SOIL_NDVI = 0.25

_NDVI_MIN, _NDVI_MAX = -0.9, 0.95

# Sky model thresholds on the blob field f (a sum of Gaussians with amplitudes 1.1-2.0): f > 1.0 is a dense
# cloud core (SCL 9), 0.45 < f <= 1.0 its rim (SCL 8). Cirrus where its band profile g > 0.5.
_CLOUD_RIM, _CLOUD_CORE, _CIRRUS_LEVEL = 0.45, 1.0, 0.5
# Cloud-shadow displacement in units of the granule's 20 m size M (the whole sky scales with the granule so
# that a tiny test granule looks like the default one): the sun is to the south-south-east at 10:56 UTC, so
# shadows fall ~7 % of M north and ~2 % west of their cloud (for M=512: 720 m north, 200 m west).
_SHADOW_DU, _SHADOW_DW = -0.02, -0.07

# SCL errors (``SampleSpec.scl_errors``), after what SCL is known to miss (Baetens et al. 2019: ~84 % overall
# accuracy, errors concentrated on thin cloud and cloud edges; Skakun et al. 2022, CMIX). Distances are in 20 m
# pixels and do NOT scale with the granule (haze is physical): a tiny test granule gets the same few pixels.
#: Haze beyond a labelled cloud rim: up to 30 % cloud mixed in at the rim, fading to 0 over 3 pixels (60 m);
#: on vegetation more than 1.3 % of cloud moves NDVI by > 0.02, so nearly all of the 60 m is contaminated.
_HAZE_MAX, _HAZE_WIDTH = 0.3, 3.0
#: Blob field below which there is no haze (the first-order distance to the rim is meaningless far away).
_HAZE_FLOOR = 0.05
#: Reflectance a thin-cirrus band adds; its fringe fades to 0 over 2 pixels beyond the labelled band.
_CIRRUS_VEIL, _VEIL_WIDTH = 0.08, 2.0
#: Penumbra beyond a labelled shadow: up to half the shadow's darkening, fading over 2 pixels.
_PENUMBRA_MAX, _PENUMBRA_WIDTH = 0.5, 2.0
#: Share of cloud-rim (8) and cirrus (10) pixels labelled as their surface (vegetation / not vegetated / water).
_THIN_AS_SURFACE = 0.2
#: Shares of cloud-shadow pixels labelled dark area (2) and water (6).
_SHADOW_AS_DARK, _SHADOW_AS_WATER = 0.15, 0.15
#: Share of pixels, any date, saturated or defective (SCL 1).
_DEFECTIVE = 0.001
#: Share of clean bare-soil pixels flagged as cloud (SCL 8: commission, single 20 m pixels).
_COMMISSION = 0.03
#: An observation is contaminated when the sky moves its NDVI by more than this from the surface's.
CONTAMINATION_TOLERANCE = 0.02


@dataclass(frozen=True)
class _SkyKind:
    name: str
    blobs: int  # number of cloud blobs (holes for an overcast sky)
    sigma: tuple[float, float]  # blob standard deviation range, fraction of M
    cirrus: bool
    overcast: bool = False


# Seven kinds. Blob counts and sizes were tuned by measuring the cover of the union of both granules over the
# default year: clear 0 %, few 0.3-4 %, scattered 12-23 %, broken 26-48 %, mostly 62-87 %, overcast 98-99.6 %
# (the same at size 128, since the sky scales with the granule). Two clear kinds keep monthly composites full.
_SKY_SCHEDULE: tuple[_SkyKind, ...] = (
    _SkyKind("clear", 0, (0.0, 0.0), False),
    _SkyKind("scattered", 6, (0.05, 0.09), True),
    _SkyKind("overcast", 4, (0.05, 0.09), False, overcast=True),
    _SkyKind("few", 3, (0.03, 0.06), False),
    _SkyKind("broken", 12, (0.07, 0.12), True),
    _SkyKind("clear", 0, (0.0, 0.0), False),
    _SkyKind("mostly", 22, (0.09, 0.15), False),
)


# ------------------------------------------------------------------------------------------------------ grids


@dataclass(frozen=True)
class Granule:
    """One synthetic MGRS granule: a square of ``size`` 10 m pixels (``size/2`` 20 m pixels)."""

    name: str
    """MGRS tile name, e.g. ``31UCQ``."""
    index: int
    """0 for granule A, 1 for granule B (mosaic order)."""
    x0: float
    """UTM easting of the top-left corner (metres)."""
    y0: float
    """UTM northing of the top-left corner (metres)."""
    size: int
    """Width and height in 10 m pixels."""
    epsg: int
    """EPSG code of the UTM zone."""
    col20: int
    """Column of this granule's first 20 m pixel in the global 20 m grid anchored at the spec's origin."""

    @property
    def shape10(self) -> tuple[int, int]:
        """(rows, cols) of the 10 m bands."""
        return (self.size, self.size)

    @property
    def shape20(self) -> tuple[int, int]:
        """(rows, cols) of the 20 m SCL."""
        return (self.size // 2, self.size // 2)

    @property
    def transform10(self) -> Affine:
        """Geotransform of the 10 m bands."""
        return Affine(10.0, 0.0, self.x0, 0.0, -10.0, self.y0)

    @property
    def transform20(self) -> Affine:
        """Geotransform of the 20 m SCL."""
        return Affine(20.0, 0.0, self.x0, 0.0, -20.0, self.y0)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) in UTM metres."""
        return (self.x0, self.y0 - 10.0 * self.size, self.x0 + 10.0 * self.size, self.y0)

    @property
    def utm_zone(self) -> int:
        return int(self.name[:2])

    @property
    def latitude_band(self) -> str:
        return self.name[2]

    @property
    def grid_square(self) -> str:
        return self.name[3:]

    def centres(self, resolution: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates ``(x (1, W), y (H, 1))`` of the 10 m or 20 m grid, for :class:`Truth`."""
        if resolution == 10:
            return pixel_centres(self.transform10, self.shape10)
        if resolution == 20:
            return pixel_centres(self.transform20, self.shape20)
        raise InputError(f"resolution {resolution!r} is not a granule grid; expected 10 or 20")


def pixel_centres(transform: Affine, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of a north-up grid, as broadcastable ``x`` (shape (1, W)) and ``y`` (H, 1).

    Pass them straight to :class:`Truth` functions to get (H, W) arrays for that grid.
    """
    if transform.b != 0 or transform.d != 0:
        raise InputError(f"transform {tuple(transform)[:6]} is rotated; expected a north-up grid (b = d = 0)")
    h, w = shape
    x = transform.c + transform.a * (np.arange(w, dtype=np.float64) + 0.5)
    y = transform.f + transform.e * (np.arange(h, dtype=np.float64) + 0.5)
    return x[np.newaxis, :], y[:, np.newaxis]


When = dt.date | dt.datetime | str | np.datetime64


def _as_date(when: When) -> dt.date:
    """The UTC calendar date of a date, datetime (naive = UTC), ISO string or numpy datetime64."""
    if isinstance(when, np.datetime64):
        return dt.date.fromisoformat(str(when.astype("datetime64[D]")))
    if isinstance(when, str) and "T" in when:
        try:
            when = dt.datetime.fromisoformat(when.strip().replace("Z", "+00:00"))
        except ValueError:
            raise InputError(f"date {when!r} is not an ISO date or datetime, e.g. 2024-01-31") from None
    if isinstance(when, dt.datetime) and when.tzinfo is not None:
        return when.astimezone(dt.UTC).date()
    return parse_date(when, name="date")


# ------------------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class SampleSpec:
    """Every parameter of the synthetic scene. Equal specs generate byte-identical catalogs."""

    size: int = 1024
    """Granule width and height in 10 m pixels; even (the SCL is ``size/2``), ideally a multiple of 16."""
    blocksize: int = 512
    """Internal COG tile size (pixels), a multiple of 16. 512 rather than Earth Search's 1024 because a
    1024-px granule written as one 1024-px tile is rejected by ``rio_cogeo.cogeo.cog_validate`` (single
    full-width block above 512 px); pass 1024 with ``size >= 2048`` to mimic Earth Search's tiling exactly."""
    start: dt.date = dt.date(2024, 1, 2)
    """First acquisition date (also accepts ``YYYY-MM-DD``)."""
    end: dt.date = dt.date(2024, 12, 31)
    """Last possible acquisition date, inclusive."""
    revisit_days: int = 5
    """Days between acquisitions (Sentinel-2A + 2B revisit)."""
    baseline_switch: dt.date = dt.date(2024, 5, 1)
    """Dates before it get processing baseline 03.01 (no DN offset), dates on or after it 05.10 (+1000)."""
    field_size: float = 400.0
    """Scale of the field pattern in metres: the road network's blocks are about ``3 * field_size`` across, each
    a wood or cut into 2-5 strips of fields (:mod:`ndvi_scale.landscape`); 400 m gives Beauce-like fields of
    5-60 ha. The river, villages and woods scale with ``size`` instead."""
    seed: int = 42
    """Seed of the landscape (roads, fields, crops, river meanders) and of the clouds."""
    epsg: int = 32631
    """EPSG code of the UTM zone of both granules."""
    x0: float = 399960.0
    """UTM easting of granule A's top-left corner (a multiple of 20 m)."""
    y0: float = 5360040.0
    """UTM northing of granule A's top-left corner (a multiple of 20 m)."""
    tiles: tuple[str, str] = field(default=("31UCQ", "31UDQ"))
    """MGRS names of granules A and B (synthetic: they only need a zone, a band letter and a square)."""
    scl_errors: bool = True
    """Give the SCL the errors real Sen2Cor makes (haze and cirrus fringes beyond the labelled edges, penumbrae,
    a share of thin cloud labelled as the surface, shadows labelled dark area or water, defective pixels, bright
    soil flagged as cloud), with their truth (:meth:`Truth.contaminated`). False: every cloud, cirrus and shadow
    pixel labelled exactly, nothing else touched (the sample of version 1)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", parse_date(self.start, name="start"))
        object.__setattr__(self, "end", parse_date(self.end, name="end"))
        object.__setattr__(self, "baseline_switch", parse_date(self.baseline_switch, name="baseline_switch"))
        if not isinstance(self.size, int) or self.size < 32 or self.size % 2:
            raise InputError(
                f"size {self.size!r} is invalid; expected an even number of pixels >= 32, e.g. 1024"
            )
        if not isinstance(self.blocksize, int) or self.blocksize < 16 or self.blocksize % 16:
            raise InputError(f"blocksize {self.blocksize!r} is invalid; expected a multiple of 16, e.g. 512")
        if self.start > self.end:
            raise InputError(f"start {self.start} is after end {self.end}; give start <= end")
        if not isinstance(self.revisit_days, int) or self.revisit_days < 1:
            raise InputError(
                f"revisit_days {self.revisit_days!r} is invalid; expected a positive integer, e.g. 5"
            )
        if not self.field_size > 0:
            raise InputError(f"field_size {self.field_size!r} is invalid; expected metres > 0, e.g. 640")
        if self.x0 % 20 or self.y0 % 20:
            raise InputError(f"origin ({self.x0}, {self.y0}) is invalid; expected multiples of 20 m")
        for t in self.tiles:
            if len(t) != 5 or not t[:2].isdigit() or not t[2:].isalpha():
                raise InputError(f"tile {t!r} is not an MGRS tile name; expected e.g. 31UCQ")

    # -- geometry --------------------------------------------------------------------------------------------

    @property
    def size20(self) -> int:
        """Granule width in 20 m pixels (M)."""
        return self.size // 2

    @property
    def shift(self) -> int:
        """East offset of granule B in 10 m pixels: ~80 % of the granule, even so the 20 m grids align."""
        return 2 * round(0.4 * self.size)

    def granules(self) -> list[Granule]:
        """Granules A and B (mosaic order)."""
        return list(self._granules)

    @cached_property
    def _granules(self) -> tuple[Granule, Granule]:
        a = Granule(self.tiles[0], 0, float(self.x0), float(self.y0), self.size, self.epsg, 0)
        b = Granule(
            self.tiles[1],
            1,
            float(self.x0 + 10 * self.shift),
            float(self.y0),
            self.size,
            self.epsg,
            self.shift // 2,
        )
        return (a, b)

    def granule(self, which: Granule | str | int) -> Granule:
        """Look a granule up by object, MGRS name or index."""
        for g in self._granules:
            if which == g or which == g.name or which == g.index:
                return g
        raise InputError(
            f"granule {which!r} is unknown; expected one of {[g.name for g in self._granules]} or 0/1"
        )

    def bbox_lonlat(self) -> tuple[float, float, float, float]:
        """W, S, E, N (degrees) of the union of the two granules."""
        a, b = self._granules
        return _bbox_lonlat(self.epsg, (a.bounds[0], a.bounds[1], b.bounds[2], b.bounds[3]))

    # -- time ------------------------------------------------------------------------------------------------

    def dates(self) -> list[dt.datetime]:
        """Acquisition datetimes (UTC, tz-aware), every ``revisit_days`` from ``start`` up to ``end``."""
        n = (self.end - self.start).days // self.revisit_days + 1
        return [
            dt.datetime.combine(self.start + dt.timedelta(days=k * self.revisit_days), _ACQUISITION_TIME)
            for k in range(n)
        ]

    def baseline(self, when: When) -> str:
        """Processing baseline on that date: ``03.01`` before ``baseline_switch``, else ``05.10``."""
        return "03.01" if _as_date(when) < self.baseline_switch else "05.10"

    def dn_offset(self, when: When) -> int:
        """DN offset of that date: 1000 from processing baseline 04.00 on, else 0."""
        return _DN_OFFSET if self.baseline(when) >= _OFFSET_BASELINE else 0

    def acquisition_number(self, when: When) -> int:
        """``date ordinal // revisit_days``: +1 per acquisition; drives platform, orbit and sky kind."""
        return _as_date(when).toordinal() // self.revisit_days

    def platform(self, when: When) -> str:
        """``sentinel-2a`` or ``sentinel-2b`` (they alternate)."""
        return "sentinel-2b" if self.acquisition_number(when) % 2 else "sentinel-2a"

    def has_swath_edge(self, when: When) -> bool:
        """True on the dates seen from "the other relative orbit", where both granules have a no-data edge."""
        return self.acquisition_number(when) % 2 == 0

    def relative_orbit(self, when: When) -> int:
        return 94 if self.has_swath_edge(when) else 51

    def sky_kind(self, when: When) -> str:
        """Name of the cloudiness kind of that date (``clear``, ``few``, ..., ``overcast``)."""
        return _SKY_SCHEDULE[self.acquisition_number(when) % len(_SKY_SCHEDULE)].name

    def item_id(self, when: When, granule: Granule | str | int) -> str:
        """Earth Search v1 item id, e.g. ``S2B_31UCQ_20240102_0_L2A``."""
        d = _as_date(when)
        sat = "S2B" if self.platform(d) == "sentinel-2b" else "S2A"
        return f"{sat}_{self.granule(granule).name}_{d:%Y%m%d}_0_L2A"

    def fingerprint(self) -> str:
        """Short stable digest of all parameters (names cache folders of non-default specs)."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


def _bbox_lonlat(epsg: int, bounds: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    xmin, ymin, xmax, ymax = bounds
    t = np.linspace(0.0, 1.0, 21)
    xs = np.concatenate(
        [xmin + (xmax - xmin) * t, np.full(21, xmax), xmax - (xmax - xmin) * t, np.full(21, xmin)]
    )
    ys = np.concatenate(
        [np.full(21, ymin), ymin + (ymax - ymin) * t, np.full(21, ymax), ymax - (ymax - ymin) * t]
    )
    lon, lat = _to_lonlat(epsg).transform(xs, ys)
    return (float(np.min(lon)), float(np.min(lat)), float(np.max(lon)), float(np.max(lat)))


def _to_lonlat(epsg: int) -> Transformer:
    # not cached: a pyproj Transformer must not be shared between threads
    return Transformer.from_crs(epsg, 4326, always_xy=True)


# ---------------------------------------------------------------------------------------------------- hashing

# ---------------------------------------------------------------------------------------------------- surface


def _surface(spec: SampleSpec, x: Any, y: Any) -> Surface:
    return surface(spec, np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))


#: Rows of a granule's grid per call of the landscape: bounds its temporaries (~30 float64 arrays of the block)
#: to ~0.5 GB for a full-size 10980-px granule instead of ~30 GB at once.
_SURFACE_ROWS = 256


def _surface_rows(spec: SampleSpec, x: np.ndarray, y: np.ndarray) -> Surface:
    """:func:`_surface` of a grid (``x`` (1, W), ``y`` (H, 1)), block of rows by block of rows: the same numbers
    (every point is computed on its own)."""
    parts = [_surface(spec, x, y[k : k + _SURFACE_ROWS]) for k in range(0, y.shape[0], _SURFACE_ROWS)]
    return Surface(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Surface)))


def _ndvi(surf: Surface, d: dt.date) -> np.ndarray:
    return np.clip(landscape_ndvi(surf, d.timetuple().tm_yday), _NDVI_MIN, _NDVI_MAX)


# -------------------------------------------------------------------------------------------------------- sky


@dataclass(frozen=True)
class _Sky:
    kind: _SkyKind
    base: float  # constant added to the blob field (overcast: a uniform deck with holes)
    blobs: tuple[tuple[float, float, float, float], ...]  # (u, w, sigma, amplitude) in 20 m pixels
    cirrus: tuple[float, float, float, float, float] | None  # (u, w, cos, sin, sigma)


@lru_cache(maxsize=512)
def _sky(spec: SampleSpec, ordinal: int) -> _Sky:
    kind = _SKY_SCHEDULE[(ordinal // spec.revisit_days) % len(_SKY_SCHEDULE)]
    rng = _SplitMix(spec.seed, ordinal)
    m = float(spec.size20)
    width = spec.shift / 2 + m  # the union of both granules on the 20 m grid
    margin = 0.15 * m  # clouds just outside still cast shadows and rims inside
    blobs = []
    for _ in range(kind.blobs):
        u = rng.uniform(-margin, width + margin)
        w = rng.uniform(-margin, m + margin)
        sigma = rng.uniform(*kind.sigma) * m
        amp = rng.uniform(1.1, 2.0)
        blobs.append((u, w, sigma, -1.8 if kind.overcast else amp))
    cirrus = None
    if kind.cirrus:
        angle = rng.uniform(0.2, 1.3)  # radians from east: a band crossing the scene diagonally
        cirrus = (
            rng.uniform(0.2, 0.8) * width,
            rng.uniform(0.2, 0.8) * m,
            math.cos(angle),
            math.sin(angle),
            rng.uniform(0.03, 0.05) * m,
        )
    return _Sky(kind, 1.6 if kind.overcast else 0.0, tuple(blobs), cirrus)


def _blob_field(sky: _Sky, u: np.ndarray, w: np.ndarray) -> np.ndarray:
    f = np.full(np.broadcast_shapes(np.shape(u), np.shape(w)), sky.base)
    for bu, bw, sigma, amp in sky.blobs:
        # separable Gaussian: cheap on broadcast (1, W) x (H, 1) grids, same arithmetic for any input shape
        f += (amp * np.exp(-0.5 * ((u - bu) / sigma) ** 2)) * np.exp(-0.5 * ((w - bw) / sigma) ** 2)
    return f


def _rim_distance(sky: _Sky, u: np.ndarray, w: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Distance (20 m pixels) from each point outside the blob field's rim (f <= rim) to the rim, to first order:
    ``(rim - f) / |grad f|``. Inside the rim: 0. Where the field is flat (far from every blob): inf."""
    shape = np.shape(f)
    gu = np.zeros(shape)
    gw = np.zeros(shape)
    for bu, bw, sigma, amp in sky.blobs:
        eu = amp * np.exp(-0.5 * ((u - bu) / sigma) ** 2)
        ew = np.exp(-0.5 * ((w - bw) / sigma) ** 2)
        gu += (eu * ((bu - u) / sigma**2)) * ew
        gw += eu * (ew * ((bw - w) / sigma**2))
    grad = np.hypot(gu, gw)
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = np.where(grad > 1e-12, (_CLOUD_RIM - f) / grad, np.inf)
    return np.where(f > _CLOUD_RIM, 0.0, dist)


@dataclass(frozen=True)
class _SkyState:
    """The sky over points of the global 20 m grid on one date: what is really there, and what SCL says."""

    sky: np.ndarray
    """True sky class (uint8): 0 clear, 3 cloud shadow, 8 cloud rim, 9 cloud core, 10 thin cirrus."""
    label: np.ndarray
    """What the SCL says of the sky (uint8): 0 = the surface class, else the class written (1, 2, 3, 6, 8, 9, 10)."""
    haze: np.ndarray
    """Fraction (0-:data:`_HAZE_MAX`) of cloud mixed into the surface reflectance beyond the labelled rims."""
    veil: np.ndarray
    """Reflectance added to both bands by the fringe of a thin-cirrus band beyond its labelled edge."""
    penumbra: np.ndarray
    """Partial shadow (0-:data:`_PENUMBRA_MAX`) beyond the shadow's labelled edge."""
    defective: np.ndarray
    """True where the detector saturated (SCL 1, both bands read as reflectance 1.0)."""


def _uniform(spec: SampleSpec, col: np.ndarray, row: np.ndarray, ordinal: int) -> np.ndarray:
    """A uniform [0, 1) draw per 20 m pixel and date: which pixel gets which SCL error (pure, platform-stable)."""
    salt = _mix64(((spec.seed & _M64) * _GOLDEN + ordinal * 0xD1B54A32D192ED03 + 0x5CE1) & _M64)
    h = _hash2(np.asarray(col), np.asarray(row), salt)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _sky_state(spec: SampleSpec, col: np.ndarray, row: np.ndarray, d: dt.date) -> _SkyState:
    """The sky (true classes, SCL labels and the contamination SCL misses) at global 20 m indices on date ``d``."""
    sky = _sky(spec, d.toordinal())
    shape = np.broadcast_shapes(np.shape(col), np.shape(row))
    out = np.zeros(shape, dtype=np.uint8)
    zero = np.zeros(shape)
    haze, veil, penumbra = zero, zero, zero
    if sky.blobs or sky.cirrus is not None or sky.base != 0.0:
        u = col + 0.5  # 20 m pixel centres, in 20 m pixel units
        w = row + 0.5
        f = _blob_field(sky, u, w)
        m = spec.size20
        us, ws = u - _SHADOW_DU * m, w - _SHADOW_DW * m
        fs = _blob_field(sky, us, ws)
        shadow = fs > _CLOUD_RIM
        cloudy = f > _CLOUD_RIM
        if sky.cirrus is not None:
            cu, cw, cos, sin, sigma = sky.cirrus
            dist = (u - cu) * sin - (w - cw) * cos  # distance to the band's centre line
            cirrus = (np.exp(-0.5 * (dist / sigma) ** 2) > _CIRRUS_LEVEL) & ~cloudy
            out[np.broadcast_to(cirrus, shape)] = SCL_THIN_CIRRUS
            beyond = np.abs(dist) - sigma * math.sqrt(2.0 * math.log(1.0 / _CIRRUS_LEVEL))  # past the edge
            if spec.scl_errors:
                veil = np.broadcast_to(_CIRRUS_VEIL * np.clip(1.0 - beyond / _VEIL_WIDTH, 0.0, 1.0), shape)
        else:
            cirrus = np.zeros(shape, dtype=bool)
        out[np.broadcast_to(shadow & ~cloudy & ~cirrus, shape)] = SCL_CLOUD_SHADOW
        out[np.broadcast_to(cloudy, shape)] = SCL_CLOUD_MEDIUM
        out[np.broadcast_to(f > _CLOUD_CORE, shape)] = SCL_CLOUD_HIGH
        if spec.scl_errors:
            clear = out == 0
            near = clear & (f > _HAZE_FLOOR)  # the first-order distance is only meaningful near a blob
            if near.any():
                d_rim = np.where(near, _rim_distance(sky, u, w, np.broadcast_to(f, shape)), np.inf)
                haze = np.where(near, _HAZE_MAX * np.clip(1.0 - d_rim / _HAZE_WIDTH, 0.0, 1.0), 0.0)
            near_s = clear & (fs > _HAZE_FLOOR)
            if near_s.any():
                d_sh = np.where(near_s, _rim_distance(sky, us, ws, np.broadcast_to(fs, shape)), np.inf)
                penumbra = np.where(near_s, _PENUMBRA_MAX * np.clip(1.0 - d_sh / _PENUMBRA_WIDTH, 0.0, 1.0), 0.0)
            veil = np.where(clear, veil, 0.0)
    label = out.copy()
    defective = np.zeros(shape, dtype=bool)
    if spec.scl_errors:
        draw = np.broadcast_to(_uniform(spec, col, row, d.toordinal()), shape)
        thin = (out == SCL_CLOUD_MEDIUM) | (out == SCL_THIN_CIRRUS)
        label[thin & (draw < _THIN_AS_SURFACE)] = 0
        in_shadow = out == SCL_CLOUD_SHADOW
        label[in_shadow & (draw < _SHADOW_AS_DARK)] = SCL_DARK
        label[in_shadow & (draw >= _SHADOW_AS_DARK) & (draw < _SHADOW_AS_DARK + _SHADOW_AS_WATER)] = SCL_WATER
        defective = draw >= 1.0 - _DEFECTIVE
        label[defective] = SCL_DEFECTIVE
    return _SkyState(out, label, haze, veil, penumbra, defective)


def _upsampled(state: _SkyState, shape20: tuple[int, int]) -> _SkyState:
    """``state`` of a 20 m grid repeated onto its 10 m grid (each 20 m pixel -> 2 x 2)."""

    def up(a: np.ndarray) -> np.ndarray:
        if not np.any(a):  # most fields are empty on most dates: a 0-d zero broadcasts like the full array
            return np.zeros((), dtype=a.dtype)
        return np.repeat(np.repeat(np.broadcast_to(a, shape20), 2, axis=0), 2, axis=1)

    return _SkyState(*(up(getattr(state, f.name)) for f in fields(_SkyState)))


def _outside(spec: SampleSpec, g: Granule, col: np.ndarray, row: np.ndarray, d: dt.date) -> np.ndarray:
    """True where granule ``g`` has no data (outside its footprint, or beyond its swath edge on that date)."""
    c = col - g.col20  # granule-local 20 m indices
    m = spec.size20
    out = (c < 0) | (c >= m) | (row < 0) | (row >= m)
    if spec.has_swath_edge(d):
        if g.index == 0:
            # slanted edge on the east side: at the bottom row it reaches col 0.85 M, inside the overlap
            # (which starts at ~0.8 M), so granule B still sees every pixel A loses
            out = out | (c + 0.15 * row >= m)
        else:
            # north-east corner cut: 0.4 M wide on the top row, closing at half height
            out = out | (c >= 0.6 * m + 0.8 * row)
    return out


def _global20(spec: SampleSpec, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    col = np.floor((np.asarray(x, dtype=np.float64) - spec.x0) / 20.0).astype(np.int64)
    row = np.floor((spec.y0 - np.asarray(y, dtype=np.float64)) / 20.0).astype(np.int64)
    return col, row


def _centres20(spec: SampleSpec, col: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UTM centres of global 20 m pixels."""
    return spec.x0 + 20.0 * (np.asarray(col) + 0.5), spec.y0 - 20.0 * (np.asarray(row) + 0.5)


def _bare_soil(surf: Surface, v: np.ndarray) -> np.ndarray:
    return np.isin(surf.cover, CROPS) & (v < BARE_SOIL_NDVI)


def _scl(
    spec: SampleSpec,
    g: Granule,
    col: np.ndarray,
    row: np.ndarray,
    d: dt.date,
    state: _SkyState | None = None,
    surf: Surface | None = None,
) -> np.ndarray:
    """Granule ``g``'s SCL at global 20 m indices (``state``: their :func:`_sky_state`, ``surf``: the surface at
    their centres, if already known)."""
    # surface class from the truth at the 20 m pixel centre
    surf = surf if surf is not None else _surface(spec, *_centres20(spec, col, row))
    cover = surf.cover
    v = _ndvi(surf, d)
    surface_class = np.where(
        cover == LandCover.WATER, SCL_WATER, np.where(v > 0.4, SCL_VEGETATION, SCL_NOT_VEGETATED)
    )
    state = state if state is not None else _sky_state(spec, col, row, d)
    scl = np.where(state.label != 0, state.label, surface_class).astype(np.uint8)
    if spec.scl_errors:
        # commission: bright bare soil flagged as cloud, single pixels, on a surface that is really clean
        draw = _uniform(spec, col, row, d.toordinal())
        quiet = (state.label == 0) & (state.haze == 0) & (state.veil == 0) & (state.penumbra == 0)
        false_cloud = quiet & _bare_soil(surf, v) & (draw >= 0.5) & (draw < 0.5 + _COMMISSION)
        scl = np.where(false_cloud, np.uint8(SCL_CLOUD_MEDIUM), scl)
    return np.where(_outside(spec, g, col, row, d), np.uint8(SCL_NODATA), scl)


def _reflectance(
    spec: SampleSpec,
    x: np.ndarray,
    y: np.ndarray,
    surf: Surface,
    state: _SkyState,
    d: dt.date,
) -> tuple[np.ndarray, np.ndarray]:
    """Red and NIR reflectance (float64, before DN rounding) of the pixels at (x, y) under the sky ``state`` (its
    arrays broadcastable to the points): the surface, changed by what is really between it and the sensor."""
    v = _ndvi(surf, d)
    s = BRIGHTNESS[surf.cover]
    red = np.asarray(s * (1.0 - v) / 2.0)  # fresh arrays (0-d for scalar input): safe to edit in place
    nir = np.asarray(s * (1.0 + v) / 2.0)
    shape = red.shape
    sky = np.broadcast_to(state.sky, shape)

    def cloud_red() -> np.ndarray:
        # clouds: bright and flat (red 0.36-0.44, nir +0.03), NDVI ~0.04 whatever is below
        return np.broadcast_to(0.40 + 0.04 * np.sin(np.asarray(x) / 53.0) * np.cos(np.asarray(y) / 71.0), shape)

    # masked pixels are rewritten in place (they are few on most dates, so this is much cheaper than np.where)
    cloud = (sky == SCL_CLOUD_MEDIUM) | (sky == SCL_CLOUD_HIGH)
    if cloud.any():
        c = cloud_red()[cloud]
        red[cloud] = c
        nir[cloud] = c + 0.03
    cirrus = sky == SCL_THIN_CIRRUS
    if cirrus.any():  # a thin veil adds the same path radiance to both bands
        red[cirrus] += _CIRRUS_VEIL
        nir[cirrus] += _CIRRUS_VEIL
    shadow = sky == SCL_CLOUD_SHADOW
    if shadow.any():  # diffuse light only: NIR is darkened more than red
        red[shadow] *= 0.5
        nir[shadow] *= 0.25
    haze = np.broadcast_to(state.haze, shape)
    hazy = haze > 0
    if hazy.any():  # beyond the labelled rim: a fraction t of cloud mixed into the surface
        t = haze[hazy]
        c = cloud_red()[hazy]
        red[hazy] = (1.0 - t) * red[hazy] + t * c
        nir[hazy] = (1.0 - t) * nir[hazy] + t * (c + 0.03)
    veil = np.broadcast_to(state.veil, shape)
    veiled = veil > 0
    if veiled.any():  # the fringe of a cirrus band, fainter with the distance from its labelled edge
        red[veiled] += veil[veiled]
        nir[veiled] += veil[veiled]
    pen = np.broadcast_to(state.penumbra, shape)
    dim = pen > 0
    if dim.any():  # penumbra: part of the shadow's darkening
        red[dim] *= 1.0 - 0.5 * pen[dim]
        nir[dim] *= 1.0 - 0.75 * pen[dim]
    bad = np.broadcast_to(state.defective, shape)
    if bad.any():  # saturated detector: both bands at full scale
        red[bad] = 1.0
        nir[bad] = 1.0
    return red, nir


def _dn(
    spec: SampleSpec,
    x: np.ndarray,
    y: np.ndarray,
    surf: Surface,
    state: _SkyState,
    nodata: np.ndarray,
    d: dt.date,
) -> tuple[np.ndarray, np.ndarray]:
    """Red and NIR DNs (uint16, 0 where ``nodata``) of the pixels at (x, y) under the sky ``state``."""
    red, nir = _reflectance(spec, x, y, surf, state, d)
    offset = spec.dn_offset(d)
    nodata = np.broadcast_to(nodata, red.shape)

    def to_dn(r: np.ndarray) -> np.ndarray:
        r /= _SCALE
        np.rint(r, out=r)
        r += offset
        np.clip(r, 1, 65535, out=r)
        dn = r.astype(np.uint16)
        dn[nodata] = 0
        return dn

    return to_dn(red), to_dn(nir)


# ------------------------------------------------------------------------------------------------------ truth


GranuleRef = Granule | str | int
GranuleSelection = GranuleRef | Sequence[GranuleRef] | None


def _selection(spec: SampleSpec, granule: GranuleSelection) -> tuple[Granule, ...]:
    if granule is None:
        return tuple(spec.granules())
    if isinstance(granule, Granule | str | int):
        return (spec.granule(granule),)
    return tuple(spec.granule(g) for g in granule)


def _observations(
    spec: SampleSpec, dates: Iterable[When | pystac.Item | Mapping[str, Any]]
) -> dict[dt.date, tuple[Granule, ...]]:
    """Date -> granules observed that date (in mosaic order), from dates or STAC items."""
    seen: dict[dt.date, set[int]] = {}
    for obs in dates:
        if isinstance(obs, pystac.Item | Mapping):
            item_id, props = (
                (obs.id, obs.properties) if isinstance(obs, pystac.Item) else (obs["id"], obs["properties"])
            )
            name = str(props.get("grid:code", ""))[len("MGRS-") :] or str(item_id).split("_")[1]
            seen.setdefault(_as_date(props["datetime"]), set()).add(spec.granule(name).index)
        else:
            seen.setdefault(_as_date(obs), set()).update(g.index for g in spec.granules())
    granules = spec.granules()
    return {d: tuple(granules[i] for i in sorted(ix)) for d, ix in sorted(seen.items())}


class TruthAt:
    """:class:`Truth` at fixed points, for many dates: the static land surface is computed once (the landscape
    costs far more than one date's sky). Build it with :meth:`Truth.at`; its methods answer like :class:`Truth`'s
    (same arguments without ``spec``, ``x``, ``y``) and give identical arrays."""

    def __init__(self, spec: SampleSpec, x: Any, y: Any) -> None:
        self.spec = spec
        self.x = np.asarray(x, dtype=np.float64)
        self.y = np.asarray(y, dtype=np.float64)
        self.col, self.row = _global20(spec, self.x, self.y)

    @cached_property
    def surface(self) -> Surface:
        """The surface at the points."""
        return _surface(self.spec, self.x, self.y)

    @cached_property
    def surface20(self) -> Surface:
        """The surface at the centres of the 20 m SCL pixels holding the points (what the SCL classifies)."""
        return _surface(self.spec, *_centres20(self.spec, self.col, self.row))

    def _scl(self, d: dt.date, granules: Sequence[Granule], state: _SkyState) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(self.col.shape, self.row.shape), dtype=np.uint8)
        for g in granules:
            out = np.where(out == SCL_NODATA, _scl(self.spec, g, self.col, self.row, d, state, self.surface20), out)
        return out

    def _observe(self, d: dt.date, granules: Sequence[Granule]) -> tuple[np.ndarray, np.ndarray]:
        """(mosaic SCL, apparent NDVI with NaN where no granule has data) on date ``d``."""
        state = _sky_state(self.spec, self.col, self.row, d)
        scl = self._scl(d, granules, state)
        red, nir = _reflectance(self.spec, self.x, self.y, self.surface, state, d)
        v = (nir - red) / (nir + red)
        return scl, np.where(scl == SCL_NODATA, np.nan, v)

    def ndvi(self, when: When) -> np.ndarray:
        """As :meth:`Truth.ndvi`."""
        return _ndvi(self.surface, _as_date(when))

    def scl(self, when: When, granule: GranuleSelection = None) -> np.ndarray:
        """As :meth:`Truth.scl`."""
        d = _as_date(when)
        return self._scl(d, _selection(self.spec, granule), _sky_state(self.spec, self.col, self.row, d))

    def apparent_ndvi(self, when: When, granule: GranuleSelection = None) -> np.ndarray:
        """As :meth:`Truth.apparent_ndvi`."""
        return self._observe(_as_date(when), _selection(self.spec, granule))[1]

    def contaminated(self, when: When, granule: GranuleSelection = None) -> np.ndarray:
        """As :meth:`Truth.contaminated`."""
        with np.errstate(invalid="ignore"):
            return np.abs(self.apparent_ndvi(when, granule) - self.ndvi(when)) > CONTAMINATION_TOLERANCE


class Truth:
    """The analytic truth of a :class:`SampleSpec` scene, at any UTM coordinates (in ``spec.epsg``).

    ``x`` and ``y`` are pixel-centre coordinates in metres, any broadcastable arrays; :func:`pixel_centres`
    builds them for a north-up grid. ``when`` is a date, datetime, ``YYYY-MM-DD``/ISO string or
    ``numpy.datetime64``; only its calendar (UTC) date matters. Dates off the acquisition schedule still get a
    well-defined sky.
    """

    @staticmethod
    def at(spec: SampleSpec, x: Any, y: Any) -> TruthAt:
        """The truth at these points for many dates (:class:`TruthAt`): the land surface computed once."""
        return TruthAt(spec, x, y)

    @staticmethod
    def land_cover(spec: SampleSpec, x: Any, y: Any) -> np.ndarray:
        """:class:`LandCover` index (int8) at each point (:mod:`ndvi_scale.landscape`)."""
        return _surface(spec, x, y).cover

    @staticmethod
    def ndvi(spec: SampleSpec, x: Any, y: Any, when: When) -> np.ndarray:
        """True surface NDVI (float64) at each point: what a perfect, cloud-free observation would give."""
        return TruthAt(spec, x, y).ndvi(when)

    @staticmethod
    def bare_soil(spec: SampleSpec, x: Any, y: Any, when: When) -> np.ndarray:
        """True where the point is an arable field on bare soil that date (a crop's NDVI below
        :data:`BARE_SOIL_NDVI`: stubble, ploughed or sown), the only surface the SCL wrongly flags as cloud (8).
        The SCL decides per 20 m pixel: pass 20 m pixel centres to know which SCL pixels may be flagged."""
        surf = _surface(spec, x, y)
        return _bare_soil(surf, _ndvi(surf, _as_date(when)))

    @staticmethod
    def scl(spec: SampleSpec, x: Any, y: Any, when: When, granule: GranuleSelection = None) -> np.ndarray:
        """Scene class (uint8) at each point on that date.

        With one ``granule`` (object, MGRS name or index), that granule's SCL (0 outside its footprint or
        beyond its swath edge). Without, the mosaic a pipeline should see: the SCL of the first granule (A,
        then B) that has data there, else 0. A sequence of granules gives the mosaic of just those, in that
        order.
        """
        return TruthAt(spec, x, y).scl(when, granule)

    @staticmethod
    def dn(
        spec: SampleSpec, x: Any, y: Any, when: When, granule: GranuleSelection = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Red (B04) and NIR (B08) digital numbers (uint16, 0 = no data) exactly as stored in the files.

        Without ``granule``, the mosaic (first granule with data). Reflectance = DN * 0.0001 + offset, where
        the offset is -0.1 when ``spec.dn_offset(when)`` is 1000, else 0 (the item's ``raster:bands``).
        """
        d = _as_date(when)
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        nodata = Truth.scl(spec, x, y, d, granule) == SCL_NODATA
        state = _sky_state(spec, *_global20(spec, x, y), d)
        return _dn(spec, x, y, _surface(spec, x, y), state, nodata, d)

    @staticmethod
    def apparent_ndvi(
        spec: SampleSpec, x: Any, y: Any, when: When, granule: GranuleSelection = None
    ) -> np.ndarray:
        """NDVI (float64) of the reflectance stored in the files, before rounding to DNs: :meth:`ndvi` where the
        sky is clean, moved by cloud, haze, cirrus, shadow or a defect elsewhere; NaN where no granule (of
        ``granule``, as in :meth:`scl`) has data. The files' NDVI is within 0.005 of it (DN rounding)."""
        return TruthAt(spec, x, y).apparent_ndvi(when, granule)

    @staticmethod
    def contaminated(
        spec: SampleSpec, x: Any, y: Any, when: When, granule: GranuleSelection = None
    ) -> np.ndarray:
        """True where an observation exists and its NDVI is off the surface's by more than
        :data:`CONTAMINATION_TOLERANCE` (cloud, haze, cirrus, shadow, penumbra, defect), whatever the SCL says.

        The analytic truth of the SCL's errors: contaminated pixels the SCL labels clear (4, 5, 6) are what a
        composite shows unless a mask filter removes them. False where no granule has data."""
        return TruthAt(spec, x, y).contaminated(when, granule)

    @staticmethod
    def is_clear(
        spec: SampleSpec,
        x: Any,
        y: Any,
        when: When,
        mask_classes: Iterable[int] = DEFAULT_MASK_CLASSES,
        granule: GranuleSelection = None,
    ) -> np.ndarray:
        """True where the mosaic SCL (see :meth:`scl`) is not one of ``mask_classes``: a valid observation."""
        classes = np.asarray(list(mask_classes), dtype=np.int64)
        return ~np.isin(Truth.scl(spec, x, y, when, granule), classes)

    @staticmethod
    def expected_composite(
        spec: SampleSpec,
        x: Any,
        y: Any,
        dates: Iterable[When | pystac.Item | Mapping[str, Any]],
        method: str = "median",
        mask_classes: Iterable[int] = DEFAULT_MASK_CLASSES,
        mask_filters: Sequence[tuple[str, float]] = (),
        resolution: float = 10.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The composite a perfect pipeline masking the SCL ``mask_classes`` would produce from the acquisitions.

        Reduces the NDVI the files hold (:meth:`apparent_ndvi`: the true NDVI wherever the sky is clean, and what
        the SCL's errors let through elsewhere) over the dates where the pixel is clear by the SCL, with one
        observation per date: the
        mosaic of the granules (never one observation per granule, so the A/B overlap is not counted twice).
        ``dates`` holds dates (both granules observed) or STAC items (``pystac.Item`` or dicts): then each
        date's mosaic uses only the granules of the items given, e.g. what survived an ``eo:cloud_cover``
        filter. ``method``: ``median``, ``mean``, ``max``, ``min`` or ``qNN``. Returns ``(values float64, NaN
        where no clear observation; counts int64)``. Memory is dates x grid: call it per compositing period.

        ``mask_filters`` (``(op, metres)``, as :attr:`ndvi_scale.config.RunConfig.mask_filters`): each granule's
        cloud/shadow mask goes through them before the mosaic, by the reference of
        :func:`ndvi_scale.testing.reference.filtered_clear_mask` (needs scipy). ``x``, ``y`` must then be the
        pixel centres of a north-up raster of ``resolution`` metres (e.g. a meshgrid of a cube's coordinates):
        the filters run on that raster, as a pipeline runs them on its output grid.
        """
        method = normalise_method(method)
        classes = tuple(mask_classes)
        shape = np.broadcast_shapes(np.shape(x), np.shape(y))
        observed = _observations(spec, dates)
        stack = np.full((len(observed), *shape), np.nan)
        filters = [(op, float(metres) / resolution) for op, metres in mask_filters]
        if filters:
            from .testing.reference import filtered_clear_mask

            if len(shape) != 2:
                raise InputError(f"points of shape {shape} are not a raster; mask filters need 2-D x and y")
        pts = TruthAt(spec, x, y)  # the static surface once, for every date
        for k, (d, granules) in enumerate(observed.items()):
            scl, apparent = pts._observe(d, granules)
            if not filters:
                stack[k] = np.where(np.isin(scl, classes), np.nan, apparent)
                continue
            state = _sky_state(spec, pts.col, pts.row, d)
            for g in granules:  # each granule's mask is filtered on its own, then the first clear one wins
                scl = np.broadcast_to(pts._scl(d, (g,), state), shape)
                data = (scl != SCL_NODATA).astype(np.uint8)
                clear = filtered_clear_mask(scl, data, data, classes, filters)
                take = clear & np.isnan(stack[k])
                stack[k][take] = np.broadcast_to(apparent, shape)[take]
        if not observed:
            return np.full(shape, np.nan), np.zeros(shape, dtype=np.int64)
        counts = np.sum(~np.isnan(stack), axis=0).astype(np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels are expected: they become NaN
            if method == "median":
                values = np.nanmedian(stack, axis=0)
            elif method == "mean":
                values = np.nanmean(stack, axis=0)
            elif method == "max":
                values = np.nanmax(stack, axis=0)
            elif method == "min":
                values = np.nanmin(stack, axis=0)
            else:
                values = np.nanpercentile(stack, float(method[1:]), axis=0)
        return np.asarray(values, dtype=np.float64), counts


# ---------------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _GranuleGrids:
    """Date-independent arrays of one granule, computed once per generation."""

    granule: Granule
    x10: np.ndarray
    y10: np.ndarray
    surface10: Surface
    surface20: Surface
    col20: np.ndarray
    row20: np.ndarray
    ring: list[list[float]]  # WGS84 footprint polygon (closed, counter-clockwise)
    bbox: list[float]  # W, S, E, N of the footprint, edges densified


def _grids(spec: SampleSpec, g: Granule) -> _GranuleGrids:
    x10, y10 = g.centres(10)
    x20, y20 = g.centres(20)
    col20, row20 = _global20(spec, x20, y20)
    # the land surface is static: computed once per granule, at both resolutions
    surface10 = _surface_rows(spec, x10, y10)
    surface20 = _surface_rows(spec, *_centres20(spec, col20, row20))
    xmin, ymin, xmax, ymax = g.bounds
    lon, lat = _to_lonlat(spec.epsg).transform([xmin, xmax, xmax, xmin, xmin], [ymin, ymin, ymax, ymax, ymin])
    ring = [[round(float(a), 9), round(float(b), 9)] for a, b in zip(lon, lat, strict=True)]
    bbox = [round(v, 9) for v in _bbox_lonlat(spec.epsg, g.bounds)]
    return _GranuleGrids(g, x10, y10, surface10, surface20, col20, row20, ring, bbox)


def _write_cog(
    path: Path, data: np.ndarray, transform: Affine, epsg: int, blocksize: int, resampling: str
) -> None:
    profile = {
        "driver": "COG",
        "width": data.shape[1],
        "height": data.shape[0],
        "count": 1,
        "dtype": data.dtype.name,
        "crs": CRS.from_epsg(epsg),
        "transform": transform,
        "nodata": 0,
        "compress": "DEFLATE",
        "blocksize": blocksize,
        # Earth Search COGs carry internal overviews; a fixed count keeps small test granules comparable
        "overview_count": 4,
        "resampling": resampling,
        "num_threads": "ALL_CPUS",  # GDAL compresses tiles in parallel; rasterio's CreateCopy holds the GIL
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)


def _percent(mask: np.ndarray, valid: np.ndarray) -> float:
    n = int(np.count_nonzero(valid))
    return round(100.0 * int(np.count_nonzero(mask & valid)) / n, 4) if n else 0.0


def _write_item(
    spec: SampleSpec, grids: _GranuleGrids, when: dt.datetime, root: Path, href_base: str | None
) -> dict[str, Any]:
    g = grids.granule
    d = when.date()
    state20 = _sky_state(spec, grids.col20, grids.row20, d)
    scl20 = _scl(spec, g, grids.col20, grids.row20, d, state20, grids.surface20)
    nodata10 = np.repeat(np.repeat(scl20 == SCL_NODATA, 2, axis=0), 2, axis=1)
    state10 = _upsampled(state20, g.shape20)
    red, nir = _dn(spec, grids.x10, grids.y10, grids.surface10, state10, nodata10, d)

    item_id = spec.item_id(d, g)
    folder = root / item_id
    folder.mkdir(parents=True, exist_ok=True)
    _write_cog(folder / "B04.tif", red, g.transform10, spec.epsg, spec.blocksize, "AVERAGE")
    _write_cog(folder / "B08.tif", nir, g.transform10, spec.epsg, spec.blocksize, "AVERAGE")
    _write_cog(folder / "SCL.tif", scl20, g.transform20, spec.epsg, spec.blocksize, "NEAREST")

    def href(name: str) -> str:
        if href_base is None:
            return str(folder.resolve() / name)
        return f"{href_base.rstrip('/')}/{item_id}/{name}"

    valid = scl20 != SCL_NODATA
    everywhere = np.ones_like(valid)
    baseline = spec.baseline(d)
    offset = -0.1 if spec.dn_offset(d) else 0
    sat = "S2B" if spec.platform(d) == "sentinel-2b" else "S2A"
    product_uri = (
        f"{sat}_MSIL2A_{when:%Y%m%dT%H%M%S}_N{baseline.replace('.', '')}_R{spec.relative_orbit(d):03d}"
        f"_T{g.name}_{d:%Y%m%d}T121500.SAFE"
    )

    def band_asset(name: str, title: str, common: str, wavelength: float, fwhm: float) -> dict[str, Any]:
        return {
            "href": href(name),
            "type": COG_MEDIA_TYPE,
            "title": title,
            "eo:bands": [
                {
                    "name": common,
                    "common_name": common,
                    "description": title.split(" - ")[0],
                    "center_wavelength": wavelength,
                    "full_width_half_max": fwhm,
                }
            ],
            "gsd": 10,
            "proj:shape": list(g.shape10),
            "proj:transform": list(g.transform10)[:6],
            "raster:bands": [
                {
                    "nodata": 0,
                    "data_type": "uint16",
                    "bits_per_sample": 15,
                    "spatial_resolution": 10,
                    "scale": _SCALE,
                    "offset": offset,
                }
            ],
            "roles": ["data"],
        }

    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": STAC_EXTENSIONS,
        "id": item_id,
        "bbox": grids.bbox,
        "geometry": {"type": "Polygon", "coordinates": [grids.ring]},
        "properties": {
            "datetime": f"{when.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%S}Z",
            "created": f"{d:%Y-%m-%d}T12:15:00Z",
            "platform": spec.platform(d),
            "constellation": "sentinel-2",
            "instruments": ["msi"],
            "eo:cloud_cover": _percent(np.isin(scl20, CLOUDY_CLASSES), valid),
            "proj:epsg": spec.epsg,
            "mgrs:utm_zone": g.utm_zone,
            "mgrs:latitude_band": g.latitude_band,
            "mgrs:grid_square": g.grid_square,
            "grid:code": f"MGRS-{g.name}",
            "s2:product_type": "S2MSI2A",
            "s2:processing_baseline": baseline,
            "s2:product_uri": product_uri,
            "s2:nodata_pixel_percentage": _percent(~valid, everywhere),
            "s2:high_proba_clouds_percentage": _percent(scl20 == SCL_CLOUD_HIGH, valid),
            "s2:medium_proba_clouds_percentage": _percent(scl20 == SCL_CLOUD_MEDIUM, valid),
            "s2:thin_cirrus_percentage": _percent(scl20 == SCL_THIN_CIRRUS, valid),
            "s2:cloud_shadow_percentage": _percent(scl20 == SCL_CLOUD_SHADOW, valid),
            "s2:vegetation_percentage": _percent(scl20 == SCL_VEGETATION, valid),
            "s2:not_vegetated_percentage": _percent(scl20 == SCL_NOT_VEGETATED, valid),
            "s2:water_percentage": _percent(scl20 == SCL_WATER, valid),
            "earthsearch:boa_offset_applied": False,
        },
        "links": [],
        "assets": {
            "red": band_asset("B04.tif", "Red (band 4) - 10m", "red", 0.665, 0.038),
            "nir": band_asset("B08.tif", "NIR 1 (band 8) - 10m", "nir", 0.842, 0.145),
            "scl": {
                "href": href("SCL.tif"),
                "type": COG_MEDIA_TYPE,
                "title": "Scene classification map (SCL)",
                "proj:shape": list(g.shape20),
                "proj:transform": list(g.transform20)[:6],
                "raster:bands": [{"nodata": 0, "data_type": "uint8", "spatial_resolution": 20}],
                "roles": ["data"],
            },
        },
        "collection": "sentinel-2-l2a",
    }


def generate(
    root: str | Path, spec: SampleSpec | None = None, href_base: str | None = None
) -> list[pystac.Item]:
    """Write the synthetic catalog of ``spec`` (default :class:`SampleSpec`) under ``root``.

    Writes ``<root>/<item_id>/{B04,B08,SCL}.tif`` and ``<root>/items.json`` (a GeoJSON FeatureCollection of
    STAC 1.0.0 items, sorted by datetime then id). Asset hrefs are absolute file paths, or
    ``href_base + "/" + item_id + "/B04.tif"`` when ``href_base`` is given (e.g. to serve ``root`` over HTTP).
    Returns the items, read back with ``migrate=False`` so they keep the Earth Search v1 fields as written.
    """
    spec = spec or SampleSpec()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    grids = [_grids(spec, g) for g in spec.granules()]
    tasks = [(when, gg) for when in spec.dates() for gg in grids]
    # Threads overlap numpy work with GDAL I/O; two are enough because compression already uses every CPU.
    with ThreadPoolExecutor(max_workers=2) as pool:
        features = list(pool.map(lambda t: _write_item(spec, t[1], t[0], root, href_base), tasks))
    features.sort(key=lambda f: (f["properties"]["datetime"], f["id"]))
    collection = {"type": "FeatureCollection", "features": features}
    tmp = root / ".items.json.tmp"
    tmp.write_text(json.dumps(collection, indent=1) + "\n")
    os.replace(tmp, root / "items.json")
    return [pystac.Item.from_dict(f, migrate=False) for f in features]


#: MGRS latitude bands, 8 degrees each from 80S (the letters I and O are not used).
_MGRS_BANDS = "CDEFGHJKLMNPQRSTUVWX"


def straddling_specs(
    boundary_lon: float = 0.0, lat: float = 48.35, *, overlap: int = 20, **kwargs: Any
) -> tuple[SampleSpec, SampleSpec]:
    """Two specs, one in each UTM zone on either side of the zone boundary ``boundary_lon``: areas across zones.

    Like real Sentinel-2 tiles, each spec keeps its own UTM zone (``proj:epsg``) and its own analytic truth in
    its own coordinates (:class:`Truth` with that spec): the western spec is in the zone ending at
    ``boundary_lon``, its granules A and B reaching ``overlap`` 10 m pixels east of the boundary; the eastern spec
    is in the zone starting there, reaching ``overlap`` pixels west of it. So the two unions overlap by about
    ``2 * overlap`` pixels around the boundary, where a pipeline sees granules from both zones on the same date.
    Both top edges lie at ``lat`` (snapped to 20 m). ``kwargs`` go to both :class:`SampleSpec` (``size``,
    ``start``, ``end``, ...); the eastern spec gets ``seed + 1``, so its parcels and clouds differ from the western
    ones. Tile names are synthetic (``30UXQ``, ``30UYQ`` | ``31UBQ``, ``31UCQ`` for the default boundary).
    Write both into one catalog with :func:`generate_zones`.
    """
    if not -180 < boundary_lon < 180 or boundary_lon % 6:
        raise InputError(
            f"boundary_lon {boundary_lon!r} is not a UTM zone boundary; expected a multiple of 6 in (-180, 180), "
            "e.g. 0"
        )
    if not -80 <= lat < 84:
        raise InputError(f"lat {lat!r} is outside the UTM latitudes; expected -80 <= lat < 84, e.g. 48.35")
    if not isinstance(overlap, int) or overlap < 0:
        raise InputError(f"overlap {overlap!r} is invalid; expected a number of 10 m pixels >= 0, e.g. 20")
    east_zone = int(round((boundary_lon + 180) / 6)) + 1
    west_zone = east_zone - 1
    hemisphere = 32600 if lat >= 0 else 32700
    band = _MGRS_BANDS[min(int((lat + 80) // 8), len(_MGRS_BANDS) - 1)]
    seed = int(kwargs.pop("seed", SampleSpec.seed))
    template = SampleSpec(**kwargs)  # validates kwargs; gives size and shift
    union = 10 * (template.size + template.shift)

    def snap20(v: float) -> float:
        return float(20 * math.floor(v / 20))

    specs = []
    for zone, tiles, seed_k in (
        (west_zone, (f"{west_zone:02d}{band}XQ", f"{west_zone:02d}{band}YQ"), seed),
        (east_zone, (f"{east_zone:02d}{band}BQ", f"{east_zone:02d}{band}CQ"), seed + 1),
    ):
        epsg = hemisphere + zone
        xb, yb = Transformer.from_crs(4326, epsg, always_xy=True).transform(boundary_lon, lat)
        x0 = xb + 10 * overlap - union if zone == west_zone else xb - 10 * overlap
        specs.append(
            replace(template, epsg=epsg, x0=snap20(x0), y0=snap20(yb), tiles=tiles, seed=seed_k)
        )
    return specs[0], specs[1]


def generate_zones(
    root: str | Path, specs: Sequence[SampleSpec], href_base: str | None = None
) -> list[pystac.Item]:
    """Write the granules of several specs (e.g. :func:`straddling_specs`) as ONE catalog under ``root``.

    Each spec is written as by :func:`generate` (same files, same items); ``<root>/items.json`` then holds the
    items of all specs, sorted by datetime then id. Tile names must differ between specs. Returns the items.
    """
    names = [g.name for spec in specs for g in spec.granules()]
    if len(set(names)) != len(names):
        raise InputError(f"specs share tile names {sorted(names)}; give each spec its own tiles")
    root = Path(root)
    features: list[dict[str, Any]] = []
    for spec in specs:
        generate(root, spec, href_base)
        features += json.loads((root / "items.json").read_text())["features"]
    features.sort(key=lambda f: (f["properties"]["datetime"], f["id"]))
    tmp = root / ".items.json.tmp"
    tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}, indent=1) + "\n")
    os.replace(tmp, root / "items.json")
    return [pystac.Item.from_dict(f, migrate=False) for f in features]


def _default_cache_dir() -> Path:
    env = os.environ.get("NDVI_SCALE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ndvi-scale"


def sample_catalog(cache_dir: str | Path | None = None, *, spec: SampleSpec | None = None) -> Path:
    """Path of the embedded sample's ``items.json``, generating it once into the cache if needed.

    The cache is ``cache_dir``, else ``$NDVI_SCALE_CACHE``, else ``~/.cache/ndvi-scale``; the sample lives in
    ``sample-v<SAMPLE_VERSION>-<size>`` (plus a parameter digest for a non-default ``spec``, meant for tests).
    Beside ``items.json`` it writes :data:`PARCELS_FILE`, the sample's field parcels and woods as GeoJSON in
    EPSG:4326 (``id``, ``cover``, ``shift_days``, ``area_ha``; :func:`ndvi_scale.landscape.parcels_geojson`): every
    pixel whose centre is inside a polygon has that polygon's cover in :class:`Truth`.
    Generation writes into a temporary sibling folder and renames it into place, so concurrent callers never
    see a half-written sample: the first rename wins and the others use it. Later calls return at once.
    """
    spec = spec or SampleSpec()
    parent = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    name = f"sample-v{SAMPLE_VERSION}-{spec.size}"
    if spec != SampleSpec():
        name += f"-{spec.fingerprint()}"
    final = (parent / name).resolve()
    items = final / "items.json"
    if items.is_file():
        return items
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    except OSError as exc:
        raise CatalogError(
            f"sample cache {parent} is not writable ({exc.strerror}); "
            "set NDVI_SCALE_CACHE to a writable folder"
        ) from None
    try:
        generate(tmp, spec, href_base=str(final))  # hrefs already point at the final location
        (tmp / PARCELS_FILE).write_text(json.dumps(parcels_geojson(spec)) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared (e.g. a CI runner's)
        try:
            os.rename(tmp, final)
        except OSError:
            if not items.is_file():  # not a lost race: something else is in the way
                raise CatalogError(
                    f"sample cache folder {final} exists but holds no items.json; delete it and retry"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return items
