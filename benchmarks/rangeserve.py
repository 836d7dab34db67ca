"""Fallback server when nginx is missing: ``python rangeserve.py ROOT PORT LOGFILE`` (127.0.0.1 only).

RangeHTTPServer's handler (``pip install rangehttpserver``), threaded, logging ``METHOD PATH STATUS BYTES
"RANGE"`` per request like the nginx configuration of :mod:`server`. It costs CPU on the benchmark's cores
(Python copies every byte), so prefer nginx for timings.
"""

from __future__ import annotations

import functools
import sys
import threading
from http.server import ThreadingHTTPServer
from typing import Any

from RangeHTTPServer import RangeRequestHandler


class _LoggingHandler(RangeRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as GDAL expects
    log_lock = threading.Lock()
    log_file: Any = None

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == "content-length":
            self._length = int(value)
        super().send_header(keyword, value)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass

    def handle_one_request(self) -> None:
        self._status, self._length = 0, 0
        super().handle_one_request()
        if getattr(self, "command", None):
            path = self.path.split("?", 1)[0]
            sent = self._length if self.command == "GET" else 0
            line = f'{self.command} {path} {self._status} {sent} "{self.headers.get("Range", "-")}"\n'
            with self.log_lock:
                self.log_file.write(line)
                self.log_file.flush()


def main() -> None:
    root, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    _LoggingHandler.log_file = open(log, "a")  # noqa: SIM115 (open for the server's lifetime)
    handler = functools.partial(_LoggingHandler, directory=root)
    ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()


if __name__ == "__main__":
    main()
