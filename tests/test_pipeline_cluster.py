"""The real pipeline through the real CLI on real Dask clusters, all on 127.0.0.1 (issue D acceptance).

Every run is ``python -m ndvi_scale compute ...`` in a subprocess, and every cube it writes must equal, bit for bit
(every stored chunk's bytes and the decoded arrays), the same run on the default threaded scheduler:

* ``--cluster tcp://...``: a `dask scheduler` + 2 `dask worker` processes, shared by this module;
* the same with one worker SIGKILLed mid-run (its own scheduler and workers): the run still exits 0;
* ``--cluster gateway`` (a dask-gateway-server with the local process backend) and ``--cluster local``;
* ``--config run.yaml`` (file values, CLI overrides, relative windows, the ConfigMap's run file) and a scheduled
  job appending month after month, then re-run on a month already written (a no-op).

Servers are started by the helpers of tests/clusters.py and stopped by PID.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rioxarray  # noqa: F401  (the .rio accessor)
import xarray as xr
import yaml

from clusters import LOOPBACK, DaskProcesses, GatewayServer, log_tails, require_gateway, wait_for
from ndvi_scale.pipeline import run as run_pipeline
from ndvi_scale.runfile import resolve_window, run_config_from
from ndvi_scale.sample import SampleSpec, generate
from ndvi_scale.write import MARKER_DIR, STAC_SUFFIX

ROOT = Path(__file__).resolve().parents[1]
CONFIGMAP = ROOT / "deploy" / "k8s" / "configmap.yaml"

SPEC = SampleSpec(size=96, blocksize=128, start=dt.date(2024, 4, 2), end=dt.date(2024, 5, 30), field_size=160)
BIG = SampleSpec(size=384, blocksize=256, start=dt.date(2024, 3, 2), end=dt.date(2024, 6, 30), field_size=320)
START, END = "2024-04-01", "2024-05-31"  # two monthly periods of SPEC
BIG_START, BIG_END = "2024-03-01", "2024-06-30"
CHUNK = "64"
#: Root metadata objects: they hold the run's provenance (its config, with --out), so they differ between runs.
ROOT_METADATA = {"zarr.json", ".zattrs", ".zgroup", ".zmetadata"}
#: Key prefixes of the data chunks of the cube variables (Zarr v3: <array>/c/<t>/<y>/<x>).
DATA_CHUNKS = ("ndvi/c/", "valid_count/c/")


# ------------------------------------------------------------------------------------------------- helpers
def bbox_args(spec: SampleSpec = SPEC) -> list[str]:
    return [f"{v:.5f}" for v in spec.bbox_lonlat()]


def compute_args(catalog: str, out: Path, *extra: str, spec: SampleSpec = SPEC, start: str = START,
                 end: str = END) -> list[str]:
    return ["compute", "--bbox", *bbox_args(spec), "--start", start, "--end", end, "--catalog", catalog,
            "--out", str(out), "--chunk", CHUNK, *extra]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NDVI_SCALE_DEBUG" and not k.startswith("DASK_GATEWAY__")}
    return env | (extra or {})


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ndvi_scale", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or cli_env())


def cli_on_terminal(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Like :func:`cli`, with stderr on a pseudo-terminal as in an interactive shell: the rich progress bar is
    enabled (it is only drawn for a terminal). Returns stdout, and what the terminal received as stderr."""
    argv = [sys.executable, "-m", "ndvi_scale", *args]
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=terminal, text=True, env=cli_env())
    finally:
        os.close(terminal)
    shown = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(controller, 65536)  # EIO (Linux) or b"" once the child closed the terminal
            except OSError:
                chunk = b""
            if not chunk:
                break
            shown += chunk
        stdout, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, shown.decode(errors="replace"))


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr and "error:" not in r.stderr, r.stderr
    return r


def stored(path: Path) -> dict[str, bytes]:
    """Every object of the store at ``path`` by key, except the root metadata (run provenance)."""
    out = {}
    for f in path.rglob("*"):
        rel = f.relative_to(path).as_posix()
        if f.is_file() and rel not in ROOT_METADATA:
            out[rel] = f.read_bytes()
    return out


def snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of the store and its STAC item, with bytes and mtime (to prove a run wrote nothing)."""
    files = [f for f in path.rglob("*") if f.is_file()] + [path.with_name(path.name + STAC_SUFFIX)]
    return {str(f): (f.read_bytes(), f.stat().st_mtime_ns) for f in files}


def open_cube(path: Path) -> xr.Dataset:
    return xr.open_zarr(path, decode_coords="all")


def assert_same_cube(got: Path, ref: Path, *, periods: int | None = None) -> None:
    """Bit for bit: every stored chunk (data and coordinates) and array metadata, then the decoded arrays.

    With ``periods``, ``got`` holds only the first ``periods`` periods of ``ref``: their data chunks are compared.
    """
    a, b = stored(got), stored(ref)
    if periods is not None:
        a = {k: v for k, v in a.items() if k.startswith(DATA_CHUNKS)}
        b = {k: v for k, v in b.items() if k.startswith(DATA_CHUNKS) and int(k.split("/")[2]) < periods}
    assert any(k.startswith("ndvi/c/") for k in a), sorted(a)[:20]
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"{len(differ)} stored object(s) differ, e.g. {differ[:5]}"
    ds_a, ds_b = open_cube(got), open_cube(ref)
    if periods is not None:
        ds_b = ds_b.isel(time=slice(0, periods))
    assert set(ds_a.variables) == set(ds_b.variables)
    for name in ds_a.variables:
        assert ds_a[name].dtype == ds_b[name].dtype, name
        np.testing.assert_array_equal(ds_a[name].values, ds_b[name].values, err_msg=str(name))
    assert np.isfinite(ds_a.ndvi.values).any() and int(ds_a.valid_count.values.max()) > 0


def markers(out: Path) -> int:
    root = out / MARKER_DIR
    return sum(1 for f in root.rglob("*") if f.is_file()) if root.exists() else 0


def write_yaml(path: Path, values: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


def dashboard_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.startswith("dask dashboard: ")]
    assert len(lines) == 1, stderr
    return lines[0].removeprefix("dask dashboard: ")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("pc-sample")
    generate(root, SPEC)
    return str(root / "items.json")


@pytest.fixture(scope="module")
def reference(catalog: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """April-May median on the default threaded scheduler: what every cluster run must reproduce."""
    out = tmp_path_factory.mktemp("pc-ref") / "threads.zarr"
    r = ok(cli(*compute_args(catalog, out)))
    assert "dask dashboard" not in r.stderr and "2 month composite(s)" in r.stdout
    return out


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskProcesses]:
    """One `dask scheduler` + 2 `dask worker` processes for the whole module (no test here kills these)."""
    procs = DaskProcesses(tmp_path_factory.mktemp("pc-dask"), n_workers=2)
    try:
        procs.wait_for_workers(2)
        yield procs
    finally:
        procs.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    require_gateway()
    # The CLI cannot size a gateway cluster (adapt 1..20 by default): cap it at what 2 cores can host.
    server = GatewayServer(tmp_path_factory.mktemp("pc-gateway"), "\nc.ClusterConfig.cluster_max_workers = 2\n")
    try:
        yield server
    finally:
        server.close()


def scheduler_stats(address: str) -> dict[str, int]:
    """Tasks of each key prefix the scheduler got results of so far (counts kept after the clients leave)."""
    from distributed import Client

    def counts(dask_scheduler: Any) -> dict[str, int]:
        return {name: int(p.state_counts["memory"]) for name, p in dask_scheduler.task_prefixes.items()} | {
            "suspicious": sum(p.suspicious for p in dask_scheduler.task_prefixes.values())}

    with Client(address, timeout=20) as client:
        return dict(client.run_on_scheduler(counts))


# ------------------------------------------------------------------------------------ 1. an existing scheduler
def test_tcp_scheduler_equals_threaded_run(catalog: str, reference: Path, scheduler: DaskProcesses,
                                           tmp_path: Path) -> None:
    out = tmp_path / "tcp.zarr"
    before = scheduler_stats(scheduler.address)
    r = ok(cli_on_terminal(*compute_args(catalog, out, "--cluster", scheduler.address)))
    assert r.stdout.splitlines()[-1].startswith(f"wrote {out}: 2 month composite(s)")
    assert dashboard_line(r.stderr).startswith(f"http://{LOOPBACK}:")
    assert "composite + write" in r.stdout + r.stderr and "12/12" in r.stdout + r.stderr  # the progress bar
    after = scheduler_stats(scheduler.address)
    ran = after.get("ndvi-scale-write", 0) - before.get("ndvi-scale-write", 0)
    assert ran == 2 * 2 * 3, after  # every region (2 months x 2 x 3 blocks) ran on the workers
    assert all(w.poll() is None for w in scheduler.workers) and scheduler.scheduler.poll() is None
    assert_same_cube(out, reference)


# ---------------------------------------------------------------------------------- 2. a worker killed mid-run
@pytest.fixture(scope="module")
def big_catalog(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("pc-big")
    generate(root, BIG)
    return str(root / "items.json")


@pytest.fixture
def doomed_scheduler(tmp_path: Path) -> Iterator[DaskProcesses]:
    (tmp_path / "dask").mkdir()
    procs = DaskProcesses(tmp_path / "dask", n_workers=2)
    try:
        yield procs
    finally:
        procs.close()


def test_worker_sigkilled_mid_run_still_exits_0_with_the_clean_cube(big_catalog: str, doomed_scheduler: DaskProcesses,
                                                                     tmp_path: Path) -> None:
    clean, killed = tmp_path / "clean.zarr", tmp_path / "killed.zarr"

    def big_args(out: Path, *extra: str) -> list[str]:
        return compute_args(big_catalog, out, *extra, spec=BIG, start=BIG_START, end=BIG_END)

    ok(cli(*big_args(clean)))  # the clean run, threaded
    doomed_scheduler.wait_for_workers(2)
    victim, survivor = doomed_scheduler.workers  # `dask worker --no-nanny`: the PID is the worker itself
    argv = [sys.executable, "-m", "ndvi_scale", *big_args(killed, "--cluster", doomed_scheduler.address)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        # Kill once some regions are written (their markers exist), while the run goes on.
        wait_for(lambda: markers(killed) >= 6 or proc.poll() is not None, 120, "progress markers",
                 doomed_scheduler.logs)
        assert proc.poll() is None, "the run finished before the kill; make BIG bigger"
        done_at_kill = markers(killed)
        os.kill(victim.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stderr}\n{log_tails(doomed_scheduler.logs)}"
    assert victim.wait(5) == -signal.SIGKILL and survivor.poll() is None
    # The victim had tasks in flight when it died: the scheduler marked them suspicious and ran them elsewhere.
    stats = scheduler_stats(doomed_scheduler.address)
    assert stats["suspicious"] >= 1, stats
    ds = open_cube(clean)
    regions = ds.sizes["time"] * -(-ds.sizes["y"] // int(CHUNK)) * -(-ds.sizes["x"] // int(CHUNK))
    assert 6 <= done_at_kill < regions
    assert stats["ndvi-scale-write"] >= regions  # every region was written by the workers (some twice)
    assert f"wrote {killed}: 4 month composite(s)" in stdout
    assert not (killed / MARKER_DIR).exists()  # finished: the markers are gone
    assert_same_cube(killed, clean)


# ---------------------------------------------------------------------------------- 3./4. gateway and local
def test_gateway_cluster_equals_threaded_run(catalog: str, reference: Path, gateway: GatewayServer,
                                             tmp_path: Path) -> None:
    out = tmp_path / "gateway.zarr"
    r = ok(cli(*compute_args(catalog, out, "--cluster", "gateway"), env=cli_env(gateway.env())))
    assert dashboard_line(r.stderr).startswith(f"{gateway.address}/clusters/")
    assert_same_cube(out, reference)
    # The run shut its gateway cluster down on exit.
    wait_for(lambda: not gateway.clusters(), 20, "the gateway cluster to shut down", [gateway.log])


def test_local_cluster_equals_threaded_run(catalog: str, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "local.zarr"
    r = ok(cli(*compute_args(catalog, out, "--cluster", "local")))
    assert dashboard_line(r.stderr).startswith(f"http://{LOOPBACK}:")
    assert_same_cube(out, reference)


# ------------------------------------------------------------------------------------------ 5. run files
def run_file_values(catalog: str, out: Path, **more: Any) -> dict[str, Any]:
    """A run file with the CLI's fields (dashes, as in deploy/k8s/configmap.yaml)."""
    return {"bbox": [float(v) for v in bbox_args()], "catalog": catalog, "out": str(out), "period": "month",
            "chunk": int(CHUNK), "max-cloud": 100, "zarr-format": 3, **more}


