"""Tests of ndvi_scale.storage: URL parsing, credentials from the environment, and one clear, fast
StorageError per failure (missing bucket, wrong or missing credentials, unreachable endpoint) against real
local servers."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest

from ndvi_scale.errors import InputError, StorageError
from ndvi_scale.storage import Location, open_location, redact
from servers import S3_ACCESS_KEY, S3_SECRET_KEY, Server, closed_port

pytestmark = pytest.mark.usefixtures("clean_cloud_env")

FAST = 10.0  # seconds: every failure must be reported quicker than this


def _fails_fast(loc: Location) -> StorageError:
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        loc.check_access()
    elapsed = time.monotonic() - start
    assert elapsed < FAST, f"took {elapsed:.1f} s"
    message = str(info.value)
    assert S3_SECRET_KEY not in message and "\n" not in message
    return info.value


# ------------------------------------------------------------------------------------------- parsing


def test_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = open_location("out/cube.zarr")
    assert rel.is_local and rel.url == rel.path == str(tmp_path / "out" / "cube.zarr")
    assert rel.bucket is None and rel.endpoint is None
    assert open_location(f"file://{tmp_path}/c.zarr").path == str(tmp_path / "c.zarr")
    assert open_location("~/x.zarr").path == os.path.expanduser("~/x.zarr")
    assert not rel.exists()
    rel.check_access()  # parent folders will be created


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("", "out is empty"),
        ("http://example.org/cube.zarr", "scheme 'http://' is not supported"),
        ("az://container/cube.zarr", "scheme 'az://' is not supported"),
        ("s3:///cube.zarr", "has no bucket"),
        ("gs://Bad_Bucket!/x", "not a valid bucket name"),
        ("s3://AKIAKEY:supersecret@bucket/x", "credentials in the URL"),
    ],
)
def test_bad_urls_are_input_errors(url: str, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        open_location(url)
    assert "supersecret" not in str(info.value)


def test_storage_options_for_a_local_path_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="apply to gs:// and s3:// only"):
        open_location(str(tmp_path / "x"), {"anon": True})


def test_s3_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMIexample")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    loc = open_location("s3://bucket/some/cube.zarr/")
    assert loc.url == "s3://bucket/some/cube.zarr" and loc.bucket == "bucket" and loc.key == "some/cube.zarr"
    opts = loc.storage_options
    assert opts["key"] == "AKIDEXAMPLE" and opts["secret"] == "wJalrXUtnFEMIexample"
    assert (
        opts["endpoint_url"] == "http://127.0.0.1:1" and opts["client_kwargs"]["region_name"] == "eu-west-3"
    )
    assert (
        opts["config_kwargs"]["connect_timeout"] <= 10
        and opts["config_kwargs"]["retries"]["max_attempts"] <= 5
    )
    assert loc.credential_source == "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    assert "wJalrXUtnFEMIexample" not in repr(loc) and "wJalrXUtnFEMIexample" not in repr(loc.spec())
    assert pickle.loads(pickle.dumps(loc.spec())) == loc.spec()

    # The service-specific endpoint wins over the generic one; explicit storage_options win over everything.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    assert open_location("s3://bucket/x").endpoint == "http://127.0.0.1:2"
    explicit = open_location(
        "s3://bucket/x", {"key": "k2", "secret": "s2", "endpoint_url": "http://user:pw@127.0.0.1:3"}
    )
    assert explicit.storage_options["key"] == "k2" and explicit.credential_source == "storage_options"
    assert explicit.endpoint == "http://127.0.0.1:3", "no user:password in the endpoint shown in messages"

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_PROFILE", "research")
    profiled = open_location("s3://bucket/x")
    assert profiled.storage_options["profile"] == "research" and "key" not in profiled.storage_options


def test_gcs_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")
    emu = open_location("gs://bucket/cube.zarr")
    assert emu.storage_options["token"] == "anon" and emu.endpoint == "http://127.0.0.1:4443"
    assert open_location("gcs://bucket/cube.zarr").url == "gs://bucket/cube.zarr"

    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "sa.json"))
    opts = open_location("gs://bucket/cube.zarr", {"token": "anon", "endpoint_url": "http://127.0.0.1:1"})
    assert opts.storage_options["token"] == "anon", "explicit storage_options override the environment"


def test_redact_removes_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "topsecretvalue")
    text = "failed with topsecretvalue at http://bob:hunter2@host/x using tok-12345"
    out = redact(text, {"token": "tok-12345"})
    assert "topsecretvalue" not in out and "hunter2" not in out and "tok-12345" not in out


def test_local_access_problems(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        open_location(str(blocker / "sub" / "cube.zarr")).check_access()
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(StorageError, match="permission denied"):
            open_location(str(ro / "cube.zarr")).check_access()


def test_delete_refuses_dangerous_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match="refusing to delete"):
        open_location(str(tmp_path)).delete()
    with pytest.raises(StorageError, match="refusing to delete"):
        open_location("/").delete()


# ------------------------------------------------------------------------------------------- S3 (SeaweedFS)


def test_s3_access_and_exists(s3_bucket: str) -> None:
    loc = open_location(f"s3://{s3_bucket}/cubes/a.zarr")
    loc.check_access()
    assert not loc.exists()
    loc.fs.pipe_file(loc.join("zarr.json"), b"{}")
    assert loc.exists() and loc.read_bytes("zarr.json") == b"{}" and loc.read_bytes("missing") is None


def test_s3_delete_touches_nothing_else(s3_bucket: str) -> None:
    loc = open_location(f"s3://{s3_bucket}/run/a.zarr")
    keep = [
        f"{s3_bucket}/run/a.zarr2/x",
        f"{s3_bucket}/run/a.zarr.stac-item.json",
        f"{s3_bucket}/run/a.zarrx",
    ]
    for path in [*keep, loc.join("zarr.json"), loc.join("ndvi/c/0/0/0")]:
        loc.fs.pipe_file(path, b"1")
    loc.delete()
    assert not loc.exists()
    assert sorted(loc.fs.find(f"{s3_bucket}/run")) == sorted(keep)
    with pytest.raises(StorageError, match="whole bucket"):
        open_location(f"s3://{s3_bucket}").delete()


def test_s3_wrong_credentials(s3_env: Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-right-secret")
    err = _fails_fast(open_location(f"s3://{s3_bucket}/cube.zarr"))
    assert str(err).startswith(f"access to s3://{s3_bucket}/cube.zarr denied at {s3_env.endpoint}")
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in str(err) and "not-the-right-secret" not in str(err)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unknown-key")
    err = _fails_fast(open_location(f"s3://{s3_bucket}/cube.zarr"))
    assert "denied" in str(err) and "unknown-key" not in str(err)

    # The same failure surfaces as the same single error from write_cube, before anything is computed.
    from ndvi_scale.write import write_cube
    from test_write import make_cube

    with pytest.raises(StorageError, match="denied"):
        write_cube(make_cube(sleep=30), f"s3://{s3_bucket}/cube.zarr")


def test_s3_missing_credentials(s3_env: Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    err = _fails_fast(open_location(f"s3://{s3_bucket}/cube.zarr"))
    assert str(err).startswith(f"no credentials found for s3://{s3_bucket}/cube.zarr")
    assert "AWS_ACCESS_KEY_ID" in str(err)


def test_s3_missing_bucket(s3_env: Server) -> None:
    err = _fails_fast(open_location("s3://no-such-bucket-here/cube.zarr"))
    assert str(err) == (
        f"bucket no-such-bucket-here does not exist at {s3_env.endpoint}; create it or fix --out "
        "(got s3://no-such-bucket-here/cube.zarr)"
    )


def test_s3_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    port = closed_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    err = _fails_fast(open_location("s3://bucket/cube.zarr"))
    assert str(err).startswith(f"cannot reach http://127.0.0.1:{port}: ")
    assert "AWS_ENDPOINT_URL" in str(err)


# ------------------------------------------------------------------------------------------- GCS (emulator)


def test_gcs_access_exists_and_delete(gcs_bucket: str) -> None:
    loc = open_location(f"gs://{gcs_bucket}/run/a.zarr")
    loc.check_access()
    assert not loc.exists()
    keep = [f"{gcs_bucket}/run/a.zarr2/x", f"{gcs_bucket}/run/a.zarr.stac-item.json"]
    for path in [*keep, loc.join("zarr.json"), loc.join("ndvi/c/0/0/0")]:
        loc.fs.pipe_file(path, b"1")
    assert loc.exists()
    loc.delete()
    assert not loc.exists()
    assert sorted(loc.fs.find(f"{gcs_bucket}/run")) == sorted(keep)


def test_gcs_missing_bucket(gcs_env: Server) -> None:
    err = _fails_fast(open_location("gs://no-such-bucket-here/cube.zarr"))
    assert str(err).startswith(f"bucket no-such-bucket-here does not exist at {gcs_env.endpoint}")


def test_gcs_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    port = closed_port()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    err = _fails_fast(open_location("gs://bucket/cube.zarr"))
    assert str(err).startswith(f"cannot reach http://127.0.0.1:{port}: ")
    assert "STORAGE_EMULATOR_HOST" in str(err)
