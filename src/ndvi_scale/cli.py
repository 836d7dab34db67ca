"""The ``ndvi-scale`` command line: parse, call one API function, map :class:`NdviScaleError` to an exit code."""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

from .errors import NdviScaleError

try:  # typer >= 0.2x vendors click as typer._click; older typer raises click's own exceptions
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as _click_exc  # type: ignore[no-redef]


class _OneLineUsageErrors(TyperGroup):
    """Click's own usage errors (unknown option, missing option value, extra argument) as ONE ``error:`` line
    with exit code 2, like every other input error, instead of a usage banner and a box."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        def run() -> Any:
            return super(_OneLineUsageErrors, self).main(
                args, prog_name, complete_var, standalone_mode=False, windows_expand_args=windows_expand_args, **extra
            )

        if not standalone_mode:
            return run()
        try:
            rv = run()
        except getattr(_click_exc, "NoArgsIsHelpError", ()) as e:  # bare `ndvi-scale`: the help, as before
            e.show()
            sys.exit(e.exit_code)
        except _click_exc.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "ndvi-scale"
            message = e.format_message().replace("\n", " ").rstrip(". ")
            argv = list(args) if args is not None else sys.argv[1:]
            if "extra argument" in message and "--bbox" in argv:  # the usual cause: fewer than 4 bbox values
                message += " (--bbox takes exactly 4 numbers W S E N, e.g. --bbox 1.4 48.1 1.6 48.3)"
            _err(f"{message}; see '{where} --help'")
            sys.exit(e.exit_code)
        except _click_exc.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except typer.Abort:
            _err("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    name="ndvi-scale",
    help="Cloud-free Sentinel-2 L2A NDVI composites as Zarr (local, gs://, s3://).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")


def _default(name: str) -> str:
    """The default of RunConfig field ``name`` as ``--help`` shows it (``0,1,2,3,8,9,10``, ``10``, ``month``):
    the options themselves default to None so that a ``--config`` file can fill what the command line omits."""
    from dataclasses import MISSING, fields

    from .config import RunConfig

    value = next(f.default for f in fields(RunConfig) if f.name == name)
    if value is MISSING or value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


#: Longest error line for errors that are not input errors: a read failure lists every unreadable asset
#: (item, band, href, error), which does not fit :data:`~ndvi_scale.errors.MAX_LINE`.
MAX_DETAIL_LINE = 1500


def _middle_cut(token: str, limit: int) -> str:
    """A long word (a path, a URL) cut in its middle: both its start and its file name stay readable."""
    if len(token) <= limit:
        return token
    head = (limit - 1) // 2
    return token[:head] + "…" + token[len(token) - (limit - 1 - head):]


def _err(message: str, limit: int | None = None) -> None:
    """One ``error:`` line on stderr: URLs cleaned, every word (path, URL, value) at most
    :data:`~ndvi_scale.errors.MAX_QUOTED` characters, the line at most ``limit`` (default
    :data:`~ndvi_scale.errors.MAX_LINE`): values quoted in our messages are already cut, this is the guarantee
    for everything else."""
    from .errors import MAX_LINE, MAX_QUOTED, cut
    from .faults import scrub

    line = re.sub(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+", " ", scrub(str(message)))  # one line
    line = re.sub(rf"\S{{{MAX_QUOTED + 1},}}", lambda m: _middle_cut(m.group(0), MAX_QUOTED), line)
    typer.echo(cut(f"error: {line}", limit or MAX_LINE), err=True)


def _out(message: str, err: bool = False) -> None:
    """Echo ``message`` with every URL in it cleaned (no credentials, no query strings)."""
    from .faults import scrub

    typer.echo(scrub(message), err=err)


class _ScrubbingFilter(logging.Filter):
    """Cleans every URL in a log record (GDAL/rasterio, botocore, ndvi-scale) before it is printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        from .faults import scrub

        try:
            text = record.getMessage()
        except Exception:  # a record whose arguments do not fit its format: printed as given
            return True
        record.msg, record.args = scrub(text), None
        return True


