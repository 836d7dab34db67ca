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
   (``wait4`` ``ru_maxrss``), CPU use, HTTP GETs and bytes fetched / bytes needed (the compressed size of the
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
    checks: list[str] = field(default_factory=list)


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


def _bytes_needed(catalog: Path, root: Path, url: str, bounds: tuple[float, ...]) -> tuple[int, int]:
    """(compressed bytes of the full-resolution tiles under ``bounds`` + file headers, number of tiles)."""
    import rasterio

    xmin, ymin, xmax, ymax = bounds
    total = tiles = 0
    for f in json.loads(catalog.read_text())["features"]:
        for key in ("red", "nir", "scl"):
            path = str(root) + f["assets"][key]["href"][len(url) :]
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
                if c0 >= c1 or r0 >= r1:
                    continue
                for i in range(r0 // bh, (r1 - 1) // bh + 1):
                    for j in range(c0 // bw, (c1 - 1) // bw + 1):
                        total += int(ds.block_size(1, i, j))
                        tiles += 1
    return total, tiles


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
        "maxrss_mb": usage.ru_maxrss / 1024,
        "traffic": srv.since(mark),
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
        vs,
        f"{o.result.get('tasks_run', '-')} ({tasks[1]})",
        f"{o.maxrss_mb:.0f}",
        f"{t.gets}",
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
    "faster than naive / odc (wall)",
    "tasks run (graph)",
    "peak RSS MB",
    "GETs",
    "MiB fetched",
    "fetched / needed",
]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(HEADER), sep, *(line(r) for r in rows)])


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
        default="floor,floor_median,naive,odc,ndvi_scale",
        help="comma list; add ndvi_scale_to_zarr for build(cfg).to_zarr() written as the peers write",
    )
    ap.add_argument("--methods", default="median,mean,max", help="ndvi-scale reducers to run (median first)")
    ap.add_argument("--no-double", action="store_true", help="skip the run with the dates doubled")
    ap.add_argument(
        "--double-contenders",
        default="floor,floor_median,odc,ndvi_scale",
        help="contenders of the doubled run (naive is slow: add it if you have the time)",
    )
    ap.add_argument(
        "--cache", default=None, help="where the generated data is kept (default: ndvi-scale cache)"
    )
    ap.add_argument("--server", default="auto", choices=["auto", "nginx", "python"])
    ap.add_argument("--markdown", default=None, help="also write the results as Markdown to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (Zarr outputs, catalogs)")
    ap.add_argument(
        "--profile", default=None, help="record each contender with py-spy into this folder (collapsed stacks)"
    )
    args = ap.parse_args()

    from ndvi_scale.config import DEFAULT_MASK_CLASSES, RunConfig
    from ndvi_scale.pipeline import build, make_plan
    from ndvi_scale.sample import sample_catalog

    cores = os.cpu_count() or 1
    runs = [args.dates] if args.no_double else [args.dates, 2 * args.dates]
    spec = _spec(args.scale, max(runs))
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
    subprocess.run([sys.executable, "-c", "from ndvi_scale import kernel; kernel.warm_up()"], check=True)
    bbox = _bbox(spec, px)
    work = Path(tempfile.mkdtemp(prefix="ndvi-bench-", dir=args.cache))
    contenders = args.contenders.split(",")
    methods = args.methods.split(",")
    outcomes: list[Outcome] = []
    problems: list[str] = []
    report: list[str] = []
    try:
        with Server(root, args.server) as srv:
            print(f"serving {root} at {srv.url} ({srv.kind})", flush=True)
            for n_dates in runs:
                dates = [d.date().isoformat() for d in spec.dates()[:n_dates]]
                cat = work / f"items-{n_dates}.json"
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
                needed, n_tiles = _bytes_needed(cat, root, srv.url, bounds)
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
                }
                _warm_page_cache(cat, root, srv.url)  # else the first contender alone reads from disk
                names = (
                    contenders
                    if n_dates == runs[0]
                    else [c for c in contenders if c in args.double_contenders.split(",")]
                )
                jobs = [(n, "median") for n in names if not n.startswith("ndvi")]
                for n in names:
                    if n.startswith("ndvi"):
                        jobs += [(n, m) for m in (methods if n == "ndvi_scale" else ["median"])]
                run_outcomes: list[Outcome] = []
                for name, method in jobs:
                    out = work / f"{name}-{method}-{n_dates}.zarr"
                    params = dict(base, method=method, out=str(out))
                    result, meta = _run_contender(name, params, work, srv, Path(args.profile) if args.profile else None)
                    result["dates"] = dates
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
                    )
                    run_outcomes.append(o)
                    print(
                        f"  {o.label:32s} {method:6s} wall {o.wall:7.2f} s  cpu {o.cpu:7.1f} s  "
                        f"rss {o.maxrss_mb:6.0f} MB  GETs {o.traffic.gets:5d}  "
                        f"{o.traffic.bytes / 2**20:7.1f} MiB",
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
                        f"(build()'s Dataset graph: {r['tasks'][1]}); "
                        f"tile cache hits/misses {r['tile_cache']['hits']}/{r['tile_cache']['misses']}"
                    )
                checks = "; ".join(f"{o.label}: {', '.join(o.checks)}" for o in run_outcomes if o.checks)
                block = (
                    f"### {n_dates} dates ({n_items} items), grid {shape[0]} x {shape[1]} px, "
                    f"{len(plan.periods)} months, {px_obs / 1e6:.0f} M px-obs, "
                    f"{needed / 2**20:.0f} MiB needed\n\n{table}\n\n{extra}\n\nchecks: {checks}\n"
                )
                print("\n" + block, flush=True)
                report.append(block)
                outcomes += run_outcomes
            server_version = srv.version()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    # memory with dates doubled
    if len(runs) == 2:
        lines = []
        for name in ("floor", "odc", "naive", "ndvi_scale"):
            a = [o for o in outcomes if o.name == name and o.method == "median" and o.dates == runs[0]]
            b = [o for o in outcomes if o.name == name and o.method == "median" and o.dates == runs[1]]
            if a and b:
                lines.append(
                    f"{LABELS[name]}: peak RSS {a[0].maxrss_mb:.0f} -> {b[0].maxrss_mb:.0f} MB "
                    f"({b[0].maxrss_mb / a[0].maxrss_mb:.2f}x), wall {a[0].wall:.1f} -> {b[0].wall:.1f} s"
                )
        block = "### dates doubled\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"
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
