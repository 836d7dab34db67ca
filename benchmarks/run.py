"""ndvi-scale vs its floor and its peers, on a realistic synthetic catalog served over local HTTP.

    python benchmarks/run.py --scale 0.5 --dates 12

1. **Data.** :func:`ndvi_scale.sample.generate` writes two overlapping granules per date (``--scale`` x
   10980 px, rounded to 16; 1024-px DEFLATE tiles as on Earth Search; clouds, shadows, swath edges) for
   ``2 x --dates`` dates, 5 days apart from 1 June 2024, once, into the cache (``--cache``).
2. **Server.** nginx (or RangeHTTPServer) serves them on 127.0.0.1; items get ``http://127.0.0.1:PORT`` hrefs.
3. **Contenders**, each in its own process (see :mod:`contenders`): decode floor, decode + median floor,
   naive stackstac, tuned odc-stac, ndvi-scale (median, and mean/max against the decode floor), on the same
   ``--bbox-px`` square grid centred on the granules' overlap, monthly composites, 2048-px chunks.
   Then everything again with the dates doubled (4 instead of 2 months), to show memory stays flat.
4. **Checks.** Every contender's NDVI must equal ndvi-scale's (same NaNs, |diff| <= 1e-4), and ndvi-scale's
   must equal the generator's analytic truth (on every 8th row) within 0.01. A benchmark of wrong results
   is worthless: a mismatch makes the run exit non-zero.
5. **Table**: wall time, Mpx-obs/s/core, ratio to the floors and peers, tasks run, peak RSS of the process
   (``VmHWM`` of the contender; ``wait4``'s ``ru_maxrss`` carries the harness's own peak through fork+exec),
   CPU use, CPU of the server, HTTP GETs and bytes fetched / bytes needed (the compressed size of the
   COG tiles under the bbox plus each file's header). ``--markdown FILE`` writes it as Markdown too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from server import Server, Traffic  # noqa: E402

START = dt.date(2024, 6, 1)
REVISIT = 5
MEDIAN_CONTENDERS = ("naive", "odc", "ndvi_scale")


@dataclass
class Outcome:
    name: str
    label: str
    dates: int
    items: int
    method: str
    wall: float
    proc_wall: float
    cpu: float
    maxrss_mb: float
    traffic: Traffic
    result: dict[str, Any]
    out: Path | None
    latency: float | None = None  # ms the server waited before each answer (None: nginx/python, no delay)
    server_cpu: float = float("nan")  # CPU seconds of the HTTP server while the contender ran
    checks: list[str] = field(default_factory=list)

    @property
    def in_flight(self) -> float | None:
        """Requests in flight on average: requests x latency / wall (Little's law on the server's wait alone).

        Requests are the GETs and the HEADs (GDAL asks each file's size with a HEAD first): each waits the latency.
        """
        if not self.latency:  # no latency, nothing waits: "-"
            return None
        return self.traffic.requests * self.latency / 1000 / self.wall


def _spec(scale: float, n_dates: int) -> Any:
    from ndvi_scale.sample import SampleSpec

    size = max(2048, int(round(10980 * scale / 16)) * 16)
    end = START + dt.timedelta(days=REVISIT * (n_dates - 1))
    return SampleSpec(size=size, blocksize=1024, start=START, end=end, revisit_days=REVISIT)


def _bbox(spec: Any, px: int) -> tuple[float, float, float, float]:
    """Lon/lat box inside a px x px UTM square centred on the A/B overlap (so the grid is ~px x px)."""
    from pyproj import Transformer

    cx = spec.x0 + 10.0 * (spec.shift + spec.size) / 2
    cy = spec.y0 - 10.0 * spec.size / 2
    half = 10.0 * px / 2 - 10.0  # the lon/lat box of an inner UTM square grows a little when projected back
    tr = Transformer.from_crs(spec.epsg, 4326, always_xy=True)
    lon, lat = tr.transform(
        [cx - half, cx + half, cx + half, cx - half], [cy - half, cy - half, cy + half, cy + half]
    )
    return (max(lon[0], lon[3]), max(lat[0], lat[1]), min(lon[1], lon[2]), min(lat[2], lat[3]))


def _http_catalog(src: Path, dst: Path, root: Path, url: str, dates: list[str]) -> int:
    """items.json restricted to ``dates`` with file hrefs under ``root`` rewritten to ``url``."""
    feats = json.loads(src.read_text())["features"]
    keep = [f for f in feats if f["properties"]["datetime"][:10] in dates]
    prefix = str(root)
    for f in keep:
        for a in f["assets"].values():
            if a["href"].startswith(prefix):
                a["href"] = url + a["href"][len(prefix) :]
    dst.write_text(json.dumps({"type": "FeatureCollection", "features": keep}))
    return len(keep)


def _bytes_needed(
    catalog: Path, root: Path, url: str, bounds: tuple[float, ...]
) -> tuple[int, int, list[dict[str, Any]]]:
    """(compressed bytes of the full-resolution tiles under ``bounds`` + file headers, number of tiles, ranges).

    ``ranges``: per asset (red, nir, scl of every item) ``{"href", "size", "header", "tiles": [[offset, n]]}``,
    the header being bytes ``[0, header)`` (up to the first tile of any level: IFDs and tile offset arrays),
    the tiles those counted, in file order. The latency floor fetches exactly these.
    """
    import rasterio

    xmin, ymin, xmax, ymax = bounds
    total = tiles = 0
    assets = []
    for f in json.loads(catalog.read_text())["features"]:
        for key in ("red", "nir", "scl"):
            href = f["assets"][key]["href"]
            path = str(root) + href[len(url) :]
            with rasterio.open(path) as ds:
                t = ds.transform
                bh, bw = ds.block_shapes[0]
                c0 = max(int(np.floor((xmin - t.c) / t.a + 1e-9)), 0)
                c1 = min(int(np.ceil((xmax - t.c) / t.a - 1e-9)), ds.width)
                r0 = max(int(np.floor((t.f - ymax) / -t.e + 1e-9)), 0)
                r1 = min(int(np.ceil((t.f - ymin) / -t.e - 1e-9)), ds.height)
                header = min(
                    int(ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1) or 0),
                    *(_first_offset(path, lvl) for lvl in range(len(ds.overviews(1)))),
                )
                total += header
                asset = {"href": href, "size": os.path.getsize(path), "header": header, "tiles": []}
                assets.append(asset)
                if c0 >= c1 or r0 >= r1:
                    continue
                for i in range(r0 // bh, (r1 - 1) // bh + 1):
                    for j in range(c0 // bw, (c1 - 1) // bw + 1):
                        n = int(ds.block_size(1, i, j))
                        off = int(ds.get_tag_item(f"BLOCK_OFFSET_{j}_{i}", "TIFF", bidx=1))
                        total += n
                        tiles += 1
                        asset["tiles"].append([off, n])
                asset["tiles"].sort()
    return total, tiles, assets


def _warm_page_cache(catalog: Path, root: Path, url: str) -> None:
    """Read every file of the catalog once, so that no contender is the one that pays the disk."""
    for f in json.loads(catalog.read_text())["features"]:
        for a in f["assets"].values():
            with open(str(root) + a["href"][len(url) :], "rb") as fh:
                while fh.read(8 << 20):
                    pass


def _first_offset(path: str, level: int) -> int:
    import rasterio

    with rasterio.open(path, overview_level=level) as ov:
        return int(ov.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1) or 1 << 62)


def _run_contender(
    name: str, params: dict[str, Any], work: Path, srv: Server, profile: Path | None = None
) -> tuple[dict[str, Any], dict]:
    p_path = work / f"{name}-params.json"
    r_path = work / f"{name}-result.json"
    p_path.write_text(json.dumps(params))
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    mark = srv.mark()
    srv_cpu0 = srv.cpu()
    t0 = time.perf_counter()
    cmd = [sys.executable, str(HERE / "contenders.py"), name, str(p_path), str(r_path)]
    if profile is not None:  # py-spy's collapsed stacks of every thread, native frames too (timings inflate)
        profile.mkdir(parents=True, exist_ok=True)
        tag = f"{name}-{params.get('method', 'median')}-{len(params.get('dates', []))}"
        cmd = ["py-spy", "record", "--threads", "--rate", "100", "--format", "raw",
               "--output", str(profile / f"{tag}.txt"), "--", *cmd]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc_wall = time.perf_counter() - t0
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"contender {name} failed (exit {proc.returncode}):\n{out[-4000:]}")
    res = json.loads(r_path.read_text())
    meta = {
        "proc_wall": proc_wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        # the kernel's share: mostly page faults of fresh memory, whose cost swings with the machine (in a VM
        # whose host takes back what its guest frees, 0.05-2.7 s per GiB first touched, from one process to the
        # next on session 21's), and grows with the contender's peak RSS
        "sys_cpu": usage.ru_stime,
        "minflt": usage.ru_minflt,
        # ru_maxrss of a child starts at the harness's own high-water mark (Linux keeps it through fork and
        # exec): the contender's VmHWM, when it reports it, is its own peak
        "maxrss_mb": res.get("vm_hwm_mb") or usage.ru_maxrss / 1024,
        "ru_maxrss_mb": usage.ru_maxrss / 1024,
        "traffic": srv.since(mark),
        "server_cpu": srv.cpu() - srv_cpu0,
    }
    return res, meta


def _load_ndvi(path: Path) -> Any:
    import xarray as xr

    ds = xr.open_zarr(path)
    return ds["ndvi"].load()


def _truth_error(o: Outcome, spec: Any, truth_rows: int) -> tuple[float, list[str]]:
    """Max |NDVI - truth| of an ndvi-scale output (every ``truth_rows``-th row) and the problems found."""
    from ndvi_scale.sample import Truth

    problems = []
    out = _load_ndvi(o.out)  # type: ignore[arg-type]
    rows = slice(None, None, truth_rows)
    X, Y = np.meshgrid(out.x.values, out.y.values[rows])
    worst = 0.0
    for t, t0 in enumerate(out.time.values):
        month = np.datetime64(t0, "M")
        sel = [d for d in spec.dates() if np.datetime64(d.date(), "M") == month]
        sel = [d for d in sel if d.date().isoformat() in o.result["dates"]]
        exp, counts = Truth.expected_composite(spec, X, Y, sel, method=o.method)
        got = out.values[t][rows]
        if not np.array_equal(np.isnan(got), counts == 0):
            problems.append(f"{o.label} [{o.method}]: clear/no-data pixels differ from the truth in {month}")
        seen = counts > 0
        if seen.any():
            worst = max(worst, float(np.abs(got[seen] - exp[seen]).max()))
    if worst > 0.01:
        problems.append(f"{o.label} [{o.method}]: |composite - truth| up to {worst:.4f} (> 0.01)")
    return worst, problems


def _verify(outcomes: list[Outcome], spec: Any, truth_rows: int) -> list[str]:
    """Every ndvi-scale output against the sample's truth; every other median against ndvi-scale's."""
    problems: list[str] = []
    for o in outcomes:
        if o.name == "ndvi_scale":
            worst, found = _truth_error(o, spec, truth_rows)
            problems += found
            o.checks.append(f"{o.method} vs truth: max |diff| {worst:.4f}")
    ref_o = next(o for o in outcomes if o.name == "ndvi_scale" and o.method == "median")
    ref = _load_ndvi(ref_o.out)  # type: ignore[arg-type]
    for o in outcomes:
        if o.out is None or o is ref_o or o.method != "median":
            continue
        got = _load_ndvi(o.out)
        times = [t for t in ref.time.values if t in got.time.values]
        if len(times) != ref.sizes["time"]:
            problems.append(f"{o.label}: periods {got.time.values} != {ref.time.values}")
            continue
        a, b = ref.sel(time=times).values, got.sel(time=times).values
        if a.shape != b.shape:
            problems.append(f"{o.label}: shape {b.shape} != {a.shape}")
            continue
        nan_diff = int((np.isnan(a) != np.isnan(b)).sum())
        both = ~np.isnan(a) & ~np.isnan(b)
        diff = float(np.abs(a[both] - b[both]).max()) if both.any() else 0.0
        o.checks.append(f"vs ndvi-scale: max |diff| {diff:.1e}, NaN mismatches {nan_diff}")
        if nan_diff or diff > 1e-4:
            problems.append(
                f"{o.label}: NDVI differs from ndvi-scale (max |diff| {diff:.2e}, {nan_diff} NaN mismatches)"
            )
    return problems


def _versions() -> dict[str, str]:
    out = {}
    for pkg in (
        "numpy",
        "dask",
        "xarray",
        "stackstac",
        "odc-stac",
        "odc-geo",
        "rasterio",
        "bottleneck",
        "zarr",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    import rasterio

    out["GDAL"] = rasterio.__gdal_version__
    return out


def _machine() -> str:
    import psutil

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


LABELS = {
    "floor": "decode floor",
    "floor_median": "decode + median floor",
    "floor_latency": "latency floor",
    "naive": "stackstac naive",
    "odc": "odc-stac tuned",
    "ndvi_scale": "ndvi-scale",
    "ndvi_scale_to_zarr": "ndvi-scale build+to_zarr",
}


def _row(
    o: Outcome, px_obs: float, floors: dict[str, Outcome], peers: dict[str, float], cores: int, needed: int
) -> list[str]:
    mpx = px_obs / o.wall / cores / 1e6
    is_floor = o.name.startswith("floor")
    cpu = o.result.get("cpu_work", float("nan"))

    def ratio(floor: str) -> str:
        f = floors.get(floor)
        if is_floor or f is None or (floor == "floor_median" and o.method != "median"):
            return "-"
        return f"{o.wall / f.wall:.2f}x / {cpu / f.result['cpu_work']:.2f}x"

    if o.name.startswith("ndvi") and o.method == "median":
        vs = " / ".join(f"{peers[p] / o.wall:.1f}x" if p in peers else "-" for p in ("naive", "odc"))
    else:
        vs = "-"
    tasks = o.result.get("tasks", [0, 0])
    t = o.traffic
    return [
        f"{o.label}" + (f" [{o.method}]" if o.name.startswith("ndvi") else ""),
        f"{o.wall:.1f}",
        f"{cpu:.1f}",
        f"{mpx:.1f}",
        ratio("floor"),
        ratio("floor_median"),
        ratio("floor_latency"),
        vs,
        f"{o.result.get('tasks_run', '-')} ({tasks[1]})",
        f"{o.maxrss_mb:.0f}",
        f"{t.gets}",
        f"{t.requests - t.gets}",
        "-" if o.in_flight is None else f"{o.in_flight:.1f}",
        f"{o.server_cpu:.2f}",
        f"{t.bytes / 2**20:.0f}",
        f"{t.bytes / needed:.3f}" if needed else "-",
    ]


HEADER = [
    "contender",
    "wall s",
    "work CPU s",
    "Mpx-obs/s/core",
    "vs decode floor (wall / CPU)",
    "vs decode+median floor (wall / CPU)",
    "vs latency floor (wall / CPU)",
    "faster than naive / odc (wall)",
    "tasks run (graph)",
    "peak RSS MB",
    "GETs",
    "HEADs",
    "requests in flight",
    "server CPU s",
    "MiB fetched",
    "fetched / needed",
]


def _table(rows: list[list[str]], header: list[str] = HEADER) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _lat_label(latency: float | None) -> str:
    return "" if latency is None else f"{latency:g} ms per request, "


SUMMARY_ROWS = [
    ("floor", "median", "decode floor"),
    ("floor_median", "median", "decode + median floor"),
    ("floor_latency", "median", "latency floor"),
    ("odc", "median", "odc-stac tuned"),
    ("naive", "median", "stackstac naive"),
    ("ndvi_scale", "median", "ndvi-scale median"),
    ("ndvi_scale", "mean", "ndvi-scale mean"),
    ("ndvi_scale", "max", "ndvi-scale max"),
]


def _latency_summary(outcomes: list[Outcome], latencies: list[float | None], n_dates: int) -> str:
    """Wall and requests in flight of every contender at every latency, and ndvi-scale median's ratios."""
    find = {(o.name, o.method, o.latency): o for o in outcomes if o.dates == n_dates}
    lat = [x for x in latencies if x is not None]
    header = ["contender"]
    for x in lat:
        header += [f"{x:g} ms: wall s", f"{x:g} ms: CPU s", f"{x:g} ms: in flight"]
    header += ["GETs (" + " / ".join(f"{x:g}" for x in lat) + " ms)", "HEADs"]
    rows = []
    for name, method, label in SUMMARY_ROWS:
        got = [find.get((name, method, x)) for x in lat]
        if not any(got):
            continue
        row = [label]
        for o in got:
            if o is None:
                row += ["-", "-", "-"]
            else:
                flight = "-" if o.in_flight is None else f"{o.in_flight:.1f}"
                row += [f"{o.wall:.1f}", f"{o.result.get('cpu_work', float('nan')):.1f}", flight]
        row.append(" / ".join("-" if o is None else str(o.traffic.gets) for o in got))
        row.append(" / ".join("-" if o is None else str(o.traffic.requests - o.traffic.gets) for o in got))
        rows.append(row)
    ratio_header = [
        "latency",
        "ndvi-scale median wall s",
        "faster than odc-stac (odc / median)",
        "vs latency floor (median / floor)",
        "vs decode floor (median / floor)",
    ]
    ratio_rows = []
    for x in lat:
        med = find.get(("ndvi_scale", "median", x))
        if med is None:
            continue
        odc, lfl, dfl = (find.get((n, "median", x)) for n in ("odc", "floor_latency", "floor"))
        ratio_rows.append([
            f"{x:g} ms",
            f"{med.wall:.1f}",
            "-" if odc is None else f"{odc.wall / med.wall:.2f}x",
            "-" if lfl is None else f"{med.wall / lfl.wall:.2f}x",
            "-" if dfl is None else f"{med.wall / dfl.wall:.2f}x",
        ])
    n_items = next((o.items for o in outcomes if o.dates == n_dates), 0)
    out = (
        f"### Latency: {n_dates} dates ({n_items} items), every request answered after the latency\n\n"
        f"{_table(rows, header)}\n\n"
        "in flight = (GETs + HEADs) x latency / wall: requests the contender kept waiting at once, on average "
        "(each waits the latency; wall is the timed part, requests are those of the whole process)\n"
    )
    if ratio_rows:
        out += "\n" + _table(ratio_rows, ratio_header) + "\n"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--scale", type=float, default=0.5, help="granule side as a fraction of 10980 px (default 0.5)"
    )
    ap.add_argument("--dates", type=int, default=12, help="acquisition dates of the first run (then doubled)")
    ap.add_argument(
        "--bbox-px",
        type=int,
        default=0,
        help="side of the output grid in px (default min(4096, 3/4 granule))",
    )
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument(
        "--contenders",
        default="floor,floor_median,floor_latency,naive,odc,ndvi_scale",
        help="comma list; add ndvi_scale_to_zarr for build(cfg).to_zarr() written as the peers write",
    )
    ap.add_argument("--methods", default="median,mean,max", help="ndvi-scale reducers to run (median first)")
    ap.add_argument("--no-double", action="store_true", help="skip the run with the dates doubled")
    ap.add_argument(
        "--double-contenders",
        default="floor,floor_median,floor_latency,odc,ndvi_scale",
        help="contenders of the doubled run (naive is slow: add it if you have the time)",
    )
    ap.add_argument(
        "--cache", default=None, help="where the generated data is kept (default: ndvi-scale cache)"
    )
    ap.add_argument(
        "--server",
        default="auto",
        choices=["auto", "nginx", "python", "delay"],
        help="auto: nginx if installed, else python; --latency always uses delayserve.py",
    )
    ap.add_argument(
        "--latency",
        default=None,
        help="milliseconds the server waits before each answer (delayserve.py); a comma list (0,40,100) runs "
        "everything at each latency and adds a summary table",
    )
    ap.add_argument(
        "--latency-skip",
        default="naive",
        help="contenders not run at a latency > 0 (default: naive, minutes even at 0 ms)",
    )
    ap.add_argument("--inflight", type=int, default=64, help="connections of the latency floor (default 64)")
    ap.add_argument("--markdown", default=None, help="also write the results as Markdown to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (Zarr outputs, catalogs)")
    ap.add_argument(
        "--profile", default=None, help="record each contender with py-spy into this folder (collapsed stacks)"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each of --repeat-contenders, in interleaved rounds; the run with the median wall time is "
        "reported (odd numbers: a real run, not an average) and every run's wall time is listed",
    )
    ap.add_argument(
        "--repeat-contenders",
        default="floor,floor_latency,ndvi_scale",
        help="contenders run --repeat times (default: the ones the latency-floor ratio is made of; the peers run "
        "once, 7-12x slower, their run-to-run noise does not change a ratio)",
    )
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    from ndvi_scale.config import DEFAULT_MASK_CLASSES, RunConfig
    from ndvi_scale.pipeline import build, make_plan
    from ndvi_scale.sample import sample_catalog

    cores = os.cpu_count() or 1
    runs = [args.dates] if args.no_double else [args.dates, 2 * args.dates]
    latencies: list[float | None] = (
        [None] if args.latency is None else [float(v) for v in args.latency.split(",") if v.strip()]
    )
    spec = _spec(args.scale, 2 * args.dates)  # the same data (and cache) with or without --no-double
    px = args.bbox_px or min(4096, int(spec.size * 0.75) // 16 * 16)
    print(
        f"data: 2 granules of {spec.size}^2 px (scale {spec.size / 10980:.3f} of 10980), 1024-px tiles, "
        f"{len(spec.dates())} dates from {spec.start}",
        flush=True,
    )
    t0 = time.perf_counter()
    items_json = sample_catalog(args.cache, spec=spec)
    root = items_json.parent
    print(f"  catalog {items_json} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    # numba compiles the kernel once and caches it on disk: do it before timing anything
    subprocess.run(  # best effort: an engine without ndvi_scale.kernel.warm_up has nothing to warm
        [sys.executable, "-c", "from ndvi_scale import kernel; kernel.warm_up()"],
        check=False,
        stderr=subprocess.DEVNULL,
    )
    bbox = _bbox(spec, px)
    work = Path(tempfile.mkdtemp(prefix="ndvi-bench-", dir=args.cache))
    contenders = args.contenders.split(",")
    methods = args.methods.split(",")
    outcomes: list[Outcome] = []
    problems: list[str] = []
    report: list[str] = []
    try:
        for latency in latencies:
            with Server(root, args.server, latency_ms=latency) as srv:
                lat_tag = "" if latency is None else f"-{latency:g}ms"
                print(f"\nserving {root} at {srv.url} ({srv.version()})", flush=True)
                for n_dates in runs:
                    dates = [d.date().isoformat() for d in spec.dates()[:n_dates]]
                    cat = work / f"items-{n_dates}{lat_tag}.json"
                    n_items = _http_catalog(items_json, cat, root, srv.url, dates)
                    end = dates[-1]
                    # the grid ndvi-scale uses (no pixel is read to build it): everyone reads onto this one
                    cfg = RunConfig.create(bbox=bbox, start=dates[0], end=end, catalog=str(cat), chunk=args.chunk)
                    plan = make_plan(cfg)
                    ds = build(cfg, plan)
                    x, y = ds.x.values, ds.y.values
                    res = float(abs(x[1] - x[0]))
                    bounds = (
                        float(x[0] - res / 2),
                        float(y[-1] - res / 2),
                        float(x[-1] + res / 2),
                        float(y[0] + res / 2),
                    )
                    shape = (len(y), len(x))
                    days_per_period = [len(p.day_numbers) for p in plan.plans if p]
                    needed, n_tiles, ranges = _bytes_needed(cat, root, srv.url, bounds)
                    px_obs = shape[0] * shape[1] * n_items
                    print(
                        f"\n== {n_dates} dates, {n_items} items, grid {shape[0]}x{shape[1]} px "
                        f"({len(ds.ndvi.chunks[1]) * len(ds.ndvi.chunks[2])} chunks of {plan.chunk}), "
                        f"{len(plan.periods)} monthly periods, {px_obs / 1e6:.0f} M px-obs; "
                        f"{n_tiles} tiles, {needed / 2**20:.0f} MiB needed",
                        flush=True,
                    )
                    base = {
                        "catalog": str(cat),
                        "bbox": bbox,
                        "start": dates[0],
                        "end": end,
                        "epsg": plan.epsg,
                        "bounds": bounds,
                        "shape": shape,
                        "resolution": res,
                        "chunk": args.chunk,
                        "mask_classes": list(DEFAULT_MASK_CLASSES),
                        "threads": cores,
                        "days_per_period": days_per_period,
                        "dates": dates,
                        "root": str(root),
                        "url": srv.url,
                        "ranges": ranges,
                        "inflight": args.inflight,
                    }
                    _warm_page_cache(cat, root, srv.url)  # else the first contender alone reads from disk
                    names = (
                        contenders
                        if n_dates == runs[0]
                        else [c for c in contenders if c in args.double_contenders.split(",")]
                    )
                    if latency:  # naive stackstac takes minutes even at 0 ms
                        names = [c for c in names if c not in args.latency_skip.split(",")]
                    jobs = [(n, "median") for n in names if not n.startswith("ndvi")]
                    for n in names:
                        if n.startswith("ndvi"):
                            jobs += [(n, m) for m in (methods if n == "ndvi_scale" else ["median"])]
                    run_outcomes: list[Outcome] = []
                    repeated = set(args.repeat_contenders.split(","))
                    done: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any], Path]]] = {}
                    for r in range(args.repeat):  # interleaved rounds: a slow minute of the machine hits everyone
                        for name, method in jobs:
                            if r and name not in repeated:
                                continue
                            tag = f"-r{r}" if args.repeat > 1 else ""
                            out = work / f"{name}-{method}-{n_dates}{lat_tag}{tag}.zarr"
                            params = dict(base, method=method, out=str(out))
                            result, meta = _run_contender(
                                name, params, work, srv, Path(args.profile) if args.profile else None
                            )
                            done.setdefault((name, method), []).append((result, meta, out))
                            if args.repeat > 1:
                                print(f"  round {r + 1}: {LABELS[name]} {method} wall {result['wall']:.2f} s "
                                      f"cpu {meta['cpu']:.1f} s (sys {meta['sys_cpu']:.1f} s, "
                                      f"{meta['minflt'] / 1000:.0f}k page faults)", flush=True)
                    for name, method in jobs:
                        tries = sorted(done[(name, method)], key=lambda t: t[0]["wall"])
                        result, meta, out = tries[(len(tries) - 1) // 2]  # the median run (the lower of two)
                        result["dates"] = dates
                        if len(tries) > 1:
                            result["walls"] = [t[0]["wall"] for t in done[(name, method)]]
                            result["sys_cpus"] = [t[1]["sys_cpu"] for t in done[(name, method)]]
                        o = Outcome(
                            name,
                            LABELS[name],
                            n_dates,
                            n_items,
                            method,
                            result["wall"],
                            meta["proc_wall"],
                            meta["cpu"],
                            meta["maxrss_mb"],
                            meta["traffic"],
                            result,
                            None if name.startswith("floor") else out,
                            latency,
                            meta["server_cpu"],
                        )
                        run_outcomes.append(o)
                        print(
                            f"  {o.label:32s} {method:6s} wall {o.wall:7.2f} s  cpu {o.cpu:7.1f} s  "
                            f"rss {o.maxrss_mb:6.0f} MB  GETs {o.traffic.gets:5d}  "
                            f"{o.traffic.bytes / 2**20:7.1f} MiB"
                            + (f"  in flight {o.in_flight:5.1f}" if o.in_flight is not None else "")
                            + f"  server cpu {o.server_cpu:.2f} s"
                            + (f"  (+{heads} HEAD)" if (heads := o.traffic.requests - o.traffic.gets) else ""),
                            flush=True,
                        )
                    if any(o.name == "ndvi_scale" and o.method == "median" for o in run_outcomes):
                        problems += [f"[{n_dates} dates] {p}" for p in _verify(run_outcomes, spec, 8)]
                    floors = {o.name: o for o in run_outcomes if o.name.startswith("floor")}
                    peers = {o.name: o.wall for o in run_outcomes if o.name in ("naive", "odc")}
                    rows = [_row(o, px_obs, floors, peers, cores, needed) for o in run_outcomes]
                    table = _table(rows)
                    ndvi = next(
                        (o for o in run_outcomes if o.name == "ndvi_scale" and o.method == "median"), None
                    )
                    extra = ""
                    if ndvi is not None:
                        r = ndvi.result
                        extra = (
                            f"ndvi-scale: {r['spatial_chunks']} spatial chunks x {r['periods']} periods, "
                            f"tasks run {r['tasks_run']} = "
                            f"{r['tasks_run'] / (r['spatial_chunks'] * r['periods']):.2f} per chunk-period "
                            f"(build()'s Dataset graph: {r['tasks'][1]})"
                            + (
                                f"; tile cache hits/misses {r['tile_cache']['hits']}/{r['tile_cache']['misses']}"
                                if r.get("tile_cache")
                                else ""
                            )
                        )
                    lfl = next((o for o in run_outcomes if o.name == "floor_latency"), None)
                    if lfl is not None and "fetch_wall" in lfl.result:
                        r = lfl.result
                        note = (
                            f"latency floor: last byte in at {r['fetch_wall']:.1f} s of {r['wall']:.1f} s "
                            f"({r['gets']} GETs on {r['inflight']} connections, {r['bytes'] / 2**20:.0f} MiB; "
                            "each asset decoded as soon as its bytes are in)"
                        )
                        extra = f"{extra}\n\n{note}" if extra else note
                    reps = [o for o in run_outcomes if "walls" in o.result]
                    if reps:
                        note = f"each row of {', '.join(sorted({o.label for o in reps}))}: the median of " + (
                            f"{args.repeat} runs in interleaved rounds; their wall times: "
                            + "; ".join(f"{o.label} {o.method} " + ", ".join(f"{w:.2f}" for w in o.result["walls"])
                                        + " (sys CPU " + ", ".join(f"{c:.1f}" for c in o.result["sys_cpus"]) + ")"
                                        for o in reps)
                        )
                        extra = f"{extra}\n\n{note}" if extra else note
                    checks = "; ".join(f"{o.label}: {', '.join(o.checks)}" for o in run_outcomes if o.checks)
                    block = (
                        f"### {_lat_label(latency)}{n_dates} dates ({n_items} items), "
                        f"grid {shape[0]} x {shape[1]} px, "
                        f"{len(plan.periods)} months, {px_obs / 1e6:.0f} M px-obs, "
                        f"{needed / 2**20:.0f} MiB needed\n\n{table}\n\n{extra}\n\nchecks: {checks}\n"
                    )
                    print("\n" + block, flush=True)
                    report.append(block)
                    outcomes += run_outcomes
                server_version = srv.version() if latency is None else "delayserve.py (threaded, sendfile)"
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    # memory with dates doubled
    if len(runs) == 2:
        lines = []
        names = ("floor", "floor_latency", "odc", "naive", "ndvi_scale")
        for latency, name in ((lat, n) for lat in latencies for n in names):
            same = [o for o in outcomes if o.name == name and o.method == "median" and o.latency == latency]
            a = [o for o in same if o.dates == runs[0]]
            b = [o for o in same if o.dates == runs[1]]
            if a and b:
                lines.append(
                    f"{_lat_label(latency)}{LABELS[name]}: peak RSS {a[0].maxrss_mb:.0f} -> {b[0].maxrss_mb:.0f} MB "
                    f"({b[0].maxrss_mb / a[0].maxrss_mb:.2f}x), wall {a[0].wall:.1f} -> {b[0].wall:.1f} s"
                )
        block = "### dates doubled\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"
        print(block)
        report.append(block)
    if latencies != [None]:
        block = _latency_summary(outcomes, latencies, runs[0])
        print(block)
        report.append(block)
    head = (
        f"machine: {_machine()}\nversions: {json.dumps(_versions())}\nserver: {server_version}\n"
        f"data: 2 granules of {spec.size}^2 px per date, 1024-px DEFLATE tiles, bbox {bbox}\n"
    )
    print(head)
    if args.markdown:
        Path(args.markdown).write_text(head + "\n" + "\n".join(report))
    if problems:
        print("RESULT CHECKS FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("all results agree (see checks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