def _install_log_handler() -> None:
    """Warnings and errors of every logger go to stderr through :class:`_ScrubbingFilter` (Python's own
    last-resort handler would print them as they are, signed URLs included)."""
    root = logging.getLogger()
    if any(isinstance(f, _ScrubbingFilter) for h in root.handlers for f in h.filters):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(message)s"))  # as Python's last-resort handler prints them
    handler.addFilter(_ScrubbingFilter())
    root.addHandler(handler)


def _guard(fn: Callable[[], T]) -> T:
    """Run ``fn``; our errors become one line on stderr + their exit code, never a traceback."""
    try:
        return fn()
    except NdviScaleError as e:
        # input errors (exit 2) fit MAX_LINE; others may list several assets or paths
        _err(str(e).replace("\n", " "), None if e.exit_code == 2 else MAX_DETAIL_LINE)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        _err("interrupted; re-run the same command to resume (written regions are kept)")
        raise typer.Exit(130) from None
    except Exception as e:  # a bug or an unforeseen failure: still no traceback unless asked
        if os.environ.get("NDVI_SCALE_DEBUG"):
            raise
        _err(f"unexpected {type(e).__name__}: {str(e)[:500]}; set NDVI_SCALE_DEBUG=1 for the traceback and report it")
        raise typer.Exit(1) from None


