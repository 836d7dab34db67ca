"""Typed, frozen run configuration: loose user input is normalised here, once.

Everything downstream (search, load, composite, write) receives a :class:`RunConfig` and can trust it: the bbox is
four floats in range and not inverted, dates are ``datetime.date`` with ``start <= end``, the period and method are
known names. Every rejection is an :class:`~ndvi_scale.errors.InputError` naming the field, the bad value and the fix.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from .errors import MAX_QUOTED, InputError, cut, shown

if TYPE_CHECKING:
    from .analytics.aoi import Aoi

#: Composite reducers understood by :mod:`ndvi_scale.composite`. ``max`` is the max-NDVI ("quality mosaic") composite
#: and also writes the date of the maximum. ``qNN`` is the NN-th percentile (e.g. ``q25``).
METHODS = ("median", "mean", "max", "min")
_QUANTILE_RE = re.compile(r"^q(\d{1,2})$")

#: Temporal periods understood by :mod:`ndvi_scale.composite` (openEO ``aggregate_temporal_period`` names).
PERIODS = ("day", "week", "dekad", "month", "season", "year")

#: SCL classes masked by default: 0 no data, 1 saturated/defective, 2 dark area / topographic shadow,
#: 3 cloud shadow, 8 cloud medium probability, 9 cloud high probability, 10 thin cirrus.
#: Kept: 4 vegetation, 5 not vegetated, 6 water, 7 unclassified, 11 snow/ice (a real observation of the surface).
DEFAULT_MASK_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 8, 9, 10)

#: Morphological operations a mask filter may apply to the cloud/shadow mask (DEA ``mask_filters``' names).
MASK_FILTER_OPS = ("opening", "closing", "dilation", "erosion")

#: Mask filters by default, in metres, in DEA's order: an opening removes cloud/shadow specks smaller than its disk
#: (bright soil flagged as cloud), then a dilation masks the haze, fringes and penumbrae SCL leaves just outside its
#: cloud and shadow edges. Radii chosen by measurement on the realistic sample (benchmarks/quality.py,
#: benchmarks/RESULTS.md).
DEFAULT_MASK_FILTERS: tuple[tuple[str, float], ...] = (("opening", 20.0), ("dilation", 60.0))

#: Largest radius of one mask filter (metres): the margin every chunk reads grows with it; a kilometre is far past
#: the cloud buffers in common use (sen2r's SCL mask buffer defaults to 250 m).
MAX_MASK_FILTER_METRES = 1000.0

#: Output pixel size in metres (Sentinel-2 red/nir native resolution).
DEFAULT_RESOLUTION = 10.0

#: Spatial chunk (pixels) for processing and output. 2048 = 2 x 2 internal 1024-px COG tiles: the published
#: sweet spot for both stackstac and odc-stac (512-px chunks are 4-5x slower), and whole tiles only are read.
DEFAULT_CHUNK = 2048

#: Largest accepted ``chunk`` (pixels): far beyond any useful task size (the pipeline halves a chunk whose task
#: would read too much anyway), it only stops absurd values early.
MAX_CHUNK = 65536


@dataclass(frozen=True)
class BBox:
    """A WGS84 bounding box, validated (west < east, south < north, within lon/lat ranges)."""

    west: float
    """Western longitude, degrees, in [-180, 180]."""
    south: float
    """Southern latitude, degrees, in [-90, 90]."""
    east: float
    """Eastern longitude, degrees, in [-180, 180]; greater than ``west`` (antimeridian boxes are refused)."""
    north: float
    """Northern latitude, degrees, in [-90, 90]; greater than ``south``."""

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.west, self.south, self.east, self.north)

    def __str__(self) -> str:
        return ",".join(f"{v:g}" for v in self.as_tuple())


def format_bbox(value: Any) -> BBox:
    """Normalise a loose bbox (``BBox``, sequence of 4 numbers, ``"W,S,E,N"`` or ``"W S E N"``) to :class:`BBox`."""
    if isinstance(value, BBox):
        return value
    raw = value
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
    elif isinstance(value, Mapping):
        raise InputError(
            f"bbox {shown(raw)} is a mapping; expected 4 numbers W S E N (degrees), e.g. 1.4 48.1 1.6 48.3"
        )
    elif isinstance(value, Iterable):
        parts = list(value)
    else:
        raise InputError(
            f"bbox {shown(raw)} is not 4 numbers; expected W S E N in degrees, e.g. --bbox 1.4 48.1 1.6 48.3"
        )
    if len(parts) != 4:
        raise InputError(
            f"bbox {shown(raw)} has {len(parts)} values; expected 4 numbers W S E N in degrees, "
            "e.g. --bbox 1.4 48.1 1.6 48.3"
        )
    try:
        w, s, e, n = (float(p) for p in parts)
    except (TypeError, ValueError, OverflowError):
        option = next((p for p in parts if isinstance(p, str) and p.startswith("--")), None)
        took = f" (it took the option {option} as a value: --bbox needs exactly 4 numbers)" if option else ""
        raise InputError(
            f"bbox {shown(raw)} holds a non-number{took}; expected 4 numbers W S E N in degrees, "
            "e.g. --bbox 1.4 48.1 1.6 48.3"
        ) from None
    for name, v, lim in (("west", w, 180), ("east", e, 180), ("south", s, 90), ("north", n, 90)):
        if not (-lim <= v <= lim):  # also rejects NaN
            raise InputError(
                f"bbox {name} {_deg(v)} is out of range [-{lim}, {lim}]; give longitude/latitude in degrees "
                "(EPSG:4326), W S E N"
            )
    if s >= n:
        raise InputError(
            f"bbox south {_deg(s)} >= north {_deg(n)}; give W S E N with south < north (is the order swapped?)"
        )
    if w > e and w > 0 > e and w - e > 180:
        raise InputError(_antimeridian_message(w, s, e, n))
    if w >= e:
        raise InputError(
            f"bbox west {_deg(w)} >= east {_deg(e)}; give W S E N with west < east (is the order swapped?). Areas "
            "crossing the antimeridian are not supported: split them in two runs at 180 degrees"
        )
    _check_lon_span(w, s, e, n)  # a whole-world bbox: refused before any search
    return BBox(w, s, e, n)


#: Widest bbox (degrees of longitude) one output grid may hold: a transverse Mercator (UTM) grid is meaningless
#: beyond ~30 degrees either side of its zone's meridian (a whole-world bbox projects to a grid that is not one).
MAX_BBOX_LON_SPAN = 60.0
#: Largest output grid side in pixels (2**20: 10,486 km at 10 m).
MAX_GRID_SIDE = 2**20


def check_grid_extent(bbox: BBox, epsg: int, resolution: float) -> None:
    """Refuse (one :class:`InputError`) a bbox that cannot be one projected output grid in ``EPSG:epsg``: wider
    than :data:`MAX_BBOX_LON_SPAN` degrees, projecting to a non-finite or empty extent, or more than
    :data:`MAX_GRID_SIDE` pixels a side. Checked before any pixel is read (a whole-world bbox used to end in
    ``Chunks do not add up to shape``)."""
    w, s, e, n = bbox.as_tuple()
    where = f"bbox {_deg(w)} {_deg(s)} {_deg(e)} {_deg(n)}"
    _check_lon_span(w, s, e, n)
    from pyproj import Transformer

    try:
        left, bottom, right, top = Transformer.from_crs(4326, epsg, always_xy=True).transform_bounds(
            w, s, e, n, densify_pts=21
        )
    except Exception as exc:  # pyproj refuses the transformation
        raise InputError(f"{where} cannot be projected to EPSG:{epsg} ({type(exc).__name__}); give a smaller "
                         "bbox or another --crs") from None
    sides = ((right - left) / resolution, (top - bottom) / resolution)
    if not all(math.isfinite(v) and 0 < v <= MAX_GRID_SIDE for v in sides):
        size = " x ".join(f"{v:.3g}" if math.isfinite(v) else "inf" for v in sides)
        raise InputError(
            f"{where} projects to a {size} px grid in EPSG:{epsg} at {resolution:g} m; expected at most "
            f"{MAX_GRID_SIDE} px a side: give a smaller bbox (split the area into several runs) or a coarser "
            "--resolution"
        )


def _check_lon_span(w: float, s: float, e: float, n: float) -> None:
    if e - w > MAX_BBOX_LON_SPAN:
        raise InputError(
            f"bbox {_deg(w)} {_deg(s)} {_deg(e)} {_deg(n)} spans {_deg(e - w)} degrees of longitude; one output "
            f"grid (a UTM zone's projection) holds at most {MAX_BBOX_LON_SPAN:g}: split the area into several "
            "runs, e.g. one per 6-degree UTM zone"
        )


def _antimeridian_message(w: float, s: float, e: float, n: float) -> str:
    """The fix for a bbox whose west is east of its east, across 180 degrees: two runs, one on each side."""
    where = f"bbox crosses the antimeridian (west {_deg(w)} > east {_deg(e)})"
    if w == 180:  # nothing east of 180: the box is -180..east
        return f"{where}; nothing lies between west 180 and 180: give it as --bbox -180 {_deg(s)} {_deg(e)} {_deg(n)}"
    if e == -180:  # nothing west of -180: the box is west..180
        return f"{where}; nothing lies between -180 and east -180: give it as --bbox {_deg(w)} {_deg(s)} 180 {_deg(n)}"
    return (
        f"{where}; split it into two runs: {_deg(w)}..180 and -180..{_deg(e)} "
        f"(--bbox {_deg(w)} {_deg(s)} 180 {_deg(n)} and --bbox -180 {_deg(s)} {_deg(e)} {_deg(n)})"
    )


def _deg(v: float) -> str:
    """A coordinate as the user typed it (up to 12 significant digits, no trailing .0)."""
    return f"{v:.12g}"


def parse_date(value: Any, *, name: str) -> dt.date:
    """Parse ``YYYY-MM-DD`` (or a ``date``/``datetime``) into a ``date``, naming the field on failure."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise InputError(f"{name} {shown(value)} is not a date; expected YYYY-MM-DD, e.g. 2024-01-31")


