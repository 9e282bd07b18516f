"""The deployment files stay true to the code they deploy.

Docker and Kubernetes do not run on the development machines, so nothing here builds an image or
starts a stack. These tests read the Dockerfile, .dockerignore, docker-compose.yml,
deploy/nginx.conf and deploy/kubernetes/*.yaml and check them against the real settings model, the
real CLI parser and the OpenAPI document (see docs/deployment.md, "What was validated and what was
not run").
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from liveness_proxy.api.openapi import build_openapi
from liveness_proxy.cli import build_parser
from liveness_proxy.settings import Settings, settings_from_mapping

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
K8S_DIR = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"

COMPOSE_SERVICES = {"postgres", "redis", "proxy-1", "proxy-2", "lb"}
PROXY_SERVICES = ("proxy-1", "proxy-2")
REQUIRED_KINDS = {
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "ConfigMap",
}
# The only ports the proxy's pods may open connections to: DNS, PostgreSQL, Redis, HTTPS.
ALLOWED_EGRESS_PORTS = {53, 5432, 6379, 443}
GRACEFUL_SHUTDOWN_SECONDS = 10  # uvicorn's timeout_graceful_shutdown in `serve`
# Strings the files must contain (compared, never bound to or written to).
ALL_INTERFACES = "0.0.0.0"  # noqa: S104
CONTAINER_TMP = "/tmp"  # noqa: S108

SETTINGS = frozenset(Settings.model_fields)
# The secrets: settings that can also be read from a file named by NAME_FILE.
FILE_BACKED = frozenset(
    name.removesuffix("_file")
    for name in SETTINGS
    if name.endswith("_file") and name.removesuffix("_file") in SETTINGS
)
# Plausible stand-ins for the secret files, to check that a configuration loads.
SECRET_STAND_INS = {
    "liveness_proxy_database_url": "postgresql://liveness:pw@postgres:5432/liveness",
    "liveness_proxy_redis_url": "redis://:pw@redis:6379/0",
}


# -- reading the files ------------------------------------------------------------------------------


def _mapping(value: object, where: str) -> dict[str, Any]:
    assert isinstance(value, dict), f"{where}: expected a mapping, got {type(value).__name__}"
    return value


def _yaml_documents(path: Path) -> list[dict[str, Any]]:
    documents = yaml.safe_load_all(path.read_text(encoding="utf-8"))
    return [_mapping(doc, path.name) for doc in documents if doc is not None]


@cache
def _compose() -> dict[str, Any]:
    (document,) = _yaml_documents(COMPOSE)
    return document


def _service(name: str) -> dict[str, Any]:
    return _mapping(_mapping(_compose()["services"], "services")[name], name)


def _compose_environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        return dict(str(item).split("=", 1) for item in environment)
    return {str(key): "" if value is None else str(value) for key, value in environment.items()}


def _k8s_files() -> list[Path]:
    return sorted(path for path in K8S_DIR.glob("*.yaml") if path != KUSTOMIZATION)


@cache
def _k8s_documents() -> tuple[dict[str, Any], ...]:
    return tuple(doc for path in _k8s_files() for doc in _yaml_documents(path))


def _k8s_one(kind: str) -> dict[str, Any]:
    found = [doc for doc in _k8s_documents() if doc.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind} in deploy/kubernetes/, found {len(found)}"
    return found[0]


def _pod_spec() -> dict[str, Any]:
    return _mapping(_k8s_one("Deployment")["spec"]["template"]["spec"], "pod spec")


def _container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1, "the pod runs exactly one container"
    return _mapping(containers[0], "container")


def _pod_labels() -> dict[str, str]:
    return _mapping(_k8s_one("Deployment")["spec"]["template"]["metadata"]["labels"], "pod labels")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


@cache
def _dockerfile() -> tuple[Instruction, ...]:
    """Instructions with continuation lines joined and comments dropped, as the builder reads them."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, value = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return tuple(instructions)


