"""Country scale: how planning cost grows with area and years, and a real distributed run proving the waves.

**Plan** (no pixels): synthetic Sentinel-2 items over N x N MGRS-size granules (109.8 km, every 100 km, centred
on UTM 31N's meridian; 73 dates a year; ``ndvi_scale.testing.scale``) written as one local FeatureCollection,
then, in a fresh subprocess per (N, years): ``search`` (read + normalise every item), ``make_plan``, the size
estimate, and ``build`` (the lazy Dataset: the whole Dask graph), monthly median, chunk 2048. Reported: items,
grid, chunk chosen, chunks, periods, graph keys, keys / (chunks x periods), CPU time of each step (process time:
the machine is shared, wall time depends on the others' load, also given with the 1-minute load average), the
subprocess's peak RSS (``ru_maxrss``: the client), and plan's output/input/CPU-hour estimate.

**Distributed** (real pixels): the embedded sample (full year, monthly median) at 20 m with 64-px chunks
(7 x 11 chunks x 12 months = 924 regions) written through a LocalCluster (scheduler in this process, 2 worker
processes of 1 thread, 127.0.0.1), once in waves of ``--wave`` regions and once in one wave a period (the
default size). Reported: wall time, tasks run, the sum of the tasks' compute time (``get_task_stream``),
scheduler overhead per task = (wall x threads - task time) / tasks, the most tasks the scheduler held at once
(a scheduler plugin) and the waves; the two cubes are compared chunk by chunk.

    python benchmarks/scale.py                       # everything (~10 min on 2 shared cores)
    python benchmarks/scale.py --sizes 2 4 8 --years 1 --no-distributed
    python benchmarks/scale.py --no-plans --no-distributed --year-median DIR

**Year median** (``--year-median DIR``): a full-year sample of 2560-px granules (``SampleSpec(size=2560,
blocksize=1024)``, generated into DIR once: ~20 min on 2 busy cores), ``--period year --method median --chunk
2048`` over a 20.6 km box inside granule A, threads scheduler, in a fresh process with the day-layer strips and
one without (``TASK_DAY_BYTES`` set to 2^40): peak RSS, wall and CPU time, cubes compared.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _catalog(n: int, years: int, root: Path) -> tuple[Path, tuple[float, float, float, float], int]:
    from ndvi_scale.testing.scale import revisit_dates, tile_grid_items, write_items

    items = list(tile_grid_items(n, revisit_dates(2024, years)))
    first = [it["bbox"] for it in items[: n * n]]
    bbox = (min(b[0] for b in first), min(b[1] for b in first), max(b[2] for b in first), max(b[3] for b in first))
    path = write_items(items, root / f"items-{n}x{n}-{years}y.json")
    return path, bbox, len(items)


def plan_child(path: str, bbox: list[float], years: int) -> dict[str, Any]:
    """One (N, years) plan measurement, in its own process (its peak RSS is the client's)."""
    logging.disable(logging.WARNING)  # granules far from the meridian warn about their footprints, per asset
    from ndvi_scale import pipeline
    from ndvi_scale.config import RunConfig
    from ndvi_scale.search import search

    t0, c0 = time.perf_counter(), time.process_time()
    cfg = RunConfig.create(bbox=bbox, start="2024-01-01", end=f"{2023 + years}-12-31", catalog=path,
                           allow_large=True)
    result = search(cfg)
    t1, c1 = time.perf_counter(), time.process_time()
    plan = pipeline.make_plan(cfg, result)
    t2, c2 = time.perf_counter(), time.process_time()
    est = pipeline.plan_estimate(plan)
    t3, c3 = time.perf_counter(), time.process_time()
    ds = pipeline.build(cfg, plan)
    t4, c4 = time.perf_counter(), time.process_time()
    keys = len(dict(ds.__dask_graph__()))  # every variable: composites, sources, layers
    ny, nx = est.chunks
    return {
        "items": len(result.items), "grid": list(est.grid_shape), "chunk": plan.chunk, "chunks": ny * nx,
        "periods": est.periods, "keys": keys,
        "tasks_per_chunk_period": est.tasks / (ny * nx * est.periods),
        "keys_per_chunk_period": keys / (ny * nx * est.periods),
        "search_s": t1 - t0, "plan_s": t2 - t1, "estimate_s": t3 - t2, "build_s": t4 - t3, "total_s": t4 - t0,
        "search_cpu": c1 - c0, "plan_cpu": c2 - c1, "estimate_cpu": c3 - c2, "build_cpu": c4 - c3,
        "total_cpu": c4 - c0,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "load": os.getloadavg()[0],
        "output_tb": est.output_bytes / 1e12, "stored_tb": est.output_bytes_compressed / 1e12,
        "input_tb": est.input_bytes / 1e12, "cpu_hours": est.cpu_hours, "regions": est.regions,
    }


def run_plans(sizes: list[int], years_list: list[int]) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ndvi-scale-bench-") as tmp:
        for n in sizes:
            for years in years_list:
                path, bbox, count = _catalog(n, years, Path(tmp))
                out = subprocess.run([sys.executable, __file__, "--child", str(path), json.dumps(bbox), str(years)],
                                     capture_output=True, text=True, check=True)
                row = {"n": n, "years": years, **json.loads(out.stdout.strip().splitlines()[-1])}
                assert row["items"] == count
                rows.append(row)
                print(_plan_row(row), flush=True)
                path.unlink()
    return rows


def _plan_row(r: dict[str, Any]) -> str:
    return (f"| {r['n']}x{r['n']} | {r['years']} | {r['items']:,} | {r['grid'][0]:,} x {r['grid'][1]:,} | {r['chunk']} "
            f"| {r['chunks']:,} x {r['periods']} | {r['keys']:,} | {r['keys_per_chunk_period']:.2f} | "
            f"{r['tasks_per_chunk_period']:.3f} | "
            f"{r['search_cpu']:.1f} | {r['plan_cpu'] + r['estimate_cpu']:.1f} | {r['build_cpu']:.1f} | "
            f"**{r['total_cpu']:.1f}** | {r['total_s']:.1f} | "
            f"{r['rss_mb']:.0f} | {r['stored_tb']:.2f} | {r['input_tb']:.1f} | {r['cpu_hours']:,.0f} | "
            f"{r.get('load', float('nan')):.1f} |")


PLAN_HEADER = (
    "| tiles | years | items | grid (px) | chunk | chunks x periods | graph keys | keys / (chunks x periods) "
    "| tasks run (est.) / (chunks x periods) | search CPU s | plan + estimate CPU s | build CPU s | **total CPU s** "
    "| total wall s | client RSS MB "
    "| stored TB (est.) | input TB (est.) | CPU-h (est.) | load (1 min) |\n" + "|---" * 19 + "|"
)


def distributed_run(wave: int, workdir: Path) -> list[dict[str, Any]]:
    """The sample at 20 m / 64-px chunks on a LocalCluster, in waves of ``wave`` regions and in the default."""
    import numpy as np
    import xarray as xr
    from distributed import Client, LocalCluster, get_task_stream
    from distributed.diagnostics.plugin import SchedulerPlugin

    from ndvi_scale import pipeline
    from ndvi_scale.config import RunConfig
    from ndvi_scale.sample import SAMPLE_BBOX, SAMPLE_END, SAMPLE_START

    class Peak(SchedulerPlugin):
        def __init__(self, scheduler: Any) -> None:
            self.scheduler, self.peak = scheduler, 0

        def transition(self, *args: Any, **kwargs: Any) -> None:
            self.peak = max(self.peak, len(self.scheduler.tasks))

    rows = []
    outs = {}
    for label, size in (("waves", wave), ("one wave a period", None)):
        if size is None:
            os.environ.pop("NDVI_SCALE_WAVE_REGIONS", None)
        else:
            os.environ["NDVI_SCALE_WAVE_REGIONS"] = str(size)
        out = workdir / f"cube-{size}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        cfg = RunConfig.create(bbox=SAMPLE_BBOX, start=SAMPLE_START, end=SAMPLE_END, catalog="sample",
                               out=str(out), resolution=20, chunk=64)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            peak = Peak(cluster.scheduler)
            cluster.scheduler.add_plugin(peak, name="peak")
            t0 = time.perf_counter()
            with get_task_stream(client) as ts:
                report = pipeline.run(cfg, cluster=cluster.scheduler_address)
            wall = time.perf_counter() - t0
        busy = sum(s["stop"] - s["start"] for t in ts.data for s in t["startstops"] if s["action"] == "compute")
        n = len(ts.data)
        assert report.write is not None
        rows.append({"run": label, "wave": size or "default (4096)", "regions": report.write.regions_written,
                     "waves": report.write.waves, "tasks": n, "wall_s": wall, "task_s": busy,
                     "overhead_ms": (wall * 2 - busy) / n * 1e3, "peak": peak.peak})
        outs[label] = out
    a, b = (xr.open_zarr(p, decode_coords="all") for p in outs.values())
    rows.append({"identical": bool(np.array_equal(a.ndvi.values, b.ndvi.values, equal_nan=True)
                                   and np.array_equal(a.valid_count.values, b.valid_count.values))})
    return rows


