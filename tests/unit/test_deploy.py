"""Static checks of the deployment files.

No container engine or cluster is needed: docker-compose.yml is validated against the
compose-spec JSON schema, the Kubernetes manifests structurally and through ``kubectl
kustomize``, the Prometheus files with ``promtool``, and every metric named in an alert or a
dashboard query against what :class:`service.core.metrics.Metrics` really exports. A missing tool
fails its test: nothing here is skipped.

Tools and packages: promtool (Debian ``prometheus``), kubectl, and the Python packages
pyyaml, jsonschema and check-jsonschema (which ships the compose-spec schema).
"""

from __future__ import annotations

import base64
import copy
import http.server
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = REPO / "docker-compose.yml"
REDIS_CLUSTER_COMPOSE = REPO / "deploy" / "redis-cluster" / "compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
PROM_DIR = DEPLOY / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
ALERT_TESTS = PROM_DIR / "alerts_test.yml"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboard.json"
GRAFANA_DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml"
K8S_DIR = DEPLOY / "k8s"

SERVICE = "agent-service"
HTTP_PORT = 8000
RUN_AS_UID = 10001
INPUT_TOPIC = "agent.tasks"
RESULTS_TOPIC = "agent.results"
DLQ_TOPIC = "agent.tasks.dlq"
GROUP_ID = "agent-workers"
INPUT_PARTITIONS = 6

# The settings the deployment files may set (a subset of what service.core.settings reads).
DEPLOY_ENV = frozenset(
    {
        "AGENT_KAFKA__BOOTSTRAP_SERVERS",
        "AGENT_KAFKA__GROUP_ID",
        "AGENT_KAFKA__INPUT_TOPIC",
        "AGENT_KAFKA__RESULTS_TOPIC",
        "AGENT_KAFKA__DLQ_TOPIC",
        "AGENT_KAFKA__SESSION_TIMEOUT_MS",
        "AGENT_REDIS__URL",
        "AGENT_LEDGER__WAIT_REPLICAS",
        "AGENT_LLM__BASE_URL",
        "AGENT_LLM__API_KEY",
        "AGENT_LLM__MODEL",
        "AGENT_LLM__TIMEOUT_S",
        "AGENT_LLM__RESPONSE_FORMAT",
        "AGENT_HTTP__HOST",
        "AGENT_HTTP__PORT",
        "AGENT_ADMIN_TOKEN",
        "AGENT_READ_TOKEN",
        "AGENT_SUBMIT_TOKEN",
        "AGENT_MAX_IN_FLIGHT",
        "AGENT_LOG_FORMAT",
    }
)
SECRET_ENV = frozenset({"AGENT_ADMIN_TOKEN", "AGENT_READ_TOKEN", "AGENT_SUBMIT_TOKEN", "AGENT_LLM__API_KEY"})

EXPECTED_ALERTS = frozenset(
    {
        "AgentServiceDown",
        "AgentNoPartitionsAssigned",
        "AgentConsumerLagGrowing",
        "AgentDeadLetterRateHigh",
        "AgentStaleFenceWrites",
        "AgentLLMErrorRatioHigh",
        "AgentTaskLatencyP95High",
        "ScheduleNotFiring",
    }
)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def require_tool(name: str, hint: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found on PATH: {hint}")
    return found


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::?(?P<op>[-?])(?P<arg>[^}]*))?\}")


def interpolate_default(value: Any) -> str:
    """Compose interpolation with an empty environment: ``${X:-d}`` becomes ``d``."""

    def sub(match: re.Match[str]) -> str:
        if match.group("op") == "?":
            pytest.fail(f"{match.group(0)} makes the variable mandatory")
        return match.group("arg") or ""

    return _INTERPOLATION.sub(sub, str(value))


def settings_env_names() -> set[str]:
    """Every environment variable service.core.settings.Settings reads (under every name a field takes)."""
    from service.core.settings import Settings
    from service.core.settings_sources import setting_names

    return setting_names(Settings)