@app.command()
def compute(
    bbox: Annotated[
        tuple[str, str, str, str] | None,
        typer.Option(help="Area of interest W S E N in degrees (EPSG:4326).", metavar="W S E N"),
    ] = None,
    start: Annotated[str | None, typer.Option(help="First day, YYYY-MM-DD.")] = None,
    end: Annotated[str | None, typer.Option(help="Last day (inclusive), YYYY-MM-DD.")] = None,
    aoi: Annotated[
        str | None,
        typer.Option(metavar="FILE", help="Polygons (GeoJSON, GeoPackage, GeoParquet, Shapefile; any CRS) instead of "
                     "--bbox: pixels whose centre is outside are NaN."),
    ] = None,
    window: Annotated[
        str | None,
        typer.Option(help="Relative dates instead of --start/--end: previous-month, previous-dekad, last-N-days, ..."),
    ] = None,
    catalog: Annotated[
        str | None,
        typer.Option(help="'sample', a profile (ndvi-scale catalogs), a STAC API URL or an items file.",
                     show_default=_default("catalog")),
    ] = None,
    out: Annotated[str | None, typer.Option(help="Output Zarr: path, gs://bucket/path or s3://bucket/path.")] = None,
    period: Annotated[
        str | None, typer.Option(help="day, week, dekad, month, season or year.", show_default=_default("period"))
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(help="median, mean, max, min or a percentile like q25.", show_default=_default("method")),
    ] = None,
    max_cloud: Annotated[
        str | None, typer.Option(metavar="PCT", help="Skip scenes with eo:cloud_cover above this %.",
                                  show_default=_default("max_cloud"))
    ] = None,
    mask_classes: Annotated[
        str | None, typer.Option(help="SCL classes to mask (comma list).", show_default=_default("mask_classes"))
    ] = None,
    resolution: Annotated[
        str | None,
        typer.Option(metavar="METRES", help="Pixel size in metres.", show_default=_default("resolution")),
    ] = None,
    crs: Annotated[
        str | None,
        typer.Option(help="'auto' (UTM zone covering most of the bbox) or EPSG:XXXX.", show_default=_default("crs")),
    ] = None,
    mask_filters: Annotated[
        str | None,
        typer.Option(help="Filters of the cloud/shadow mask, in order, e.g. opening:20,dilation:60 (metres), or none."),
    ] = None,
    mask_opening: Annotated[
        str | None, typer.Option(metavar="METRES", help="Opening radius of the cloud/shadow mask (0: none).")
    ] = None,
    mask_dilation: Annotated[
        str | None, typer.Option(metavar="METRES", help="Dilation radius of the cloud/shadow mask (0: none).")
    ] = None,
    chunk: Annotated[
        str | None, typer.Option(metavar="PIXELS", help="Spatial chunk in pixels (processing = Zarr chunks).",
                     show_default=_default("chunk"))
    ] = None,
    zarr_format: Annotated[
        str | None,
        typer.Option(metavar="3|2", help="Zarr format of a new output: 3 or 2 (an existing cube keeps its own).",
                     show_default="3"),
    ] = None,
    codec: Annotated[
        str | None, typer.Option(metavar="zstd|zlib|lz4|none", help="Compression of a new output.",
                     show_default=_default("codec"))
    ] = None,
    overwrite: Annotated[
        bool | None,
        typer.Option("--overwrite/--no-overwrite", help="Replace existing output.", show_default="no-overwrite"),
    ] = None,
    append: Annotated[
        bool | None,
        typer.Option("--append/--no-append", help="Add new periods to an existing cube.", show_default="no-append"),
    ] = None,
    skip_bad_assets: Annotated[
        bool | None,
        typer.Option(
            "--skip-bad-assets/--no-skip-bad-assets",
            help="Continue past unreadable assets, recording them in the output.",
            show_default="no-skip-bad-assets",
        ),
    ] = None,
    allow_local: Annotated[
        bool | None,
        typer.Option(
            "--allow-local/--no-allow-local",
            help="Read local asset paths from any catalog (default: only inside a local catalog's folder).",
            show_default="no-allow-local",
        ),
    ] = None,
    cluster: Annotated[
        str | None, typer.Option(help="threads, local, tcp://HOST:PORT, gateway or kubernetes.", show_default="threads")
    ] = None,
    config: Annotated[
        str | None, typer.Option(help="YAML run config (same fields as these options; options override it).")
    ] = None,
    quicklook: Annotated[
        str | None,
        typer.Option(metavar="PNG", help="Also write PNG quicklook(s) of the written cube, as show --png does."),
    ] = None,
    yes: Annotated[
        bool,
        typer.Option("--yes", help="Start even above the size guard (100 GB of output or 100,000 regions)."),
    ] = False,
) -> None:
    """Search, mask clouds, compute NDVI, composite per period and write Zarr."""

    def go() -> None:
        from .config import mask_filter_options
        from .runfile import run_config_from

        values: dict[str, Any] = dict(
            bbox=bbox, start=start, end=end, aoi=aoi, window=window, catalog=catalog, out=out, period=period,
            method=method, max_cloud=max_cloud, mask_classes=mask_classes, resolution=resolution, crs=crs,
            chunk=chunk, zarr_format=zarr_format, codec=codec, overwrite=overwrite, append=append,
            skip_bad_assets=skip_bad_assets, allow_local=allow_local, cluster=cluster,
            allow_large=True if yes else None,
            mask_filters=mask_filter_options(mask_filters, mask_opening, mask_dilation),
        )
        cfg, merged = run_config_from(config, {k: v for k, v in values.items() if v is not None})
        if cfg.out is None:
            from .errors import InputError

            raise InputError("out is missing; give --out PATH (local path, gs://bucket/path or s3://bucket/path)")
        if quicklook is not None:
            from .viz import check_png_path

            check_png_path(quicklook)  # refuse a bad --quicklook before hours of work
        import warnings

        from .faults import SkippedAssetWarning
        from .pipeline import run  # imported once the input is valid: bad input is refused in a blink

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedAssetWarning)  # listed in the summary, once per asset
            report = run(cfg, cluster=merged.get("cluster"), echo=lambda msg: _out(msg, err=True),
                         show_progress=True)
        _out(report.describe())
        if quicklook is not None:
            from .viz import show

            typer.echo(show(cfg.out, quicklook))  # pages for many periods, the day of the max/min beside

    _guard(go)


