"""cluster.connect against real backends on 127.0.0.1: a `dask scheduler` + 2 `dask worker` processes (one of
them SIGKILLed mid-run), a LocalCluster, a real dask-gateway-server (local process backend) and fast failures.

Every server is a subprocess started here (helpers shared with test_pipeline_cluster.py in tests/clusters.py) and
stopped by PID in teardown (with any process it spawned).
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import LocalCluster, get_task_stream

from clusters import LOOPBACK, DaskProcesses, GatewayServer, free_port, require_gateway, wait_for
from ndvi_scale import cluster as cl
from ndvi_scale.cluster import (
    DEFAULT_RETRIES,
    ROBUST_CONFIG,
    ClusterError,
    compute_with_retries,
    connect,
    local_cluster_kwargs,
    parse_spec,
)
from ndvi_scale.errors import InputError


@pytest.fixture
def dask_processes(tmp_path: Path) -> Iterator[DaskProcesses]:
    procs = DaskProcesses(tmp_path, n_workers=2)
    try:
        yield procs
    finally:
        procs.close()


def test_remote_scheduler_computes_like_numpy(dask_processes: DaskProcesses) -> None:
    rng = np.random.default_rng(42)
    x = rng.random((600, 400))
    expected = ((x - x.mean(axis=0)) / (x.std(axis=0) + 1)).sum(axis=1)
    before = dask.config.get("distributed.scheduler.allowed-failures")
    with connect(dask_processes.address, connect_timeout=20) as (client, dashboard):
        assert client is not None
        # The scheduler's HTTP server got an OS-chosen port (8787 would collide with anything else).
        assert dashboard is not None and dashboard.startswith(f"http://{LOOPBACK}:")
        assert f":{8787}/" not in dashboard
        client.wait_for_workers(2, timeout=30)
        workers = client.scheduler_info()["workers"]
        assert {w["name"] for w in workers.values()} == {"w0", "w1"}
        assert all(addr.startswith(f"tcp://{LOOPBACK}:") for addr in workers)
        assert (
            dask.config.get("distributed.scheduler.allowed-failures")
            == ROBUST_CONFIG["distributed.scheduler.allowed-failures"]
        )
        a = da.from_array(x, chunks=(100, 100))
        with get_task_stream(client) as stream:
            (got,) = compute_with_retries((a - a.mean(axis=0)) / (a.std(axis=0) + 1), client=client)
        np.testing.assert_allclose(got.sum(axis=1), expected, rtol=1e-12)
        # The work was really spread over both worker processes.
        assert {t["worker"] for t in stream.data} == set(workers)
    # Leaving the context disconnects but leaves an existing scheduler (and its workers) running.
    assert dask_processes.scheduler.poll() is None
    assert all(w.poll() is None for w in dask_processes.workers)
    assert dask.config.get("distributed.scheduler.allowed-failures") == before


def test_killed_worker_mid_run_gives_the_clean_result(dask_processes: DaskProcesses) -> None:
    n_blocks, block = 40, 500

    def slow_block(x: np.ndarray, block_info: dict[Any, Any] | None = None) -> np.ndarray:
        # Defined inside the test so cloudpickle ships it by value to the worker processes.
        time.sleep(0.15)
        (i,) = block_info[0]["chunk-location"] if block_info else (0,)
        return np.sqrt(x) * (i + 1) + np.sin(x)

    def graph(run: str) -> da.Array:
        # A distinct name per run, so the second run cannot re-use results the first left on the workers.
        src = da.arange(n_blocks * block, chunks=block, dtype="f8")
        return src.map_blocks(slow_block, dtype="f8", name=f"slow-{run}")

    with connect(dask_processes.address) as (client, _):
        assert client is not None
        client.wait_for_workers(2, timeout=30)
        (clean,) = compute_with_retries(graph("clean"), client=client)

        pids = client.run(os.getpid)  # worker address -> PID of that `dask worker` process
        assert sorted(pids.values()) == sorted(p.pid for p in dask_processes.workers)
        victim_addr, victim_pid = sorted(pids.items())[0]

        future = client.compute(graph("faulty"), retries=DEFAULT_RETRIES)
        prefix = "slow-faulty"

        def progress() -> tuple[int, int]:
            held = client.has_what()
            mine = [k for k in held.get(victim_addr, ()) if prefix in str(k)]
            total = sum(1 for keys in held.values() for k in keys if prefix in str(k))
            return len(mine), total

        # Kill only once the victim holds finished results, so they are lost and must be recomputed.
        wait_for(lambda: progress()[0] >= 3, 30, "the victim worker to finish 3 tasks", dask_processes.logs)
        held_by_victim, done = progress()
        assert done < n_blocks, "the run finished before the kill; make the blocks slower"
        os.kill(victim_pid, signal.SIGKILL)

        result = future.result(timeout=90)
        assert future.status == "finished"
        np.testing.assert_array_equal(result, clean)  # bit-for-bit the clean run
        assert held_by_victim >= 3
        wait_for(lambda: len(client.scheduler_info()["workers"]) == 1, 10, "the scheduler to drop the worker")
        assert victim_addr not in client.scheduler_info()["workers"]
    victim = next(p for p in dask_processes.workers if p.pid == victim_pid)
    assert victim.wait(5) == -signal.SIGKILL


def test_unreachable_scheduler_fails_fast_with_a_clear_message() -> None:
    address = f"tcp://{LOOPBACK}:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as err:
        with connect(address, connect_timeout=2):
            pass  # pragma: no cover
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert msg.startswith(f"cannot reach scheduler {address}: ")
    assert msg.endswith("; check the address or start `dask scheduler`")


# --------------------------------------------------------------------------------------- threads / local
def test_threads_and_none_use_no_distributed() -> None:
    for spec in (None, "threads", " Threads "):
        with connect(spec, n_workers=2, threads_per_worker=3) as (client, dashboard):
            assert (client, dashboard) == (None, None)
            assert dask.config.get("scheduler") == "threads"
            assert dask.config.get("num_workers") == 6
            (total,) = compute_with_retries(da.arange(1000, chunks=100).sum())
            assert total == 499500


def test_local_cluster_is_loopback_processes_sized_to_the_machine() -> None:
    with connect("local", n_workers=2, threads_per_worker=1) as (client, dashboard):
        assert client is not None
        info = client.scheduler_info()
        assert info["address"].startswith(f"tcp://{LOOPBACK}:")
        assert len(info["workers"]) == 2
        for addr, w in info["workers"].items():
            assert addr.startswith(f"tcp://{LOOPBACK}:")
            assert w["nthreads"] == 1
            assert w["memory_limit"] == int(cl.MEMORY_LIMIT * cl.LOCAL_MEMORY_FRACTION / 2)
        assert len(set(client.run(os.getpid).values())) == 2  # separate processes
        assert dashboard is not None and dashboard.startswith(f"http://{LOOPBACK}:")
        assert not dashboard.startswith(f"http://{LOOPBACK}:8787/")  # OS-chosen port
        (total,) = compute_with_retries(da.ones((300, 300), chunks=100).sum(), client=client)
        assert total == 90000


def test_local_cluster_defaults_and_no_bokeh(monkeypatch: pytest.MonkeyPatch) -> None:
    kw = local_cluster_kwargs()
    assert kw["processes"] is True and kw["host"] == LOOPBACK
    assert kw["threads_per_worker"] == min(cl.DEFAULT_THREADS_PER_WORKER, cl.CPU_COUNT)
    assert kw["n_workers"] == max(1, cl.CPU_COUNT // kw["threads_per_worker"])
    assert kw["memory_limit"] * kw["n_workers"] <= cl.MEMORY_LIMIT
    assert kw["dashboard_address"] == f"{LOOPBACK}:0"
    monkeypatch.setattr(cl, "has_bokeh", lambda: False)
    assert local_cluster_kwargs(1, 1)["dashboard_address"] is None


# ------------------------------------------------------------------------------------------- dask-gateway
@pytest.fixture(scope="module")
def gateway_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    require_gateway()  # a missing package fails the test (no skip), naming what to install
    server = GatewayServer(tmp_path_factory.mktemp("gateway"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def gateway_server(gateway_process: GatewayServer, monkeypatch: pytest.MonkeyPatch) -> GatewayServer:
    # As DaskHub hands the gateway to notebooks: DASK_GATEWAY__* variables (read by connect at call time).
    for name, value in gateway_process.env().items():
        monkeypatch.setenv(name, value)
    return gateway_process


@pytest.mark.parametrize("sizing", [{"n_workers": 2}, {"adapt": (2, 2)}], ids=["scale", "adapt"])
def test_gateway_cluster_computes_and_shuts_down(gateway_server: GatewayServer, sizing: dict[str, Any]) -> None:
    x = np.arange(200_000, dtype="f8").reshape(400, 500)
    options = {"worker_cores": 1, "worker_memory": 1.0}
    unraisable: list[Any] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "unraisablehook", unraisable.append)
        run_gateway_cluster(gateway_server, x, options, sizing)
        gc.collect()
    # connect() leaves no dask-gateway object that complains when garbage-collected.
    assert [u.object for u in unraisable] == []
    wait_for(lambda: not gateway_server.clusters(), 20, "the gateway cluster to shut down", [gateway_server.log])


def run_gateway_cluster(
    gateway_server: GatewayServer, x: np.ndarray, options: dict[str, Any], sizing: dict[str, Any]
) -> None:
    with connect("gateway", gateway_options=options, **sizing) as (
        client,
        dashboard,
    ):
        assert client is not None
        client.wait_for_workers(2, timeout=60)
        assert len(client.scheduler_info()["workers"]) == 2
        assert dashboard is not None and dashboard.startswith(f"{gateway_server.address}/clusters/")
        (got,) = compute_with_retries(da.from_array(x, chunks=100).T @ da.from_array(x, chunks=100), client=client)
        np.testing.assert_allclose(got, x.T @ x, rtol=1e-12)

        (report,) = gateway_server.clusters().values()
        assert report["status"] == "RUNNING"
        assert report["options"]["worker_cores"] == 1 and report["options"]["worker_memory"] == 1.0


def test_gateway_rejects_options_it_does_not_offer(gateway_server: GatewayServer) -> None:
    with pytest.raises(InputError) as err:
        with connect("gateway", gateway_options={"worker_gpus": 1}):
            pass  # pragma: no cover
    msg = str(err.value)
    assert "gateway option 'worker_gpus' is not offered by the gateway at http://127.0.0.1:" in msg
    assert "expected one of worker_cores, worker_memory, image" in msg
    with pytest.raises(InputError, match=r"gateway option worker_cores=99 is invalid"):
        with connect("gateway", gateway_options={"worker_cores": 99}):
            pass  # pragma: no cover


def test_gateway_without_address_or_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    # Import first: a dask.config.set of a gateway.* key before dask_gateway registers its defaults would, on
    # exit, remove the whole gateway section.
    import dask_gateway  # noqa: F401

    monkeypatch.delenv("DASK_GATEWAY__ADDRESS", raising=False)
    with dask.config.set({"gateway.address": None}):
        with pytest.raises(InputError, match="cluster gateway has no gateway address; set DASK_GATEWAY__ADDRESS"):
            with connect("gateway"):
                pass  # pragma: no cover
    with dask.config.set({"gateway.address": f"http://{LOOPBACK}:{free_port()}", "gateway.auth.type": "basic"}):
        with pytest.raises(ClusterError, match=r"cannot reach Dask Gateway http://127\.0\.0\.1:\d+: "):
            with connect("gateway"):
                pass  # pragma: no cover


def test_gateway_refuses_threads_per_worker() -> None:
    with pytest.raises(InputError, match="threads_per_worker cannot be set for cluster gateway"):
        with connect("gateway", threads_per_worker=2):
            pass  # pragma: no cover


# -------------------------------------------------------------------------------------- dask-kubernetes
def test_kubernetes_missing_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)  # makes the import fail even if installed
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    with pytest.raises(
        InputError,
        match="cluster kubernetes needs the dask-kubernetes package .* pip install dask-kubernetes",
    ):
        with connect("kubernetes"):
            pass  # pragma: no cover


def test_kubernetes_wiring_with_a_stand_in_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[dict[str, Any]] = []

    class FakeKubeCluster(LocalCluster):  # the operator's KubeCluster, played by an in-process cluster
        def __init__(self, **kwargs: Any) -> None:
            created.append(kwargs)
            super().__init__(n_workers=kwargs["n_workers"], processes=False, dashboard_address=None)

    package = types.ModuleType("dask_kubernetes")
    operator = types.ModuleType("dask_kubernetes.operator")
    operator.KubeCluster = FakeKubeCluster  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dask_kubernetes", package)
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", operator)

    with connect("kubernetes", adapt=(1, 3), kube_options={"image": "ndvi-scale:1", "namespace": "ndvi"}) as (
        client,
        _,
    ):
        assert client is not None
        (total,) = compute_with_retries(da.ones(1000, chunks=100).sum(), client=client)
        assert total == 1000
    assert created == [
        {
            "name": "ndvi-scale",
            "shutdown_on_close": True,
            "n_workers": 1,
            "image": "ndvi-scale:1",
            "namespace": "ndvi",
        }
    ]


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, "threads"),
        ("LOCAL", "local"),
        ("gateway", "gateway"),
        ("kubernetes", "kubernetes"),
        ("tcp://127.0.0.1:8786", "tcp://127.0.0.1:8786"),
        ("tcp://scheduler.dask.svc:8786/", "tcp://scheduler.dask.svc:8786"),
        ("tcp://[::1]:8786", "tcp://[::1]:8786"),
    ],
)
def test_parse_spec(spec: str | None, expected: str) -> None:
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("slurm", "cluster 'slurm' is unknown; expected threads .* tcp://HOST:PORT .* gateway .* kubernetes"),
        ("tcp://127.0.0.1", "cluster 'tcp://127.0.0.1' is not a scheduler address; expected tcp://HOST:PORT"),
        ("tcp://127.0.0.1:99999", "has port 99999; expected a TCP port 1-65535"),
        ("tcp://127.0.0.1:0", "has port 0"),
        ("127.0.0.1:8786", "cluster '127.0.0.1:8786' is unknown"),
        (42, "cluster 42 is not text"),
    ],
)
def test_bad_specs(spec: Any, match: str) -> None:
    with pytest.raises(InputError, match=match):
        with connect(spec):
            pass  # pragma: no cover


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_workers": 0}, "n_workers 0 is invalid; expected a whole number >= 1"),
        ({"threads_per_worker": 1.5}, "threads_per_worker 1.5 is invalid"),
        ({"adapt": (3, 1)}, r"adapt \(3, 1\) is invalid; expected \(minimum, maximum\)"),
        ({"adapt": (1, 2), "n_workers": 2}, "n_workers and adapt are both given"),
        ({"gateway_options": {"worker_cores": 2}}, "gateway options are given but cluster is threads"),
        ({"kube_options": {"image": "x"}}, "kubernetes options are given but cluster is threads"),
    ],
)
def test_bad_sizes_and_options(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match):
        with connect("threads", **kwargs):
            pass  # pragma: no cover


def test_retries_default_and_robust_config_keys_exist() -> None:
    assert DEFAULT_RETRIES >= 1
    for key in ROBUST_CONFIG:
        assert dask.config.get(key, None) is not None, f"{key} is not a distributed setting"
    assert ROBUST_CONFIG["distributed.scheduler.allowed-failures"] > 3  # above the default


def test_worker_plugin_drops_only_the_heartbeat_of_a_closing_worker() -> None:
    """distributed's shutdown race: a failed run closes the cluster under running tasks, and a worker's heartbeat
    then logs "ConnectionPool is closed" with a traceback through tornado, on the CLI's terminal."""
    import logging

    from ndvi_scale.cluster import QuietReportedErrors

    class Worker:  # the bound method's repr is what tornado logs: "<bound method Worker.heartbeat of ...>"
        def heartbeat(self) -> None: ...

        def other(self) -> None: ...

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    app_log = logging.getLogger("tornado.application")  # tornado's ioloop logs callback errors here
    worker_log = logging.getLogger("distributed.worker")
    before = (list(app_log.filters), list(worker_log.filters))
    handler = Keep()
    app_log.addHandler(handler)
    try:
        QuietReportedErrors().setup(None)

        def fail(callback: Any, message: str) -> None:
            try:
                raise RuntimeError(message)
            except RuntimeError:
                app_log.error("Exception in callback %r", callback, exc_info=True)  # as tornado's PeriodicCallback

        fail(Worker().heartbeat, "ConnectionPool is closed")
        assert seen == []
        fail(Worker().other, "ConnectionPool is closed")
        fail(Worker().heartbeat, "something else")
        assert [r.exc_info[1].args[0] for r in seen if r.exc_info] == ["ConnectionPool is closed", "something else"]
    finally:
        app_log.removeHandler(handler)
        app_log.filters[:], worker_log.filters[:] = before
