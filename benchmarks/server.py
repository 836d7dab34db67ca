"""A local, range-capable HTTP server for the benchmark data, on 127.0.0.1 only, with a request log.

nginx (Debian ``nginx-light``) when it is installed: it serves ranges and multi-range requests with
``sendfile``, so it takes next to no CPU from the contenders on a 2-core machine. Otherwise RangeHTTPServer
(``pip install rangehttpserver``) in a child process, through :mod:`rangeserve`, which logs the same fields.
With a latency (``Server(root, latency_ms=MS)``, ``run.py --latency``): :mod:`delayserve`, a threaded
server that waits MS milliseconds before answering each request and sends bodies with ``os.sendfile``.
Each request is one log line ``METHOD PATH STATUS BODY_BYTES "RANGE"``; :meth:`Server.mark` and
:meth:`Server.since` count the GETs and bytes between two points of the benchmark.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

_NGINX_CONF = """\
worker_processes 1;
daemon off;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format bench '$request_method $uri $status $body_bytes_sent "$http_range"';
    access_log {log} bench;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 120;
    keepalive_requests 1000000;
    max_ranges 1024;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ image/tiff tif; application/json json; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Traffic:
    gets: int
    bytes: int
    requests: int


class Server:
    """``with Server(root) as srv:`` serves ``root`` at ``srv.url`` until the block ends."""

    def __init__(self, root: Path, kind: str = "auto", latency_ms: float | None = None) -> None:
        self.root = Path(root).resolve()
        if latency_ms is not None:  # only the delaying server can wait before answering
            kind = "delay"
        self.kind = ("nginx" if shutil.which("nginx") else "python") if kind == "auto" else kind
        self.latency_ms = latency_ms or 0.0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp = Path(tempfile.mkdtemp(prefix="ndvi-bench-http-"))
        self.log = self._tmp / "access.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        self.log.touch()
        if self.kind == "nginx":
            conf = self._tmp / "nginx.conf"
            conf.write_text(_NGINX_CONF.format(tmp=self._tmp, log=self.log, port=self.port, root=self.root))
            cmd = ["nginx", "-p", str(self._tmp), "-c", str(conf)]
        elif self.kind == "delay":
            cmd = [
                sys.executable,
                str(Path(__file__).with_name("delayserve.py")),
                str(self.root),
                str(self.port),
                str(self.log),
                "--latency",
                str(self.latency_ms),
            ]
        else:
            cmd = [
                sys.executable,
                str(Path(__file__).with_name("rangeserve.py")),
                str(self.root),
                str(self.port),
                str(self.log),
            ]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(self.url + "/items.json", timeout=2).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.time() > deadline:
                    err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                    self.__exit__()
                    raise RuntimeError(f"{self.kind} HTTP server did not start: {err}") from None
                time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # only the process we started, by its handle
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def version(self) -> str:
        if self.kind == "nginx":
            out = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
            return (out.stderr or out.stdout).strip().split("/")[-1]
        if self.kind == "delay":
            return f"delayserve.py (threaded, sendfile), {self.latency_ms:g} ms before each answer"
        from importlib.metadata import version

        return f"RangeHTTPServer {version('rangehttpserver')}"

    def cpu(self) -> float:
        """CPU seconds the server's processes used so far (nginx: master and workers)."""
        import psutil

        if self._proc is None:
            return 0.0
        try:
            p = psutil.Process(self._proc.pid)
            procs = [p, *p.children(recursive=True)]
            total = 0.0
            for q in procs:
                t = q.cpu_times()
                total += t.user + t.system
            return total
        except psutil.Error:
            return float("nan")

    def mark(self) -> int:
        """The current end of the log (flushes: nginx writes its access log unbuffered)."""
        time.sleep(0.2)
        return self.log.stat().st_size

    def since(self, mark: int, suffix: str = ".tif") -> Traffic:
        """GETs and body bytes of requests for ``*suffix`` logged after ``mark``."""
        time.sleep(0.2)
        gets = nbytes = n = 0
        with self.log.open("rb") as f:
            f.seek(mark)
            for raw in f:
                parts = raw.decode(errors="replace").split(" ")
                if len(parts) < 4 or not parts[1].endswith(suffix):
                    continue
                n += 1
                if parts[0] == "GET":
                    gets += 1
                    nbytes += int(parts[3]) if parts[3].isdigit() else 0
        return Traffic(gets, nbytes, n)