def plan_cmd(as_json: bool = False, config: str | None = None, **options: Any) -> None:
    """Say what a compute with the same options would read, write and cost, without reading any pixel."""

    def go() -> None:
        from .pipeline import make_plan, plan_estimate
        from .runfile import run_config_from

        values = {k: v for k, v in options.items() if k not in ("quicklook", "yes", "cluster") and v is not None}
        if options.get("yes"):
            values["allow_large"] = True
        cfg, _ = run_config_from(config, values)
        plan = make_plan(cfg)
        _out(plan.search.summary(), err=True)
        cost = plan_estimate(plan)
        _out(cost.to_json() if as_json else cost.summary())

    _guard(go)


# `plan` takes exactly compute's options (so any compute command line can be planned by changing one word), plus
# --json: its signature is compute's, extended, rather than a second copy of twenty options that would drift.
_compute_signature = inspect.signature(compute, eval_str=True)
_json_option = inspect.Parameter(
    "as_json", inspect.Parameter.KEYWORD_ONLY, default=False,
    annotation=Annotated[bool, typer.Option("--json", help="One JSON object (the RunEstimate fields).")],
)
plan_cmd.__signature__ = _compute_signature.replace(  # type: ignore[attr-defined]
    parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in _compute_signature.parameters.values()]
    + [_json_option]
)
plan_cmd.__annotations__ = {p.name: p.annotation for p in plan_cmd.__signature__.parameters.values()}  # type: ignore[attr-defined]
app.command("plan")(plan_cmd)


@app.command("catalogs")
def catalogs_cmd(as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False) -> None:
    """List the provider profiles usable as --catalog."""

    def go() -> None:
        from .profiles import list_profiles

        rows = list_profiles()
        if as_json:
            for p in rows:
                typer.echo(json.dumps({"name": p.name, "title": p.title, "url": p.url,
                                       "collections": list(p.collections), "signing": p.signing, "auth": p.auth}))
            return
        typer.echo("sample  embedded offline synthetic Sentinel-2 L2A sample (no network)")
        for p in rows:
            typer.echo(f"{p.name}  {p.title}  {p.url}  collections={','.join(p.collections)}")

    _guard(go)


@app.command("inspect")
def inspect_cmd(
    source: Annotated[str, typer.Argument(help="STAC Item / ItemCollection / search page / JSON array: path or URL.")],
    as_json: Annotated[
        bool, typer.Option("--json/--no-json", help="One JSON object per line, or one readable line per item.")
    ] = True,
) -> None:
    """Show how each item is interpreted: bands, scale/offset, baseline, CRS, warnings."""

    def go() -> None:
        from .items import inspect, inspect_line

        for rec in inspect(source):
            _out(json.dumps(rec) if as_json else inspect_line(rec))

    _guard(go)


@app.command("show")
def show_cmd(
    zarr: Annotated[str, typer.Argument(help="Cube written by compute: path, gs://bucket/path or s3://bucket/path.")],
    png: Annotated[
        str | None,
        typer.Option("--png", metavar="PNG", help="PNG file to write (more than --per-page periods: PNG-2.png, ...)."),
    ] = None,
    html: Annotated[
        str | None,
        typer.Option("--html", metavar="HTML",
                     help="Self-contained interactive page: time slider, NDVI under the mouse."),
    ] = None,
    time: Annotated[
        str | None,
        typer.Option(help="Period: index (0, -1), 'last', or a date inside it (2024-06-15). Default: all periods."),
    ] = None,
    width: Annotated[int, typer.Option(help="Image width in pixels.")] = 1200,
    dpi: Annotated[int, typer.Option(help="Dots per inch (text size).")] = 100,
    per_page: Annotated[int, typer.Option(help="Most periods on one PNG; more go to further files.")] = 24,
) -> None:
    """Draw an NDVI cube: PNG small multiples (one period, or every period) and/or an interactive HTML page."""

    def go() -> None:
        from .viz import show

        typer.echo(show(zarr, png, time=time, width=width, dpi=dpi, html=html, per_page=per_page))

    _guard(go)