YEAR_SPEC = {"size": 2560, "blocksize": 1024}


def year_child(catalog: str, out: str, strips: bool) -> dict[str, Any]:
    """One year-median run at chunk 2048 (see the module docstring), in its own process."""
    from pyproj import Transformer

    import ndvi_scale
    from ndvi_scale.engine import task
    from ndvi_scale.sample import SampleSpec

    if not strips:
        task.TASK_DAY_BYTES = 2**40
    spec = SampleSpec(**YEAR_SPEC)  # type: ignore[arg-type]
    x0, _, _, y1 = spec.granule(0).bounds
    bx0, by1 = x0 + 1000, y1 - 1000
    lons, lats = Transformer.from_crs(spec.epsg, 4326, always_xy=True).transform(
        [bx0, bx0 + 20600, bx0, bx0 + 20600], [by1, by1, by1 - 20600, by1 - 20600])
    t0 = time.perf_counter()
    ds = ndvi_scale.compute((min(lons), min(lats), max(lons), max(lats)), "2024-01-01", "2024-12-31",
                            catalog=catalog, out=out, period="year", method="median", chunk=2048)
    return {"strips": strips, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time(),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "shape": list(ds.ndvi.shape),
            "chunks": [list(c) for c in ds.ndvi.chunks[1:]], "load": os.getloadavg()[0]}


