"""The default sample's full-year composite over http://, at 0 ms and at 100 ms per request.

    python benchmarks/sample_latency.py                 # --latency 0,100
    python benchmarks/sample_latency.py --latency 0,40,100

The default sample (``ndvi_scale.sample.sample_catalog()``: items.json with local hrefs, 146 items of 2024) is
served by ``delayserve.py`` on 127.0.0.1, which waits the latency before answering each request (sendfile, one
thread per connection). For each latency the items' hrefs are rewritten to ``http://127.0.0.1:PORT/...`` into a
temporary items file and the command line runs as a user would type it::

    ndvi-scale compute --bbox 1.706 48.307 1.878 48.382 --start 2024-01-01 --end 2024-12-31 \\
                       --catalog ITEMS.json --out OUT.zarr            # monthly median

The wall is the command's (process start to exit, imports included). GETs/HEADs/bytes come from the server's log.
Then every latency's cube must equal the first one bit for bit (every data variable and coordinate; attributes
name the hrefs and may differ): a mismatch exits 1. Issue H's acceptance: the 100 ms run takes <= 1.5x the 0 ms
run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from server import Server  # noqa: E402

BBOX = ("1.706", "48.307", "1.878", "48.382")


def _rewrite(items_json: Path, root: Path, url: str, dst: Path) -> int:
    doc = json.loads(items_json.read_text())
    feats = doc["features"] if isinstance(doc, dict) else doc
    prefix = str(root)
    n = 0
    for f in feats:
        for a in f["assets"].values():
            href = a["href"]
            if href.startswith("file://"):
                href = href[len("file://") :]
            if href.startswith(prefix):
                a["href"] = url + href[len(prefix) :]
                n += 1
    dst.write_text(json.dumps(doc))
    return n


def _warm(root: Path) -> None:
    for p in root.rglob("*.tif"):
        with open(p, "rb") as fh:
            while fh.read(8 << 20):
                pass


def _compare(a: Path, b: Path) -> list[str]:
    """Differences between two cubes' data variables and coordinates (bit for bit; NaN == NaN)."""
    import xarray as xr

    da, db = xr.open_zarr(a), xr.open_zarr(b)
    problems = []
    names = sorted(set(da.variables) | set(db.variables))
    for name in names:
        if name not in da.variables or name not in db.variables:
            problems.append(f"{name}: only in one cube")
            continue
        x, y = da[name].values, db[name].values
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{name}: {x.shape} {x.dtype} != {y.shape} {y.dtype}")
            continue
        if x.dtype.kind == "f":
            same = np.array_equal(x.view(f"u{x.itemsize}"), y.view(f"u{y.itemsize}"))
        else:
            same = np.array_equal(x, y)
        if not same:
            problems.append(f"{name}: values differ")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency", default="0,100", help="milliseconds per request, comma list (default 0,100)")
    ap.add_argument("--cache", default=None, help="sample cache folder (default: ndvi-scale's)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (cubes, items, logs)")
    args = ap.parse_args()
    latencies = [float(v) for v in args.latency.split(",") if v.strip()]

    from ndvi_scale.sample import sample_catalog

    t0 = time.perf_counter()
    items_json = sample_catalog(args.cache)
    root = items_json.parent.resolve()
    print(f"sample catalog {items_json} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    _warm(root)  # no run pays the disk
    # numba caches its compiled kernels on disk: compile them before timing (best effort, engine-specific)
    subprocess.run(
        [sys.executable, "-c", "from ndvi_scale import kernel; kernel.warm_up()"],
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    work = Path(tempfile.mkdtemp(prefix="ndvi-sample-latency-"))
    runs = []
    try:
        for lat in latencies:
            with Server(root, latency_ms=lat) as srv:
                items = work / f"items-{lat:g}ms.json"
                n = _rewrite(items_json, root, srv.url, items)
                out = work / f"cube-{lat:g}ms.zarr"
                cmd = [
                    sys.executable, "-m", "ndvi_scale", "compute",
                    "--bbox", *BBOX, "--start", "2024-01-01", "--end", "2024-12-31",
                    "--catalog", str(items), "--out", str(out),
                ]  # fmt: skip
                env = dict(os.environ, PYTHONWARNINGS="ignore")
                mark, cpu0 = srv.mark(), srv.cpu()
                t = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t
                traffic, server_cpu = srv.since(mark), srv.cpu() - cpu0
                if proc.returncode != 0:
                    print(proc.stdout[-3000:], proc.stderr[-3000:])
                    raise SystemExit(f"ndvi-scale compute failed at {lat:g} ms (exit {proc.returncode})")
                heads = traffic.requests - traffic.gets
                inflight = traffic.requests * lat / 1000 / wall
                runs.append((lat, wall, traffic, heads, inflight, server_cpu, out))
                print(
                    f"{lat:5g} ms: wall {wall:6.1f} s  GETs {traffic.gets}  HEADs {heads}  "
                    f"{traffic.bytes / 2**20:.0f} MiB  in flight {inflight:.1f}  server CPU {server_cpu:.2f} s  "
                    f"({n} hrefs)",
                    flush=True,
                )
        problems = []
        for r in runs[1:]:
            problems += [f"{r[0]:g} ms vs {runs[0][0]:g} ms: {p}" for p in _compare(runs[0][6], r[6])]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    base = runs[0]
    print(
        "\n| latency | wall s | vs first | GETs | HEADs | MiB fetched | requests in flight | server CPU s |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for lat, wall, traffic, heads, inflight, server_cpu, _ in runs:
        print(
            f"| {lat:g} ms | {wall:.1f} | {wall / base[1]:.2f}x | {traffic.gets} | {heads} | "
            f"{traffic.bytes / 2**20:.0f} | {inflight:.1f} | {server_cpu:.2f} |"
        )
    print(
        "\nwall: `ndvi-scale compute` of the default sample, full year, monthly median, process start to exit; "
        "in flight = (GETs + HEADs) x latency / wall"
    )
    if problems:
        print("CUBES DIFFER:\n  " + "\n  ".join(problems))
        return 1
    print(f"cubes identical at {', '.join(f'{r[0]:g} ms' for r in runs)} (every data variable and coordinate)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
