"""Real Dask servers for the tests, on 127.0.0.1 only: a `dask scheduler` with `dask worker` processes, and a
dask-gateway-server with its local process backend.

Shared by tests/test_cluster.py (cluster.connect) and tests/test_pipeline_cluster.py (the pipeline and the CLI on
those clusters). Each test module builds its own fixtures from :class:`DaskProcesses` and :class:`GatewayServer`.
Every server is a subprocess started in its own session and stopped by PID, together with anything it spawned.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

LOOPBACK = "127.0.0.1"


# ----------------------------------------------------------------------------------------- process helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        # A new session per server, so that teardown can also reach what it spawned.
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """PIDs of all live descendants of ``pid`` (from /proc), collected before the parent is stopped."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` (graceful), SIGKILL it after ``timeout``, then SIGKILL any descendant still alive."""
    spawned = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for pid in spawned:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_for(predicate: Any, timeout: float, what: str, logs: list[Path] = ()) -> None:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{log_tails(logs)}")


def log_tails(logs: list[Path]) -> str:
    """The end of each server log, for a failure message."""
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())


# ---------------------------------------------------------------------------- scheduler + worker processes
class DaskProcesses:
    """A `dask scheduler` and ``n_workers`` single-threaded `dask worker` processes (no nanny: a worker's PID is
    the worker itself, and a killed worker stays dead), named ``w0``, ``w1``..."""

    def __init__(self, tmp: Path, n_workers: int) -> None:
        self.tmp = tmp
        self.scheduler_file = tmp / "scheduler.json"
        self.logs: list[Path] = []
        self.scheduler = start(
            [
                sys.executable, "-m", "dask", "scheduler",
                "--host", LOOPBACK, "--port", "0", "--dashboard-address", f"{LOOPBACK}:0",
                "--scheduler-file", str(self.scheduler_file),
            ],
            self._log("scheduler"),
        )  # fmt: skip
        wait_for(self.scheduler_file.exists, 30, "the scheduler file", self.logs)
        wait_for(lambda: self.scheduler_file.stat().st_size > 0, 10, "the scheduler address", self.logs)
        self.address: str = json.loads(self.scheduler_file.read_text())["address"]
        self.workers = [
            start(
                [
                    sys.executable,
                    "-m",
                    "dask",
                    "worker",
                    self.address,
                    "--host",
                    LOOPBACK,
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--no-nanny",
                    "--name",
                    f"w{i}",
                    "--memory-limit",
                    "1GiB",
                    "--death-timeout",
                    "60",
                ],
                self._log(f"worker{i}"),
            )  # fmt: skip
            for i in range(n_workers)
        ]

    def _log(self, name: str) -> Path:
        path = self.tmp / f"{name}.log"
        self.logs.append(path)
        return path

    def wait_for_workers(self, n: int, timeout: float = 30) -> None:
        """Block until ``n`` workers are connected to the scheduler."""
        from distributed import Client

        with Client(self.address, timeout=timeout) as client:
            try:
                client.wait_for_workers(n, timeout=timeout)
            except TimeoutError:
                raise AssertionError(f"{n} workers did not connect within {timeout}s\n{log_tails(self.logs)}") from None

    def close(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            stop(proc)


# ------------------------------------------------------------------------------------------- dask-gateway
GATEWAY_CONFIG = """
import sys
from dask_gateway_server.options import Float, Integer, Options, String

c.DaskGateway.address = "{loopback}:{api_port}"
c.Proxy.address = "{loopback}:{http_port}"
c.Proxy.tcp_address = "{loopback}:{tcp_port}"
# Processes on this machine as the current user, no user separation (UnsafeLocalBackend is for tests).
c.DaskGateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.LocalBackend.clusters_directory = "{clusters}"
# `dask-scheduler`/`dask-worker` scripts are gone from distributed; `python -m dask scheduler` is the same.
c.ClusterConfig.scheduler_cmd = [sys.executable, "-m", "dask", "scheduler"]
c.ClusterConfig.worker_cmd = [sys.executable, "-m", "dask", "worker"]
c.ClusterConfig.idle_timeout = 120

# The same option names as deploy/helm/daskhub-values.yaml offers.
def option_handler(options):
    return {{"worker_cores": options.worker_cores, "worker_memory": "%fG" % options.worker_memory}}

c.Backend.cluster_options = Options(
    Integer("worker_cores", 1, min=1, max=2, label="Worker cores"),
    Float("worker_memory", 1, min=0.5, max=4, label="Worker memory (GiB)"),
    String("image", default="ndvi-scale:test", label="Image"),
    handler=option_handler,
)
"""


class GatewayServer:
    """A dask-gateway-server (local process backend, basic auth) on 127.0.0.1; ``extra_config`` is appended to
    its Python config file (e.g. ``c.ClusterConfig.cluster_max_workers = 2``)."""

    def __init__(self, tmp: Path, extra_config: str = "") -> None:
        self.http_port, self.tcp_port, api_port = free_port(), free_port(), free_port()
        config = tmp / "dask_gateway_config.py"
        config.write_text(
            GATEWAY_CONFIG.format(
                loopback=LOOPBACK,
                api_port=api_port,
                http_port=self.http_port,
                tcp_port=self.tcp_port,
                clusters=tmp / "clusters",
            )
            + extra_config
        )
        self.log = tmp / "gateway.log"
        exe = Path(sys.executable).with_name("dask-gateway-server")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "dask_gateway_server"]
        self.proc = start([*cmd, "--config", str(config)], self.log)
        self.address = f"http://{LOOPBACK}:{self.http_port}"
        wait_for(self._healthy, 30, "dask-gateway-server", [self.log])

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            with urllib.request.urlopen(f"{self.address}/api/health", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def env(self) -> dict[str, str]:
        """The DASK_GATEWAY__* variables, as DaskHub hands the gateway to notebooks (read by cluster.connect)."""
        return {
            "DASK_GATEWAY__ADDRESS": self.address,
            "DASK_GATEWAY__PROXY_ADDRESS": f"gateway://{LOOPBACK}:{self.tcp_port}",
            "DASK_GATEWAY__AUTH__TYPE": "basic",
        }

    def clusters(self) -> dict[str, Any]:
        """This user's running/pending gateway clusters, from the REST API (basic auth as the client does)."""
        token = base64.b64encode(f"{getpass.getuser()}:".encode()).decode()
        request = urllib.request.Request(
            f"{self.address}/api/v1/clusters/", headers={"Authorization": f"Basic {token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            return dict(json.load(resp))

    def close(self) -> None:
        stop(self.proc, timeout=20)  # SIGTERM: the gateway stops its clusters, then itself


def require_gateway() -> None:
    """Fail (no skip) naming what to install when dask-gateway or its server is missing."""
    try:
        import dask_gateway  # noqa: F401
        import dask_gateway_server  # noqa: F401
    except ImportError as exc:  # pragma: no cover
        pytest.fail(f"{exc}; pip install dask-gateway 'dask-gateway-server[local]'")