def build_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Settings as the service would build them from exactly ``env``."""
    from service.core.settings import Settings

    for key in list(os.environ):
        if key.upper().startswith("AGENT_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


def compose_env(service: str) -> dict[str, str]:
    env = compose()["services"][service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        with path.open(encoding="utf-8") as fh:
            docs.extend(doc for doc in yaml.safe_load_all(fh) if doc is not None)
    return docs


def k8s_one(kind: str) -> dict[str, Any]:
    found = [doc for doc in k8s_docs() if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def deployment_container() -> dict[str, Any]:
    containers = k8s_one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "agent-service runs a single container per pod"
    return containers[0]


def configmap_data() -> dict[str, str]:
    return {k: str(v) for k, v in k8s_one("ConfigMap")["data"].items()}


# ---- Dockerfile ----------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) with continuations joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    stage = -1
    out: list[tuple[int, str, str]] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append((stage, keyword, args.strip()))
    return out


def dockerfile_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for stage, keyword, rest in dockerfile_instructions():
        if stage == -1 and keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
    return args


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last = max(stage for stage, _, _ in instructions)
    return [(kw, rest) for stage, kw, rest in instructions if stage == last]


def copy_sources() -> list[str]:
    """Sources of every COPY/ADD that reads the build context (not another stage)."""
    if not DOCKERFILE.exists():
        return []
    sources: list[str] = []
    for _, keyword, rest in dockerfile_instructions():
        if keyword not in {"COPY", "ADD"}:
            continue
        tokens = rest.split()
        if any(t.startswith("--from=") for t in tokens):
            continue
        paths = [t for t in tokens if not t.startswith("--")]
        assert len(paths) >= 2, f"{keyword} {rest}: needs a source and a destination"
        sources.extend(paths[:-1])
    return sources


# ---- Prometheus / Grafana ------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    board = dashboard()
    queries: list[tuple[str, str]] = []
    for panel in iter_panels(board.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append((f"panel {panel['id']} target {target.get('refId')}", target["expr"]))
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            if isinstance(query, dict):
                query = query.get("query")
            if query:
                queries.append((f"variable {var['name']}", query))
    return queries


_GRAFANA_VARS = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "instance": ".*",
}


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables so promtool can parse the query."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in _GRAFANA_VARS:
            pytest.fail(f"unknown Grafana variable ${name} in {expr!r}")
        return _GRAFANA_VARS[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", sub, expr)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_METRIC = re.compile(r"(?<![\w:])agent_\w+")
_SELECTOR = re.compile(r"(?<![\w:])(agent_\w+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def referenced_metrics(expr: str) -> set[str]:
    """agent_* metric names in a PromQL expression (not inside label values)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def exported_metrics() -> tuple[set[str], dict[str, dict[str, set[str]]]]:
    """Series names a scrape of the service yields, and the label values each one carries."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from service.core.metrics import Metrics

    text = generate_latest(Metrics().registry).decode("utf-8")
    names: set[str] = set()
    labels: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            base = family.name.removesuffix("_total")
            names.update({base + "_total", base + "_created"})
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count", "_created"))
        elif family.type == "summary":
            names.update(family.name + s for s in ("", "_sum", "_count", "_created"))
        else:
            names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
            for key, value in sample.labels.items():
                labels[sample.name][key].add(value)
    return names, labels


def alert_exprs() -> list[tuple[str, str]]:
    return [(rule.get("alert") or rule.get("record"), rule["expr"]) for rule in alert_rules()]


# --------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------


def compose_schema_validator() -> Any:
    try:
        vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.fail("check-jsonschema is not installed: it provides the compose-spec schema")
    import jsonschema

    schema = json.loads((vendor / "compose-spec.json").read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_compose_matches_compose_spec_schema() -> None:
    validator = compose_schema_validator()
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_schema_check_rejects_mistakes() -> None:
    """The schema check has teeth: typical slips are reported."""
    validator = compose_schema_validator()
    broken = copy.deepcopy(compose())
    broken["services"][SERVICE]["deploy"]["replica"] = 2  # misspelt key
    assert list(validator.iter_errors(broken))
    broken = copy.deepcopy(compose())
    broken["services"]["redis"]["depends_on"] = {"kafka": {"condition": "healthy"}}
    assert list(validator.iter_errors(broken))


def _merged(base: Any, override: Any) -> Any:
    """``docker compose -f base -f override``: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: _merged(base[k], v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override}
    return override


def redis_cluster_compose() -> dict[str, Any]:
    return _merged(compose(), load_yaml(REDIS_CLUSTER_COMPOSE))


