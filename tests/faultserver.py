"""A range-capable static HTTP server that misbehaves on purpose, for the read-fault tests (issue G).

Run as a process (the tests start it with ``servers.start_fault_server`` and stop it by PID)::

    python tests/faultserver.py --root DIR --rules RULES.json --log LOG.jsonl --port-file PORT

It serves the files under ``--root`` on 127.0.0.1 (port chosen by the OS, written to ``--port-file``), with
single ``Range: bytes=a-b`` requests answered 206 as object stores do. ``RULES.json`` is a JSON list of faults,
re-read whenever the file changes, so a test can break and repair files while the server runs::

    [{"match": "S2B_31UCQ_20240405_0_L2A/B04.tif", "fault": "status", "code": 500, "times": 3}]

* ``match``: substring of the request path the rule applies to (first matching rule wins).
* ``fault``:
  - ``status``: answer ``code`` (default 500) with a short body, like an overloaded object store (with a
    ``Retry-After: retry_after`` header when the rule has one);
  - ``hang``: wait ``seconds`` (default 60) before answering normally: the client must time out;
  - ``drop``: send the status line, headers and half of the body, then close the connection;
  - ``truncate``: serve the file as if only its first ``fraction`` (default 0.5) had been uploaded, honestly
    (sizes and ``Content-Range`` say so, ranges past the end get 416): a COG whose header is intact but whose
    tiles are missing;
  - ``require``: answer 403 unless the query string contains ``param`` (an expired signature, e.g. a
    Planetary Computer SAS token, until the client re-signs).
* ``times``: how many matching requests get the fault (then the file is served normally); -1: always.

Every request is logged to ``--log`` as one JSON line: method, path, query, range, status and the fault applied
(a ``hang`` is logged with status 0 when it starts, its eventual answer as fault ``late answer``).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

_LOCK = threading.Lock()


class Rules:
    """The rules file, re-read when it changes, with the number of times each rule has fired."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: int | None = None
        self._rules: list[dict[str, Any]] = []
        self._fired: list[int] = []

    def pick(self, path: str) -> dict[str, Any] | None:
        """The rule to apply to this request (counted as fired), or None."""
        with _LOCK:
            try:
                mtime = self.path.stat().st_mtime_ns
            except FileNotFoundError:
                mtime = None
            if mtime != self._mtime:
                self._mtime = mtime
                self._rules = json.loads(self.path.read_text()) if mtime is not None else []
                self._fired = [0] * len(self._rules)
            for i, rule in enumerate(self._rules):
                if rule["match"] in path:
                    times = int(rule.get("times", -1))
                    if times >= 0 and self._fired[i] >= times:
                        return None
                    self._fired[i] += 1
                    return rule
            return None


def make_handler(root: Path, rules: Rules, log_path: Path) -> type[http.server.BaseHTTPRequestHandler]:
    log_file = log_path.open("a", buffering=1)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as GDAL/curl expect from object stores

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server API)
            pass

        def _log(self, status: int, fault: str | None) -> None:
            url = urllib.parse.urlsplit(self.path)
            entry = {"method": self.command, "path": url.path, "query": url.query,
                     "range": self.headers.get("Range"), "status": status, "fault": fault, "t": time.time()}
            with _LOCK:
                log_file.write(json.dumps(entry) + "\n")

        def _plain(self, status: int, body: bytes, fault: str | None, retry_after: object = None) -> None:
            self.send_response(status)
            if retry_after is not None:
                self.send_header("Retry-After", str(retry_after))
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self._log(status, fault)

        def do_HEAD(self) -> None:  # noqa: N802 (http.server API)
            self._serve()

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            self._serve()

        def _serve(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            rel = urllib.parse.unquote(url.path).lstrip("/")
            file = (root / rel).resolve()
            if not file.is_file() or root not in file.parents:
                self._plain(404, b"not found", None)
                return
            rule = rules.pick(url.path)
            kind = rule["fault"] if rule else None
            if kind == "status":
                self._plain(int(rule.get("code", 500)), b"injected failure", kind,  # type: ignore[union-attr]
                            retry_after=rule.get("retry_after"))  # type: ignore[union-attr]
                return
            if kind == "require" and rule["param"] not in url.query:  # type: ignore[index]
                self._plain(403, b"AuthenticationFailed: signature expired", kind)
                return
            if kind == "hang":
                self._log(0, kind)  # logged now: the client has given up long before the late answer
                time.sleep(float(rule.get("seconds", 60)))  # type: ignore[union-attr]
                kind = "late answer"
            data = file.read_bytes()
            if kind == "truncate":
                data = data[: int(len(data) * float(rule.get("fraction", 0.5)))]  # type: ignore[union-attr]
            size = len(data)
            status, start, end = 200, 0, size - 1
            header = self.headers.get("Range")
            if header and header.startswith("bytes=") and "," not in header:
                a, _, b = header[len("bytes="):].partition("-")
                start = int(a) if a else max(0, size - int(b))
                end = min(int(b), size - 1) if (a and b) else size - 1
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    self._log(416, kind)
                    return
                status = 206
            body = data[start : end + 1]
            self.send_response(status)
            self.send_header("Content-Type", "image/tiff")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if self.command == "HEAD":
                self._log(status, kind)
                return
            if kind == "drop":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                self._log(status, kind)
                return
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. after a hang)
                pass
            self._log(status, kind)

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--rules", type=Path, required=True)
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--port-file", type=Path, required=True)
    args = ap.parse_args()
    root = args.root.resolve()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(root, Rules(args.rules), args.log))
    server.daemon_threads = True
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    os.replace(tmp, args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
