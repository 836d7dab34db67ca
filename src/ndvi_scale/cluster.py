"""Where a run computes: one context manager for threads, a local cluster, a running scheduler, Dask
Gateway or the dask-kubernetes operator.

>>> with connect("local") as (client, dashboard):   # doctest: +SKIP
...     print("dashboard:", dashboard)
...     (ndvi,) = compute_with_retries(lazy_ndvi, client=client)

========================  ==================================================================================
spec                      what runs the tasks
========================  ==================================================================================
``None``, ``"threads"``   dask's threaded scheduler in this process (no distributed); yields ``(None, None)``
``"local"``               a :class:`~distributed.LocalCluster` of worker *processes* sized to this machine
                          (or to this pod's cgroup limits), bound to 127.0.0.1
``"tcp://HOST:PORT"``     an existing ``dask scheduler`` (left running at exit)
``"gateway"``             a new Dask Gateway cluster (DaskHub); address and auth from the ``gateway.*`` dask
                          config, i.e. ``DASK_GATEWAY__ADDRESS``, ``DASK_GATEWAY__PROXY_ADDRESS``,
                          ``DASK_GATEWAY__AUTH__TYPE``; shut down at exit
``"kubernetes"``          a new dask-kubernetes operator ``KubeCluster``; deleted at exit
========================  ==================================================================================

Client, scheduler and workers must run the same Python environment (same dask, distributed, numpy,
rasterio... versions): use the ``deploy/Dockerfile`` image for all three (see ``deploy/README.md``).

Fault tolerance has two layers. A task that *raises* (an object-storage read that outlived rasterio/GDAL's
own HTTP retries) is re-run up to ``retries`` times when submitted with ``client.compute(..., retries=N)``
(:data:`DEFAULT_RETRIES`, :func:`compute_with_retries`). A task whose *worker dies* (pre-empted spot node,
OOM kill) is rescheduled by the scheduler on another worker, up to
``distributed.scheduler.allowed-failures`` times (:data:`ROBUST_CONFIG`). Both are safe because every task
is a pure function of its inputs: reads and NDVI maths are deterministic and Zarr region writes idempotent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import dask
import dask.config

# Imported eagerly, not inside connect(): importing distributed registers its config defaults, which must
# exist before ROBUST_CONFIG overrides a few of them.
from dask.system import CPU_COUNT
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.system import MEMORY_LIMIT

from .errors import ClusterError, InputError, shown

#: Retries per task for ``client.compute(..., retries=DEFAULT_RETRIES)``. Three covers the transient
#: failures of object storage (HTTP 429/5xx, connection resets, a bucket throttled for a few seconds) that
#: outlast the readers' own retries, while a genuinely broken input still fails after a few attempts instead
#: of hiding for long: every retry repeats the whole failing read. Retrying is safe because tasks are pure
#: and Zarr region writes idempotent.
DEFAULT_RETRIES = 3

#: Dask settings applied for the duration of :func:`connect`. They reach the scheduler and workers that
#: ``connect`` starts itself (``local``: in this process, and handed to the worker processes). A remote
#: scheduler (``tcp://``, gateway, kubernetes) reads its own environment: the image sets the same values as
#: ``DASK_*`` variables.
ROBUST_CONFIG: dict[str, Any] = {
    # A task is declared bad (KilledWorker) after being on this many workers that died. Innocent tasks reach
    # the default 3 when spot/pre-emptible nodes are reclaimed in a row; 6 rides out that churn, while a task
    # that really kills its worker (e.g. out of memory on every attempt) still fails the run after 6.
    "distributed.scheduler.allowed-failures": 6,
    # Re-try client<->scheduler and worker<->worker data transfers on transient network errors (default 0:
    # fail at the first reset), with backoff between attempts.
    "distributed.comm.retry.count": 3,
    # New cloud workers and cross-zone links can take over 30 s to accept a first connection under load.
    "distributed.comm.timeouts.connect": "60s",
}

#: Default threads per worker process of a ``local`` cluster. Half the time goes to HTTP range reads, where
#: rasterio/GDAL release the GIL, so two threads keep one core busy; more processes (rather than more threads)
#: give each its own GDAL block cache and contain a crash to one worker.
DEFAULT_THREADS_PER_WORKER = 2

#: Fraction of this machine's (or pod's) memory shared out to ``local`` workers; the rest is for the client
#: process (graph, STAC items) and the OS page cache.
LOCAL_MEMORY_FRACTION = 0.9

#: Default ``adapt(minimum, maximum)`` of gateway/kubernetes clusters when no ``n_workers`` is given: keep one
#: worker warm, grow with the task backlog, and cap the cost of one run.
DEFAULT_ADAPT: tuple[int, int] = (1, 20)

#: Seconds to wait for an existing scheduler (``tcp://``) before giving up.
DEFAULT_CONNECT_TIMEOUT = 20.0

SPECS = ("threads", "local", "tcp://HOST:PORT", "gateway", "kubernetes")

_TCP_RE = re.compile(r"^tcp://(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})/?$")


def parse_spec(spec: str | None) -> str:
    """Check a cluster spec; return ``threads``, ``local``, ``gateway``, ``kubernetes`` or ``tcp://host:port``."""
    if spec is None:
        return "threads"
    if not isinstance(spec, str):
        raise InputError(f"cluster {shown(spec)} is not text; expected one of {', '.join(SPECS)}")
    s = spec.strip()
    if s.lower() in ("threads", "local", "gateway", "kubernetes"):
        return s.lower()
    if s.lower().startswith("tcp://"):
        m = _TCP_RE.match(s)
        if not m:
            raise InputError(
                f"cluster {shown(spec)} is not a scheduler address; expected tcp://HOST:PORT, e.g. tcp://127.0.0.1:8786"
            )
        port = int(m.group("port"))
        if not 0 < port < 65536:
            raise InputError(f"cluster {shown(spec)} has port {port}; expected a TCP port 1-65535, e.g. 8786")
        return f"tcp://{m.group('host')}:{port}"
    raise InputError(
        f"cluster {shown(spec)} is unknown; expected threads (no cluster), local (processes on this machine), "
        "tcp://HOST:PORT (a running `dask scheduler`), gateway (Dask Gateway) or kubernetes (dask-kubernetes)"
    )