def test_redis_cluster_override_matches_compose_spec_schema() -> None:
    validator = compose_schema_validator()
    errors = sorted(validator.iter_errors(redis_cluster_compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_redis_cluster_override_runs_the_ledger_on_six_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    from dedup.client import is_cluster_url

    stack = redis_cluster_compose()
    services = stack["services"]
    nodes = sorted(name for name in services if name.startswith("redis-node-"))
    assert len(nodes) == 6
    for name in nodes:
        command = " ".join(services[name]["command"])
        for flag in ("--cluster-enabled yes", "--appendonly yes", "--maxmemory-policy noeviction"):
            assert flag in command, f"{name}: {flag}"
        volume = services[name]["volumes"][0].split(":")[0]
        assert volume in stack["volumes"], f"{name}: volume {volume} not declared"
    init = " ".join(services["redis-cluster-init"]["command"])
    assert "--cluster-replicas 1" in init and "redis-node-$$i" in init and "for i in 1 2 3 4 5 6" in init
    assert set(services["redis-cluster-init"]["depends_on"]) == set(nodes)
    agent = services[SERVICE]
    assert agent["depends_on"]["redis-cluster-init"]["condition"] == "service_completed_successfully"
    env = {k: str(v) for k, v in agent["environment"].items()}
    assert is_cluster_url(env["AGENT_REDIS__URL"])
    named = [h.split(":")[0] for h in env["AGENT_REDIS__URL"].split("://", 1)[1].split(",")]
    assert set(named) <= set(nodes)
    settings = build_settings({k: interpolate_default(v) for k, v in env.items()}, monkeypatch)
    assert settings.ledger.wait_replicas == 1  # one replica per primary: a failover loses no published result


def test_compose_has_the_stack() -> None:
    services = compose()["services"]
    assert {"kafka", "kafka-init", "redis", SERVICE, "prometheus", "grafana"} <= set(services)
    assert {"api", "fake-model", "local-model", "otel-collector", "jaeger"} <= set(services)
    for name, spec in services.items():
        assert "image" in spec or "build" in spec, f"{name}: neither image nor build"
        image = spec.get("image", "")
        if name != SERVICE:
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"


def test_compose_kafka_runs_kraft_single_node() -> None:
    kafka = compose()["services"]["kafka"]
    # the Kafka the tests run (deploy/kafka/pom.xml) is the Kafka users run
    pinned = re.search(r"<kafka.version>([^<]+)</kafka.version>", (REPO / "deploy/kafka/pom.xml").read_text())
    assert pinned is not None
    assert kafka["image"] == f"apache/kafka:{pinned[1]}"
    assert compose()["services"]["kafka-init"]["image"] == kafka["image"]
    env = compose_env("kafka")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node_id}@kafka:9093"
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert "CONTROLLER://" in env["KAFKA_LISTENERS"]
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    # KRaft storage formatting needs a base64url-encoded 16-byte cluster id
    cluster_id = env["CLUSTER_ID"]
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16
    # the data directory is a named volume
    assert any(str(v).split(":")[1] == env["KAFKA_LOG_DIRS"] for v in kafka.get("volumes", [])), (
        "KAFKA_LOG_DIRS is not on a volume"
    )
    assert kafka["healthcheck"]["test"], "kafka needs a healthcheck for depends_on"


def test_compose_topics_are_created_by_the_init_service() -> None:
    services = compose()["services"]
    init = services["kafka-init"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert init.get("restart") == "no"
    script = interpolate_default(" ".join(init["command"])).replace("$$", "$")
    created: dict[str, int] = {}
    for line in script.splitlines():
        if "--create" not in line:
            continue
        assert "--if-not-exists" in line, f"not idempotent: {line}"
        topic = re.search(r"--topic\s+(\S+)", line)
        partitions = re.search(r"--partitions\s+(\d+)", line)
        assert topic and partitions, line
        created[topic.group(1)] = int(partitions.group(1))
    assert set(created) == {INPUT_TOPIC, RESULTS_TOPIC, DLQ_TOPIC}
    assert created[INPUT_TOPIC] == INPUT_PARTITIONS
    env = compose_env(SERVICE)
    assert {env["AGENT_KAFKA__INPUT_TOPIC"], env["AGENT_KAFKA__RESULTS_TOPIC"], env["AGENT_KAFKA__DLQ_TOPIC"]} == set(
        created
    )


def test_compose_redis_persists_with_aof() -> None:
    redis = compose()["services"]["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")
    command = redis["command"]
    command = command.split() if isinstance(command, str) else [str(c) for c in command]
    joined = " ".join(command)
    assert "--appendonly yes" in joined
    assert "--appendfsync everysec" in joined
    volumes = [str(v) for v in redis["volumes"]]
    assert any(v.split(":")[1] == "/data" and not v.startswith((".", "/")) for v in volumes)
    assert redis["healthcheck"]["test"]


def test_compose_agent_service() -> None:
    spec = compose()["services"][SERVICE]
    assert spec["build"]["context"] == "."
    assert (REPO / spec["build"]["context"] / spec["build"]["dockerfile"]) == DOCKERFILE
    assert spec["deploy"]["replicas"] == 2
    assert "ports" not in spec, "replicas cannot share a fixed host port"
    assert "container_name" not in spec, "replicas cannot share a container name"
    assert str(HTTP_PORT) in [str(p) for p in spec["expose"]]
    assert spec["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert spec["depends_on"]["redis"]["condition"] == "service_healthy"
    assert spec["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    grace = str(spec["stop_grace_period"])
    assert grace.endswith("s") and int(grace[:-1]) >= 30, "SIGTERM needs time to drain"


# OpenTelemetry's own variables, read by service.core.tracing: where the spans go
TRACING_ENV = frozenset({"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"})


def test_compose_agent_env_names_are_known_settings() -> None:
    env = compose_env(SERVICE)
    assert set(env) & TRACING_ENV == TRACING_ENV, "the compose stack exports traces"
    env = {k: v for k, v in env.items() if k not in TRACING_ENV}
    unknown = set(env) - DEPLOY_ENV
    assert not unknown, f"not agent-service settings: {sorted(unknown)}"
    not_read = set(env) - settings_env_names()
    assert not not_read, f"service.core.settings.Settings reads none of {sorted(not_read)}"


def test_compose_agent_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = compose_env(SERVICE)
    assert raw["AGENT_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert raw["AGENT_REDIS__URL"] == "redis://redis:6379/0"
    assert raw["AGENT_HTTP__HOST"] == "0.0.0.0"
    assert raw["AGENT_HTTP__PORT"] == str(HTTP_PORT)
    assert raw["AGENT_LOG_FORMAT"] == "json"
    assert raw["AGENT_ADMIN_TOKEN"] == "${AGENT_ADMIN_TOKEN:-}"
    assert raw["AGENT_SUBMIT_TOKEN"] == "${AGENT_SUBMIT_TOKEN:-}"
    assert raw["AGENT_LLM__BASE_URL"].startswith("${AGENT_LLM__BASE_URL:-http")
    # with nothing set in the shell, the defaults must make valid settings
    settings = build_settings({k: interpolate_default(v) for k, v in raw.items()}, monkeypatch)
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.kafka.group_id == GROUP_ID
    assert settings.kafka.input_topic == INPUT_TOPIC
    assert settings.kafka.results_topic == RESULTS_TOPIC
    assert settings.kafka.dlq_topic == DLQ_TOPIC
    assert settings.http.host == "0.0.0.0"
    assert settings.http.port == HTTP_PORT
    assert settings.log_format == "json"
    assert settings.llm.base_url == "http://fake-model:8080/v1"


def test_compose_host_gateway_for_default_llm_url() -> None:
    spec = compose()["services"][SERVICE]
    default_url = interpolate_default(compose_env(SERVICE)["AGENT_LLM__BASE_URL"])
    if "host.docker.internal" in default_url:
        assert "host.docker.internal:host-gateway" in spec.get("extra_hosts", [])


def _bind_mounts(spec: dict[str, Any]) -> list[tuple[str, str]]:
    mounts: list[tuple[str, str]] = []
    for volume in spec.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((volume["source"], volume["target"]))
            continue
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/", "~")):
            mounts.append((source, target))
    return mounts


def test_compose_bind_mounts_exist_and_named_volumes_are_declared() -> None:
    doc = compose()
    declared = set(doc.get("volumes") or {})
    for name, spec in doc["services"].items():
        for source, _ in _bind_mounts(spec):
            assert not source.startswith(("/", "~")), f"{name}: {source} is outside the repo"
            assert (REPO / source).exists(), f"{name}: bind mount source {source} does not exist"
        for volume in spec.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/", "~")):
                assert volume.split(":")[0] in declared, f"{name}: volume {volume} not declared"


def test_compose_prometheus_and_grafana_wiring() -> None:
    services = compose()["services"]
    prom_mounts = {Path(target).name: (source, target) for source, target in _bind_mounts(services["prometheus"])}
    assert (REPO / prom_mounts["prometheus.yml"][0]).resolve() == PROM_CONFIG
    assert (REPO / prom_mounts["alerts.yml"][0]).resolve() == ALERTS
    config_target = prom_mounts["prometheus.yml"][1]
    assert f"--config.file={config_target}" in services["prometheus"]["command"]
    # rule_files are resolved against the config file's directory
    for rule_file in load_yaml(PROM_CONFIG)["rule_files"]:
        mounted = str(Path(config_target).parent / rule_file)
        assert mounted in {t for _, t in prom_mounts.values()}, f"{rule_file} not mounted beside the config"

    grafana = services["grafana"]
    assert "3000:3000" in [str(p) for p in grafana["ports"]]
    mounts = dict(_bind_mounts(grafana))
    assert (REPO / "deploy/grafana/provisioning").resolve() == (
        REPO / next(s for s, t in mounts.items() if t == "/etc/grafana/provisioning")
    ).resolve()
    dashboard_target = next(t for s, t in mounts.items() if (REPO / s).resolve() == DASHBOARD)
    provider_paths = [p["options"]["path"] for p in load_yaml(GRAFANA_PROVIDERS)["providers"]]
    assert str(Path(dashboard_target).parent) in provider_paths
    datasource = load_yaml(GRAFANA_DATASOURCES)["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"


# --------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------


def test_dockerfile_is_multistage_on_python_311_slim() -> None:
    args = dockerfile_args()
    froms = [rest for _, kw, rest in dockerfile_instructions() if kw == "FROM"]
    assert len(froms) >= 2
    for line in froms:
        image = line.split()[0]
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], image)
        assert image == "python:3.11-slim", line
    builder = [rest for stage, kw, rest in dockerfile_instructions() if stage == 0 and kw == "RUN"]
    assert any("pip wheel" in r for r in builder), "the builder stage must build wheels"
    runtime_runs = [rest for kw, rest in final_stage() if kw == "RUN"]
    assert any("venv" in r and "--no-index" in r for r in runtime_runs), (
        "the final stage installs the builder's wheels into a venv, offline"
    )


def test_dockerfile_final_stage_has_no_build_tools_or_sources() -> None:
    for keyword, rest in final_stage():
        if keyword == "RUN":
            assert not re.search(r"apt-get\s+install|build-essential|\bgcc\b|\bgit\b", rest), rest
        if keyword in {"COPY", "ADD"}:
            assert "--from=" in rest, f"final stage copies from the build context: {rest}"


def test_dockerfile_runtime_contract() -> None:
    stage = final_stage()
    users = [rest for kw, rest in stage if kw == "USER"]
    assert users, "final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user == str(RUN_AS_UID)
    assert [rest for kw, rest in stage if kw == "EXPOSE"] == [str(HTTP_PORT)]
    entrypoint = [json.loads(rest) for kw, rest in stage if kw == "ENTRYPOINT"]
    assert entrypoint == [["agent-service"]]
    assert [json.loads(rest) for kw, rest in stage if kw == "CMD"] == [["run"]]
    env = " ".join(rest for kw, rest in stage if kw == "ENV")
    assert "AGENT_HTTP__HOST=0.0.0.0" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # the pod's root filesystem is read-only


def healthcheck_argv() -> list[str]:
    checks = [rest for kw, rest in final_stage() if kw == "HEALTHCHECK"]
    assert len(checks) == 1, "final stage needs exactly one HEALTHCHECK"
    _, _, command = checks[0].partition("CMD ")
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"], "healthcheck runs python (curl is not in the image)"
    return argv


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        code = type(self).status if self.path == "/healthz" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_dockerfile_healthcheck_probes_healthz(status: int, healthy: bool) -> None:
    argv = healthcheck_argv()
    assert "urllib" in argv[2] and "/healthz" in argv[2]
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "AGENT_HTTP__PORT": str(server.server_address[1])}
        proc = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)
    assert not thread.is_alive()
    assert (proc.returncode == 0) is healthy, proc.stderr.decode()


@pytest.mark.parametrize("source", copy_sources())
def test_dockerfile_copy_source_exists(source: str) -> None:
    assert (REPO / source).exists(), f"COPY {source}: not in the repository (build context is the root)"
    patterns = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()]
    assert f"!{source.rstrip('/')}" in patterns, f"{source} is excluded by {DOCKERIGNORE.name}"


def test_dockerfile_copies_the_packages() -> None:
    sources = {s.rstrip("/") for s in copy_sources()}
    assert {"pyproject.toml", "README.md", "service", "consumers", "dedup"} <= sources


def test_pyproject_declares_the_console_script() -> None:
    pyproject = REPO / "pyproject.toml"
    assert pyproject.exists(), "pyproject.toml is missing: the image cannot be built"
    scripts = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {}).get("scripts", {})
    assert "agent-service" in scripts, "ENTRYPOINT agent-service needs [project.scripts] agent-service"


