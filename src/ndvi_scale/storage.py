"""Where outputs go: one :class:`Location` for a local path, ``gs://bucket/path`` or ``s3://bucket/path``.

:func:`open_location` resolves a URL plus optional fsspec ``storage_options`` into a filesystem, a
credential-free URL (for messages and provenance) and a Zarr store. Credentials come from the usual places
only:

* S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``), else ``AWS_PROFILE``, else
  the default botocore chain (config files, instance metadata). A custom endpoint (MinIO, SeaweedFS, Ceph,
  ...) comes from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, the region from
  ``AWS_REGION``/``AWS_DEFAULT_REGION``.
* GCS: ``GOOGLE_APPLICATION_CREDENTIALS``, else gcloud application-default credentials or the metadata server
  (the gcsfs default chain). ``STORAGE_EMULATOR_HOST`` selects an emulator, with anonymous access.

Explicit ``storage_options`` always win over the environment. Environment values are copied into the options
explicitly (rather than left for botocore/gcsfs to discover) so that fsspec's instance cache is keyed on them
and error messages can say where the credentials came from.

Every failure to reach storage is turned into ONE :class:`~ndvi_scale.errors.StorageError` by
:func:`storage_error`: missing bucket, denied/missing credentials, unreachable endpoint. Messages never
contain secrets.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

# gcsfs >= 2025.x probes "zonal/hierarchical namespace" bucket features on every call unless this is off;
# against an emulator (and without a project) each probe stalls for 60 s. It is read when gcsfs is imported,
# so it must be set before anything imports gcsfs (fsspec imports it lazily on first use of gs://).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402  (must come after the environment default above)
from fsspec.asyn import sync  # noqa: E402

from .errors import InputError, NdviScaleError, StorageError, exception_chain, shown  # noqa: E402

__all__ = [
    "Location",
    "LocationSpec",
    "open_location",
    "storage_error",
    "CHECK_TIMEOUT",
    "CONNECT_TIMEOUT",
]

#: Seconds to wait for a TCP connection to an object-storage endpoint (botocore default is 60).
CONNECT_TIMEOUT = 5.0
#: Overall bound, in seconds, on :meth:`Location.check_access`: gcsfs retries connection errors 6 times with
#: exponential back-off (~30 s) and that cannot be configured, so the probe is cut short instead.
CHECK_TIMEOUT = 15.0
#: botocore retries (total attempts, "standard" mode = exponential back-off with jitter on
#: throttling/5xx/network).
S3_MAX_ATTEMPTS = 3

_SCHEMES = {"": "file", "file": "file", "s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs"}
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_SECRET_KEYS = ("secret", "token", "password", "key", "session", "credential", "private")


@dataclass(frozen=True)
class Location:
    """A resolved output location. Build it with :func:`open_location`.

    ``url`` is safe to print and to store in provenance; ``storage_options`` may hold secrets and is kept out
    of ``repr``.
    """

    url: str
    """Normalised, credential-free URL: an absolute local path, ``s3://bucket/key`` or ``gs://bucket/key``."""
    protocol: str
    """``file``, ``s3`` or ``gs``."""
    path: str
    """Path for :attr:`fs`: the absolute local path, or ``bucket/key`` for object storage."""
    endpoint: str | None
    """Credential-free endpoint URL for messages (None for local paths)."""
    credential_source: str
    """Where credentials come from, for messages (never the credentials themselves)."""
    storage_options: Mapping[str, Any] = field(repr=False, compare=False)
    """Resolved fsspec options (may contain secrets: never log them)."""
    fs: fsspec.AbstractFileSystem = field(repr=False, compare=False)
    """Synchronous fsspec filesystem for small operations (exists, markers, deletes, STAC item)."""

    # ------------------------------------------------------------------ naming

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def bucket(self) -> str | None:
        """Bucket name for object storage, None for local paths."""
        return None if self.is_local else self.path.split("/", 1)[0]

    @property
    def key(self) -> str:
        """Key prefix inside the bucket ('' for the bucket root); the local path for local locations."""
        if self.is_local:
            return self.path
        return self.path.split("/", 1)[1] if "/" in self.path else ""

    @property
    def name(self) -> str:
        """Last path component (e.g. ``cube.zarr``)."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *parts: str) -> str:
        """fs path of ``parts`` below this location."""
        return "/".join([self.path.rstrip("/"), *(p.strip("/") for p in parts)])

    def sibling(self, suffix: str) -> Location:
        """The location ``<this path><suffix>`` on the same filesystem (e.g. ``cube.zarr.stac-item.json``)."""
        scheme = "" if self.is_local else f"{self.protocol}://"
        return Location(
            url=f"{scheme}{self.path}{suffix}",
            protocol=self.protocol,
            path=f"{self.path}{suffix}",
            endpoint=self.endpoint,
            credential_source=self.credential_source,
            storage_options=self.storage_options,
            fs=self.fs,
        )

    def spec(self) -> LocationSpec:
        """A picklable, hashable handle to re-open this location in a dask worker (secrets not in repr)."""
        return LocationSpec(self.url, json.dumps(dict(self.storage_options), sort_keys=True, default=str))

    # ------------------------------------------------------------------ zarr

    @functools.cached_property
    def store(self) -> Any:
        """The Zarr store for xarray/zarr, e.g. ``xr.open_zarr(loc.store)`` (created once).

        ``zarr.storage.LocalStore`` for local paths, else ``zarr.storage.FsspecStore`` (an asynchronous
        s3fs/gcsfs instance with the same options).
        """
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.path)
        # FsspecStore needs an *asynchronous* fsspec instance bound to zarr's own event loop; from_url builds
        # it with the same options as our synchronous one.
        return zarr.storage.FsspecStore.from_url(
            f"{self.protocol}://{self.path}", storage_options=dict(self.storage_options)
        )

    # ------------------------------------------------------------------ queries

    def exists(self) -> bool:
        """True if anything is at this location: a file or folder (local), an object at this key or any object
        below it (object storage).

        For object storage this asks for at most one key instead of trusting "directory" listings: some
        servers (SeaweedFS, MinIO on a filesystem) keep reporting a prefix as a folder after its last object
        is deleted.
        """
        if self.is_local:
            return os.path.lexists(self.path)
        if not self.key:
            return True  # a bucket root "exists" once access is checked
        try:
            return bool(self.fs.isfile(self.path)) or self._any_object_below()
        except NdviScaleError:
            raise
        except Exception as exc:
            raise storage_error(exc, self, "checking") from None

    def _any_object_below(self) -> bool:
        prefix = self.key.rstrip("/") + "/"
        if self.protocol == "s3":
            coro = self.fs._call_s3("list_objects_v2", Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
            return bool(_run(self.fs, coro, CHECK_TIMEOUT).get("KeyCount", 0))
        coro = self.fs._call("GET", "b/{}/o", self.bucket, prefix=prefix, maxResults=1, json_out=True)
        return bool(_run(self.fs, coro, CHECK_TIMEOUT).get("items"))

    def is_empty_dir(self) -> bool:
        """True for an existing, empty local folder (object-store prefixes are never empty: they vanish)."""
        return self.is_local and os.path.isdir(self.path) and not os.listdir(self.path)

    def read_bytes(self, subpath: str) -> bytes | None:
        """Bytes of ``subpath`` below this location, or None if it does not exist."""
        try:
            return bytes(self.fs.cat_file(self.join(subpath)))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except Exception as exc:
            raise storage_error(exc, self, "reading") from None

    def check_access(self, timeout: float = CHECK_TIMEOUT) -> None:
        """Fail fast with one clear :class:`StorageError` if this location cannot be used.

        Object storage: the endpoint must accept a TCP connection (bounded by :data:`CONNECT_TIMEOUT`), the
        bucket must exist and listing the output prefix must be allowed with the resolved credentials. Local
        paths: the nearest existing parent must be a writable folder (an empty folder is created there and removed
        at once). Nothing else is written.
        """
        if self.is_local:
            self._check_local()
            return
        self._check_tcp()
        try:
            if self.protocol == "s3":
                coro = self.fs._call_s3("list_objects_v2", Bucket=self.bucket, Prefix=self.key, MaxKeys=1)
            else:
                coro = self.fs._call(
                    "GET", "b/{}/o", self.bucket, prefix=self.key, maxResults=1, json_out=True
                )
            _run(self.fs, coro, timeout)
        except NdviScaleError:
            raise
        except FileNotFoundError as exc:
            # The probe lists a prefix: "not found" can only be the bucket itself.
            raise storage_error(exc, self, "checking", missing="bucket") from None
        except Exception as exc:
            raise storage_error(exc, self, "checking") from None

    def delete(self) -> None:
        """Delete everything at this location (file, folder or key prefix) and nothing else.

        Refuses dangerous targets: a bucket root, the filesystem root, the home folder or any parent of the
        current folder.
        """
        if not self.is_local:
            if not self.key:
                raise StorageError(
                    f"refusing to delete the whole bucket {self.url}; give --out a path inside the bucket"
                )
            try:
                # A trailing "/" makes the recursive delete match only keys *below* this prefix (never
                # "cube.zarr2" or the "cube.zarr.stac-item.json" beside it); a plain object at the exact key
                # goes separately.
                if self.fs.isfile(self.path):
                    self.fs.rm_file(self.path)
                found = self.fs.find(self.path + "/")
                if found:
                    self.fs.rm(found)
            except Exception as exc:
                raise storage_error(exc, self, "deleting") from None
            return
        real = os.path.realpath(self.path)
        protected = {os.path.realpath(p) for p in (os.sep, os.path.expanduser("~"))}
        cwd = os.path.realpath(os.getcwd())
        if real in protected or cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep):
            raise StorageError(
                f"refusing to delete {self.path}: it is the root, the home folder or a parent of the current "
                "folder; choose a dedicated --out"
            )
        try:
            if os.path.isdir(self.path) and not os.path.islink(self.path):
                shutil.rmtree(self.path)
            elif os.path.lexists(self.path):
                os.remove(self.path)
        except OSError as exc:
            raise storage_error(exc, self, "deleting") from None

    # ------------------------------------------------------------------ helpers

    def _check_local(self) -> None:
        if os.path.lexists(self.path):
            # Writing into a folder needs it writable; replacing a file needs its folder writable.
            target = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        else:
            target = os.path.dirname(self.path)
            while not os.path.lexists(target) and os.path.dirname(target) != target:
                target = os.path.dirname(target)
            if not os.path.isdir(target):
                raise StorageError(
                    f"cannot create {self.path}: {target} is a file, not a folder; choose another --out"
                )
        if not os.access(target, os.W_OK | os.X_OK):
            raise StorageError(
                f"cannot write to {self.path}: permission denied on {target}; choose a writable --out"
            )
        # os.access answers "yes" for root on read-only or virtual filesystems (/proc, a ro mount): create and
        # remove one empty folder there, so such an --out is refused now and not after the search.
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".ndvi-scale-probe-", dir=target))
        except OSError as exc:
            raise StorageError(
                f"cannot write to {self.path}: creating a folder in {target} fails ({exc.strerror or exc}); "
                "choose a writable --out"
            ) from None

    def _check_tcp(self) -> None:
        """Refuse quickly when nothing listens at the endpoint (gcsfs would retry for ~30 s)."""
        if self.endpoint is None or _proxy_configured():
            return  # default AWS endpoint (botocore resolves it per region) or a proxy in between: skip
        parts = urlsplit(self.endpoint)
        host = parts.hostname or ""
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise StorageError(
                f"endpoint {self.endpoint} has an invalid port; fix {self._endpoint_hint()}"
            ) from None
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
                pass
        except OSError as exc:
            raise StorageError(
                f"cannot reach {self.endpoint}: {_short(exc, self)}; check {self._endpoint_hint()} / network"
            ) from None

    def _endpoint_hint(self) -> str:
        if self.protocol == "s3":
            return "AWS_ENDPOINT_URL (or storage_options endpoint_url)"
        if "STORAGE_EMULATOR_HOST" in os.environ:
            return "STORAGE_EMULATOR_HOST (or storage_options endpoint_url)"
        return "storage_options endpoint_url, proxy settings"

    def _credential_hint(self) -> str:
        if self.protocol == "s3":
            return "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or storage_options key/secret)"
        if self.protocol == "gs":
            return (
                "GOOGLE_APPLICATION_CREDENTIALS (or run `gcloud auth application-default login`, or "
                "storage_options token)"
            )
        return "the folder permissions"


# ------------------------------------------------------------------------------------------ opening


def open_location(url: str, storage_options: Mapping[str, Any] | None = None) -> Location:
    """Resolve ``url`` (local path, ``file://``, ``s3://bucket/path``, ``gs://bucket/path``) to a Location.

    ``storage_options`` are fsspec options for the filesystem (s3fs / gcsfs); they override anything taken
    from the environment. Raises :class:`~ndvi_scale.errors.InputError` for an unknown scheme or a malformed
    URL. Does no network I/O except what gcsfs does to discover default Google credentials (call
    :meth:`Location.check_access` to probe).
    """
    if not isinstance(url, str) or not url.strip():
        raise InputError("out is empty; give a local path, gs://bucket/path or s3://bucket/path")
    raw = url.strip()
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter, "C:\\..."
        scheme = ""
    if scheme not in _SCHEMES:
        raise InputError(
            f"out scheme {shown(scheme + '://')} is not supported; expected a local path, gs://bucket/path or "
            "s3://bucket/path"
        )
    protocol = _SCHEMES[scheme]
    opts: dict[str, Any] = dict(storage_options or {})
    if protocol == "file":
        return _open_local(raw if not scheme else parts.path, opts)
    if "@" in parts.netloc or parts.password is not None:
        # fsspec would accept s3://KEY:SECRET@bucket; refuse so secrets never end up in URLs, logs or
        # provenance.
        raise InputError(
            f"out {protocol}://... contains credentials in the URL; remove them and use "
            + (
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                if protocol == "s3"
                else "GOOGLE_APPLICATION_CREDENTIALS"
            )
        )
    bucket = parts.netloc
    key = parts.path.strip("/")
    if not bucket:
        raise InputError(f"out {shown(raw)} has no bucket; expected {protocol}://bucket/path")
    if not _BUCKET_RE.match(bucket):
        raise InputError(
            f"out bucket {shown(bucket)} is not a valid bucket name; expected 3-222 lowercase letters, digits, "
            f"'.', '-' or '_', e.g. {protocol}://my-bucket/ndvi.zarr"
        )
    path = f"{bucket}/{key}" if key else bucket
    if protocol == "s3":
        opts, endpoint, source = _s3_options(opts)
    else:
        opts, endpoint, source = _gcs_options(opts)
    try:
        fs = fsspec.filesystem(protocol, **opts)
    except NdviScaleError:
        raise
    except Exception as exc:  # e.g. google-auth refusing a broken GOOGLE_APPLICATION_CREDENTIALS file
        loc = Location(
            f"{protocol}://{path}", protocol, path, endpoint, source, opts, fsspec.filesystem("memory")
        )
        raise storage_error(exc, loc, "opening") from None
    return Location(f"{protocol}://{path}", protocol, path, endpoint, source, opts, fs)


@dataclass(frozen=True)
class LocationSpec:
    """What a dask task needs to re-open a :class:`Location`. Task arguments end up in scheduler/worker logs
    when a task fails, so the options (which may hold credentials) stay out of ``repr``."""

    url: str
    options_json: str = field(repr=False)


@functools.lru_cache(maxsize=32)
def location_from_spec(spec: LocationSpec) -> Location:
    """Re-open a location from :meth:`Location.spec`; cached per process (dask tasks call it per region)."""
    return open_location(spec.url, json.loads(spec.options_json))


_store_lock = threading.Lock()
_stores: dict[LocationSpec, Any] = {}


def store_from_spec(spec: LocationSpec) -> Any:
    """A Zarr store for a :meth:`Location.spec`, shared by all tasks of a process (stores are thread-safe)."""
    with _store_lock:
        if spec not in _stores:
            _stores[spec] = location_from_spec(spec).store
        return _stores[spec]


def _open_local(path: str, opts: dict[str, Any]) -> Location:
    if opts:
        raise InputError(
            f"storage_options {sorted(opts)} were given for the local path {path}; they apply to gs:// and "
            "s3:// only"
        )
    full = os.path.abspath(os.path.expanduser(path))
    fs = fsspec.filesystem("file", auto_mkdir=True)
    return Location(full, "file", full, None, "local file permissions", {}, fs)


def _s3_options(opts: dict[str, Any]) -> tuple[dict[str, Any], str | None, str]:
    env = os.environ
    client_kwargs = dict(opts.pop("client_kwargs", None) or {})
    endpoint = (
        opts.pop("endpoint_url", None)
        or client_kwargs.pop("endpoint_url", None)
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
        or None
    )
    region = client_kwargs.get("region_name") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    if endpoint:
        opts["endpoint_url"] = endpoint
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    if opts.get("anon"):
        source = "anonymous access (storage_options anon=True)"
    elif opts.get("key") or opts.get("secret") or opts.get("profile"):
        source = "storage_options"
    elif env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        opts["key"] = env["AWS_ACCESS_KEY_ID"]
        opts["secret"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            opts["token"] = env["AWS_SESSION_TOKEN"]
        source = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    elif env.get("AWS_PROFILE"):
        opts["profile"] = env["AWS_PROFILE"]
        source = f"AWS_PROFILE={env['AWS_PROFILE']}"
    else:
        source = "the default AWS credential chain (config files, instance role)"
    # Short connect timeout and a bounded number of attempts: a wrong endpoint must fail in seconds, not
    # minutes.
    config = dict(opts.pop("config_kwargs", None) or {})
    config.setdefault("connect_timeout", CONNECT_TIMEOUT)
    config.setdefault("read_timeout", 60)
    config.setdefault("retries", {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"})
    opts["config_kwargs"] = config
    # Listings must reflect what zarr (a separate, asynchronous instance) just wrote.
    opts.setdefault("use_listings_cache", False)
    return opts, _clean_url(endpoint) if endpoint else None, source


def _gcs_options(opts: dict[str, Any]) -> tuple[dict[str, Any], str | None, str]:
    env = os.environ
    emulator = env.get("STORAGE_EMULATOR_HOST", "")
    if emulator in ("", "default"):
        emulator = ""
    if emulator and "://" not in emulator:
        emulator = f"http://{emulator}"
    endpoint = opts.get("endpoint_url") or emulator or None
    if endpoint:
        opts["endpoint_url"] = endpoint
    if "token" in opts:
        source = "storage_options token"
    elif emulator and endpoint == emulator:
        opts["token"] = "anon"  # emulators accept anything; anonymous avoids a credential lookup
        source = "anonymous access (STORAGE_EMULATOR_HOST)"
    elif env.get("GOOGLE_APPLICATION_CREDENTIALS"):
        opts["token"] = env["GOOGLE_APPLICATION_CREDENTIALS"]  # a file path, not a secret
        source = "GOOGLE_APPLICATION_CREDENTIALS"
    else:
        source = "gcloud application-default credentials or the metadata server"
    opts.setdefault("use_listings_cache", False)
    shown = _clean_url(endpoint) if endpoint else "https://storage.googleapis.com"
    return opts, shown, source


# ------------------------------------------------------------------------------------------- errors


def storage_error(
    exc: BaseException, loc: Location, action: str, *, missing: str | None = None
) -> StorageError:
    """Translate an exception from fsspec/s3fs/gcsfs/botocore/aiohttp/OS into one clear StorageError.

    ``action`` is a verb for the fallback message (``writing``, ``reading``, ...). ``missing="bucket"`` says
    that a not-found error can only mean the bucket (the caller listed a prefix).
    """
    if isinstance(exc, StorageError):
        return exc
    kind = _classify(exc)
    reason = _short(exc, loc)
    where = loc.endpoint or "the local filesystem"
    if kind == "notfound" and (missing == "bucket" or _mentions_bucket(exc)) and not loc.is_local:
        return StorageError(
            f"bucket {loc.bucket} does not exist at {where}; create it or fix --out (got {loc.url})"
        )
    if kind == "nocreds":
        return StorageError(
            f"no credentials found for {loc.url} (looked in {loc.credential_source}); set "
            f"{loc._credential_hint()}"
        )
    if kind == "denied":
        if loc.is_local:
            return StorageError(
                f"{action} {loc.url} failed: permission denied ({reason}); choose a writable --out"
            )
        return StorageError(
            f"access to {loc.url} denied at {where} ({reason}); check {loc._credential_hint()} "
            f"(credentials came from {loc.credential_source}) and that they may list, read and write "
            "this bucket"
        )
    if kind == "unreachable":
        return StorageError(f"cannot reach {where}: {reason}; check {loc._endpoint_hint()} / network")
    if kind == "notfound":
        return StorageError(f"{action} {loc.url} failed: not found ({reason}); was it deleted meanwhile?")
    if kind == "nospace":
        return StorageError(
            f"{action} {loc.url} failed: no space left ({reason}); free space or choose another --out"
        )
    return StorageError(f"{action} {loc.url} failed: {type(exc).__name__}: {reason}")


def _classify(exc: BaseException) -> str:
    for e in exception_chain(exc):
        name = type(e).__name__
        text = str(e)
        if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
            return "nocreds"
        if name in ("NoSuchBucket",) or "NoSuchBucket" in text:
            return "notfound"
        if isinstance(e, PermissionError) or name in ("RefreshError", "InvalidAccessKeyId", "AccessDenied"):
            return "denied"
        code = getattr(e, "code", None)
        if name == "HttpError" and code in (401, 403):
            return "denied"
        if isinstance(e, OSError) and re.match(r"^(Forbidden|Unauthorized)\b", text):
            return "denied"  # gcsfs raises OSError("Forbidden: <path>") for HTTP 403
        if name in (
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ConnectionClosedError",
            "ClientConnectorError",
            "ClientConnectionError",
            "ServerDisconnectedError",
            "ServerTimeoutError",
            "FSTimeoutError",
            "ProxyConnectionError",
        ) or isinstance(e, ConnectionError | TimeoutError | asyncio.TimeoutError | socket.gaierror):
            return "unreachable"
        if isinstance(e, FileNotFoundError):
            return "notfound"
        if isinstance(e, OSError) and getattr(e, "errno", None) == 28:
            return "nospace"
    return "other"


def _mentions_bucket(exc: BaseException) -> bool:
    return any("bucket" in str(e).lower() for e in exception_chain(exc))


def _short(exc: BaseException, loc: Location | None = None) -> str:
    """First line of the message, shortened, with anything that looks like a secret removed."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = redact(text, loc.storage_options if loc is not None else None)
    return text if len(text) <= 240 else text[:237] + "..."


def redact(text: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Remove secret values (from ``storage_options`` and the usual environment variables) and URL users."""
    secrets: list[str] = []
    for k, v in (storage_options or {}).items():
        if isinstance(v, str) and any(s in k.lower() for s in _SECRET_KEYS) and len(v) >= 4:
            secrets.append(v)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        v = os.environ.get(var, "")
        if len(v) >= 4:
            secrets.append(v)
    for s in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(s, "***")
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", text)


def _clean_url(url: str) -> str:
    """The URL without user:password."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return parts._replace(netloc=host).geturl()
    return url


def _proxy_configured() -> bool:
    return any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")
    )


def _run(fs: Any, coro: Any, timeout: float) -> Any:
    """Run an fsspec coroutine on the filesystem's loop with an overall timeout."""

    async def _wrapped() -> Any:
        return await coro

    return sync(fs.loop, _wrapped, timeout=timeout)