def _short_text(value: Any, *, lower: bool = True) -> str:
    """``str(value)`` stripped (and lower-cased) for a name-like option, without ever building the text of a
    huge or deeply nested value (``str()`` of an alias-bomb list never ends): such values become ``""``, which
    no name matches, so the caller's message (quoting the value with :func:`shown`) applies."""
    if isinstance(value, str):
        text = value if len(value) <= 1000 else ""
    elif isinstance(value, bool | int | float) and not (isinstance(value, int) and abs(value) > 10**100):
        text = str(value)
    else:
        text = ""
    text = text.strip()
    return text.lower() if lower else text


def normalise_method(value: str) -> str:
    """Check a composite method name (``median``, ``mean``, ``max``, ``min`` or ``qNN``)."""
    v = _short_text(value)
    if v in METHODS:
        return v
    m = _QUANTILE_RE.match(v)
    if m and 0 < int(m.group(1)) < 100:
        return f"q{int(m.group(1)):02d}"
    raise InputError(f"method {shown(value)} is unknown; expected one of {', '.join(METHODS)} or a percentile like q25")


def normalise_period(value: str) -> str:
    v = _short_text(value)
    if v not in PERIODS:
        raise InputError(f"period {shown(value)} is unknown; expected one of {', '.join(PERIODS)}")
    return v