@pytest.fixture(scope="module")
def max_cube(catalog: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run file saying method mean, out A; the command line says --method max --out B. Returns (A, B)."""
    tmp = tmp_path_factory.mktemp("pc-max")
    file_out, cli_out = tmp / "from-file.zarr", tmp / "from-cli.zarr"
    run_yaml = write_yaml(tmp / "run.yaml", run_file_values(catalog, file_out, method="mean", start=START, end=END))
    r = ok(cli("compute", "--config", str(run_yaml), "--method", "max", "--out", str(cli_out)))
    assert "2 month composite(s) of NDVI (max)" in r.stdout
    return file_out, cli_out


def test_run_file_with_cli_overrides(max_cube: tuple[Path, Path], reference: Path) -> None:
    file_out, cli_out = max_cube
    assert not file_out.exists()  # --out won over the file's out
    ds, ref = open_cube(cli_out), open_cube(reference)
    assert "max_date" in ds and ds.attrs["ndvi_scale_method"] == "max"  # --method max won over method: mean
    config = json.loads(ds.attrs["ndvi_scale_config"])
    assert config["method"] == "max" and config["max_cloud"] == 100 and config["period"] == "month"
    # Everything else came from the file: same grid, periods and clear days as the flags-only median run.
    for name in ("time", "time_end", "x", "y"):
        np.testing.assert_array_equal(ds[name].values, ref[name].values)
    np.testing.assert_array_equal(ds.valid_count.values, ref.valid_count.values)
    seen = ds.valid_count.values > 0
    np.testing.assert_array_equal(np.isfinite(ds.ndvi.values), seen)
    assert (ds.ndvi.values[seen] >= ref.ndvi.values[seen]).all()  # the max is never below the median
    dates = ds.max_date.values[seen]
    assert not np.isnat(dates).any() and (dates >= np.datetime64(START)).all() and (dates <= np.datetime64(END)).all()


def test_run_file_window_last_n_days_through_the_cli(catalog: str, max_cube: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    """``window: last-3660-days`` (relative to today, UTC) covers the 2024 sample: one yearly period per year."""
    out = tmp_path / "window.zarr"
    run_yaml = write_yaml(tmp_path / "run.yaml", run_file_values(catalog, out, method="max", period="year",
                                                                 window="last-3660-days"))
    before = resolve_window("last-3660-days")
    ok(cli("compute", "--config", str(run_yaml)))
    windows = {before, resolve_window("last-3660-days")}  # two if the run straddled midnight (UTC)
    ds, monthly = open_cube(out), open_cube(max_cube[1])
    years = ds.time.values.astype("datetime64[Y]").astype(int) + 1970
    assert list(years) in [list(range(start.year, end.year + 1)) for start, end in windows]
    counts = ds.valid_count.values.reshape(len(years), -1).sum(axis=1)
    assert [int(y) for y, c in zip(years, counts, strict=True) if c] == [2024]
    y2024 = ds.sel(time="2024")
    # All sample days are in April-May: the year's clear days and maximum are those of the two months.
    np.testing.assert_array_equal(y2024.valid_count.values[0], monthly.valid_count.values.sum(axis=0))
    np.testing.assert_array_equal(y2024.ndvi.values[0], np.fmax(*monthly.ndvi.values))


def test_run_file_window_previous_month_with_a_given_today(catalog: str, reference: Path, tmp_path: Path) -> None:
    """``window: previous-month`` resolved against a fixed today, then the same pipeline the CLI runs."""
    out = tmp_path / "april.zarr"
    run_yaml = write_yaml(tmp_path / "run.yaml", run_file_values(catalog, out, method="median",
                                                                 window="previous-month"))
    cfg, merged = run_config_from(run_yaml, {}, today=dt.date(2024, 5, 2))
    assert (cfg.start, cfg.end) == (dt.date(2024, 4, 1), dt.date(2024, 4, 30)) and "window" not in merged
    report = run_pipeline(cfg, cluster=merged.get("cluster"))
    assert report.write is not None and report.write.periods_written == ("2024-04-01",)
    assert_same_cube(out, reference, periods=1)


def test_configmap_run_file_runs_with_local_catalog_and_out(tmp_path: Path) -> None:
    """deploy/k8s/configmap.yaml's run.yaml as the CronJob runs it, only catalog and out made local.

    Its window is previous-month (relative to today, UTC) and its bbox is not the default sample's: a sample
    catalog is generated inside that bbox, dated from the previous month to the end of this one (so that a run
    straddling a month change still finds its scenes). Its ``cluster: local`` is kept.
    """
    text = yaml.safe_load(CONFIGMAP.read_text())["data"]["run.yaml"]
    (tmp_path / "configmap-run.yaml").write_text(text, encoding="utf-8")
    # As shipped (Earth Search, gs:// with workload identity) it only has to build a RunConfig: nothing contacted.
    cfg, merged = run_config_from(tmp_path / "configmap-run.yaml", {}, today=dt.date(2024, 3, 2))
    assert (cfg.start, cfg.end) == (dt.date(2024, 2, 1), dt.date(2024, 2, 29)) and merged["cluster"] == "local"
    assert cfg.out is not None and cfg.out.startswith("gs://") and cfg.append is True
    values = yaml.safe_load(text)
    assert values["catalog"].startswith("https://") and values["out"].startswith("gs://")
    first, last = resolve_window(values["window"])
    end_of_this_month = resolve_window("previous-month", last + dt.timedelta(days=32))[1]
    spec = SampleSpec(size=96, blocksize=128, start=first, end=end_of_this_month, field_size=160, x0=388000.0,
                      y0=5340000.0)
    w, s, e, n = spec.bbox_lonlat()
    bw, bs, be, bn = values["bbox"]
    assert bw < w and bs < s and e < be and n < bn  # the granules lie inside the ConfigMap's bbox
    generate(tmp_path / "sample", spec)
    out = tmp_path / "monthly.zarr"
    values |= {"catalog": str(tmp_path / "sample" / "items.json"), "out": str(out)}
    run_yaml = write_yaml(tmp_path / "run.yaml", values)
    r = ok(cli("compute", "--config", str(run_yaml)))
    months = {first, resolve_window(values["window"])[0]}  # two if the run straddled a month change (UTC)
    assert "1 month composite(s) of NDVI (median)" in r.stdout
    assert dashboard_line(r.stderr).startswith(f"http://{LOOPBACK}:")  # cluster: local from the file
    ds = open_cube(out)
    assert [str(t)[:10] for t in ds.time.values] in [[m.isoformat()] for m in months]
    assert ds.rio.crs.to_epsg() == 32631 and int(ds.valid_count.max()) > 0
    config = json.loads(ds.attrs["ndvi_scale_config"])
    assert config["max_cloud"] == 80 and config["skip_bad_assets"] is False and config["append"] is True
    assert config["bbox"] == values["bbox"]


# ------------------------------------------------------------------------------------ 6. a monthly schedule
def test_scheduled_monthly_appends_then_a_rerun_is_a_no_op(catalog: str, reference: Path, scheduler: DaskProcesses,
                                                           tmp_path: Path) -> None:
    """The CronJob's file (window + append: true, on the shared scheduler), run month after month; each run's
    month is given on the command line, as the backfill job does (CLI dates replace the file's window)."""
    out = tmp_path / "monthly.zarr"
    run_yaml = write_yaml(tmp_path / "run.yaml", run_file_values(
        catalog, out, method="median", window="previous-month", append=True, cluster=scheduler.address))

    def month(start: str, end: str) -> subprocess.CompletedProcess[str]:
        return ok(cli("compute", "--config", str(run_yaml), "--start", start, "--end", end))

    first = month("2024-04-01", "2024-04-30")  # no cube yet: append creates it
    assert "1 month composite(s)" in first.stdout and "dask dashboard" in first.stderr
    april = stored(out)
    second = month("2024-05-01", "2024-05-31")
    assert "1 month composite(s)" in second.stdout
    april = {k: v for k, v in april.items() if k.startswith(DATA_CHUNKS)}
    assert {k: v for k, v in stored(out).items() if k in april} == april  # April's chunks untouched
    assert_same_cube(out, reference)  # month after month = one two-month run
    before = snapshot(out)
    again = month("2024-04-01", "2024-04-30")  # e.g. Kubernetes retries a finished job
    assert "1 already present, skipped" in again.stdout
    assert snapshot(out) == before  # not one byte (nor mtime) changed
