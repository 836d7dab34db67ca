"""SIGKILL loop: random kills of ``ndvi-scale compute`` / ``compute --append`` followed by the same command.

Every round starts a real CLI run on the embedded sample, SIGKILLs it at a random moment (from interpreter
start-up to the last region, the consolidation and the STAC item), then runs the very same command again and
checks the result against a clean, uninterrupted run:

* the command exits 0 (or 7 "already exists" when the kill came after the cube was fully finished, e.g. while
  the process was exiting);
* every data object (``ndvi/``, ``valid_count/`` chunks) is byte-identical to the clean run's, and the store
  holds exactly the clean run's objects: no ``*.partial`` temporary file, no ``.ndvi-scale/`` markers or
  records, nothing else;
* the write state is ``complete``, the metadata is consolidated, the STAC item is the cube's and the writer
  lease (``<out>.lease.json``, left by the killed run) was taken over and released.

Not part of the test suite (it takes minutes). One line per round goes to the log (``--log``) and stdout; the
exit status is 1 if any round failed. The acceptance run of issue K is 100 rounds::

    python benchmarks/kill_loop.py --rounds 100 --log benchmarks/kill_loop-100.log

(about 25 s per round on 2 busy cores: ~40 minutes). ``--rounds 20`` is what benchmarks/kill_loop.log holds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE_BBOX = ("1.706", "48.307", "1.878", "48.382")
FIRST_HALF = ("2024-01-01", "2024-06-30")
SECOND_HALF = ("2024-07-01", "2024-12-31")
WHOLE_YEAR = ("2024-01-01", "2024-12-31")


def command(out: Path, dates: tuple[str, str], append: bool, catalog: str, chunk: int) -> list[str]:
    argv = [sys.executable, "-m", "ndvi_scale", "compute", "--bbox", *SAMPLE_BBOX, "--start", dates[0],
            "--end", dates[1], "--catalog", catalog, "--out", str(out), "--chunk", str(chunk)]
    return argv + (["--append"] if append else [])


def run(argv: list[str]) -> tuple[int, str, float]:
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    return p.returncode, (p.stderr.strip().splitlines() or [""])[-1], time.monotonic() - t0


def objects(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()}


def data_bytes(root: Path) -> dict[str, bytes]:
    return {k: p.read_bytes() for k, p in objects(root).items()
            if k.startswith(("ndvi/", "valid_count/")) and not k.endswith((".json", ".zarray", ".zattrs"))}


def write_state(doc: dict) -> dict:
    """The write state in the root attributes (``ndvi_scale_write``; ``ndvi_scale:write`` in older cubes)."""
    attrs = doc.get("attributes") or {}
    return json.loads(attrs.get("ndvi_scale_write") or attrs.get("ndvi_scale:write") or "{}")


def state_at(out: Path) -> str:
    """What the killed run left: write phase, markers, temporary files."""
    if not out.exists():
        return "nothing"
    try:
        phase = write_state(json.loads((out / "zarr.json").read_text()))["state"]
    except (OSError, ValueError, KeyError):
        phase = "no-metadata"
    markers = len(list((out / ".ndvi-scale" / "done").rglob("*"))) if (out / ".ndvi-scale").exists() else 0
    partial = len(list(out.rglob("*.partial")))
    return f"{phase} markers={markers} partial={partial}"


def check(out: Path, reference: Path) -> list[str]:
    problems = []
    got, want = objects(out), objects(reference)
    extra = sorted(set(got) - set(want))
    missing = sorted(set(want) - set(got))
    if extra:
        problems.append(f"stray objects {extra[:5]}{'...' if len(extra) > 5 else ''}")
    if missing:
        problems.append(f"missing objects {missing[:5]}{'...' if len(missing) > 5 else ''}")
    a, b = data_bytes(out), data_bytes(reference)
    differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    if differ:
        problems.append(f"{len(differ)} chunk(s) differ, e.g. {differ[0]}")
    try:
        doc = json.loads((out / "zarr.json").read_text())
    except (OSError, ValueError) as exc:
        return problems + [f"no cube: {exc}"]
    if write_state(doc).get("state") != "complete":
        problems.append("write state not complete")
    if not doc.get("consolidated_metadata"):
        problems.append("metadata not consolidated")
    if Path(str(out) + ".lease.json").exists():
        problems.append("writer lease left behind")
    item = Path(str(out) + ".stac-item.json")
    if not item.exists():
        problems.append("no STAC item")
    elif json.loads(item.read_text())["properties"]["ndvi_scale:fingerprint"] != write_state(doc).get(
            "fingerprint"):
        problems.append("STAC item is not the cube's")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    ap.add_argument("--catalog", default="sample")
    ap.add_argument("--chunk", type=int, default=256, help="spatial chunk (256: 16 regions per month)")
    ap.add_argument("--log", type=Path, default=None, help="append one line per round here")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kill-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    log = args.log.open("a") if args.log else None

    def say(line: str) -> None:
        print(line, flush=True)
        if log:
            log.write(line + "\n")
            log.flush()

    say(f"# kill_loop.py rounds={args.rounds} seed={seed} catalog={args.catalog} chunk={args.chunk} "
        f"started {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} on {os.cpu_count()} cores")
    ref_full, ref_half, ref_app = work / "ref-full.zarr", work / "ref-half.zarr", work / "ref-append.zarr"
    for p in (ref_full, ref_half, ref_app):
        shutil.rmtree(p, ignore_errors=True)
    rc, err, t_full = run(command(ref_full, WHOLE_YEAR, False, args.catalog, args.chunk))
    assert rc == 0, err
    rc, err, _ = run(command(ref_half, FIRST_HALF, False, args.catalog, args.chunk))
    assert rc == 0, err
    shutil.copytree(ref_half, ref_app)
    rc, err, t_app = run(command(ref_app, SECOND_HALF, True, args.catalog, args.chunk))
    assert rc == 0, err
    say(f"# clean runs: compute {t_full:.1f} s, append {t_app:.1f} s")

    failures = 0
    for i in range(1, args.rounds + 1):
        append = rng.random() < 0.5
        out = work / "killed.zarr"
        shutil.rmtree(out, ignore_errors=True)
        Path(str(out) + ".stac-item.json").unlink(missing_ok=True)
        if append:
            shutil.copytree(ref_half, out)
            shutil.copy(str(ref_half) + ".stac-item.json", str(out) + ".stac-item.json")
        argv = command(out, SECOND_HALF if append else WHOLE_YEAR, append, args.catalog, args.chunk)
        reference = ref_app if append else ref_full
        kill_at = rng.uniform(0.0, (t_app if append else t_full) * 1.05)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=kill_at)
            killed = False
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
        left = state_at(out)
        # killed (or ended) after the cube was finished: the same command then says "already exists" (exit 7)
        finished = out.exists() and not [p for p in check(out, reference) if p != "writer lease left behind"]
        rc, err, took = run(argv)
        ok_rc = rc == 0 or (rc == 7 and finished)
        problems = ([] if ok_rc else [f"exit {rc}: {err[:200]}"]) + check(out, reference)
        failures += bool(problems)
        say(f"{i:3d} {'append ' if append else 'compute'} kill at {kill_at:5.1f} s "
            f"{'killed' if killed else 'had ended'}: left {left}{' (finished)' if finished else ''}; "
            f"rerun exit {rc} in {took:.1f} s: "
            f"{'OK' if not problems else 'FAIL ' + '; '.join(problems)}")
    say(f"# {args.rounds - failures}/{args.rounds} rounds bit-identical with no stray files "
        f"({failures} failed), finished {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
