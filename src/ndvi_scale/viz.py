"""Look at NDVI composites: one colour convention, interactive hvplot views and static PNG quicklooks.

Colour convention (:data:`NDVI_RANGE`, :func:`ndvi_palette`, :func:`ndvi_cmap`)
-------------------------------------------------------------------------------
NDVI is drawn on the fixed range **-0.2 .. 0.9** (never stretched to the data, so two maps, two periods or two
areas compare by eye), with a hard break at 0:

* ``NDVI < 0`` (water, snow, cloud leftovers): **blues**, light near 0, dark at -0.2; anything below -0.2 is
  :data:`WATER_COLOR` (colour bars are drawn with a "min" arrow). Negative values never look like soil.
* ``0 .. 0.3`` (bare soil, built-up, senescent crops): **browns** to sand;
* ``0.3 .. 0.5`` (sparse or young vegetation): **yellow** to yellow-green;
* ``0.5 .. 0.9`` (crops at peak, grassland, forest): **greens**, darker as NDVI grows; above 0.9 stays
  the darkest green.
* NaN (no clear observation in the period): **transparent** in interactive maps (``clipping_colors``) and
  :data:`NODATA_COLOR` (light grey) in PNG quicklooks.

Entry points
------------
* :func:`ndvi_map`: hvplot image of the composites with a time slider (needs ``hvplot``).
* :func:`ndvi_timeseries`: hvplot curve of NDVI at one point, marker sizes = clear observations per period.
* :func:`quicklook_png`: static PNG (matplotlib only) of every period as small multiples, or of one period.
* :func:`show`: open a written cube (local path, ``gs://``, ``s3://``) and write its quicklook (pages of at most
  :data:`PER_PAGE` panels, the day of the maximum/minimum beside a max/min cube) and/or its interactive HTML view
  (:mod:`ndvi_scale.viz_html`); used by ``ndvi-scale show ZARR --png PNG --html HTML`` and ``ndvi-scale compute
  --quicklook PNG``.

Pictures never mislead: panels carry coordinates (km, the cube's CRS) and a scale bar; the first and last period
labels stop at the dates the run asked for; an incomplete cube (an interrupted write, :mod:`ndvi_scale.cubestate`)
gets a banner and its regions not computed yet are hatched, unlike pixels without a clear observation (grey).

``import ndvi_scale.viz`` is cheap: matplotlib and hvplot are imported by the functions that need them.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .errors import InputError, NdviScaleError, OutputError, shown

__all__ = [
    "DEFAULT_DPI",
    "DEFAULT_WIDTH",
    "NDVI_NCOLORS",
    "NDVI_RANGE",
    "NDVI_STOPS",
    "NODATA_COLOR",
    "WATER_COLOR",
    "check_png_path",
    "ndvi_cmap",
    "ndvi_map",
    "ndvi_palette",
    "ndvi_timeseries",
    "open_cube",
    "period_label",
    "point_series",
    "quicklook_png",
    "select_periods",
    "show",
]

#: Fixed colour range of NDVI maps (values outside are clipped to the end colours or :data:`WATER_COLOR`).
NDVI_RANGE: tuple[float, float] = (-0.2, 0.9)

#: (NDVI, colour) stops of the palette, piecewise linear in RGB. Two stops at 0 make a hard break between the
#: negative blues (water) and the browns of bare soil.
NDVI_STOPS: tuple[tuple[float, str], ...] = (
    (-0.20, "#2c5a8c"),  # dark blue: open water
    (0.00, "#a9cce3"),  # light blue: shallow/turbid water, snow, wet shadows
    (0.00, "#7b4a1e"),  # brown: bare soil, built-up
    (0.15, "#b0803f"),  # light brown
    (0.30, "#e2c878"),  # sand
    (0.40, "#f3ec6e"),  # yellow: sparse vegetation
    (0.50, "#c4e072"),  # yellow-green
    (0.60, "#8ac463"),
    (0.70, "#4ea64c"),  # green
    (0.80, "#228139"),
    (0.90, "#0b5327"),  # dark green: dense canopy
)

#: Colour of NDVI below ``NDVI_RANGE[0]`` (deep water).
WATER_COLOR = "#1b3a63"
#: Colour of NaN (no clear observation) in PNG quicklooks; interactive maps leave NaN transparent.
NODATA_COLOR = "#c8c8c8"
#: Number of discrete colours: 220 steps of 0.005 NDVI over -0.2 .. 0.9, so the break falls on a step edge.
NDVI_NCOLORS = 220

#: Default quicklook width in pixels and resolution (dots per inch: sets the size of the text).
DEFAULT_WIDTH = 1200
DEFAULT_DPI = 100

_TIME_INDEX_RE = re.compile(r"^[+-]?\d{1,3}$")
#: Exceptions of zarr/xarray meaning "something is there, but it is not a Zarr group".
_NOT_ZARR = frozenset(
    {
        "GroupNotFoundError",
        "NodeNotFoundError",
        "NodeTypeValidationError",
        "MetadataValidationError",
        "FileNotFoundError",
        "JSONDecodeError",
    }
)


# ------------------------------------------------------------------------------------------------- colours


def _hex_to_rgb(color: str) -> np.ndarray:
    c = color.lstrip("#")
    return np.array([int(c[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.float64) / 255.0


def _rgb_at(values: np.ndarray) -> np.ndarray:
    """RGB (N, 3) in 0..1 of the palette at NDVI ``values`` (clipped to :data:`NDVI_RANGE`)."""
    pos = np.array([p for p, _ in NDVI_STOPS])
    rgb = np.stack([_hex_to_rgb(c) for _, c in NDVI_STOPS])
    v = np.clip(np.asarray(values, dtype=np.float64), pos[0], pos[-1])
    # side="right": at a repeated position (the break at 0) the later stop starts the next segment.
    i = np.clip(np.searchsorted(pos, v, side="right") - 1, 0, len(pos) - 2)
    span = pos[i + 1] - pos[i]
    t = np.where(span > 0, (v - pos[i]) / np.where(span > 0, span, 1.0), 0.0)
    return rgb[i] + (rgb[i + 1] - rgb[i]) * t[:, None]


def ndvi_palette(n: int = NDVI_NCOLORS) -> list[str]:
    """``n`` hex colours sampled at the centres of ``n`` equal steps of :data:`NDVI_RANGE`.

    Pass it as ``cmap=`` with ``clim=NDVI_RANGE`` to hvplot/holoviews/bokeh.
    """
    lo, hi = NDVI_RANGE
    centres = lo + (np.arange(n) + 0.5) * (hi - lo) / n
    return ["#{:02x}{:02x}{:02x}".format(*(round(c * 255) for c in row)) for row in _rgb_at(centres)]


def ndvi_cmap(n: int = NDVI_NCOLORS, *, nan_color: str | None = NODATA_COLOR) -> Any:
    """The NDVI palette as a matplotlib colormap (use with ``vmin, vmax = NDVI_RANGE``).

    Under the range: :data:`WATER_COLOR`; over: the darkest green; NaN: ``nan_color`` (None = transparent).
    """
    from matplotlib.colors import ListedColormap

    return ListedColormap(ndvi_palette(n), name="ndvi").with_extremes(
        under=WATER_COLOR,
        over=NDVI_STOPS[-1][1],
        bad=nan_color if nan_color is not None else (0.0, 0.0, 0.0, 0.0),
    )


# ------------------------------------------------------------------------------------------------- helpers


def _ndvi_array(obj: xr.Dataset | xr.DataArray, var: str = "ndvi") -> xr.DataArray:
    """The NDVI DataArray of a cube, with dims ``time, y, x`` (a missing time axis gets length 1)."""
    if isinstance(obj, xr.Dataset):
        if var not in obj.data_vars:
            raise InputError(
                f"the dataset has no {shown(var)} variable "
                f"(variables: {', '.join(map(str, obj.data_vars)) or 'none'});"
                " expected an ndvi-scale cube from ndvi_scale.compute or ndvi-scale compute"
            )
        arr = obj[var]
    elif isinstance(obj, xr.DataArray):
        arr = obj
    else:
        raise InputError(
            f"expected an xarray Dataset or DataArray of NDVI, got {type(obj).__name__}; pass the result of "
            "ndvi_scale.compute or xarray.open_zarr(...)"
        )
    missing = {"y", "x"} - set(arr.dims)
    if missing:
        raise InputError(
            f"NDVI array has dims {tuple(arr.dims)}; expected ('time', 'y', 'x') as written by ndvi-scale"
        )
    if "time" not in arr.dims:
        arr = (
            arr.expand_dims("time") if "time" in arr.coords else arr.expand_dims(time=[np.datetime64("NaT")])
        )
    extra = [d for d in arr.dims if d not in ("time", "y", "x")]
    if extra:
        raise InputError(
            f"NDVI array has extra dims {extra}; select one value of each first (e.g. .isel(...))"
        )
    return arr.transpose("time", "y", "x")


def period_label(start: Any, end: Any = None) -> str:
    """Short label of a compositing period: ``2024-05`` (month), ``2024`` (year), ``2024-05-01..05-10``."""
    t0 = pd.Timestamp(start)
    if pd.isna(t0):
        return "-"
    if end is None or pd.isna(pd.Timestamp(end)):
        return f"{t0:%Y-%m-%d}"
    t1 = pd.Timestamp(end)
    if t1 == t0:
        return f"{t0:%Y-%m-%d}"
    if t0.day == 1 and t0.month == 1 and t1.month == 12 and t1.day == 31 and t1.year == t0.year:
        return f"{t0:%Y}"
    if t0.day == 1 and t1.year == t0.year and t1.month == t0.month and t1.is_month_end:
        return f"{t0:%Y-%m}"
    if t1.year == t0.year:
        return f"{t0:%Y-%m-%d}..{t1:%m-%d}"
    return f"{t0:%Y-%m-%d}..{t1:%Y-%m-%d}"


def _labels(arr: xr.DataArray, span: tuple[Any, Any] | None = None) -> list[str]:
    """Period labels; with ``span`` (the run's requested first and last day) the first and last periods are cut
    to it: a weekly cube asked up to 2024-12-31 ends with ``2024-12-30..12-31``, not ``..2025-01-05``."""
    starts = list(arr["time"].values)
    ends = list(arr["time_end"].values) if "time_end" in arr.coords else [None] * arr.sizes["time"]
    if span is not None and starts:
        first, last = (np.datetime64(pd.Timestamp(d).normalize(), "ns") for d in span)
        if ends[0] is not None and starts[0] < first <= ends[0]:
            starts[0] = first
        if ends[-1] is not None and starts[-1] <= last < ends[-1]:
            ends[-1] = last
    return [period_label(t0, t1) for t0, t1 in zip(starts, ends, strict=True)]


def _requested_span(ds: Any) -> tuple[Any, Any] | None:
    """(start, end) the cube's last run asked for (its ``ndvi_scale_config``), or None."""
    import json

    from .cf import get_attr

    raw = get_attr(ds.attrs, "config") if isinstance(ds, xr.Dataset) else None
    try:
        cfg = json.loads(raw) if isinstance(raw, str) else raw
        return (pd.Timestamp(cfg["start"]), pd.Timestamp(cfg["end"])) if isinstance(cfg, dict) else None
    except (ValueError, KeyError, TypeError):
        return None


def select_periods(arr: xr.DataArray, time: Any = None) -> list[int]:
    """Indices along ``time`` chosen by ``time``.

    ``None`` or ``"all"``: every period. An int (or a string of at most 3 digits, ``"-1"``): that index,
    negative from the end. ``"last"``: the latest period holding any NDVI (computes a little), else the last
    one. A date (``"2024-06-15"``, ``"2024-06"``, ``datetime``): the period containing it (``time`` <= date <=
    ``time_end``), or the period starting on it. A list of any of these: each of them.
    """
    n = arr.sizes["time"]
    labels = _labels(arr)
    listing = ", ".join(labels) if n <= 24 else f"{labels[0]} .. {labels[-1]}"
    if time is None or (isinstance(time, str) and time.strip().lower() in ("", "all")):
        return list(range(n))
    if isinstance(time, list | tuple):
        out: list[int] = []
        for t in time:
            out += [i for i in select_periods(arr, t) if i not in out]
        return out
    if isinstance(time, str) and time.strip().lower() == "last":
        # from the end, one period at a time: usually only the last period is read
        for i in range(n - 1, -1, -1):
            if bool(arr.isel(time=i).notnull().any()):
                return [i]
        return [n - 1]
    if isinstance(time, str) and _TIME_INDEX_RE.match(time.strip()):
        time = int(time.strip())
    if isinstance(time, int | np.integer) and not isinstance(time, bool):
        if not -n <= int(time) < n:
            raise InputError(
                f"time index {int(time)} is out of range; the cube has {n} period(s) ({listing}): give "
                f"0..{n - 1}, -1 for the last, 'last', a date like 2024-06-15 or nothing for all"
            )
        return [int(time) % n]
    try:
        when = pd.Timestamp(time)
        if when.tzinfo is not None:
            when = when.tz_convert("UTC").tz_localize(None)
    except (TypeError, ValueError):
        raise InputError(
            f"time {shown(time)} is not a period index, 'last' or a date; give e.g. 0, -1, last or 2024-06-15"
        ) from None
    starts = pd.DatetimeIndex(arr["time"].values)
    if "time_end" in arr.coords:
        ends = pd.DatetimeIndex(arr["time_end"].values) + pd.Timedelta(days=1)
        hit = np.flatnonzero((starts <= when) & (when < ends))
    else:
        hit = np.flatnonzero(starts.normalize() == when.normalize())
    if not hit.size:
        raise InputError(
            f"time {shown(time)} is in no period of the cube ({listing}); give a date inside one of them"
        )
    return [int(hit[0])]


def _crs_of(obj: xr.Dataset | xr.DataArray) -> Any:
    """pyproj CRS of the cube (from its ``spatial_ref``), or None."""
    import rioxarray  # noqa: F401  (the .rio accessor)

    try:
        crs = obj.rio.crs
    except Exception:  # noqa: BLE001  (a broken grid_mapping is just "no CRS" here)
        crs = None
    if crs is None:
        return None
    from pyproj import CRS

    return CRS.from_user_input(crs.to_wkt())


def _crs_name(obj: xr.Dataset | xr.DataArray) -> str:
    crs = _crs_of(obj)
    if crs is None:
        return ""
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.name


def _require_hvplot() -> Any:
    try:
        import holoviews as hv

        before = hv.Store.current_backend if hv.Store.renderers else None
        import hvplot.pandas  # noqa: F401  (registers .hvplot on pandas)
        import hvplot.xarray  # noqa: F401  (registers .hvplot on xarray)

        # The first import of hvplot.pandas/xarray loads bokeh and makes it current: keep the user's choice
        # (e.g. hvplot.extension("matplotlib") made before the first call).
        if before is not None and before in hv.Store.renderers and hv.Store.current_backend != before:
            hv.Store.set_current_backend(before)
    except ImportError:
        raise ImportError(
            "ndvi_scale.viz.ndvi_map/ndvi_timeseries need hvplot (an ndvi-scale dependency): pip install hvplot "
            "(quicklook_png and show need matplotlib only)"
        ) from None
    return hv


def _step_for(arr: xr.DataArray, max_pixels: int | None) -> int:
    if not max_pixels:
        return 1
    return max(1, math.ceil(max(arr.sizes["y"], arr.sizes["x"]) / max_pixels))


def _coarsen(arr: xr.DataArray, step: int) -> xr.DataArray:
    """Block mean of ``step`` x ``step`` pixels (NaN-aware), lazy on dask; coordinates of block centres."""
    if step <= 1:
        return arr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = arr.coarsen(y=step, x=step, boundary="trim").mean()
    return out.astype(np.float32).assign_attrs(arr.attrs)


# ------------------------------------------------------------------------------------------- interactive


def ndvi_map(
    ds: xr.Dataset | xr.DataArray,
    *,
    time: Any = None,
    var: str = "ndvi",
    max_pixels: int | None = 1000,
    width: int = 600,
    title: str | None = None,
    **hvplot_kwargs: Any,
) -> Any:
    """hvplot image of the NDVI composites with a time slider (one frame per period), in the NDVI colours.

    ``ds`` is a cube (lazy or not) or its ``ndvi`` DataArray; ``time`` restricts the periods (as in
    :func:`select_periods`; a single period gives no slider). Frames larger than ``max_pixels`` along a side
    are block-averaged lazily before reaching the browser (``None`` to keep every pixel). Nothing is computed
    until a frame is shown. Returns a holoviews DynamicMap (an Image for one period), which notebooks display
    with a slider; ``widget_location="bottom"`` returns a panel layout with the slider there instead. Extra
    keyword arguments go to ``.hvplot.image`` (e.g. ``dynamic=False`` to embed every frame in a static HTML
    page).
    """
    _require_hvplot()
    arr = _ndvi_array(ds, var)
    idx = select_periods(arr, time) if time is not None else list(range(arr.sizes["time"]))
    crs = _crs_name(ds)
    arr = _coarsen(arr.isel(time=idx), _step_for(arr, max_pixels)).rename(var)
    arr.attrs.setdefault("long_name", "NDVI")
    options: dict[str, Any] = dict(
        x="x",
        y="y",
        cmap=ndvi_palette(),
        clim=NDVI_RANGE,
        colorbar=True,
        data_aspect=1,
        frame_width=width,
        xformatter="%.0f",
        yformatter="%.0f",
        xlabel=f"x (m, {crs})" if crs else "x",
        ylabel=f"y (m, {crs})" if crs else "y",
        clabel="NDVI",
        title=title if title is not None else "NDVI",
    )
    if arr.sizes["time"] > 1:
        options.update(groupby="time")
    else:
        arr = arr.isel(time=0)
        if title is None:
            options["title"] = f"NDVI {_labels(_ndvi_array(ds, var).isel(time=idx))[0]}"
    options.update(hvplot_kwargs)
    widget_location = options.pop("widget_location", None)
    plot = arr.hvplot.image(**options)
    plot = plot.opts(clipping_colors={"min": WATER_COLOR, "max": NDVI_STOPS[-1][1], "NaN": "transparent"})
    if widget_location is not None and arr.ndim == 3:
        import panel as pn

        return pn.panel(plot, widget_location=widget_location)
    return plot


def _point_xy(
    ds: xr.Dataset | xr.DataArray, x: float | None, y: float | None, lon: float | None, lat: float | None
) -> tuple[float, float]:
    if (x is None) != (y is None) or (lon is None) != (lat is None) or (x is None) == (lon is None):
        raise InputError("give the point as x=, y= (cube CRS, metres) or as lon=, lat= (degrees), not both")
    if lon is None or lat is None:
        assert x is not None and y is not None
        return float(x), float(y)
    crs = _crs_of(ds)
    if crs is None:
        raise InputError(
            "the cube has no CRS (spatial_ref), so lon/lat cannot be placed; give x=, y= instead"
        )
    from pyproj import Transformer

    tx, ty = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(float(lon), float(lat))
    return float(tx), float(ty)


def _inside(coord: np.ndarray, value: float) -> bool:
    if coord.size == 0:
        return False
    half = abs(float(coord[1] - coord[0])) / 2 if coord.size > 1 else 5.0
    return float(coord.min()) - half <= value <= float(coord.max()) + half


def point_series(
    ds: xr.Dataset | xr.DataArray,
    x: float | None = None,
    y: float | None = None,
    *,
    lon: float | None = None,
    lat: float | None = None,
    var: str = "ndvi",
) -> pd.DataFrame:
    """NDVI and clear-observation count per period at the pixel nearest to a point, as a DataFrame.

    Columns: ``time`` (period start), ``time_end``, ``period`` (label), ``ndvi``, ``valid_count`` (when
    the cube has it), ``x``, ``y`` (the pixel centre used). Computes only that pixel.
    """
    px, py = _point_xy(ds, x, y, lon, lat)
    arr = _ndvi_array(ds, var)
    if not (_inside(arr["x"].values, px) and _inside(arr["y"].values, py)):
        xs, ys = arr["x"].values, arr["y"].values
        raise InputError(
            f"point x={px:.1f}, y={py:.1f} ({_crs_name(ds) or 'cube CRS'}) is outside the cube "
            f"(x {xs.min():.0f}..{xs.max():.0f}, y {ys.min():.0f}..{ys.max():.0f}); pick a point inside it"
        )
    cols = {var: arr}
    if isinstance(ds, xr.Dataset) and "valid_count" in ds.data_vars:
        cols["valid_count"] = ds["valid_count"]
    at = xr.Dataset(cols).sel(x=px, y=py, method="nearest").compute()
    frame = pd.DataFrame(
        {
            "time": pd.DatetimeIndex(at["time"].values),
            "time_end": pd.DatetimeIndex(at["time_end"].values) if "time_end" in at.coords else pd.NaT,
            "period": _labels(arr),
            "ndvi": at[var].values.astype(np.float64),
        }
    )
    if "valid_count" in at:
        frame["valid_count"] = at["valid_count"].values.astype(np.int64)
    frame["x"] = float(at["x"])
    frame["y"] = float(at["y"])
    return frame


def ndvi_timeseries(
    ds: xr.Dataset | xr.DataArray,
    x: float | None = None,
    y: float | None = None,
    *,
    lon: float | None = None,
    lat: float | None = None,
    var: str = "ndvi",
    width: int = 650,
    height: int = 300,
    title: str | None = None,
) -> Any:
    """hvplot curve of NDVI per period at one point, with the number of clear observations.

    Give the point in the cube CRS (``x``, ``y``, metres) or in degrees (``lon``, ``lat``); the nearest pixel
    is used. Each period is a marker on the curve, sized and coloured by its clear-observation count
    (``valid_count``; hover for the values); periods without any clear observation leave a gap in the curve
    and are marked with a grey cross at the bottom. Computes only that pixel.
    """
    hv = _require_hvplot()
    frame = point_series(ds, x, y, lon=lon, lat=lat, var=var)
    bokeh = _backend() == "bokeh"
    has_count = "valid_count" in frame
    ok = frame[frame["ndvi"].notna()]
    lo, hi = NDVI_RANGE
    ylim = (
        min(lo, float(ok["ndvi"].min()) if len(ok) else lo) - 0.05,
        max(hi, float(ok["ndvi"].max()) if len(ok) else hi) + 0.05,
    )
    times = frame["time"]
    margin = (
        (times.iloc[-1] - times.iloc[0]) / max(2 * (len(times) - 1), 1)
        if len(times) > 1
        else pd.Timedelta(1, "D")
    )
    xlim = (times.iloc[0] - margin, times.iloc[-1] + margin)
    where = f"x={frame['x'].iloc[0]:.0f}, y={frame['y'].iloc[0]:.0f}"
    if lon is not None:
        where = f"lon {lon:.4f}, lat {lat:.4f} ({where})"
    size = (
        dict(width=width, height=height) if bokeh else dict(aspect=width / height, fig_size=100 * width / 400)
    )
    axes = dict(xlim=xlim, ylim=ylim, xlabel="period start", ylabel="NDVI", **size)
    if not bokeh:
        from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

        axes["xformatter"] = ConciseDateFormatter(AutoDateLocator())
    vdims = ["ndvi", "period"] + (["valid_count"] if has_count else [])
    curve = hv.Curve(frame, "time", vdims, label="NDVI").opts(
        color="#4d4d4d",
        title=title if title is not None else f"NDVI at {where}",
        **({"line_width": 1.5, "tools": ["hover"]} if bokeh else {"linewidth": 1.5}),
        **axes,
    )
    biggest = max(int(ok["valid_count"].max()), 1) if has_count and len(ok) else 1
    marker = 5 + 12 * np.sqrt(ok["valid_count"].to_numpy() / biggest) if has_count else np.full(len(ok), 8.0)
    points = hv.Scatter(ok.assign(marker=marker), "time", [*vdims, "marker"], label="clear observations")
    if has_count and len(ok):
        style: dict[str, Any] = dict(
            color="valid_count", cmap="viridis", colorbar=True, clabel="clear observations", clim=(0, biggest)
        )
        style.update(
            {"size": hv.dim("marker"), "tools": ["hover"]} if bokeh else {"s": hv.dim("marker") ** 2}
        )
    else:
        style = {"color": "#1a9850"} | ({"size": 8} if bokeh else {"s": 40})
    plot = curve * points.opts(**style)
    empty = frame[frame["ndvi"].isna()]
    if len(empty):
        crosses = hv.Scatter(
            empty.assign(ndvi=ylim[0] + 0.03), "time", ["ndvi", "period"], label="no clear observation"
        )
        plot = plot * crosses.opts(color="#8c8c8c", marker="x", **({"size": 10} if bokeh else {"s": 60}))
    return plot.opts(legend_position="bottom_left", show_legend=True)


def _backend() -> str:
    import holoviews as hv

    return hv.Store.current_backend or "bokeh"


# ------------------------------------------------------------------------------------------------ static


def open_cube(url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Open an ndvi-scale cube (local path, ``gs://``, ``s3://``) lazily, with clear errors.

    Credentials and endpoints come from the environment as for writing (see :mod:`ndvi_scale.storage`).
    Raises :class:`InputError` for a missing store or a store that is not an ndvi-scale cube, and
    :class:`~ndvi_scale.errors.StorageError` when object storage refuses or cannot be reached.
    """
    from .storage import open_location, storage_error

    try:
        loc = open_location(os.fspath(url), storage_options)
    except InputError as exc:
        raise InputError(f"cannot open zarr store {shown(os.fspath(url))}: {exc}") from None
    if not loc.exists():
        raise InputError(
            f"zarr store {loc.url} does not exist; give the --out of a previous ndvi-scale compute"
        )
    if loc.is_local and not os.path.isdir(loc.path):
        raise InputError(
            f"{loc.url} is a file, not a Zarr store; give the --out folder of ndvi-scale compute"
        )
    try:
        store = loc.store
        store = store() if callable(store) else store  # a method in older ndvi_scale.storage, now a property
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # consolidated-metadata and CF decoding chatter
            ds = xr.open_zarr(store, decode_coords="all", consolidated=False)
    except NdviScaleError:
        raise
    except Exception as exc:  # noqa: BLE001  (classified below)
        name = type(exc).__name__
        if name in _NOT_ZARR or isinstance(exc, KeyError | ValueError):
            detail = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise InputError(
                f"{loc.url} is not a Zarr store ({name}: {detail}); give the --out of ndvi-scale compute"
            ) from None
        raise storage_error(exc, loc, "reading") from None
    if "ndvi" not in ds.data_vars:
        found = ", ".join(map(str, ds.data_vars)) or "no variables"
        raise InputError(
            f"{loc.url} is a Zarr store but not an ndvi-scale cube: it has no 'ndvi' variable ({found}); "
            "give the --out of ndvi-scale compute"
        )
    if not {"y", "x"} <= set(ds["ndvi"].dims):
        raise InputError(
            f"{loc.url} is not an ndvi-scale cube: 'ndvi' has dims {tuple(ds['ndvi'].dims)}, expected "
            "('time', 'y', 'x')"
        )
    ds.attrs.setdefault("ndvi_scale_url", loc.url)
    return ds


def _fig_layout(
    n: int, ny: int, nx: int, width: int, dpi: int, ncols: int | None, title_lines: int = 1, label_chars: int = 8
) -> dict[str, Any]:
    """Pixel geometry of the quicklook: columns, rows, panel size, margins, total height."""
    fs = 9.0 * dpi / 72.0  # 9 pt text, in pixels
    pad = 0.8 * fs
    if ncols is None:
        aspect = nx / max(ny, 1)
        # about as many columns as make a landscape-ish page, never more than 6, and never so many that the
        # panel titles (label + clear share, ~0.6 em per character) would run into each other
        fit = max(1, int((width - 2 * pad) // ((label_chars + 17) * 0.6 * fs + 0.8 * fs)))
        ncols = max(1, min(n, 6, fit, round(math.sqrt(n * 1.6 / max(aspect, 0.2)))))
    ncols = max(1, min(int(ncols), n))
    nrows = math.ceil(n / ncols)
    hgap = 0.8 * fs
    panel_title = 1.7 * fs
    vgap = 0.6 * fs
    xlabels = 2.6 * fs  # the x coordinates (and their axis label) under the last row
    axis_w = 4.0 * fs  # the y coordinates (and their axis label) left of the first column
    panel_w = (width - 2 * pad - axis_w - (ncols - 1) * hgap) / ncols
    if panel_w < 8:
        raise InputError(
            f"width {width} px is too small for {n} panel(s) in {ncols} column(s); "
            "give a larger width or one period"
        )
    panel_h = panel_w * ny / max(nx, 1)
    title_h = (1.0 + 1.6 * title_lines) * fs
    cbar_block = 4.2 * fs
    height = pad + title_h + nrows * (panel_title + panel_h) + (nrows - 1) * vgap + xlabels + cbar_block + pad
    return dict(
        fs=fs,
        pad=pad,
        ncols=ncols,
        nrows=nrows,
        hgap=hgap,
        vgap=vgap,
        panel_title=panel_title,
        panel_w=panel_w,
        panel_h=panel_h,
        axis_w=axis_w,
        title_h=title_h,
        cbar_block=cbar_block,
        height=int(math.ceil(height)),
    )


def quicklook_png(
    ds: xr.Dataset | xr.DataArray | str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    time: Any = None,
    *,
    width: int = DEFAULT_WIDTH,
    dpi: int = DEFAULT_DPI,
    ncols: int | None = None,
    title: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    var: str = "ndvi",
) -> tuple[int, int]:
    """Write a static PNG of NDVI composites in the NDVI colours with a colour bar; return (width, height).

    ``ds`` is a cube (lazy or not), its ``ndvi`` DataArray, or the path/URL of a written cube. ``time`` picks
    the periods (:func:`select_periods`): ``None`` = every period as small multiples, an index, ``"last"`` or
    a date = one period. ``width`` is the image width in pixels (exact); the height follows from the layout
    and the aspect of the area. ``dpi`` sets the text size (9 pt text is ``9 * dpi / 72`` pixels). Each panel
    is block-averaged to about its size in pixels before anything is computed, so a large cube is reduced by
    dask chunk by chunk and never loaded whole. Uses matplotlib only (Agg), never a display.

    ``var="max_date"`` (or ``"min_date"``) draws, for a max/min cube, the day of each period on which the pixel's
    NDVI was highest (lowest): 1 = the period's first day. Panels carry coordinates (km, the cube's CRS) and a
    scale bar. An incomplete cube (an interrupted write, :mod:`ndvi_scale.cubestate`) gets a banner, and its
    regions not computed yet are hatched, never drawn like pixels without a clear observation. The file is
    written with the permissions the umask gives a new file (0644 under umask 022). Raises :class:`InputError`
    for a bad ``time``, ``width``, ``dpi`` or ``var``, :class:`OutputError` when the PNG cannot be written.
    """
    width, dpi = _check_size(width, dpi)
    out = check_png_path(png_path)
    if isinstance(ds, str | os.PathLike):
        ds = open_cube(ds, storage_options)
    kind = "ndvi" if var == "ndvi" else "day"
    if kind == "day" and (not isinstance(ds, xr.Dataset) or var not in ds.data_vars):
        raise InputError(f"the cube has no {shown(var)} variable; only max/min cubes have max_date/min_date")
    arr = _ndvi_array(ds)
    idx = select_periods(arr, time)
    labels = [_labels(arr, _requested_span(ds))[i] for i in idx]
    ny, nx = arr.sizes["y"], arr.sizes["x"]
    if ny == 0 or nx == 0:
        raise InputError(f"the cube is empty (y {ny} x {nx} pixels); nothing to draw")
    from .cubestate import completeness  # imports the write stage: not at import time of viz

    state = completeness(ds) if isinstance(ds, xr.Dataset) else None
    banner = state.banner() if state is not None else ""
    if title is None:
        title = _default_title(ds, arr, var)
    lines = _wrap(title, width, dpi)
    banner_lines = _wrap(banner, width, dpi) if banner else []
    lay = _fig_layout(len(idx), ny, nx, width, dpi, ncols, len(lines) + len(banner_lines),
                      max((len(t) for t in labels), default=8))
    step = max(1, math.floor(min(nx / lay["panel_w"], ny / max(lay["panel_h"], 1))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if kind == "day":
            values = _day_of_period(ds[var].isel(time=idx), step)
        else:
            values = np.asarray(_coarsen(arr.isel(time=idx), step).values, dtype=np.float32)
    computed = None
    if state is not None and not state.complete:
        computed = np.stack([state.pixel_mask(i, ny, nx)[: values.shape[1] * step: step,
                                                          : values.shape[2] * step: step] for i in idx])
    xs, ys = arr["x"].values, arr["y"].values
    dx = abs(float(xs[1] - xs[0])) if nx > 1 else 10.0
    dy = abs(float(ys[1] - ys[0])) if ny > 1 else 10.0
    extent = (
        float(xs.min()) - dx / 2,
        float(xs.max()) + dx / 2,
        float(ys.min()) - dy / 2,
        float(ys.max()) + dy / 2,
    )
    flip_y = ny > 1 and ys[0] < ys[-1]  # north-up images have y decreasing; draw any grid north up
    _draw(values, labels, extent, flip_y, lay, width, dpi, "\n".join(lines), out,
          computed=computed, banner="\n".join(banner_lines), kind=kind, crs=_crs_name(ds), method=var.split("_")[0])
    return _png_size(out)


def _day_of_period(dates: xr.DataArray, step: int) -> np.ndarray:
    """Day of its period (1 = first day) of each pixel's max/min date, block-sampled by ``step``; NaN if none."""
    sub = dates.isel(y=slice(0, None, step), x=slice(0, None, step))
    raw = np.asarray(sub.values)
    starts = np.asarray(dates["time"].values).astype("datetime64[D]")[:, None, None]
    if np.issubdtype(raw.dtype, np.datetime64):
        days = (raw.astype("datetime64[D]") - starts).astype("float64")
        days[np.isnat(raw)] = np.nan
    else:  # undecoded: int days since 1970-01-01
        days = raw.astype("float64") - starts.astype("int64")
        days[(raw < -10**6) | ~np.isfinite(days)] = np.nan
    return (days + 1).astype(np.float32)


def _check_size(width: Any, dpi: Any) -> tuple[int, int]:
    try:
        w, d = int(width), int(dpi)
    except (TypeError, ValueError):
        raise InputError(
            f"width {shown(width)} / dpi {shown(dpi)} are not integers; give e.g. width=1200, dpi=100"
        ) from None
    if not 100 <= w <= 20000:
        raise InputError(f"width {w} px is out of range; expected 100..20000 pixels, e.g. 1200")
    if not 20 <= d <= 1200:
        raise InputError(f"dpi {d} is out of range; expected 20..1200, e.g. 100")
    return w, d


def check_png_path(png_path: Any) -> Path:
    """Validate a quicklook path before any work: a local ``.png`` file name in an existing folder.

    Raises :class:`InputError` (not a ``.png``, a URL, empty) or :class:`OutputError` (missing folder, a
    folder).
    """
    if not isinstance(png_path, str | os.PathLike) or not os.fspath(png_path).strip():
        raise InputError(f"png path {shown(png_path)} is empty; give a file name ending in .png")
    raw = os.fspath(png_path)
    if "://" in raw:
        raise InputError(
            f"png path {raw} is a URL; quicklooks are written to a local file, e.g. quicklook.png"
        )
    out = Path(raw).expanduser()
    if out.suffix.lower() != ".png":
        raise InputError(f"png path {raw} does not end in .png; give a file name like quicklook.png")
    if out.is_dir():
        raise OutputError(
            f"cannot write quicklook {raw}: it is a folder; give a file name like quicklook.png"
        )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write quicklook {raw}: folder {parent} does not exist; create it first")
    return out


def _default_title(ds: Any, arr: xr.DataArray, var: str = "ndvi") -> str:
    attrs = ds.attrs if isinstance(ds, xr.Dataset) else {}
    head = str(attrs.get("title") or "NDVI composites")
    if var != "ndvi":
        head = f"{var}: day of each period when NDVI was {'highest' if var.startswith('max') else 'lowest'}"
    crs = _crs_name(ds)
    ny, nx = arr.sizes["y"], arr.sizes["x"]
    xs = arr["x"].values
    res = abs(float(xs[1] - xs[0])) if nx > 1 else None
    grid = f"{nx} x {ny} px" + (f" at {res:g} m" if res else "") + (f", {crs}" if crs else "")
    return f"{head} ({grid})"


def _wrap(title: str, width: int, dpi: int) -> list[str]:
    """The title cut into lines that fit the image width (bold 11.25 pt text: ~0.62 em per character)."""
    import textwrap

    fs = 9.0 * dpi / 72.0
    chars = max(12, int((width - 1.6 * fs) / (0.62 * 1.25 * fs)))
    return textwrap.wrap(title, chars) or [""]


#: Colours of the stripes drawn over regions an interrupted write has not computed yet (never like "no data").
NOT_COMPUTED_COLORS = ("#ffffff", "#e8a0a0")


def _hatch(shape: tuple[int, int], period: int = 6) -> np.ndarray:
    """RGBA (ny, nx, 4) diagonal stripes in :data:`NOT_COMPUTED_COLORS`."""
    yy, xx = np.indices(shape)
    stripe = ((yy + xx) // max(period // 2, 1)) % 2 == 0
    rgba = np.empty((*shape, 4))
    rgba[stripe] = [*_hex_to_rgb(NOT_COMPUTED_COLORS[0]), 1.0]
    rgba[~stripe] = [*_hex_to_rgb(NOT_COMPUTED_COLORS[1]), 1.0]
    return rgba


def _nice_length(metres: float) -> float:
    """Largest 1/2/5 x 10^k metres not above ``metres``."""
    k = 10 ** math.floor(math.log10(max(metres, 1e-9)))
    return max(m * k for m in (1, 2, 5) if m * k <= metres)


def _scale_bar(ax: Any, extent: tuple[float, float, float, float], fs_pt: float, panel_h: float) -> None:
    """A scale bar (at most a quarter of the panel width, rounded to 1/2/5 x 10^k) in the lower left corner, 3 px
    thick whatever the panel size (matplotlib's AnchoredSizeBar)."""
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    x0, x1, y0, y1 = extent
    length = _nice_length((x1 - x0) / 4)
    text = f"{length / 1000:g} km" if length >= 1000 else f"{length:g} m"
    bar = AnchoredSizeBar(ax.transData, length, text, "lower left", pad=0.3, borderpad=0.5, sep=2, frameon=True,
                          size_vertical=3 * (y1 - y0) / max(panel_h, 1),
                          fontproperties=FontProperties(size=fs_pt * 0.8))
    bar.patch.set_alpha(0.8)
    bar.patch.set_edgecolor("none")
    ax.add_artist(bar)


def _draw(
    values: np.ndarray,
    labels: Sequence[str],
    extent: tuple[float, float, float, float],
    flip_y: bool,
    lay: Mapping[str, Any],
    width: int,
    dpi: int,
    title: str,
    out: Path,
    *,
    computed: np.ndarray | None = None,
    banner: str = "",
    kind: str = "ndvi",
    crs: str = "",
    method: str = "max",
) -> None:
    from matplotlib.colorbar import ColorbarBase
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    height = lay["height"]
    fs_pt = lay["fs"] * 72.0 / dpi
    # +0.25 px: Agg truncates width*dpi, and W/dpi*dpi may come back as W - 1e-12.
    fig = Figure(figsize=((width + 0.25) / dpi, (height + 0.25) / dpi), dpi=dpi, facecolor="white")
    if kind == "day":
        from matplotlib import colormaps

        longest = max(31, int(np.nanmax(values)) if np.isfinite(values).any() else 31)
        cmap = colormaps["viridis"].resampled(longest).with_extremes(bad=NODATA_COLOR)
        norm = Normalize(0.5, longest + 0.5)
    else:
        cmap = ndvi_cmap()
        norm = Normalize(*NDVI_RANGE)

    def box(left: float, top: float, w: float, h: float) -> tuple[float, float, float, float]:
        """Pixel box (from the top-left corner) -> figure fraction (left, bottom, width, height)."""
        return (left / width, 1 - (top + h) / height, w / width, h / height)

    pad, fs = lay["pad"], lay["fs"]
    fig.text(
        0.5,
        1 - pad / height,
        title,
        ha="center",
        va="top",
        fontsize=fs_pt * 1.25,
        fontweight="bold",
        linespacing=1.15,
    )
    if banner:
        fig.text(0.5, 1 - (lay["title_h"] - 0.2 * fs) / height, banner, ha="center", va="bottom", linespacing=1.15,
                 fontsize=fs_pt, color="#9b1c1c", fontweight="bold",
                 bbox=dict(facecolor="#fde8e8", edgecolor="#9b1c1c", boxstyle="round,pad=0.25", linewidth=0.8))
    km = FuncFormatter(lambda v, _pos: f"{v / 1000:g}")
    top0 = pad + lay["title_h"]
    last_row = (len(labels) - 1) // lay["ncols"]
    for k, (img, label) in enumerate(zip(values, labels, strict=True)):
        r, c = divmod(k, lay["ncols"])
        left = pad + lay["axis_w"] + c * (lay["panel_w"] + lay["hgap"])
        top = top0 + r * (lay["panel_title"] + lay["panel_h"] + lay["vgap"]) + lay["panel_title"]
        ax = fig.add_axes(box(left, top, lay["panel_w"], lay["panel_h"]))
        ax.set_facecolor(NODATA_COLOR)
        done = computed[k] if computed is not None else np.ones(img.shape, dtype=bool)
        ok = np.isfinite(img) & done
        ax.imshow(
            img[::-1] if flip_y else img,
            cmap=cmap,
            norm=norm,
            extent=extent,
            interpolation="nearest",
            aspect="auto",
            origin="upper",
        )
        if not done.all():
            overlay = _hatch(img.shape, max(4, img.shape[1] // 24))
            overlay[done, 3] = 0.0
            ax.imshow(overlay[::-1] if flip_y else overlay, extent=extent, interpolation="nearest", aspect="auto",
                      origin="upper")
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(4, steps=[1, 2, 5, 10]))
            axis.set_major_formatter(km)
        ax.tick_params(labelsize=fs_pt * 0.75, length=0.25 * fs, pad=0.15 * fs,
                       labelleft=c == 0, labelbottom=r == last_row or k + lay["ncols"] >= len(labels))
        if k == 0:
            _scale_bar(ax, extent, fs_pt, lay["panel_h"])
        if c == 0:
            ax.set_ylabel("y (km)", fontsize=fs_pt * 0.75, labelpad=0.2 * fs)
        if c == 0 and (r == last_row or k + lay["ncols"] >= len(labels)):
            ax.set_xlabel(f"x (km, {crs})" if crs else "x (km)", fontsize=fs_pt * 0.75, labelpad=0.15 * fs,
                          loc="left")
        for spine in ax.spines.values():
            spine.set_linewidth(0.5)
            spine.set_color("#666666")
        n_done = int(done.sum())
        frac = float(ok.sum()) / n_done if n_done else 0.0
        if n_done == 0:
            note = "not computed"
        elif n_done < done.size:
            note = f"{n_done / done.size:.0%} computed"
        elif kind == "day":
            note = ""
        else:
            note = f"{frac:.0%} clear" if frac < 1 else ""
        ax.set_title(f"{label}  ({note})" if note else label, fontsize=fs_pt, pad=0.25 * fs)
        if n_done and not ok.any():
            ax.text(0.5, 0.5, "no clear observation", ha="center", va="center", transform=ax.transAxes,
                    fontsize=fs_pt, color="#444444")
        elif n_done == 0:
            ax.text(0.5, 0.5, "not computed yet", ha="center", va="center", transform=ax.transAxes,
                    fontsize=fs_pt, color="#9b1c1c", bbox=dict(facecolor="white", edgecolor="none", alpha=0.8))
    # colour bar (NDVI: with the "below range" arrow, deep water), then swatches for no data and not computed
    avail = width - 2 * pad
    cb_w = max(min(0.55 * width, avail - 16 * fs), 0.4 * avail)
    cb_h = 0.9 * fs
    cb_top = height - pad - lay["cbar_block"] + 0.9 * fs
    swatch = 1.2 * fs
    cb_left = pad + max((avail - cb_w - 15 * fs) / 2, 0)
    cax = fig.add_axes(box(cb_left, cb_top, cb_w, cb_h))
    if kind == "day":
        longest = int(float(norm.vmax or 31.5) - 0.5)
        ticks = [1, *range(5, longest + 1, 5)]
        bar = ColorbarBase(cax, cmap=cmap, norm=norm, orientation="horizontal", ticks=ticks)
        label = (f"day of the period when NDVI was {'highest' if method == 'max' else 'lowest'} "
                 "(1 = the period's first day)")
    else:
        every = 0.2 if cb_w / fs >= 14 else 0.4
        ticks = [t for t in np.arange(-0.2, 0.91, every).round(1) if NDVI_RANGE[0] <= t <= NDVI_RANGE[1]]
        bar = ColorbarBase(cax, cmap=cmap, norm=norm, orientation="horizontal", extend="min", ticks=ticks)
        label = "NDVI  (blue < 0: water, snow;  brown 0-0.3: bare soil;  yellow to green: vegetation)"
    bar.ax.tick_params(labelsize=fs_pt * 0.9, length=0.3 * fs)
    bar.set_label(label, fontsize=fs_pt * 0.9)
    sx = min(cb_left + cb_w + 1.5 * fs, width - pad - 14 * fs)
    swatches: list[tuple[Any, str]] = [(NODATA_COLOR, "no clear observation")]
    if computed is not None and not computed.all():
        swatches.append((None, "not computed"))
    for i, (color, text) in enumerate(swatches):
        top = cb_top - (swatch - cb_h) / 2 + i * 1.6 * fs - (0.8 * fs if len(swatches) > 1 else 0)
        sax = fig.add_axes(box(sx, top, swatch, swatch))
        if color is None:
            sax.imshow(_hatch((12, 12), 4), extent=(0, 1, 0, 1), interpolation="nearest")
            sax.add_patch(Rectangle((0, 0), 1, 1, facecolor="none", edgecolor="#666666", linewidth=0.5))
        else:
            sax.add_patch(Rectangle((0, 0), 1, 1, facecolor=color, edgecolor="#666666", linewidth=0.5))
        sax.set_xlim(0, 1)
        sax.set_ylim(0, 1)
        sax.set_axis_off()
        fig.text((sx + swatch + 0.4 * fs) / width, 1 - (top + swatch / 2) / height, text, ha="left",
                 va="center", fontsize=fs_pt * 0.9)
    _save(fig, out, dpi)


def _save(fig: Any, out: Path, dpi: int) -> None:
    """Write ``fig`` next to ``out`` and rename it into place (a reader never sees half a PNG), with the
    permissions the umask gives any new file (``mkstemp`` alone would leave 0600)."""
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{out.name}.", suffix=".png", dir=out.parent if str(out.parent) else "."
        )
        os.close(fd)
    except OSError as exc:
        raise OutputError(
            f"cannot write quicklook {out}: {exc.strerror or exc}; choose a writable folder"
        ) from None
    try:
        fig.savefig(tmp, dpi=dpi, format="png", facecolor="white")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(
            f"cannot write quicklook {out}: {exc.strerror or exc}; choose a writable folder"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process umask (read by setting it and setting it back: there is no other way in Python)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header (IHDR), without decoding the image."""
    with open(path, "rb") as f:
        head = f.read(24)
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


#: Most panels on one PNG page of :func:`show`: more (a weekly year has 53) go to further pages, so that every
#: panel stays large enough to read (4-6 columns at the default width).
PER_PAGE = 24


def _page_path(png: str, page: int, suffix: str = "") -> str:
    """``june.png`` for page 1, ``june-2.png`` for page 2; ``suffix`` before the number (``-max_date``)."""
    stem, ext = os.path.splitext(png)
    return f"{stem}{suffix}{'' if page == 1 else f'-{page}'}{ext}"


def show(
    zarr_url: str | os.PathLike[str],
    png: str | os.PathLike[str] | None = None,
    time: Any = None,
    *,
    width: int = DEFAULT_WIDTH,
    dpi: int = DEFAULT_DPI,
    storage_options: Mapping[str, Any] | None = None,
    html: str | os.PathLike[str] | None = None,
    per_page: int = PER_PAGE,
) -> str:
    """Open a written cube (local path, ``gs://``, ``s3://``), write its pictures, return a summary line.

    ``png``: quicklook PNG(s) of the periods ``time`` picks (:func:`select_periods`; ``None``: every period), at
    most ``per_page`` panels per file: ``june.png``, then ``june-2.png``, ... For a max/min cube, the day of the
    extreme goes beside them (``june-max_date.png``). ``html``: a self-contained interactive page of the same
    periods (:func:`ndvi_scale.viz_html.write_html`: time slider, NDVI under the mouse). At least one of the two.
    Raises :class:`InputError` for a missing store, a store that is not an ndvi-scale cube, a bad ``time`` or
    neither output; :class:`OutputError` when a file cannot be written;
    :class:`~ndvi_scale.errors.StorageError` when object storage refuses or is unreachable.
    """
    _check_size(width, dpi)
    if png is None and html is None:
        raise InputError("nothing to write: give --png FILE.png, --html FILE.html or both")
    if png is not None:
        check_png_path(png)
    if html is not None:
        from .viz_html import check_html_path

        check_html_path(html)
    if not isinstance(per_page, int) or per_page < 1:
        raise InputError(f"per_page {shown(per_page)} is invalid; expected a whole number of panels >= 1, e.g. 24")
    ds = open_cube(zarr_url, storage_options)
    arr = _ndvi_array(ds)
    idx = select_periods(arr, time)
    labels = _labels(arr, _requested_span(ds))
    span = labels[idx[0]] if len(idx) == 1 else f"{len(idx)} periods {labels[idx[0]]} .. {labels[idx[-1]]}"
    written: list[str] = []
    size = ""
    if png is not None:
        pages = [idx[i: i + per_page] for i in range(0, len(idx), per_page)]
        dates = [v for v in ("max_date", "min_date") if v in ds.data_vars]
        for number, page in enumerate(pages, start=1):
            for var, suffix in [("ndvi", ""), *((v, f"-{v}") for v in dates)]:
                path = _page_path(os.fspath(png), number, suffix) if len(pages) > 1 or suffix else os.fspath(png)
                w, h = quicklook_png(ds, path, page if len(page) > 1 else page[0], width=width, dpi=dpi, var=var)
                written.append(path)
                size = size or f" ({w}x{h} px)"
    if html is not None:
        from .viz_html import write_html

        write_html(ds, html, idx)
        written.append(os.fspath(html))
    return f"wrote {', '.join(written)}{size}: NDVI {span} of {ds.attrs.get('ndvi_scale_url', zarr_url)}"