def normalise_mask_classes(value: Any) -> tuple[int, ...]:
    raw = value
    if isinstance(value, str):
        value = [p for p in re.split(r"[,\s]+", value.strip()) if p]
    try:
        classes = tuple(sorted({_integer_value(v) for v in value}))
    except (TypeError, ValueError, OverflowError):
        raise InputError(
            f"mask classes {shown(raw)} are not integers; expected SCL classes 0-11, e.g. 0,3,8,9,10"
        ) from None
    bad = [c for c in classes if not 0 <= c <= 11]
    if bad:
        raise InputError(f"mask classes {shown(bad)} are not SCL classes; expected integers 0-11, e.g. 0,3,8,9,10")
    return classes


def normalise_mask_filters(value: Any) -> tuple[tuple[str, float], ...]:
    """``(op, metres)`` pairs from ``"opening:20,dilation:60"``, ``"none"``, a list of pairs, of ``"op:metres"``
    strings or of ``{"op": ..., "metres": ...}`` mappings. Radii of 0 are dropped (no-ops).

    Raises :class:`InputError` naming the bad entry."""
    expected = f"a list of op:metres with op one of {', '.join(MASK_FILTER_OPS)}, e.g. opening:20,dilation:60, or none"
    raw = value
    if value is None:
        return ()
    if isinstance(value, str):
        text = _short_text(value)
        if text in ("", "none", "off", "[]"):
            return ()
        value = [p for p in re.split(r"[,;]+", text) if p.strip()]
    elif isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise InputError(f"mask filters {shown(raw)} are not a list; expected {expected}")
    out: list[tuple[str, float]] = []
    for entry in list(value)[:65]:
        if isinstance(entry, str):
            parts = [p for p in re.split(r"[:=\s]+", entry.strip()) if p]
        elif isinstance(entry, Mapping):
            parts = [entry.get("op"), entry.get("metres", entry.get("radius"))]
        elif isinstance(entry, Iterable):
            parts = list(entry)[:3]
        else:
            parts = [entry]
        if len(parts) != 2:
            raise InputError(f"mask filters entry {shown(entry)} is not op and radius; expected {expected}")
        op = _short_text(parts[0])
        if op not in MASK_FILTER_OPS:
            raise InputError(f"mask filters op {shown(parts[0])} is unknown; expected {expected}")
        metres = _number(parts[1], f"mask filters {op} radius", "metres 0-1000, e.g. 60")
        if not 0 <= metres <= MAX_MASK_FILTER_METRES:
            raise InputError(
                f"mask filters {op} radius {metres:g} m is out of range; expected metres 0-{MAX_MASK_FILTER_METRES:g}"
            )
        if metres > 0:
            out.append((op, metres))
    if len(list(value)) > 64:
        raise InputError(f"mask filters {shown(raw)} are more than 64; expected {expected}")
    return tuple(out)


