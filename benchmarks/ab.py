"""A/B of two versions of ndvi-scale on the benchmark's data, alternating runs (issue H's small steps).

Run-to-run noise on these VMs is +-0.15-0.3 s on a ~3.5 s run, more than most single changes gain, so one run of
each version says nothing. This runs the timed part of run.py's ``ndvi_scale`` contender (``pipeline.run`` of
the same catalog over the same delaying server, imports and numba's cache loading excluded) for version A, then
B, then A... each in a fresh process, and prints every run and the means::

    python benchmarks/ab.py HEAD~1 HEAD --latency 100 --rounds 5      # git refs: worktrees made in /tmp
    python benchmarks/ab.py /path/to/src-a /path/to/src-b               # or two src/ folders

Run it on a quiet machine, ideally as ``chrt -f 10 python benchmarks/ab.py ...`` (real-time priority: steadier).
Data: the benchmark's default (``--scale 0.5 --dates 12``, median, chunk 2048, no mask filters; ``--default-filters``:
the filters a user's run has by default), cached as run.py caches it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: The child: one timed run of the version whose ``src`` is first on sys.path (printed as one JSON line).
CHILD = r"""
import json, sys, time, tempfile
from pathlib import Path
sys.path.insert(0, {bench!r})
import dask, imagecodecs, numcodecs, pystac, zarr  # noqa: F401  (imported untimed, as run.py's contenders do)
import ndvi_scale, ndvi_scale.write, ndvi_scale.cluster  # noqa: F401
from ndvi_scale import kernel, sample as s
from ndvi_scale.config import RunConfig
from ndvi_scale.pipeline import run
import run as R
from server import Server
assert ndvi_scale.__file__.startswith({src!r}), ndvi_scale.__file__
kernel.warm_up()
spec = R._spec({scale}, 2 * {dates})
items = s.sample_catalog(None, spec=spec)
root = items.parent
with Server(root, "delay", latency_ms={latency}) as srv:
    dates = [d.date().isoformat() for d in spec.dates()[:{dates}]]
    work = Path(tempfile.mkdtemp(prefix="ndvi-ab-"))
    cat = work / "items.json"
    R._http_catalog(items, cat, root, srv.url, dates)
    R._warm_page_cache(cat, root, srv.url)
    cfg = RunConfig.create(bbox=R._bbox(spec, 4096), start=dates[0], end=dates[-1], catalog=str(cat),
                           out=str(work / "o.zarr"), period="month", method={method!r}, chunk=2048,
                           **({{}} if {default_filters} else {{"mask_filters": ()}}))
    mark = srv.mark()
    t0, c0 = time.perf_counter(), time.process_time()
    with dask.config.set(scheduler="threads"):
        run(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({{"wall": wall, "cpu": cpu, "gets": srv.since(mark).gets}}))
"""


def _src(ref: str, tmp: Path) -> str:
    """The ``src`` folder of ``ref``: a folder given as is, else a git worktree of that ref made under ``tmp``."""
    p = Path(ref)
    if p.is_dir():
        src = p / "src" if (p / "src" / "ndvi_scale").is_dir() else p
        return str(src.resolve())
    dest = tmp / ref.replace("/", "_").replace("~", "-")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(dest), ref], check=True,
                   capture_output=True)
    return str((dest / "src").resolve())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="version A: a git ref or a src/ folder")
    ap.add_argument("b", help="version B: a git ref or a src/ folder")
    ap.add_argument("--latency", type=float, default=0.0, help="ms the server waits before each answer")
    ap.add_argument("--rounds", type=int, default=4, help="runs of each version, alternating")
    ap.add_argument("--method", default="median")
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--dates", type=int, default=12)
    ap.add_argument("--default-filters", action="store_true",
                    help="the default mask filters (opening 20 m, dilation 60 m) as a user's run; default: none, "
                    "as run.py's contenders (the peers have none)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ndvi-ab-src-"))
    made = []
    try:
        srcs = {}
        for name, ref in (("A", args.a), ("B", args.b)):
            srcs[name] = _src(ref, tmp)
            if not Path(ref).is_dir():
                made.append(str(Path(srcs[name]).parent))
        runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
        for k in range(args.rounds):
            for name in ("A", "B") if k % 2 == 0 else ("B", "A"):  # ABBA: drift hits both alike
                code = CHILD.format(bench=str(HERE), src=srcs[name], scale=args.scale, dates=args.dates,
                                    latency=args.latency, method=args.method,
                                    default_filters=args.default_filters)
                env = dict(os.environ, PYTHONPATH=srcs[name])
                out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
                got = json.loads(out.stdout.strip().splitlines()[-1])
                runs[name].append(got)
                print(f"round {k + 1} {name}: wall {got['wall']:.2f} s  cpu {got['cpu']:.2f} s  GETs {got['gets']}",
                      flush=True)
        for name in ("A", "B"):
            walls = [r["wall"] for r in runs[name]]
            cpus = [r["cpu"] for r in runs[name]]
            print(f"{name} ({srcs[name]}): wall mean {statistics.mean(walls):.2f} s, "
                  f"median {statistics.median(walls):.2f} s; cpu mean {statistics.mean(cpus):.2f} s "
                  f"({len(walls)} runs, {args.latency:g} ms)")
        wa = statistics.mean(r["wall"] for r in runs["A"])
        wb = statistics.mean(r["wall"] for r in runs["B"])
        print(f"B / A wall: {wb / wa:.3f}")
    finally:
        for path in made:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", path], capture_output=True)


if __name__ == "__main__":
    main()
