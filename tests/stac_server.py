"""Real local STAC APIs for the tests, on 127.0.0.1 only.

* :func:`start_rustac`: ``rustac serve`` (``pip install rustac``; the wheel ships the ``rustac`` command)
  with its in-process memory backend, loaded from item-collection files. bbox/datetime/collections/limit work
  and paging follows POST ``next`` links whose JSON body carries the position; ``query``/``filter`` are NOT
  implemented and silently answer 0 items. Started on an OS-chosen free port as a subprocess, stopped by PID.
* :class:`TokenPagingAPI`: a tiny STAC API (``http.server`` in a thread) serving fixed pages with GET
  ``next`` links carrying ``?token=`` (the other paging style), advertising GET search only. It records every
  request and can answer a scripted series of failures (status codes, ``Retry-After``, delays).
"""

from __future__ import annotations

import copy
import http.server
import json
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servers import HOST, Server, ServerError, find_binary, free_ports

__all__ = ["Failure", "TokenPagingAPI", "get_json", "start_rustac"]


def _wait_landing(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.endpoint + "/", timeout=1) as resp:
                if resp.status == 200 and "conformsTo" in json.loads(resp.read()):
                    return
        except (OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.1)
    server.stop()
    raise ServerError(
        f"{server.name} did not answer at {server.endpoint} within {timeout:.0f} s ({last}):\n"
        f"{server.log_tail()}"
    )


def start_rustac(items: Sequence[Path], log_dir: Path, *, timeout: float = 30.0) -> Server:
    """``rustac serve`` holding ``items`` (item-collection JSON files) at ``http://127.0.0.1:<free port>``.

    Collections named by the items are created on the fly (``--create-collections``); the memory backend is
    used (``--use-duckdb false``). Stop it with ``server.stop()`` (SIGTERM to its process group, by PID).
    """
    binary = find_binary("rustac", "rustac")
    log_dir.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for _attempt in range(3):  # the chosen port may be taken before rustac binds it: retry with another
        (port,) = free_ports(1)
        addr = f"{HOST}:{port}"
        cmd = [binary, "serve", "--addr", addr, "--create-collections", "--use-duckdb", "false"]
        cmd += [str(p) for p in items]
        log_path = log_dir / f"rustac-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        server = Server("rustac serve", f"http://{addr}", proc, log_dir, log_path)
        try:
            _wait_landing(server, timeout)
            return server
        except ServerError as exc:
            last_error = exc
            server.stop()
    raise ServerError(f"rustac serve could not be started: {last_error}")


@dataclass
class Failure:
    """One scripted answer instead of the real page: an HTTP status (with optional ``Retry-After``), after an
    optional delay (``status=None`` with a delay = a slow but correct answer, to trigger read timeouts)."""

    status: int | None = 503
    retry_after: str | None = None
    delay: float = 0.0


@dataclass
class TokenPagingAPI:
    """A STAC API whose /search pages are ``pages`` (FeatureCollections), chained by GET ``?token=`` links.

    Page *i* > 0 is served for ``token=next:<last id of page i-1>``. The landing page advertises GET search
    and the item-search conformance classes (with the ``extensions``). ``failures[(page_index, attempt)]``
    scripts the answer to the *attempt*-th request (0-based) for that page. Every request is recorded in
    :attr:`requests` as ``(method, path, query dict)``. Use as a context manager, or ``start()``/``stop()``.
    """

    pages: list[dict[str, Any]]
    failures: dict[tuple[int, int], Failure] = field(default_factory=dict)
    extensions: tuple[str, ...] = ("query",)
    """Item-search extensions the landing page advertises (``query``, ``filter``)."""
    requests: list[tuple[str, str, dict[str, list[str]]]] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self._attempts: dict[int, int] = {}
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- documents
    def _landing(self) -> dict[str, Any]:
        return {
            "type": "Catalog",
            "stac_version": "1.0.0",
            "id": "token-paging-api",
            "description": "test API: GET /search with ?token= paging",
            "conformsTo": [
                "https://api.stacspec.org/v1.0.0/core",
                "https://api.stacspec.org/v1.0.0/item-search",
                *(f"https://api.stacspec.org/v1.0.0/item-search#{ext}" for ext in self.extensions),
            ],
            "links": [
                {"rel": "self", "href": f"{self.url}/", "type": "application/json"},
                {"rel": "root", "href": f"{self.url}/", "type": "application/json"},
                {"rel": "search", "href": f"{self.url}/search", "type": "application/geo+json",
                 "method": "GET"},
            ],
        }

    def _page(self, index: int, query: dict[str, list[str]]) -> dict[str, Any]:
        page = copy.deepcopy(self.pages[index])
        links = [{"rel": "root", "href": f"{self.url}/", "type": "application/json"}]
        if index + 1 < len(self.pages):
            params = {k: v[-1] for k, v in query.items() if k != "token"}
            params["token"] = f"next:{page['features'][-1]['id']}"
            links.append(
                {
                    "rel": "next",
                    "href": f"{self.url}/search?{urllib.parse.urlencode(params)}",
                    "type": "application/geo+json",
                    "method": "GET",
                }
            )
        page["links"] = links
        return page

    def _page_index(self, token: str | None) -> int | None:
        if token is None:
            return 0
        for i, page in enumerate(self.pages[:-1]):
            if token == f"next:{page['features'][-1]['id']}":
                return i + 1
        return None

    def attempts(self, page_index: int) -> int:
        """How many requests were made for page ``page_index``."""
        return self._attempts.get(page_index, 0)

    # -- server
    def start(self) -> TokenPagingAPI:
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/geo+json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                parts = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(parts.query)
                with api._lock:
                    api.requests.append(("GET", parts.path, query))
                if parts.path in ("", "/"):
                    return self._send(200, api._landing())
                if parts.path == "/conformance":
                    return self._send(200, {"conformsTo": api._landing()["conformsTo"]})
                if parts.path != "/search":
                    return self._send(404, {"code": "NotFound", "description": parts.path})
                index = api._page_index(query.get("token", [None])[-1])
                if index is None:
                    return self._send(400, {"code": "BadToken", "description": str(query.get("token"))})
                with api._lock:
                    attempt = api._attempts.get(index, 0)
                    api._attempts[index] = attempt + 1
                failure = api.failures.get((index, attempt))
                if failure is not None:
                    if failure.delay:
                        time.sleep(failure.delay)
                    if failure.status is not None:
                        headers = {} if failure.retry_after is None else {"Retry-After": failure.retry_after}
                        body = {"code": "Scripted", "description": "failure"}
                        return self._send(failure.status, body, headers)
                try:
                    self._send(200, api._page(index, query))
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (read timeout)
                    pass

            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                with api._lock:
                    api.requests.append(("POST", self.path, {}))
                self._send(405, {"code": "MethodNotAllowed", "description": "GET only"})

        self._server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{HOST}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> TokenPagingAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def get_json(url: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body`` as JSON to) ``url`` and parse the answer: for checks that bypass ndvi-scale."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{url} answered HTTP {exc.code}: {exc.read()[:300]!r}") from None
