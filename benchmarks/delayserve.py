"""A range server with a fixed delay per request: ``python delayserve.py ROOT PORT LOGFILE [--latency MS]``.

Object storage answers each range request after tens of milliseconds; a local nginx answers at once. This server
stands in for the former on 127.0.0.1 only:

* it waits ``--latency`` milliseconds after reading each request (GET or HEAD) and before answering it; the wait
  holds no lock, so N requests on N connections wait together (one thread per connection, keep-alive HTTP/1.1,
  a listen backlog of 1024);
* ``HEAD``, ``GET`` of a whole file, a single range (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) answered 206 with
  ``Content-Range``, and a multi-range (``bytes=a-b,c-d``) answered 206 ``multipart/byteranges`` as nginx does
  (parts in the order asked); 416 for an unsatisfiable range, 404 for a missing file;
* file bodies go out with ``os.sendfile`` (the kernel copies from the page cache to the socket): next to no
  CPU per byte, so the server takes almost nothing from the contenders on a 2-core machine;
* one log line per request, ``METHOD PATH STATUS BODY_BYTES "RANGE"``, as nginx's and :mod:`rangeserve`'s
  (:class:`server.Server` counts the GETs and bytes from it).
"""

from __future__ import annotations

import argparse
import email.utils
import os
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_TYPES = {".tif": "image/tiff", ".tiff": "image/tiff", ".json": "application/json"}
_BOUNDARY = "00000000000000000001"


def parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """``[(start, end_inclusive), ...]`` of a ``bytes=`` header for a file of ``size`` bytes.

    ``None`` when the header is not a byte range (serve the whole file, as nginx does), ``[]`` when no range is
    satisfiable (416).
    """
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec.strip():
        return None
    out = []
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        if not dash:
            return None
        try:
            if first == "":  # suffix: the last n bytes
                n = int(last)
                if n <= 0:
                    continue
                out.append((max(size - n, 0), size - 1))
                continue
            a = int(first)
            b = int(last) if last else size - 1
        except ValueError:
            return None
        if a >= size:
            continue
        if a > b:
            return None
        out.append((a, min(b, size - 1)))
    return out


class DelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as GDAL and the contenders expect
    server_version = "delayserve"
    sys_version = ""
    root: Path = Path(".")
    latency: float = 0.0  # seconds
    log_lock = threading.Lock()
    log_file: Any = None
    timeout = 300  # an idle keep-alive connection is closed after this
    disable_nagle_algorithm = True  # TCP_NODELAY: headers and small bodies go out at once

    # -- plumbing
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass

    def _log(self, status: int, sent: int) -> None:
        if self.log_file is None:
            return
        path = urllib.parse.unquote(self.path.split("?", 1)[0])
        line = f'{self.command} {path} {status} {sent} "{self.headers.get("Range", "-")}"\n'
        with self.log_lock:
            self.log_file.write(line)
            self.log_file.flush()

    def _error(self, status: int, extra: dict[str, str] | None = None) -> None:
        body = f"{status}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._log(status, len(body) if self.command != "HEAD" else 0)

    def _file(self) -> Path | None:
        rel = urllib.parse.unquote(self.path.split("?", 1)[0]).lstrip("/")
        path = (self.root / rel).resolve()
        if self.root not in path.parents and path != self.root:
            return None
        return path if path.is_file() else None

    def _send(self, fd: int, offset: int, count: int) -> None:
        sock = self.connection
        while count > 0:
            n = os.sendfile(sock.fileno(), fd, offset, count)
            if n == 0:
                raise ConnectionError("client closed the connection")
            offset += n
            count -= n

    # -- methods
    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        if self.latency > 0:
            time.sleep(self.latency)  # the object store's time to first byte
        path = self._file()
        if path is None:
            self._error(404)
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            mtime = email.utils.formatdate(os.fstat(fd).st_mtime, usegmt=True)
            ctype = _TYPES.get(path.suffix.lower(), "application/octet-stream")
            header = self.headers.get("Range")
            ranges = parse_ranges(header, size) if header else None
            if ranges == []:
                self._error(416, {"Content-Range": f"bytes */{size}"})
                return
            common = {"Accept-Ranges": "bytes", "Last-Modified": mtime}
            if ranges is None:  # the whole file
                self._head(200, {**common, "Content-Type": ctype, "Content-Length": str(size)})
                if body:
                    self._send(fd, 0, size)
                self._log(200, size if body else 0)
            elif len(ranges) == 1:
                a, b = ranges[0]
                n = b - a + 1
                self._head(
                    206,
                    {
                        **common,
                        "Content-Type": ctype,
                        "Content-Length": str(n),
                        "Content-Range": f"bytes {a}-{b}/{size}",
                    },
                )
                if body:
                    self._send(fd, a, n)
                self._log(206, n if body else 0)
            else:  # multipart/byteranges, as nginx answers bytes=a-b,c-d
                parts = [
                    (
                        f"\r\n--{_BOUNDARY}\r\nContent-Type: {ctype}\r\nContent-Range: bytes {a}-{b}/{size}\r\n\r\n"
                    ).encode()
                    for a, b in ranges
                ]
                tail = f"\r\n--{_BOUNDARY}--\r\n".encode()
                length = sum(len(p) for p in parts) + sum(b - a + 1 for a, b in ranges) + len(tail)
                self._head(
                    206,
                    {
                        **common,
                        "Content-Type": f"multipart/byteranges; boundary={_BOUNDARY}",
                        "Content-Length": str(length),
                    },
                )
                if body:
                    for p, (a, b) in zip(parts, ranges, strict=True):
                        self.wfile.write(p)
                        self._send(fd, a, b - a + 1)
                    self.wfile.write(tail)
                self._log(206, length if body else 0)
        finally:
            os.close(fd)

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()  # flushes the headers (wfile is unbuffered): sendfile follows them on the socket


class DelayServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # 64+ clients connecting at once must not hit a SYN retry
    allow_reuse_address = True


def make_server(root: str | Path, port: int, log: str | Path | None, latency_ms: float) -> DelayServer:
    """A server on 127.0.0.1:``port`` (0: any free port); ``serve_forever()`` it in a thread or a process."""
    attrs = {
        "root": Path(root).resolve(),
        "latency": latency_ms / 1000.0,
        "log_file": open(log, "a") if log else None,  # noqa: SIM115 (open for the server's lifetime)
        "log_lock": threading.Lock(),
    }
    handler = type("Handler", (DelayHandler,), attrs)
    return DelayServer(("127.0.0.1", port), handler)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root")
    ap.add_argument("port", type=int)
    ap.add_argument("log")
    ap.add_argument("--latency", type=float, default=0.0, help="milliseconds to wait before each answer")
    args = ap.parse_args()
    make_server(args.root, args.port, args.log, args.latency).serve_forever()


if __name__ == "__main__":
    main()