# --------------------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool", "install Debian's prometheus package")


def test_promtool_check_config(promtool: str) -> None:
    proc = run_tool(promtool, "check", "config", str(PROM_CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_rules(promtool: str) -> None:
    proc = run_tool(promtool, "check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_alert_unit_tests(promtool: str) -> None:
    proc = run_tool(promtool, "test", "rules", str(ALERT_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_scrapes_replicas_through_docker_dns() -> None:
    config = load_yaml(PROM_CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs[SERVICE]
    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    [sd] = job["dns_sd_configs"]
    assert sd["names"] == [SERVICE] and SERVICE in compose()["services"]
    assert sd["type"] == "A"
    assert sd["port"] == HTTP_PORT


def test_alerts_are_complete_and_annotated() -> None:
    rules = alert_rules()
    names = [rule.get("alert") for rule in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert set(names) >= EXPECTED_ALERTS
    for rule in rules:
        assert rule.get("alert"), f"recording rule in alerts.yml: {rule}"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"].get("summary"), rule["alert"]
        assert rule["annotations"].get("description"), rule["alert"]


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert queries
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(queries)
        if not expr.startswith("label_values(")
    ]
    for _, expr in queries:
        if expr.startswith("label_values("):
            metric = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", expr)
            assert metric, f"bad variable query {expr!r}"
            rules.append({"record": "dashboard:variable", "expr": metric.group(1)})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    proc = run_tool(promtool, "check", "rules", "--lint=none", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------
# metrics referenced by alerts and dashboard
# --------------------------------------------------------------------------------------


def test_exported_metric_names_cover_every_type() -> None:
    names, _ = exported_metrics()
    # a counter shows with _total, a histogram with its series, a labelled gauge without children
    assert {"agent_tasks_total", "agent_task_duration_seconds_bucket", "agent_consumer_lag"} <= names
    assert "agent_tasks" not in names


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_referenced_metrics_are_exported(source: str) -> None:
    exprs = alert_exprs() if source == "alerts" else dashboard_queries()
    referenced = {name for _, expr in exprs for name in referenced_metrics(expr)}
    assert referenced, f"no agent_* metric found in the {source}"
    exported, _ = exported_metrics()
    missing = {
        name: [where for where, expr in exprs if name in referenced_metrics(expr)]
        for name in sorted(referenced - exported)
    }
    assert not missing, f"{source} reference metrics the service does not export: {missing}"


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_referenced_label_values_exist(source: str) -> None:
    """outcome="..." and friends name values the service really sets."""
    exprs = alert_exprs() if source == "alerts" else dashboard_queries()
    _, labels = exported_metrics()
    for where, expr in exprs:
        for metric, matchers in _SELECTOR.findall(expr):
            known = labels.get(metric)
            if not known:
                continue  # no pre-initialised children (a labelled gauge): nothing to compare
            for label, op, value in _MATCHER.findall(matchers):
                if label in {"instance", "job"}:
                    continue  # added by Prometheus
                assert label in known, f"{where}: {metric} has no label {label}"
                values = value.split("|") if op in {"=~", "!~"} else [value]
                for v in values:
                    if re.fullmatch(r"\w+", v):
                        assert v in known[label], f"{where}: {metric}{{{label}}} is never {v!r}"


def test_dashboard_covers_the_service() -> None:
    referenced = {name for _, expr in dashboard_queries() for name in referenced_metrics(expr)}
    assert {
        "agent_messages_consumed_total",
        "agent_tasks_total",
        "agent_consumer_lag",
        "agent_llm_latency_seconds_bucket",
        "agent_llm_requests_total",
        "agent_llm_tokens_total",
        "agent_dead_letters_total",
        "agent_inflight_tasks",
        "agent_paused_partitions",
        "agent_stale_fence_writes_total",
        "agent_schedule_slots_total",
        "agent_schedule_lag_seconds_bucket",
        "agent_schedule_next_fire_timestamp_seconds",
    } <= referenced
    exprs = [expr for _, expr in dashboard_queries()]
    for quantile in ("0.5", "0.95"):
        assert any(f"histogram_quantile({quantile}," in e and "agent_llm_latency_seconds_bucket" in e for e in exprs), (
            f"no LLM latency p{quantile[2:]} panel"
        )
    for label in ("endpoint", "kind"):  # a fallback's latency, and a kind's, seen apart
        assert any(f"sum by (le, {label})" in e and "agent_llm_latency_seconds_bucket" in e for e in exprs), label


# --------------------------------------------------------------------------------------
# Grafana
# --------------------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] == SERVICE
    assert 36 <= board["schemaVersion"] <= 41
    assert board["title"]
    panels = list(iter_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & area, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for ds in [panel.get("datasource"), *(t.get("datasource") for t in panel["targets"])]:
            assert ds and ds["type"] == "prometheus" and ds["uid"] in {"${datasource}", "prometheus"}, (
                f"panel {panel['title']!r}: datasource {ds}"
            )


def test_grafana_provisioning_matches_the_dashboard() -> None:
    datasources = load_yaml(GRAFANA_DATASOURCES)
    assert datasources["apiVersion"] == 1
    [prom] = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    assert prom["name"] == "Prometheus"
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    ds_var = variables["datasource"]
    assert ds_var["type"] == "datasource" and ds_var["query"] == "prometheus"
    assert ds_var["current"]["value"] == prom["uid"]
    providers = load_yaml(GRAFANA_PROVIDERS)
    assert providers["apiVersion"] == 1
    assert all(p["type"] == "file" and p["options"]["path"] for p in providers["providers"])


# --------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------

_K8S_KINDS = {
    ("v1", "ConfigMap"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("policy/v1", "PodDisruptionBudget"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}
_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def test_k8s_manifests_are_well_formed() -> None:
    docs = k8s_docs()
    kinds = {(doc.get("apiVersion"), doc.get("kind")) for doc in docs}
    assert kinds == _K8S_KINDS
    assert len(docs) == len(_K8S_KINDS)
    for doc in docs:
        name = doc.get("metadata", {}).get("name", "")
        assert _DNS1123.fullmatch(name) and len(name) <= 63, f"{doc['kind']}: bad name {name!r}"
        assert isinstance(doc.get("spec", doc.get("data")), dict), f"{doc['kind']}: no spec/data"


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    images = {image["name"] for image in kustomization.get("images", [])}
    assert deployment_container()["image"].split(":")[0] in images


def test_kustomize_builds() -> None:
    kubectl = require_tool("kubectl", "kubectl kustomize renders deploy/k8s offline")
    proc = run_tool(kubectl, "kustomize", str(K8S_DIR))
    assert proc.returncode == 0, proc.stderr
    rendered = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    assert {(d["apiVersion"], d["kind"]) for d in rendered} == _K8S_KINDS


def test_k8s_deployment() -> None:
    deployment = k8s_one("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    template_labels = spec["template"]["metadata"]["labels"]
    selector = spec["selector"]["matchLabels"]
    assert selector and selector.items() <= template_labels.items(), "selector must match template labels"
    # /readyz fails until a pod holds a partition: with as many pods as partitions a surge
    # pod never becomes ready unless the rollout may first stop an old one
    assert str(spec["strategy"]["rollingUpdate"]["maxUnavailable"]) not in {"0", "0%"}
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 60
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(HTTP_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"

    container = deployment_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": HTTP_PORT}

    def probe(name: str) -> tuple[str, int]:
        get = container[name]["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    assert probe("livenessProbe") == ("/healthz", HTTP_PORT)
    assert probe("readinessProbe") == ("/readyz", HTTP_PORT)
    if "startupProbe" in container:
        assert probe("startupProbe")[0] == "/healthz"

    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]
    mounts = {m["name"] for m in container.get("volumeMounts", [])}
    assert mounts <= {v["name"] for v in pod.get("volumes", [])}


def test_k8s_pod_runs_non_root_read_only() -> None:
    pod = k8s_one("Deployment")["spec"]["template"]["spec"]
    container = deployment_container()
    pod_ctx = pod.get("securityContext", {})
    ctx = container.get("securityContext", {})

    def effective(key: str) -> Any:
        return ctx.get(key, pod_ctx.get(key))

    assert effective("runAsNonRoot") is True
    assert effective("runAsUser") == RUN_AS_UID, "same uid as the image's USER"
    assert effective("runAsGroup") not in {None, 0}
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx.get("privileged", False) is False
    assert "ALL" in ctx["capabilities"]["drop"]
    assert "/tmp" in {m["mountPath"] for m in container.get("volumeMounts", [])}


def test_k8s_env_comes_from_configmap_and_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    configmap = k8s_one("ConfigMap")
    container = deployment_container()
    assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in container["envFrom"]
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e}
    assert set(from_secret) == SECRET_ENV
    assert len({ref["name"] for ref in from_secret.values()}) == 1
    assert (from_secret["AGENT_ADMIN_TOKEN"]["key"], from_secret["AGENT_ADMIN_TOKEN"].get("optional", False)) == (
        "admin-token", False)
    # producers' token: optional, unset only the admin token submits
    assert (from_secret["AGENT_SUBMIT_TOKEN"]["key"], from_secret["AGENT_SUBMIT_TOKEN"].get("optional")) == (
        "submit-token", True)

    data = configmap_data()
    assert not set(data) & SECRET_ENV, "secrets do not belong in the ConfigMap"
    assert set(data) <= DEPLOY_ENV, sorted(set(data) - DEPLOY_ENV)
    all_env = set(data) | set(from_secret) | {e["name"] for e in container.get("env", [])}
    assert all_env <= settings_env_names(), sorted(all_env - settings_env_names())

    settings = build_settings({**data, **{k: "dummy" for k in SECRET_ENV}}, monkeypatch)
    assert settings.http.host == "0.0.0.0"
    assert settings.http.port == HTTP_PORT
    assert settings.log_format == "json"
    assert settings.kafka.group_id == GROUP_ID
    assert settings.kafka.input_topic == INPUT_TOPIC


def test_k8s_service_selects_the_pods() -> None:
    service = k8s_one("Service")
    labels = k8s_one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()
    [port] = service["spec"]["ports"]
    assert port["name"] == "http" and port["port"] == HTTP_PORT
    target = port.get("targetPort", port["port"])
    names = {p["name"]: p["containerPort"] for p in deployment_container()["ports"]}
    assert (names[target] if isinstance(target, str) else target) == HTTP_PORT


def test_k8s_pdb_selects_the_pods() -> None:
    pdb = k8s_one("PodDisruptionBudget")
    deployment = k8s_one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_keda_scales_on_the_consumer_group_lag() -> None:
    scaled = k8s_one("ScaledObject")
    deployment = k8s_one("Deployment")
    ref = scaled["spec"]["scaleTargetRef"]
    assert ref.get("kind", "Deployment") == "Deployment"
    assert ref["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] == 1
    # one consumer per partition at most does work
    assert scaled["spec"]["maxReplicaCount"] == INPUT_PARTITIONS
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    data = configmap_data()
    assert meta["bootstrapServers"] == data["AGENT_KAFKA__BOOTSTRAP_SERVERS"]
    assert meta["consumerGroup"] == data["AGENT_KAFKA__GROUP_ID"] == GROUP_ID
    assert meta["topic"] == data["AGENT_KAFKA__INPUT_TOPIC"] == INPUT_TOPIC
    assert isinstance(meta["lagThreshold"], str) and int(meta["lagThreshold"]) > 0