@app.command("repair")
def repair_cmd(
    out: Annotated[str, typer.Argument(help="Cube written by compute: path, gs://bucket/path or s3://bucket/path.")],
) -> None:
    """Roll a stopped write (killed, out of memory, changed catalog) back to the cube's last complete state.

    Complete periods stay, unfinished ones are cut off (compute --append then adds them); a complete cube whose
    last steps were stopped gets its consolidated metadata and STAC item."""

    def go() -> None:
        from .repair import repair_cube

        _out(repair_cube(out).summary())

    _guard(go)


def _write_table(df: Any, out: str, overwrite: bool) -> str:
    """Write ``df`` as CSV or Parquet (by the extension of ``out``); never over an existing file without
    ``overwrite``."""
    from .errors import InputError, OutputError, OutputExistsError

    low = out.lower()
    if not low.endswith((".csv", ".parquet")):
        raise InputError(f"out {out!r} has no known extension; give a .csv or .parquet file")
    if os.path.exists(out) and not overwrite:
        raise OutputExistsError(f"{out} exists; give --overwrite to replace it, or another --out")
    try:
        if low.endswith(".csv"):
            df.to_csv(out, index=False)
        else:
            df.to_parquet(out, index=False)
    except OSError as exc:
        raise OutputError(f"cannot write {out} ({exc.strerror or exc}); give a writable --out path") from None
    return f"wrote {out} ({len(df)} rows)"


@app.command("series")
def series_cmd(
    cube: Annotated[str, typer.Argument(help="Cube written by compute: path, gs://bucket/path or s3://bucket/path.")],
    points: Annotated[
        list[str],
        typer.Option("--points", help="LON,LAT (repeatable) or a file: CSV (lon,lat[,id]) or GeoJSON/GPKG points."),
    ],
    out: Annotated[str, typer.Option("--out", help="series.csv or series.parquet")],
    window: Annotated[int, typer.Option(help="Odd window in pixels: mean of the clear pixels around each point.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
) -> None:
    """Per-point time series of ndvi and valid_count (pixel containing each point, or an odd window mean)."""

    def go() -> None:
        from .analytics.series import series

        pts: Any = points[0] if len(points) == 1 and os.path.exists(points[0]) else points
        typer.echo(_write_table(series(cube, pts, window=window), out, overwrite))

    _guard(go)


@app.command("zonal")
def zonal_cmd(
    cube: Annotated[str, typer.Argument(help="Cube written by compute: path, gs://bucket/path or s3://bucket/path.")],
    zones: Annotated[str, typer.Option("--zones", help="Polygons: GeoJSON, GeoPackage, GeoParquet or Shapefile.")],
    out: Annotated[str, typer.Option("--out", help="stats.parquet or stats.csv")],
    id_field: Annotated[
        str | None, typer.Option("--id", help="Field naming each zone (default: feature index).")
    ] = None,
    stats: Annotated[
        str, typer.Option(help="Comma list of mean,median,std,min,max,count,valid_fraction.")
    ] = "mean,std,min,max,count,valid_fraction",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
) -> None:
    """Zonal statistics per (zone, period) with exact fractional pixel coverage, chunk by chunk."""

    def go() -> None:
        from .analytics.zonal import parse_stats, zonal

        wanted = parse_stats(stats)  # refuse a bad --stats before reading anything
        typer.echo(_write_table(zonal(cube, zones, id_field=id_field, stats=wanted), out, overwrite))

    _guard(go)


def main() -> None:
    """Console-script entry point."""
    _install_log_handler()
    try:
        app()
    except SystemExit as e:
        sys.exit(e.code)


if __name__ == "__main__":
    main()
