"""Cloud-edge contamination of composites on the realistic sample, per composite method and mask setting.

Runs ``ndvi_scale.compute`` on the embedded sample (SAMPLE_BBOX, 2024, monthly; the SCL has the errors of
``SampleSpec.scl_errors``) once per (method, mask filters), writes each cube under ``--work``, and judges it with
:func:`ndvi_scale.testing.quality.composite_quality` against the analytic truth:

* contaminated: composite pixels off by > 0.02 NDVI from the same reducer over the true NDVI of the observations
  the run kept;
* lost: clean observations (a granule has data, the truth says the sky left the NDVI within 0.02) the mask dropped;
* empty: composite pixels without any observation; dirty kept: kept observations that are contaminated.

    python benchmarks/quality.py                                  # the default table (about 10 minutes, 2 cores)
    python benchmarks/quality.py --methods median --filters none "opening:20,dilation:60"
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_FILTERS = [
    "none",
    "dilation:20",
    "dilation:40",
    "dilation:60",
    "dilation:80",
    "dilation:100",
    "opening:20,dilation:40",
    "opening:20,dilation:60",
    "opening:20,dilation:80",
    "opening:40,dilation:60",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["median", "mean", "max"])
    ap.add_argument("--filters", nargs="+", default=DEFAULT_FILTERS, help="mask filter settings (--mask-filters)")
    ap.add_argument("--work", default=None, help="folder for the cubes (default: a temporary one, removed)")
    ap.add_argument("--chunk", type=int, default=2048)
    args = ap.parse_args()

    import xarray as xr

    import ndvi_scale
    from ndvi_scale.config import DEFAULT_MASK_CLASSES, normalise_mask_filters
    from ndvi_scale.sample import SAMPLE_BBOX, SAMPLE_END, SAMPLE_START, SampleSpec, sample_catalog
    from ndvi_scale.testing.quality import QualityRun, composite_quality

    catalog = sample_catalog()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ndvi-quality-"))
    runs: dict[str, QualityRun] = {}
    timings: dict[str, float] = {}
    try:
        for method in args.methods:
            for text in args.filters:
                filters = normalise_mask_filters(text)
                name = f"{method} | {text}"
                out = work / f"{method}-{text.replace(':', '').replace(',', '-')}.zarr"
                t0 = time.perf_counter()
                if not out.exists():
                    ndvi_scale.compute(SAMPLE_BBOX, SAMPLE_START, SAMPLE_END, catalog=str(catalog), out=str(out),
                                       method=method, mask_filters=filters, chunk=args.chunk)
                timings[name] = time.perf_counter() - t0
                runs[name] = QualityRun(xr.open_zarr(out, decode_coords="all"), method, filters)
                print(f"computed {name} in {timings[name]:.1f} s", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        figures = composite_quality(SampleSpec(), runs, DEFAULT_MASK_CLASSES)
        print(f"judged in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        print("| method | mask filters | contaminated | clear obs lost | no observation | dirty obs kept | run s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name, f in figures.items():
            method, text = name.split(" | ")
            if f["count_mismatch"]:
                print(f"WARNING {name}: {f['count_mismatch']:.0f} pixels' counts differ from the oracle's",
                      file=sys.stderr)
            print(f"| {method} | {text} | {100 * f['contaminated']:.2f} % | {100 * f['lost']:.1f} % | "
                  f"{100 * f['empty']:.2f} % | {100 * f['dirty_kept']:.2f} % | {timings[name]:.1f} |")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
