"""The writer lease (issue K): one writer at a time per output, on local disk, S3 (SeaweedFS) and GCS (emulator).

A lease object ``<out>.lease.json`` (owner, host, pid, heartbeat, expiry) is created exclusively; a second
writer is refused with one line naming the holder; a stale lease (expired, or its process dead) is taken over;
the lease goes when the write ends. Concurrent appends from two real CLI processes: the second is refused, the
first's periods are all there.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import xarray as xr

from ndvi_scale.errors import OutputError
from ndvi_scale.sample import SampleSpec, generate
from ndvi_scale.storage import open_location
from ndvi_scale.write import LEASE_SUFFIX, WriterLease, check_output, write_cube
from test_write import PERIODS, make_cube, store_bytes

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


@pytest.fixture
def local_url(tmp_path: Path) -> str:
    return str(tmp_path / "cube.zarr")


@pytest.fixture
def s3_url(s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/leased/cube.zarr"


@pytest.fixture
def gs_url(gcs_bucket: str) -> str:
    return f"gs://{gcs_bucket}/leased/cube.zarr"


BACKENDS = ["local_url", "s3_url", "gs_url"]


def _lease_doc(url: str) -> dict[str, Any] | None:
    loc = open_location(url)
    try:
        return json.loads(loc.fs.cat_file(loc.path + LEASE_SUFFIX))
    except FileNotFoundError:
        return None


def _put_lease(url: str, **fields: Any) -> None:
    loc = open_location(url)
    doc = {"owner": "someone", "host": "elsewhere.example", "pid": 4242, "token": "theirs",
           "started": "2024-01-01T00:00:00Z", "heartbeat": "2024-01-01T00:00:00Z", "expires": time.time() + 600,
           "expires_at": "soon", **fields}
    loc.fs.pipe_file(loc.path + LEASE_SUFFIX, json.dumps(doc).encode())


@pytest.mark.parametrize("where", BACKENDS)
def test_second_writer_is_refused_naming_the_holder_and_nothing_is_written(where: str, request) -> None:
    url = request.getfixturevalue(where)
    holder = WriterLease(open_location(url)).acquire()
    try:
        doc = _lease_doc(url)
        assert doc is not None and doc["pid"] == os.getpid() and doc["host"] == socket.gethostname()
        assert doc["expires"] > time.time() and doc["token"] == holder.token
        with pytest.raises(OutputError) as e:  # exclusive create: a second lease is refused
            WriterLease(open_location(url)).acquire()
        for call in (lambda: check_output(url), lambda: write_cube(make_cube(PERIODS), url)):
            with pytest.raises(OutputError) as e:
                call()
            msg = str(e.value)
            assert f"is being written by {doc['owner']}@{doc['host']} pid {os.getpid()}" in msg, msg
            assert "lease expires" in msg and "\n" not in msg and len(msg) < 400
        assert not open_location(url).exists()  # nothing written
    finally:
        holder.release()
    assert _lease_doc(url) is None
    report = write_cube(make_cube(PERIODS), url)  # released: the next writer goes
    assert report.regions_written > 0 and _lease_doc(url) is None  # and lets go when it is done


@pytest.mark.parametrize("where", BACKENDS)
def test_stale_leases_are_taken_over(where: str, request) -> None:
    url = request.getfixturevalue(where)
    _put_lease(url, expires=time.time() - 5)  # expired (its holder stopped renewing it)
    write_cube(make_cube(PERIODS), url)
    assert _lease_doc(url) is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _put_lease(url, host=socket.gethostname(), pid=int(dead.stdout))  # not expired, but its process is gone
    write_cube(make_cube(["2024-03-01"]), url, append=True)
    assert _lease_doc(url) is None
    _put_lease(url)  # live elsewhere (another host, not expired): refused
    with pytest.raises(OutputError, match=r"being written by someone@elsewhere\.example pid 4242"):
        write_cube(make_cube(["2024-04-01"]), url, append=True)
    assert _lease_doc(url)["token"] == "theirs"  # not ours to remove


@pytest.mark.parametrize("where", ["local_url", "s3_url"])
def test_lease_object_is_created_exclusively(where: str, request) -> None:
    """The create itself is atomic (O_EXCL; S3 conditional put, which SeaweedFS honours). GCS: gcsfs sends
    ifGenerationMatch=0, which real GCS honours but the test emulator (gcp-storage-emulator) ignores, so it is
    not tested there; the read before the create still refuses a live lease on every store."""
    url = request.getfixturevalue(where)
    first, second = WriterLease(open_location(url)), WriterLease(open_location(url))
    assert first._create(first._doc()) is True
    assert second._create(second._doc()) is False
    assert _lease_doc(url)["token"] == first.token


def test_preflight_removes_a_stale_lease_even_when_nothing_is_written(local_url: str) -> None:
    """A run killed after its cube was finished leaves its lease; the same command then refuses ("already
    exists") without writing, and must not leave that lease behind either."""
    write_cube(make_cube(PERIODS), local_url)
    _put_lease(local_url, expires=time.time() - 1)
    with pytest.raises(OutputError, match="already exists"):
        check_output(local_url)
    assert _lease_doc(local_url) is None


def test_heartbeat_renews_the_lease(local_url: str) -> None:
    lease = WriterLease(open_location(local_url), ttl=2.0).acquire()
    try:
        first = _lease_doc(local_url)
        time.sleep(1.3)
        second = _lease_doc(local_url)
        assert first and second and second["expires"] > first["expires"] and second["token"] == first["token"]
    finally:
        lease.release()


_HOLD = """
import sys, time
from ndvi_scale.storage import open_location
from ndvi_scale.write import WriterLease
WriterLease(open_location(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("where", BACKENDS)
def test_holder_killed_then_taken_over(where: str, request) -> None:
    """A real process holds the lease: refused while it lives; SIGKILLed, its lease is stale at once."""
    url = request.getfixturevalue(where)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, url], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"pid {proc.pid} "):
            write_cube(make_cube(PERIODS), url)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    write_cube(make_cube(PERIODS), url)
    assert store_bytes(url) and _lease_doc(url) is None


SPEC = SampleSpec(size=96, blocksize=128, start=dt.date(2024, 4, 2), end=dt.date(2024, 6, 29), field_size=160)


def test_two_concurrent_cli_appends_never_lose_a_period(tmp_path: Path) -> None:
    """Issue K case 1: two appends on one cube started together. Either both periods end up in the cube, or the
    second is refused with one line naming the holder and its period is not recorded as written."""
    root = tmp_path / "catalog"
    generate(root, SPEC)
    out = str(tmp_path / "cube.zarr")
    env = {k: v for k, v in os.environ.items() if k != "NDVI_SCALE_DEBUG"}

    def compute(start: str, end: str, *extra: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "ndvi_scale", "compute", "--bbox", *(f"{v:.5f}" for v in SPEC.bbox_lonlat()),
                "--start", start, "--end", end, "--catalog", str(root / "items.json"), "--out", out, "--chunk",
                "64", *extra]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    first = compute("2024-04-01", "2024-04-30")
    assert first.wait(300) == 0
    a, b = compute("2024-05-01", "2024-05-31", "--append"), compute("2024-06-01", "2024-06-30", "--append")
    (_, err_a), (_, err_b) = a.communicate(timeout=300), b.communicate(timeout=300)
    codes = (a.returncode, b.returncode)
    with xr.open_zarr(out) as cube:
        times = [str(t)[:10] for t in cube.time.values]
        runs = json.loads(cube.attrs["ndvi_scale_runs"])
    recorded = sorted(p for r in runs for p in r["periods"])
    assert recorded == times, (recorded, times)  # nothing recorded that is not in the cube
    if codes == (0, 0):  # one ended before the other took the lease: both periods, in order
        assert times == ["2024-04-01", "2024-05-01", "2024-06-01"], times
        return
    assert sorted(codes) == [0, 6], (codes, err_a, err_b)
    refused = err_b if b.returncode == 6 else err_a
    line = [ln for ln in refused.splitlines() if ln.startswith("error:")]
    assert len(line) == 1, refused
    # refused while the other one writes (the lease), or - June written first - May is an earlier period
    # than the cube's last one (a backfill: refused, not lost)
    assert re.search(r"is being written by \S+@\S+ pid \d+|is earlier than the last period", line[0]), refused
    won = "2024-06-01" if b.returncode == 0 else "2024-05-01"
    assert times == ["2024-04-01", won]


_APPEND = """
import sys
from ndvi_scale.errors import NdviScaleError
from ndvi_scale.write import write_cube
from test_write import make_cube
try:
    write_cube(make_cube([sys.argv[2]], sleep=0.2), sys.argv[1], append=True)
except NdviScaleError as exc:
    print(f"error: {exc}", flush=True)
    sys.exit(exc.exit_code)
print("ok", flush=True)
"""


@pytest.mark.parametrize("where", BACKENDS)
def test_two_concurrent_appends_in_processes_never_lose_a_period(where: str, request) -> None:
    """Issue K case 1 on every backend: two processes append March and April to one cube at the same time.
    Either both months are in the cube, in order, or the second is refused naming the holder (or, April first,
    March as earlier than the last period) and is neither in the cube nor recorded."""
    url = request.getfixturevalue(where)
    write_cube(make_cube(PERIODS), url)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    procs = [subprocess.Popen([sys.executable, "-c", _APPEND, url, month], stdout=subprocess.PIPE, text=True,
                              env=env) for month in ("2024-03-01", "2024-04-01")]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    with xr.open_zarr(open_location(url).store) as cube:
        times = [str(t)[:10] for t in cube.time.values]
        runs = json.loads(cube.attrs["ndvi_scale_runs"])
    assert sorted(p for r in runs for p in r["periods"]) == times  # nothing recorded that is not there
    if codes == [0, 0]:
        assert times == [*PERIODS, "2024-03-01", "2024-04-01"]
        return
    assert sorted(codes) == [0, 6], (codes, outs)
    refused = outs[codes.index(6)].strip()
    assert re.search(r"is being written by \S+@\S+ pid \d+ |is earlier than the last period", refused), refused
    won = ("2024-03-01", "2024-04-01")[codes.index(0)]
    assert times == [*PERIODS, won]


@pytest.mark.parametrize(("where", "atomic"), [("local_url", True), ("s3_url", True), ("gs_url", False)])
def test_a_store_ignoring_exclusive_creates_is_detected_and_fenced(where: str, atomic: bool, request) -> None:
    """The create is probed: SeaweedFS refuses a second conditional create, the GCS emulator ignores it (last
    writer wins). There the lease settles and is verified: a rival whose create landed last holds it, and the
    first is refused naming it instead of writing beside it (the emulator's "'2024-03-01' is not in list")."""
    url = request.getfixturevalue(where)
    first = WriterLease(open_location(url))
    assert first._create(first._doc()) is True and first.atomic is atomic
    if atomic:
        return
    rival = WriterLease(open_location(url))
    assert rival._create(rival._doc()) is True  # what a rival that read "no lease" just before does
    with pytest.raises(OutputError, match=rf"is being written by \S+@\S+ pid {os.getpid()} "):
        first.verify()
    rival.verify()
