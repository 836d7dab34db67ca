"""Shared fixtures: real local object-storage servers, started once per test session on 127.0.0.1.

* ``seaweedfs`` / ``s3_env`` / ``s3_bucket``: S3 (SeaweedFS ``weed mini``, authentication on).
* ``gcs_emulator`` / ``gcs_env`` / ``gcs_bucket``: Google Cloud Storage (gcp-storage-emulator).
* ``clean_cloud_env``: hides the developer's cloud credentials, endpoints and proxies from a test.

Servers are stopped by PID at the end of the session. If a server binary is missing the tests using it FAIL
with the pip command to run (see tests/servers.py); nothing is skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

# gcsfs reads this when imported: without it every gcsfs call against the emulator stalls for 60 s.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Credential discovery must never leave this machine: no cloud instance-metadata lookups.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["NO_GCE_CHECK"] = "True"
os.environ["GCE_METADATA_HOST"] = "127.0.0.1:9"
os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"

import pytest  # noqa: E402

from servers import Server, ServerError, start_gcs_emulator, start_seaweedfs  # noqa: E402

#: A short temporary root when none is given (``--basetemp``): error lines cut every quoted value at 80 characters,
#: and tests check that the paths they name are whole. pytest's default root plus xdist's per-worker folder
#: (``/tmp/pytest-of-USER/pytest-N/popen-gwK/``) pushed some test paths past 80.
_SHORT_BASETEMP: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _SHORT_BASETEMP
    if config.option.basetemp or hasattr(config, "workerinput"):  # given, or an xdist worker (gets the root's)
        return
    import tempfile

    _SHORT_BASETEMP = config.option.basetemp = tempfile.mkdtemp(prefix="nst-")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SHORT_BASETEMP is not None:
        import shutil

        shutil.rmtree(_SHORT_BASETEMP, ignore_errors=True)

#: Test modules that start real servers, clusters or notebook kernels: marked ``integration`` (a unit run is
#: ``pytest -m "not integration"``).
INTEGRATION_MODULES = {
    "test_cluster", "test_pipeline_cluster", "test_notebooks", "test_storage", "test_cube_cli", "test_faults",
    "test_write", "test_search", "test_deploy", "test_ranges",
}
INTEGRATION_MODULES |= {"test_viz_html"}  # starts a headless Chromium


def _stackstac_installed() -> bool:
    try:
        import stackstac  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the integration modules; leave the ``stackstac`` tests to their own environment where stackstac is not
    installed (tests/test_stackstac_compat.py runs them there and fails if any fails)."""
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)
    if _stackstac_installed():
        return
    keep = [i for i in items if i.get_closest_marker("stackstac") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("stackstac") is not None])
        items[:] = keep


from servers import S3_ACCESS_KEY, S3_SECRET_KEY  # noqa: E402

_ENV_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_PROFILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "STORAGE_EMULATOR_HOST",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
)


@pytest.fixture
def clean_cloud_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The test sees none of the developer's cloud settings (~/.aws, gcloud, proxies, endpoints, keys)."""
    for var in (*_ENV_TO_CLEAR, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    nowhere = tmp_path_factory.getbasetemp() / "no-cloud-config"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(nowhere / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere / "aws-credentials"))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(nowhere / "gcloud"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def _start(factory: object, *args: object, **kwargs: object) -> Server:
    try:
        return factory(*args, **kwargs)  # type: ignore[operator]
    except ServerError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A SeaweedFS S3 server; requests must be signed with S3_ACCESS_KEY/S3_SECRET_KEY."""
    server = _start(
        start_seaweedfs,
        tmp_path_factory.mktemp("seaweedfs"),
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gcp-storage-emulator server (anonymous access, like any emulator)."""
    server = _start(
        start_gcs_emulator, tmp_path_factory.mktemp("gcs") / "data", default_bucket="ndvi-default"
    )
    yield server
    server.stop()


@pytest.fixture
def s3_env(seaweedfs: Server, monkeypatch: pytest.MonkeyPatch, clean_cloud_env: None) -> Server:
    """Environment of a user pointed at the SeaweedFS server with valid credentials."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return seaweedfs


@pytest.fixture
def s3_bucket(s3_env: Server) -> str:
    """A fresh, empty bucket on the SeaweedFS server (with s3_env set)."""
    import s3fs

    name = f"t-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(
        key=S3_ACCESS_KEY, secret=S3_SECRET_KEY, endpoint_url=s3_env.endpoint, skip_instance_cache=True
    )
    fs.mkdir(name)
    return name


@pytest.fixture
def gcs_env(gcs_emulator: Server, monkeypatch: pytest.MonkeyPatch, clean_cloud_env: None) -> Server:
    """Environment of a user pointed at the GCS emulator (STORAGE_EMULATOR_HOST)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.endpoint)
    return gcs_emulator


@pytest.fixture
def gcs_bucket(gcs_env: Server) -> str:
    """A fresh, empty bucket on the GCS emulator (with gcs_env set)."""
    import gcsfs

    name = f"t-{uuid.uuid4().hex[:12]}"
    fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=gcs_env.endpoint, skip_instance_cache=True)
    fs.mkdir(name)
    return name