def _final_stage() -> list[Instruction]:
    instructions = list(_dockerfile())
    last_from = max(i for i, instruction in enumerate(instructions) if instruction.keyword == "FROM")
    return instructions[last_from:]


def _one(keyword: str) -> str:
    values = [instruction.value for instruction in _final_stage() if instruction.keyword == keyword]
    assert values, f"the final stage of the Dockerfile has no {keyword}"
    return values[-1]  # the last one wins, as in Docker


def _exec_form(keyword: str) -> list[str]:
    value = json.loads(_one(keyword))
    assert isinstance(value, list), f"{keyword} must use the exec (JSON array) form"
    assert all(isinstance(item, str) for item in value)
    return value


def _image_port() -> int:
    return int(_one("EXPOSE").split()[0].split("/")[0])


def _image_uid() -> int:
    user = _one("USER").split(":")[0]
    assert user.isdigit(), f"USER must be numeric (Kubernetes cannot check runAsNonRoot for {user!r})"
    return int(user)


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rules, closely enough for these paths: the last matching line wins, a line also
    matches everything below a directory it matches, `**/` matches any number of directories."""
    rules: list[tuple[str, bool]] = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((line.removeprefix("!").strip("/"), negated))
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    excluded = False
    for pattern, negated in rules:
        variants = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(prefix, variant) for prefix in prefixes for variant in variants):
            excluded = not negated
    return excluded


def _nginx_conf() -> str:
    return re.sub(r"#[^\n]*", "", NGINX_CONF.read_text(encoding="utf-8"))


def _served_get_paths() -> set[str]:
    paths = _mapping(build_openapi()["paths"], "paths")
    return {path for path, operations in paths.items() if "get" in operations}


def _setting_name_problems(names: Iterable[str]) -> list[str]:
    problems = []
    for name in names:
        if name != name.upper():
            problems.append(f"{name}: settings are documented in upper case")
        if name.lower() in SETTINGS:
            continue  # a setting that is itself a path (LIVENESS_PROXY_AUDIT_KEYS_FILE)
        if name.endswith("_FILE"):
            if name.lower().removesuffix("_file") not in FILE_BACKED:
                problems.append(f"{name}: {name.removesuffix('_FILE')} is not a setting that takes a file")
        elif name.lower() not in SETTINGS:
            problems.append(f"{name}: not a setting of liveness_proxy.settings.Settings")
    return problems


def _settings_from(environment: dict[str, str], tmp_path: Path) -> Settings:
    """Loads settings as the container would, with stand-in files for the *_FILE secrets."""
    values: dict[str, str] = {}
    for name, value in environment.items():
        if name.endswith("_FILE"):
            field = name.lower().removesuffix("_file")
            stand_in = tmp_path / field
            stand_in.write_text(SECRET_STAND_INS.get(field, "s" * 48) + "\n", encoding="utf-8")
            value = str(stand_in)
        values[name] = value
    return settings_from_mapping(values)


def _resolve_compose_variables(value: str) -> str:
    """`${NAME:-default}` gives its default, `${NAME:?message}` (required) an example value."""
    value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{\w+:\?[^}]*\}", "example-domain-id", value)


def _walk_strings(value: object) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _walk_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk_strings(item)


_CREDENTIALED_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@", re.IGNORECASE)


# -- every file parses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [COMPOSE, *_k8s_files(), KUSTOMIZATION],
    ids=lambda path: str(path.relative_to(ROOT)),
)
def test_yaml_file_parses_into_mappings(path: Path) -> None:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    assert _yaml_documents(path), f"{path.relative_to(ROOT)} holds no document"


def test_the_kubernetes_directory_is_not_empty() -> None:
    assert len(_k8s_files()) >= len(REQUIRED_KINDS)


# -- Dockerfile --------------------------------------------------------------------------------------


def test_dockerfile_builds_in_one_stage_and_runs_in_another_on_the_same_base() -> None:
    froms = [instruction.value.split() for instruction in _dockerfile() if instruction.keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    images = {words[0] for words in froms}
    assert len(images) == 1, f"the venv is copied between stages, so both need one base image: {images}"
    copies = [instruction.value for instruction in _final_stage() if instruction.keyword == "COPY"]
    assert any(value.startswith("--from=") for value in copies), "the runtime stage copies the build"
    assert not any(
        instruction.keyword == "RUN" and "pip install" in instruction.value for instruction in _final_stage()
    ), "nothing is installed in the runtime stage"
    base_default = next(
        instruction.value.split("=", 1)[1]
        for instruction in _dockerfile()
        if instruction.keyword == "ARG" and instruction.value.startswith("PYTHON_IMAGE=")
    )
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base_default), base_default


def test_dockerfile_runs_as_a_fixed_non_root_user() -> None:
    assert _image_uid() != 0


def test_dockerfile_healthcheck_asks_the_process_on_healthz() -> None:
    healthcheck = _one("HEALTHCHECK")
    assert " CMD " in f" {healthcheck} ", "HEALTHCHECK runs a command"
    assert f"127.0.0.1:{_image_port()}/healthz" in healthcheck
    assert "/healthz" in _served_get_paths()


def test_dockerfile_entrypoint_and_cmd_are_the_serve_command() -> None:
    entrypoint = _exec_form("ENTRYPOINT")
    command = _exec_form("CMD")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert entrypoint[0] in scripts, f"{entrypoint[0]} is not a console script of the project"
    args = build_parser().parse_args([*entrypoint[1:], *command])
    assert args.command == "serve"
    assert args.handler.__name__ == "cmd_serve"
    assert args.host == ALL_INTERFACES
    assert args.port == _image_port()
    assert args.workers == 1, "one worker per container: scale with replicas"


def test_readme_documents_the_serve_command() -> None:
    assert "liveness-proxy serve" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_dockerfile_copies_files_that_exist_and_that_the_build_context_keeps() -> None:
    for instruction in _dockerfile():
        if instruction.keyword != "COPY" or instruction.value.startswith("--from="):
            continue
        words = [word for word in instruction.value.split() if not word.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert not _dockerignore_excludes(source), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_the_sources_and_nothing_private() -> None:
    sources = [
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "src").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and not path.parent.name.endswith(".egg-info")
    ]
    assert sources
    kept = ["pyproject.toml", "constraints.txt", "README.md", *sources]
    assert [path for path in kept if _dockerignore_excludes(path)] == []
    private = [
        ".venv/bin/python",
        ".git/HEAD",
        ".env",
        "src/.env",
        "liveness-proxy.db",
        "src/liveness-proxy.db-wal",
        ".liveness-demo/pepper",
        "secrets/database_url.txt",
        "tests/test_flow.py",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/cache.db",
        ".ruff_cache/CACHEDIR.TAG",
        "src/liveness_proxy/__pycache__/cli.cpython-311.pyc",
        "src/liveness_proxy.egg-info/PKG-INFO",
    ]
    assert [path for path in private if not _dockerignore_excludes(path)] == []


# -- docker-compose.yml ---------------------------------------------------------------------------


def test_compose_has_the_five_services() -> None:
    assert set(_mapping(_compose()["services"], "services")) == COMPOSE_SERVICES


@pytest.mark.parametrize("name", PROXY_SERVICES)
def test_compose_proxy_variables_are_real_settings(name: str) -> None:
    assert _setting_name_problems(_compose_environment(_service(name))) == []


@pytest.mark.parametrize("name", PROXY_SERVICES)
def test_compose_proxy_takes_every_secret_from_a_mounted_file(name: str) -> None:
    service = _service(name)
    environment = _compose_environment(service)
    inline = sorted(variable for variable in environment if variable.lower() in FILE_BACKED)
    assert inline == [], f"secret values set inline: {inline}"
    mounted: set[str] = set()
    for entry in service.get("secrets", []):
        mounted.add(entry if isinstance(entry, str) else entry.get("target", entry["source"]))
    top_level = _mapping(_compose()["secrets"], "secrets")
    for field in sorted(FILE_BACKED):
        variable = f"{field.upper()}_FILE"
        assert variable in environment, f"{name}: {variable} is not set"
        path = PurePosixPath(environment[variable])
        assert path.parent == PurePosixPath("/run/secrets"), f"{variable}: {path} is not a mounted secret"
        assert path.name in mounted, f"{variable}: secret {path.name} is not mounted into {name}"
        source = top_level[path.name]["file"]
        assert source.startswith("./secrets/"), f"secret {path.name} must come from ./secrets/"


@pytest.mark.parametrize("name", PROXY_SERVICES)
def test_compose_proxy_configuration_loads(name: str, tmp_path: Path) -> None:
    environment = {
        variable: _resolve_compose_variables(value)
        for variable, value in _compose_environment(_service(name)).items()
    }
    settings = _settings_from(environment, tmp_path)
    settings.require_proxy_secrets()
    assert settings.liveness_proxy_redis_url.get_secret_value()
    assert settings.database_url.startswith("postgresql+asyncpg://")


def test_compose_carries_no_credentials_inline() -> None:
    credentialed = [text for text in _walk_strings(_compose()) if _CREDENTIALED_URL.search(text)]
    assert credentialed == []
    postgres = _compose_environment(_service("postgres"))
    assert "POSTGRES_PASSWORD" not in postgres
    assert postgres.get("POSTGRES_PASSWORD_FILE", "").startswith("/run/secrets/")
    for service_name in COMPOSE_SERVICES:
        for variable in _compose_environment(_service(service_name)):
            if re.search(r"PASSWORD|SECRET|PEPPER", variable):
                assert variable.endswith("_FILE"), f"{service_name}: {variable} set inline"


def test_compose_services_have_healthchecks() -> None:
    for name in COMPOSE_SERVICES:
        healthcheck = _mapping(_service(name).get("healthcheck"), f"{name}: healthcheck")
        assert not healthcheck.get("disable", False)
        test = healthcheck["test"]
        assert test, f"{name}: empty healthcheck"
        assert test != ["NONE"], f"{name}: healthcheck disabled"
    command = " ".join
    assert "pg_isready" in command(_service("postgres")["healthcheck"]["test"])
    assert "ping" in command(_service("redis")["healthcheck"]["test"])
    for name in PROXY_SERVICES:
        assert f"127.0.0.1:{_image_port()}/healthz" in command(_service(name)["healthcheck"]["test"])


def test_compose_starts_each_service_after_what_it_needs_is_healthy() -> None:
    needs = {name: {"postgres", "redis"} for name in PROXY_SERVICES} | {"lb": set(PROXY_SERVICES)}
    for name, dependencies in needs.items():
        depends_on = _mapping(_service(name).get("depends_on"), f"{name}: depends_on")
        assert set(depends_on) == dependencies
        for dependency in dependencies:
            assert depends_on[dependency]["condition"] == "service_healthy", f"{name} -> {dependency}"


@pytest.mark.parametrize("name", [*PROXY_SERVICES, "lb"])
def test_compose_runs_the_stateless_services_locked_down(name: str) -> None:
    service = _service(name)
    assert service.get("read_only") is True
    assert "ALL" in service.get("cap_drop", [])
    assert "no-new-privileges:true" in service.get("security_opt", [])
    assert any(str(mount).split(":")[0] == CONTAINER_TMP for mount in service.get("tmpfs", []))
    user = str(service.get("user", "0")).split(":")[0]
    assert user.isdigit(), f"{name}: user {user!r} is not numeric"
    assert int(user) != 0, f"{name} runs as root"
    if name in PROXY_SERVICES:
        assert int(user) == _image_uid()
        assert "build" in service, f"{name} is built from the Dockerfile"


def test_compose_publishes_only_the_lb_and_keeps_the_stores_internal() -> None:
    published = {name for name in COMPOSE_SERVICES if _service(name).get("ports")}
    assert published == {"lb"}
    container_ports = {str(port).rsplit(":", 1)[-1].split("/")[0] for port in _service("lb")["ports"]}
    assert container_ports == {"8080"}
    networks = _mapping(_compose()["networks"], "networks")
    for name in ("postgres", "redis"):
        for network in _service(name)["networks"]:
            assert (networks[network] or {}).get("internal") is True, f"{name} is on {network}"


# -- deploy/nginx.conf --------------------------------------------------------------------------------


def test_lb_round_robins_over_both_proxies() -> None:
    conf = _nginx_conf()
    upstreams = dict(re.findall(r"upstream\s+(\S+)\s*\{([^}]*)\}", conf))
    assert len(upstreams) == 1, "one upstream block"
    ((name, block),) = upstreams.items()
    servers = re.findall(r"^\s*server\s+([^\s;]+)", block, re.MULTILINE)
    assert sorted(servers) == sorted(f"{proxy}:{_image_port()}" for proxy in PROXY_SERVICES)
    for method in ("least_conn", "ip_hash", "hash", "random", "least_time"):
        assert not re.search(rf"^\s*{method}\b", block, re.MULTILINE), f"{method}: not round robin"
    assert re.search(rf"proxy_pass\s+http://{re.escape(name)}\s*;", conf)
    volumes = [str(volume) for volume in _service("lb").get("volumes", [])]
    assert any(volume.startswith("./deploy/nginx.conf:/etc/nginx/nginx.conf") for volume in volumes)


def test_lb_passes_the_request_id_through() -> None:
    conf = _nginx_conf()
    header = re.search(r"proxy_set_header\s+X-Request-ID\s+\$(\w+)\s*;", conf, re.IGNORECASE)
    assert header, "X-Request-ID is set explicitly on the way to the proxies"
    variable = header.group(1)
    if variable != "http_x_request_id":
        mapping = re.search(rf"map\s+\$http_x_request_id\s+\${variable}\s*\{{([^}}]*)\}}", conf)
        assert mapping, f"${variable} must be derived from the caller's X-Request-ID"
        assert re.search(r"default\s+\$http_x_request_id\s*;", mapping.group(1))


def test_lb_does_not_expose_metrics() -> None:
    assert re.search(r"location\s*=\s*/metrics\s*\{\s*return\s+404\s*;", _nginx_conf())


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("no nginx binary on this machine: deploy/nginx.conf was checked by parsing only")
    # The proxies' names resolve only on the compose network, /tmp is the container's.
    conf = NGINX_CONF.read_text(encoding="utf-8").replace(f"{CONTAINER_TMP}/", f"{tmp_path}/")
    for proxy in PROXY_SERVICES:
        conf = conf.replace(f"{proxy}:", "127.0.0.1:")
    (tmp_path / "nginx.conf").write_text(conf, encoding="utf-8")
    result = subprocess.run(
        [nginx, "-t", "-q", "-e", "stderr", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# -- deploy/kubernetes ----------------------------------------------------------------------------------


def test_every_manifest_has_api_version_kind_and_name() -> None:
    for document in _k8s_documents():
        assert document.get("apiVersion"), document
        assert document.get("kind"), document
        assert _mapping(document.get("metadata"), "metadata").get("name"), document


def test_manifests_include_the_required_kinds() -> None:
    kinds = {document["kind"] for document in _k8s_documents()}
    assert kinds >= REQUIRED_KINDS, f"missing: {REQUIRED_KINDS - kinds}"
    assert "Secret" not in kinds, "secrets are created with kubectl, never committed"


def test_kustomization_lists_every_manifest_and_sets_the_image() -> None:
    (kustomization,) = _yaml_documents(KUSTOMIZATION)
    assert sorted(kustomization["resources"]) == [path.name for path in _k8s_files()]
    namespace = kustomization["namespace"]
    for document in _k8s_documents():
        if document["kind"] != "Namespace":
            assert document["metadata"].get("namespace") == namespace, document["metadata"]["name"]
    image_name = _container()["image"].split(":")[0]
    assert image_name in {image["name"] for image in kustomization.get("images", [])}


def test_probes_ask_routes_the_app_serves_on_the_container_port() -> None:
    container = _container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert set(ports.values()) == {_image_port()}
    served = _served_get_paths()
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe_name, path in expected.items():
        probe = _mapping(container.get(probe_name), probe_name)["httpGet"]
        assert probe["path"] == path, f"{probe_name} asks {probe['path']}"
        assert probe["path"] in served
        port = probe["port"]
        assert ports.get(port, port) == _image_port(), f"{probe_name} asks port {port}"


def test_container_runs_the_serve_command_of_the_image() -> None:
    container = _container()
    assert "command" not in container, "keep the image's ENTRYPOINT"
    args = build_parser().parse_args(
        [*_exec_form("ENTRYPOINT")[1:], *container.get("args", _exec_form("CMD"))]
    )
    assert args.command == "serve"
    assert args.port in (None, _image_port())
    assert args.workers == 1


def test_pod_runs_locked_down() -> None:
    pod = _pod_spec()
    container = _container()
    pod_context = pod.get("securityContext", {})
    context = container.get("securityContext", {})
    assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True
    assert context.get("runAsUser", pod_context.get("runAsUser")) == _image_uid()
    assert context.get("readOnlyRootFilesystem") is True
    assert context.get("allowPrivilegeEscalation") is False
    assert context.get("privileged", False) is False
    assert context.get("capabilities", {}).get("drop") == ["ALL"]
    assert not context.get("capabilities", {}).get("add")
    seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
    assert seccomp.get("type") == "RuntimeDefault"
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_pod_has_no_api_token_no_service_links_and_a_tmp_volume() -> None:
    pod = _pod_spec()
    account = _k8s_one("ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account.get("automountServiceAccountToken") is False
    assert pod.get("automountServiceAccountToken") is False
    # Service links would set LIVENESS_PROXY_PORT=tcp://... for the Service named liveness-proxy.
    assert pod.get("enableServiceLinks") is False
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    tmp = [mount for mount in _container()["volumeMounts"] if mount["mountPath"] == CONTAINER_TMP]
    assert len(tmp) == 1
    assert "emptyDir" in volumes[tmp[0]["name"]]


def test_pod_outlives_its_graceful_shutdown_and_spreads_out() -> None:
    pod = _pod_spec()
    pre_stop = _container().get("lifecycle", {}).get("preStop", {})
    sleep = 0
    if "exec" in pre_stop and pre_stop["exec"]["command"][0] == "sleep":
        sleep = int(pre_stop["exec"]["command"][1])
    elif "sleep" in pre_stop:
        sleep = int(pre_stop["sleep"]["seconds"])
    assert pod["terminationGracePeriodSeconds"] > sleep + GRACEFUL_SHUTDOWN_SECONDS
    spread = pod.get("topologySpreadConstraints") or pod.get("affinity", {}).get("podAntiAffinity")
    assert spread, "replicas are spread over nodes"
    assert _k8s_one("Deployment")["spec"]["replicas"] >= 3


def test_selectors_pick_the_deployments_pods() -> None:
    labels = _pod_labels()
    deployment = _k8s_one("Deployment")
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": _k8s_one("Service")["spec"]["selector"],
        "PodDisruptionBudget": _k8s_one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": _k8s_one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector, f"{kind}: empty selector"
        assert selector.items() <= labels.items(), f"{kind} selects {selector}, pods have {labels}"
    target = _k8s_one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )


def test_service_forwards_to_the_container_port() -> None:
    service = _k8s_one("Service")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    ports = {port["name"]: port["containerPort"] for port in _container()["ports"]}
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        assert ports.get(target, target) == _image_port()


def test_autoscaler_and_disruption_budget_leave_room() -> None:
    hpa = _k8s_one("HorizontalPodAutoscaler")["spec"]
    assert hpa["minReplicas"] >= 3
    assert hpa["maxReplicas"] > hpa["minReplicas"]
    assert [metric["resource"]["name"] for metric in hpa["metrics"]] == ["cpu"]
    pdb = _k8s_one("PodDisruptionBudget")["spec"]
    assert ("minAvailable" in pdb) != ("maxUnavailable" in pdb), "one of minAvailable, maxUnavailable"
    if "minAvailable" in pdb:
        assert 0 < int(pdb["minAvailable"]) < hpa["minReplicas"], "a drain must be able to evict a pod"
    else:
        assert int(pdb["maxUnavailable"]) >= 1


def test_kubernetes_variables_are_real_settings() -> None:
    configmap = _k8s_one("ConfigMap")
    container = _container()
    references = [source["configMapRef"]["name"] for source in container.get("envFrom", [])]
    assert references == [configmap["metadata"]["name"]]
    names = [*configmap["data"], *(variable["name"] for variable in container.get("env", []))]
    assert _setting_name_problems(names) == []


def test_kubernetes_secrets_are_mounted_files(tmp_path: Path) -> None:
    configmap = _k8s_one("ConfigMap")["data"]
    container = _container()
    env = {variable["name"]: variable for variable in container.get("env", [])}
    inline = sorted(name for name in [*configmap, *env] if name.lower() in FILE_BACKED)
    assert inline == [], f"secret values set inline: {inline}"
    volumes = {volume["name"]: volume for volume in _pod_spec()["volumes"]}
    secret_mounts = {
        mount["mountPath"]: volumes[mount["name"]]["secret"]
        for mount in container["volumeMounts"]
        if "secret" in volumes[mount["name"]]
    }
    assert len(secret_mounts) == 1
    ((mount_path, secret),) = secret_mounts.items()
    assert secret["secretName"] == "liveness-proxy-secrets"
    items = {item["path"] for item in secret.get("items", [])}
    for field in sorted(FILE_BACKED):
        variable = f"{field.upper()}_FILE"
        assert variable in env, f"{variable} is not set"
        path = PurePosixPath(env[variable]["value"])
        assert path.parent == PurePosixPath(mount_path), f"{variable}: {path} is not in the secret volume"
        assert not items or path.name in items, f"{variable}: {path.name} is not an item of the Secret"
    # With the Secret's files in place, the ConfigMap and the env make a configuration that loads.
    environment = {**configmap, **{name: variable["value"] for name, variable in env.items()}}
    _settings_from(environment, tmp_path).require_proxy_secrets()


def test_kubernetes_manifests_carry_no_credentials_inline() -> None:
    credentialed = [
        text
        for document in _k8s_documents()
        for text in _walk_strings(document)
        if _CREDENTIALED_URL.search(text)
    ]
    assert credentialed == []


def test_network_policy_allows_only_the_expected_traffic() -> None:
    policy = _k8s_one("NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ports = {port["name"]: port["containerPort"] for port in _container()["ports"]}
    assert policy["ingress"], "some ingress must be allowed"
    for rule in policy["ingress"]:
        assert rule.get("from"), "ingress from named peers only"
        for port in rule["ports"]:
            assert ports.get(port["port"], port["port"]) == _image_port()
    egress_ports: set[int] = set()
    for rule in policy["egress"]:
        assert rule.get("ports"), "every egress rule names its ports"
        egress_ports |= {int(port["port"]) for port in rule["ports"]}
    assert egress_ports == ALLOWED_EGRESS_PORTS


def test_manifests_match_the_kubernetes_schemas() -> None:
    validator = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    # Strict: an unknown (misspelt) field fails, as `kubectl apply` would refuse it.
    for version in ("1.29", validator.latest_version()):
        for document in _k8s_documents():
            validator.validate(document, version, strict=True)


def test_kustomize_renders_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on this machine: kustomization.yaml was checked by parsing only")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(rendered) == len(_k8s_documents())
    (kustomization,) = _yaml_documents(KUSTOMIZATION)
    (image,) = kustomization["images"]
    deployment = next(doc for doc in rendered if doc["kind"] == "Deployment")
    container_image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container_image == f"{image['newName']}:{image['newTag']}"
