"""engine.httpget (through engine.ranges): the lean range GET against a scripted HTTP server on 127.0.0.1, the
answers object stores and proxies really give: kept-alive connections reused, a connection the server closed
while idle, ``Connection: close``, HTTP/1.0, a redirect and a chunked body (both left to urllib3), a truncated
body, 503 with ``Retry-After``."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ndvi_scale.engine import httpget, ranges

DATA = bytes(range(256)) * 64  # 16 KiB


@dataclass
class Scripted:
    """A socket server answering each request by its path (see :meth:`answer`); counts connections and requests."""

    port: int = 0
    connections: int = 0
    requests: list[str] = field(default_factory=list)
    busy_left: int = 0
    tls: ssl.SSLContext | None = None
    _sock: socket.socket | None = None

    def start(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        assert self._sock is not None
        self._sock.close()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:
                conn.close()
                return
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                target = lines[0].split(" ")[1]
                rng = next(x.split("=")[1] for x in lines[1:] if x.lower().startswith("range:"))
                a, b = (int(v) for v in rng.split("-"))
                self.requests.append(target)
                if not self.answer(conn, target.partition("?")[0], DATA[a : b + 1]):
                    return

    def answer(self, conn: socket.socket, path: str, part: bytes) -> bool:
        """Send the answer for ``path``; False closes the connection."""
        if path == "/ok":
            conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n\r\n" % len(part) + part)
            return True
        if path == "/idle-close":  # keep-alive promised, then the server drops the idle connection
            conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n\r\n" % len(part) + part)
            return False
        if path == "/close":
            conn.sendall(b"HTTP/1.1 206 Partial Content\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                         % len(part) + part)
            return False
        if path == "/http10":
            conn.sendall(b"HTTP/1.0 206 Partial Content\r\nContent-Length: %d\r\n\r\n" % len(part) + part)
            return False
        if path == "/redirect":
            conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /ok\r\nContent-Length: 0\r\n\r\n")
            return True
        if path == "/chunked":  # the whole file, chunked: a server that ignores Range
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(DATA) + DATA
                         + b"\r\n0\r\n\r\n")
            return True
        if path == "/truncated":
            conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n\r\n" % len(part)
                         + part[: len(part) // 2])
            return False
        if path == "/busy":
            if self.busy_left > 0:
                self.busy_left -= 1
                conn.sendall(b"HTTP/1.1 503 Slow Down\r\nRetry-After: 0\r\nContent-Length: 4\r\n\r\nbusy")
                return True
            conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n\r\n" % len(part) + part)
            return True
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found")
        return True


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Scripted]:
    for key, value in {"GDAL_HTTP_MAX_RETRY": "2", "GDAL_HTTP_RETRY_DELAY": "0.01", "GDAL_HTTP_TIMEOUT": "2",
                       "GDAL_HTTP_CONNECTTIMEOUT": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(ranges, "_http", None)
    srv = Scripted()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        httpget.reset()
        ranges._http = None


def get(server: Scripted, path: str, a: int = 100, n: int = 1000) -> bytes:
    return bytes(ranges.fetch(f"http://127.0.0.1:{server.port}{path}?sig=x%2By", [(a, n)])[0])


def test_ranges_reuse_one_kept_alive_connection(server: Scripted) -> None:
    for a in (0, 100, 5000, 16000):
        assert get(server, "/ok", a, 300) == DATA[a : a + 300]
    assert server.connections == 1 and len(server.requests) == 4


def test_a_connection_closed_while_idle_is_replaced_without_a_failure(server: Scripted) -> None:
    assert get(server, "/idle-close") == DATA[100:1100]
    assert get(server, "/idle-close", 0, 10) == DATA[:10]  # the kept socket is dead: a new one, same answer
    assert server.connections == 2 and len(server.requests) == 2


@pytest.mark.parametrize("path", ["/close", "/http10"])
def test_connections_the_server_closes_are_not_kept(server: Scripted, path: str) -> None:
    assert get(server, path) == DATA[100:1100]
    assert get(server, path, 7, 9) == DATA[7:16]
    assert server.connections == 2 and httpget._idle.get(("http", "127.0.0.1", server.port), []) == []


def test_redirects_and_chunked_bodies_are_left_to_urllib3(server: Scripted) -> None:
    assert get(server, "/redirect") == DATA[100:1100]  # asked again through urllib3, which follows it to /ok
    assert server.requests[:3] == ["/redirect?sig=x%2By", "/redirect?sig=x%2By", "/ok"]
    assert get(server, "/chunked", 300, 50) == DATA[300:350]  # the whole file, chunked: the range cut from it


def test_a_truncated_body_is_retried_then_fails_without_the_signature(server: Scripted) -> None:
    with pytest.raises(OSError) as err:
        get(server, "/truncated")
    assert len(server.requests) == 3  # GDAL_HTTP_MAX_RETRY=2: three requests in all
    assert "failed after retries" in str(err.value) and "sig" not in str(err.value)


def test_a_busy_server_is_asked_again_after_its_retry_after(server: Scripted) -> None:
    server.busy_left = 2
    assert get(server, "/busy") == DATA[100:1100]
    assert len(server.requests) == 3 and server.connections == 1  # the 503 bodies were read: one connection
    with pytest.raises(OSError, match="HTTP response code: 404"):
        get(server, "/missing")


def test_only_plain_requests_take_the_lean_path() -> None:
    from urllib.parse import urlsplit

    for url in ("http://user:pw@h/a.tif", "http://h/a b.tif", "ftp://h/a.tif", "http://h/\u00e9.tif"):
        with pytest.raises(httpget.Unsupported):
            httpget.get_range(urlsplit(url), 0, 10, 1.0, 1.0)


def test_https_ranges_verify_the_certificate_and_reuse_the_connection(
    server: Scripted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over TLS: the server's certificate is verified against the trusted CAs (here a test CA named by
    SSL_CERT_FILE, as a user's would be), the connection is kept, and an untrusted server is refused."""
    import trustme

    ca = trustme.CA()
    server.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server.tls)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setattr(httpget, "_tls", None)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    url = f"https://127.0.0.1:{server.port}/ok?sig=x"
    for a in (0, 9000):
        assert bytes(ranges.fetch(url, [(a, 500)])[0]) == DATA[a : a + 500]
    assert server.connections == 1
    httpget.reset()
    monkeypatch.setattr(httpget, "_tls", None)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "none.pem"))  # the test CA no longer trusted
    with pytest.raises(OSError) as err:
        ranges.fetch(url, [(0, 500)])
    assert "CERTIFICATE_VERIFY_FAILED" in str(err.value) and "sig" not in str(err.value)