def mask_filter_options(filters: Any = None, opening: Any = None, dilation: Any = None) -> Any:
    """The ``mask_filters`` value of the options ``--mask-filters``, ``--mask-opening``, ``--mask-dilation`` (None:
    none given). Opening and dilation make DEA's pair ``[opening, dilation]``, the one not given at its default
    (:data:`DEFAULT_MASK_FILTERS`); 0 turns one off. Raises :class:`InputError` if the list and either are given."""
    if opening is None and dilation is None:
        return filters
    if filters is not None:
        raise InputError(
            "mask filters are given both as a list and as an opening/dilation radius; give either --mask-filters or "
            "--mask-opening/--mask-dilation"
        )
    default = dict(DEFAULT_MASK_FILTERS)
    return [
        ("opening", default.get("opening", 0.0) if opening is None else opening),
        ("dilation", default.get("dilation", 0.0) if dilation is None else dilation),
    ]


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs, validated. Build it with :meth:`RunConfig.create` from loose input."""

    bbox: BBox
    """Area of interest in WGS84 degrees."""
    start: dt.date
    """First day of the period of interest (inclusive)."""
    end: dt.date
    """Last day of the period of interest (inclusive)."""
    catalog: str = "sample"
    """``sample`` (embedded offline sample), a provider profile name, a STAC API URL or a local items file."""
    out: str | None = None
    """Output Zarr location: local path, ``gs://bucket/path`` or ``s3://bucket/path``; None = do not write."""
    period: str = "month"
    """Compositing period: one of :data:`PERIODS`."""
    method: str = "median"
    """Composite reducer: one of :data:`METHODS` or ``qNN``."""
    max_cloud: float = 100.0
    """Drop scenes whose ``eo:cloud_cover`` is above this percentage (0-100)."""
    mask_classes: tuple[int, ...] = DEFAULT_MASK_CLASSES
    """SCL classes treated as invalid (cloud, shadow, nodata, ...)."""
    mask_filters: tuple[tuple[str, float], ...] = DEFAULT_MASK_FILTERS
    """Morphological filters of the cloud/shadow mask (the masked classes among 3, 8, 9, 10), in order, as
    ``(op, radius in metres)`` with op opening, closing, dilation or erosion; a disk on the output grid. Empty:
    exactly the SCL classes. ``mask_opening``/``mask_dilation`` keywords of :meth:`create` build DEA's pair."""
    resolution: float = DEFAULT_RESOLUTION
    """Output pixel size in metres."""
    crs: str = "auto"
    """Output CRS: ``auto`` (the UTM zone covering most of the bbox, see :func:`ndvi_scale.load.choose_epsg`) or
    ``EPSG:XXXX`` (a projected CRS in metres)."""
    chunk: int = DEFAULT_CHUNK
    """Spatial chunk size in pixels (processing and Zarr chunks are the same)."""
    overwrite: bool = False
    """Replace an existing output (or, with ``append``, recompute periods already written) instead of refusing."""
    append: bool = False
    """Add this run's periods to an existing cube (same grid); periods already written are skipped."""
    skip_bad_assets: bool = False
    """Continue when an asset cannot be read after retries, recording it in the provenance (else fail)."""
    allow_local: bool = False
    """Accept local asset paths from any catalog (by default: only from a local catalog, inside its folder)."""
    zarr_format: int | None = None
    """Zarr format of a new output (3, or 2 for old readers); None: 3 for a new output, and an existing cube keeps
    its own. Asking an existing cube for another format is refused (it is never silently ignored)."""
    codec: str = "zstd"
    """Compression of a new output's chunks: zstd, zlib (for GDAL builds without zstd), lz4 (blosc) or none."""
    allow_large: bool = False
    """Start a run above the size guard (:data:`ndvi_scale.sizing.MAX_OUTPUT_BYTES` of output or
    :data:`~ndvi_scale.sizing.MAX_REGIONS` regions; CLI ``--yes``); else it stops before writing anything."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Free-form options for later stages (kept for provenance)."""
    aoi: Aoi | None = None
    """Polygon area of interest (``--aoi FILE``), loaded and checked once: the run's ``bbox`` is its bounds and
    pixels whose centre is outside it are NaN (count 0). None: the whole bbox."""

    @classmethod
    def create(cls, **kwargs: Any) -> RunConfig:
        """Validate and normalise loose keyword input (CLI strings, YAML values, Python objects)."""
        known = {f.name for f in fields(cls)} | {"mask_opening", "mask_dilation"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InputError(
                f"unknown config field(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}"
            )
        kw: dict[str, Any] = dict(kwargs)
        aliases = {k: kw.pop(k) for k in ("mask_opening", "mask_dilation") if k in kw}
        if aliases:
            kw["mask_filters"] = mask_filter_options(
                kw.get("mask_filters"), aliases.get("mask_opening"), aliases.get("mask_dilation")
            )
        if kw.get("aoi") is not None:
            aoi = load_run_aoi(kw["aoi"], kw.get("resolution", DEFAULT_RESOLUTION))
            # A bbox equal to the AOI's is accepted: the configuration a cube records (its history line) has both.
            if kw.get("bbox") is not None and format_bbox(kw["bbox"]).as_tuple() != aoi.bbox:
                raise InputError(
                    f"bbox {format_bbox(kw['bbox'])} differs from the bbox of aoi {shown(aoi.source)}; give either "
                    "--aoi FILE (the bbox is taken from its polygons) or --bbox W S E N"
                )
            kw["aoi"], kw["bbox"] = aoi, aoi.bbox
        if kw.get("bbox") is None:
            raise InputError("bbox is missing; give --bbox W S E N in degrees, e.g. --bbox 1.4 48.1 1.6 48.3, "
                             "or --aoi FILE")
        kw["bbox"] = format_bbox(kw["bbox"])  # first: a --bbox short of values swallows the next option
        for name in ("start", "end"):
            if kwargs.get(name) is None:
                raise InputError(f"{name} is missing; give --{name} YYYY-MM-DD")
        kw["start"] = parse_date(kw["start"], name="start")
        kw["end"] = parse_date(kw["end"], name="end")
        if kw["start"] > kw["end"]:
            raise InputError(
                f"start {kw['start']} is after end {kw['end']}; give --start before (or equal to) --end"
            )
        if "period" in kw:
            kw["period"] = normalise_period(kw["period"])
        if "method" in kw:
            kw["method"] = normalise_method(kw["method"])
        if "mask_classes" in kw:
            kw["mask_classes"] = normalise_mask_classes(kw["mask_classes"])
        if "mask_filters" in kw:
            kw["mask_filters"] = normalise_mask_filters(kw["mask_filters"])
        if "catalog" in kw:
            cat = kw["catalog"]
            if not isinstance(cat, str | os.PathLike):
                raise InputError(
                    f"catalog {shown(cat)} is not text; give 'sample', a profile name (ndvi-scale catalogs), a URL "
                    "or a path"
                )
            if not os.fspath(cat).strip():
                raise InputError(
                    f"catalog is empty ({shown(cat)}); give 'sample', a profile name (ndvi-scale catalogs), a URL "
                    "or a path"
                )
            kw["catalog"] = os.fspath(cat).strip()
        if kw.get("out") is not None:
            out_value = kw["out"]
            if not isinstance(out_value, str | os.PathLike):
                raise InputError(
                    f"out {shown(out_value)} is not text; give a local path, gs://bucket/path or s3://bucket/path"
                )
            out = os.fspath(out_value).strip()
            if not out:
                raise InputError(
                    f"out is empty ({shown(out_value)}); give a local path, gs://bucket/path or s3://bucket/path"
                )
            kw["out"] = out
        if "max_cloud" in kw:
            mc = _number(kw["max_cloud"], "max_cloud", "a percentage 0-100, e.g. 20")
            if not 0 <= mc <= 100:
                raise InputError(f"max_cloud {mc:g} is out of range; expected a percentage 0-100")
            kw["max_cloud"] = mc
        if "resolution" in kw:
            res = _number(kw["resolution"], "resolution", "metres > 0, e.g. 10")
            if not 0 < res <= 10000:
                raise InputError(f"resolution {res:g} is out of range; expected metres > 0, e.g. 10")
            kw["resolution"] = res
        if "chunk" in kw:
            ch = _integer(kw["chunk"], "chunk", f"pixels 64-{MAX_CHUNK} and a multiple of 16, e.g. 2048")
            if not 64 <= ch <= MAX_CHUNK or ch % 16:
                raise InputError(
                    f"chunk {shown(ch)} is invalid; expected pixels {64}-{MAX_CHUNK} and a multiple of 16, e.g. 2048"
                )
            kw["chunk"] = ch
        if "zarr_format" in kw:
            zf = _integer(kw["zarr_format"], "zarr_format", "2 or 3")
            if zf not in (2, 3):
                raise InputError(f"zarr_format {shown(zf)} is invalid; expected 2 or 3")
            kw["zarr_format"] = zf
        if "crs" in kw:
            kw["crs"] = normalise_crs(kw["crs"])
        if "codec" in kw:
            codec = _short_text(kw["codec"])  # never str() of a huge or nested value
            codec = {"gzip": "zlib", "deflate": "zlib", "blosc-lz4": "lz4"}.get(codec, codec)
            if codec not in ("zstd", "zlib", "lz4", "none"):
                raise InputError(f"codec {shown(kw['codec'])} is unknown; expected zstd, zlib, lz4 or none")
            kw["codec"] = codec
        for flag in ("overwrite", "append", "skip_bad_assets", "allow_local", "allow_large"):
            if flag in kw:
                kw[flag] = _flag(kw[flag], flag)
        return cls(**kw)

    def replace(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (for provenance and logs)."""
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, BBox):
                v = list(v.as_tuple())
            elif isinstance(v, dt.date):
                v = v.isoformat()
            elif isinstance(v, tuple):
                v = [list(e) if isinstance(e, tuple) else e for e in v]
            elif isinstance(v, Mapping):
                v = dict(v)
            elif f.name == "aoi" and v is not None:
                v = v.source  # its digest is in the cube's ndvi_scale_aoi and in the run's fingerprint
            d[f.name] = v
        return d


def load_run_aoi(value: Any, resolution: Any) -> Aoi:
    """The :class:`~ndvi_scale.analytics.aoi.Aoi` of ``value`` (a file path, a GeoDataFrame, shapely polygons in
    EPSG:4326, or an ``Aoi``), refused (one :class:`InputError` naming the file and the fix) when missing,
    unreadable, not polygons, invalid or smaller than one pixel of ``resolution`` metres."""
    import shapely

    from .analytics.aoi import Aoi, load_aoi

    kinds = "GeoJSON, GeoPackage, GeoParquet or Shapefile polygons"
    if isinstance(value, Aoi):
        return value
    if isinstance(value, shapely.Geometry):
        value = [value]
    if isinstance(value, str | os.PathLike):
        path = os.fspath(value)
        if not isinstance(path, str) or not path.strip():
            raise InputError(f"aoi {shown(value)} is empty or not text; give --aoi FILE ({kinds})")
        value = path.strip()
        if len(value) > 4096 or "\0" in value:  # longer than any path the system accepts
            raise InputError(f"aoi {shown(value)} is not a file path; give --aoi FILE ({kinds})")
    elif not (hasattr(value, "geometry") and hasattr(value, "crs")) and not (
        isinstance(value, list | tuple) and value and all(isinstance(g, shapely.Geometry) for g in value)
    ):
        raise InputError(f"aoi {shown(value)} is not a polygon file; give --aoi FILE ({kinds}), or in Python a "
                         "GeoDataFrame or shapely polygons in EPSG:4326")
    res = _number(resolution, "resolution", "metres > 0, e.g. 10")
    try:
        return load_aoi(value, resolution=res if res > 0 else DEFAULT_RESOLUTION)
    except InputError as exc:  # the messages name the file as given: a long path is cut, the fix stays
        if isinstance(value, str) and len(value) > MAX_QUOTED:
            raise InputError(str(exc).replace(value, cut(value))) from None
        raise
    except OSError as exc:  # e.g. a path the system refuses to look at
        raise InputError(f"aoi {shown(value)} cannot be opened ({type(exc).__name__}); give --aoi FILE "
                         f"({kinds})") from None


def normalise_crs(value: Any) -> str:
    """``auto`` or ``EPSG:XXXX`` of a known projected CRS in metres (the resolution is given in metres)."""
    v = _short_text(value, lower=False)
    if v.lower() == "auto":
        return "auto"
    m = re.fullmatch(r"(?i)(?:epsg:)?(\d{4,5})", v)
    if not m:
        raise InputError(f"crs {shown(value)} is invalid; expected 'auto' or EPSG:XXXX, e.g. EPSG:32631")
    code = f"EPSG:{int(m.group(1))}"
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        crs = CRS.from_user_input(code)
    except CRSError:
        raise InputError(
            f"crs {shown(value)} is not a known EPSG code; expected 'auto' or a projected CRS, e.g. EPSG:32631 "
            "(UTM 31N)"
        ) from None
    units = {(a.unit_name or "").lower() for a in crs.axis_info[:2]}
    if not crs.is_projected or not units <= {"metre", "meter"}:
        kind = "geographic (degrees)" if crs.is_geographic else f"not a projected CRS in metres ({', '.join(units)})"
        raise InputError(
            f"crs {shown(value)} is {kind}; --resolution is in metres: give 'auto' or a projected CRS in metres, "
            "e.g. EPSG:32631 (UTM 31N)"
        )
    return code


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise InputError(f"{name} {shown(value)} is not a boolean; expected true or false")


def _number(value: Any, name: str, expected: str) -> float:
    if isinstance(value, bool):
        raise InputError(f"{name} {shown(value)} is not a number; expected {expected}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{name} {shown(value)} is not a number; expected {expected}") from None
    if not math.isfinite(v):
        raise InputError(f"{name} {shown(value)} is not a finite number; expected {expected}")
    return v


def _integer_value(value: Any) -> int:
    """An int from an int, an integral float or an integer string (bools refused); TypeError/ValueError else."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value.strip())
    v = float(value)
    if not v.is_integer():
        raise ValueError(f"{shown(value)} is not a whole number")
    return int(v)


def _integer(value: Any, name: str, expected: str) -> int:
    try:
        return _integer_value(value)
    except (TypeError, ValueError, OverflowError):
        pass
    try:  # "2048.0" or 2048.0 are fine, 2048.5 is not
        v = _number(value, name, expected)
    except InputError:
        raise InputError(f"{name} {shown(value)} is not an integer; expected {expected}") from None
    if not v.is_integer():
        raise InputError(f"{name} {shown(value)} is not an integer; expected {expected}")
    return int(v)


def as_sequence(value: Any) -> Sequence[Any]:
    return value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