def year_median(root: Path) -> list[dict[str, Any]]:
    import numpy as np
    import xarray as xr

    from ndvi_scale.sample import SampleSpec, generate

    catalog = root / "catalog" / "items.json"
    if not catalog.exists():
        generate(root / "catalog", SampleSpec(**YEAR_SPEC))  # type: ignore[arg-type]
    rows, outs = [], []
    for strips in (True, False):
        out = root / f"year-{'strips' if strips else 'whole'}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        done = subprocess.run([sys.executable, __file__, "--year-child", str(catalog), str(out), str(int(strips))],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        outs.append(xr.open_zarr(out))
    a, b = outs
    rows.append({"identical": bool(np.array_equal(a.ndvi.values, b.ndvi.values, equal_nan=True)
                                   and np.array_equal(a.valid_count.values, b.valid_count.values))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--years", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--wave", type=int, default=16, help="regions per wave in the distributed run")
    ap.add_argument("--no-plans", action="store_true")
    ap.add_argument("--no-distributed", action="store_true")
    ap.add_argument("--year-median", metavar="DIR", help="also the single-tile year median (data cached in DIR)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--year-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.year_child:
        catalog, out, strips = args.year_child
        print(json.dumps(year_child(catalog, out, strips == "1")))
        return
    if args.child:
        path, bbox, years = args.child
        print(json.dumps(plan_child(path, json.loads(bbox), int(years))))
        return
    if not args.no_plans:
        print(PLAN_HEADER, flush=True)
        run_plans(args.sizes, args.years)
    if not args.no_distributed:
        with tempfile.TemporaryDirectory(prefix="ndvi-scale-dist-") as tmp:
            for row in distributed_run(args.wave, Path(tmp)):
                print(json.dumps(row), flush=True)
    if args.year_median:
        Path(args.year_median).mkdir(parents=True, exist_ok=True)
        for row in year_median(Path(args.year_median)):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