def _check_count(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"{name} {shown(value)} is invalid; expected a whole number >= 1")


@contextlib.contextmanager
def connect(
    spec: str | None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    gateway_options: Mapping[str, Any] | None = None,
    adapt: tuple[int, int] | None = None,
    kube_options: Mapping[str, Any] | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Iterator[tuple[Client | None, str | None]]:
    """Open the compute backend named by ``spec``; yield ``(client or None, dashboard link or None)``.

    ``n_workers``/``threads_per_worker`` size ``local`` (defaults: all cores,
    :data:`DEFAULT_THREADS_PER_WORKER` threads each) and ``threads`` (a pool of ``n_workers *
    threads_per_worker`` threads). For ``gateway`` and ``kubernetes``, ``n_workers`` means
    ``scale(n_workers)``, else ``adapt=(minimum, maximum)`` (default :data:`DEFAULT_ADAPT`); worker size
    comes from ``gateway_options`` (cluster options offered by the gateway, e.g. ``{"worker_cores": 2,
    "worker_memory": 8, "image": "..."}``) or ``kube_options`` (``KubeCluster`` keyword arguments, e.g.
    ``image``, ``resources``, ``namespace``). Everything this function started is shut down at exit; an
    existing ``tcp://`` scheduler is only disconnected from. ``connect_timeout`` bounds the wait for a
    ``tcp://`` scheduler.
    """
    kind = parse_spec(spec)
    _check_count("n_workers", n_workers)
    _check_count("threads_per_worker", threads_per_worker)
    if adapt is not None:
        if len(adapt) != 2 or not 0 <= adapt[0] <= adapt[1] or adapt[1] < 1:
            raise InputError(
                f"adapt {shown(adapt)} is invalid; expected (minimum, maximum) with 0 <= minimum <= maximum"
            )
        if n_workers is not None:
            raise InputError("n_workers and adapt are both given; give n_workers for a fixed size or adapt, not both")
    if gateway_options and kind != "gateway":
        raise InputError(f"gateway options are given but cluster is {kind}; use cluster gateway or drop them")
    if kube_options and kind != "kubernetes":
        raise InputError(f"kubernetes options are given but cluster is {kind}; use cluster kubernetes or drop them")

    with dask.config.set(ROBUST_CONFIG):
        if kind == "threads":
            with _threads(n_workers, threads_per_worker):
                yield None, None
        elif kind == "local":
            with _local(n_workers, threads_per_worker) as opened:
                yield opened
        elif kind == "gateway":
            with _gateway(n_workers, threads_per_worker, gateway_options or {}, adapt) as opened:
                yield opened
        elif kind == "kubernetes":
            with _kubernetes(n_workers, threads_per_worker, kube_options or {}, adapt) as opened:
                yield opened
        else:
            with _existing(kind, connect_timeout) as opened:
                yield opened


def compute_with_retries(
    *collections: Any, client: Client | None = None, retries: int = DEFAULT_RETRIES, **kwargs: Any
) -> tuple[Any, ...]:
    """``dask.compute(*collections)``, on ``client`` with per-task ``retries`` when there is one.

    Without a client (``threads``) there is nothing to retry on: dask's local schedulers fail at the first
    error, and the run is resumed by running it again (appends skip the periods already written).
    """
    if client is None:
        return tuple(dask.compute(*collections, **kwargs))
    futures = client.compute(list(collections), retries=retries, **kwargs)
    return tuple(client.gather(futures))


# ------------------------------------------------------------------------------------------------ backends
@contextlib.contextmanager
def _threads(n_workers: int | None, threads_per_worker: int | None) -> Iterator[None]:
    settings: dict[str, Any] = {"scheduler": "threads"}
    if n_workers or threads_per_worker:
        settings["num_workers"] = (n_workers or 1) * (threads_per_worker or 1)
    with dask.config.set(settings):
        yield


def has_bokeh() -> bool:
    """The dashboard needs bokeh; without it the dashboard is disabled instead of failing the run."""
    return importlib.util.find_spec("bokeh") is not None


def local_cluster_kwargs(n_workers: int | None = None, threads_per_worker: int | None = None) -> dict[str, Any]:
    """LocalCluster arguments sized to this machine: cores and memory as dask sees them (cgroup-aware)."""
    threads = threads_per_worker or max(1, min(DEFAULT_THREADS_PER_WORKER, CPU_COUNT))
    workers = n_workers or max(1, CPU_COUNT // threads)
    return {
        "n_workers": workers,
        "threads_per_worker": threads,
        # Processes, not threads: GDAL, numpy and Python code in one process contend for the GIL.
        "processes": True,
        # Loopback only: nothing on the network can submit code to these workers.
        "host": "127.0.0.1",
        "memory_limit": int(MEMORY_LIMIT * LOCAL_MEMORY_FRACTION / workers),
        # Port 0: the OS picks a free one, so two runs on one machine do not collide on 8787.
        "dashboard_address": "127.0.0.1:0" if has_bokeh() else None,
    }


@contextlib.contextmanager
def _local(n_workers: int | None, threads_per_worker: int | None) -> Iterator[tuple[Client, str | None]]:
    kwargs = local_cluster_kwargs(n_workers, threads_per_worker)
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        # The workers write to this terminal: keep the tracebacks of errors the CLI reports itself out of it.
        client.register_plugin(QuietReportedErrors(), name="ndvi-scale-quiet-reported-errors")
        link = cluster.dashboard_link if kwargs["dashboard_address"] else None
        yield client, link


class _DropReported(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:
            return True
        return not (text.startswith("Compute Failed") and any(name in text for name in REPORTED_ERRORS))


#: Exceptions that end a run with one clear line of their own (e.g. the list of unreadable assets): a worker
#: need not also log their traceback.
REPORTED_ERRORS = ("AssetReadError",)


class _DropClosingHeartbeat(logging.Filter):
    """A worker's heartbeat that runs while the worker closes (the run failed and the cluster is shut down under
    running tasks) finds its connection pool closed, and tornado logs that with a traceback: distributed's
    shutdown race, nothing of the run's. Only that record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not (isinstance(exc, RuntimeError) and str(exc) == "ConnectionPool is closed"):
            return True
        try:
            text = record.getMessage()  # "Exception in callback <bound method Worker.heartbeat of <Worker ...>>"
        except Exception:
            return True
        return "Worker.heartbeat" not in text


class QuietReportedErrors(WorkerPlugin):
    """Worker plugin: drop distributed's "Compute Failed" traceback for :data:`REPORTED_ERRORS`, and the traceback
    of a heartbeat of a worker that is closing (:class:`_DropClosingHeartbeat`)."""

    def setup(self, worker: Any) -> None:
        logging.getLogger("distributed.worker").addFilter(_DropReported())
        logging.getLogger("tornado.application").addFilter(_DropClosingHeartbeat())


@contextlib.contextmanager
def _existing(address: str, timeout: float) -> Iterator[tuple[Client, str | None]]:
    try:
        client = Client(address, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(
            f"cannot reach scheduler {address}: {exc}; check the address or start `dask scheduler`"
        ) from exc
    try:
        yield client, client.dashboard_link
    finally:
        client.close()


def _gateway_setting(name: str) -> Any:
    """A ``gateway.*`` dask setting, else its ``DASK_GATEWAY__*`` variable (set after dask was imported)."""
    value = dask.config.get(f"gateway.{name}", None)
    if value is None:
        value = os.environ.get("DASK_GATEWAY__" + name.upper().replace(".", "__").replace("-", "_")) or None
    return value


@contextlib.contextmanager
def _gateway(
    n_workers: int | None,
    threads_per_worker: int | None,
    options_in: Mapping[str, Any],
    adapt: tuple[int, int] | None,
) -> Iterator[tuple[Client, str | None]]:
    try:
        from dask_gateway import Gateway
    except ImportError:
        raise InputError(
            "cluster gateway needs the dask-gateway client; pip install dask-gateway (the version of the "
            "gateway server)"
        ) from None
    if threads_per_worker is not None:
        raise InputError(
            "threads_per_worker cannot be set for cluster gateway; size workers with the gateway's options "
            "instead, e.g. gateway_options={'worker_cores': 2}"
        )
    address = _gateway_setting("address")
    if not address:
        raise InputError(
            "cluster gateway has no gateway address; set DASK_GATEWAY__ADDRESS (or gateway.address in the "
            "dask config), e.g. http://proxy-public/services/dask-gateway (DaskHub sets it in its notebooks)"
        )
    gateway = Gateway(
        address=address,
        proxy_address=_gateway_setting("proxy-address"),
        public_address=_gateway_setting("public-address"),
        auth=_gateway_setting("auth.type"),
    )
    try:
        try:
            options = gateway.cluster_options()
        except Exception as exc:  # aiohttp, auth and HTTP errors all mean the same thing to the user
            raise ClusterError(
                f"cannot reach Dask Gateway {address}: {exc}; check DASK_GATEWAY__ADDRESS and the "
                "credentials (DASK_GATEWAY__AUTH__TYPE, JUPYTERHUB_API_TOKEN)"
            ) from exc
        for key, value in options_in.items():
            if key not in options:
                raise InputError(
                    f"gateway option {shown(key)} is not offered by the gateway at {address}; expected one of "
                    f"{', '.join(options) or '(none)'}"
                )
            try:
                options[key] = value
            except (TypeError, ValueError) as exc:
                raise InputError(f"gateway option {key}={shown(value)} is invalid: {exc}") from None
        try:
            cluster = gateway.new_cluster(options, shutdown_on_close=True)
        except Exception as exc:
            raise ClusterError(f"Dask Gateway {address} could not start a cluster: {exc}") from exc
        try:
            if n_workers is not None:
                cluster.scale(n_workers)
            else:
                lo, hi = adapt or DEFAULT_ADAPT
                cluster.adapt(minimum=lo, maximum=hi)
            client = cluster.get_client(set_as_default=True)
            try:
                yield client, cluster.dashboard_link
            finally:
                client.close()
        finally:
            cluster.shutdown()
            _closed_for_good(cluster.gateway)
    finally:
        gateway.close()
        _closed_for_good(gateway)


def _closed_for_good(gateway: Any) -> None:
    """Make further ``close()`` calls of a closed dask-gateway client no-ops.

    ``Gateway.__del__`` closes the client again, and with current distributed that second close raises (the
    stopped event loop refuses access): every run would end with "Exception ignored in Gateway.__del__" on
    stderr. The instance attribute shadows the method for that one object only.
    """
    gateway.close = lambda: None


@contextlib.contextmanager
def _kubernetes(
    n_workers: int | None,
    threads_per_worker: int | None,
    kube_options: Mapping[str, Any],
    adapt: tuple[int, int] | None,
) -> Iterator[tuple[Client, str | None]]:
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise InputError(
            "cluster kubernetes needs the dask-kubernetes package (and its operator installed in the "
            "Kubernetes cluster); pip install dask-kubernetes, or use cluster gateway"
        ) from None
    if threads_per_worker is not None:
        raise InputError(
            "threads_per_worker cannot be set for cluster kubernetes; size workers with kube_options "
            "(resources=..., worker_command=...)"
        )
    kwargs: dict[str, Any] = {"name": "ndvi-scale", "shutdown_on_close": True}
    kwargs["n_workers"] = n_workers if n_workers is not None else (adapt or DEFAULT_ADAPT)[0]
    kwargs.update(kube_options)
    try:
        cluster = KubeCluster(**kwargs)
    except Exception as exc:  # kubernetes API errors: no cluster, no operator, RBAC...
        raise ClusterError(
            f"cannot create a KubeCluster: {exc}; check the kube config / service account and that the dask "
            "operator is installed (helm install dask/dask-kubernetes-operator)"
        ) from exc
    try:
        if n_workers is None:
            lo, hi = adapt or DEFAULT_ADAPT
            # Keywords: distributed's Cluster.adapt takes the Adaptive class as its first positional argument.
            cluster.adapt(minimum=lo, maximum=hi)
        client = Client(cluster)
        try:
            yield client, getattr(cluster, "dashboard_link", None)
        finally:
            client.close()
    finally:
        cluster.close()
