"""The Helm chart (deploy/helm/agent-service), rendered and checked offline.

``helm lint`` and ``helm template`` run over several value sets; each rendering goes through
kubeconform (strict: an unknown field is an error) and is parsed here: kinds and names, selectors
that match the pods' labels, every ``AGENT_*`` variable a real setting that the service accepts,
credentials only ever read from a Secret, the StatefulSet with stable transactional ids when
transactional, and the PrometheusRule equal to deploy/prometheus/alerts.yml.

kubeconform's schemas come from package registries only: Kubernetes' own from the PyPI package
kubernetes-validate (made standalone here), and the CRD kinds' (prometheus-operator's ServiceMonitor
and PrometheusRule, KEDA's ScaledObject) from cloudcoil's models, which are generated from those
projects' CRDs (deploy/helm/crd_schemas.py). ``make helm-tools`` builds helm and kubeconform into
.tools/bin (or they are found on PATH) and writes the CRD schemas to .tools/crd-schemas; a missing
one fails its test, never skips.
"""

from __future__ import annotations

import base64
import copy
import functools
import importlib.resources
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy import SECRET_ENV, alert_rules, build_settings, settings_env_names

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "agent-service"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
TOOLS_BIN = REPO / ".tools" / "bin"
CRD_SCHEMAS = REPO / ".tools" / "crd-schemas"  # deploy/helm/crd_schemas.py, run by make helm-tools
RELEASE = "agent-service"
NAMESPACE = "agents"
CRD_KINDS = ("ServiceMonitor", "PrometheusRule", "ScaledObject")
# the kinds the chart renders (lowercase, as kubernetes-validate names its schema files)
SCHEMA_KINDS = frozenset({"configmap", "secret", "service", "deployment", "statefulset", "poddisruptionbudget",
                          "horizontalpodautoscaler"})
SCHEMA_VERSION = "v1.37.0"
# credentials: never a plain value in the ConfigMap or the pod spec
CREDENTIAL_ENV = SECRET_ENV | {
    "AGENT_REDIS__URL",
    "AGENT_LLM__FALLBACKS",
    "AGENT_LLM__REPLICAS",
    "AGENT_KAFKA__SASL_PASSWORD",
    "AGENT_KAFKA__SASL_OAUTHBEARER_CLIENT_SECRET",
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "transactional": {"kafka": {"transactional": True}},
    "keda": {
        "autoscaling": {"keda": {"enabled": True}},
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    },
    "transactional-keda": {"kafka": {"transactional": True}, "autoscaling": {"keda": {"enabled": True, "maxReplicas": 4}}},
    "existing-secret": {"secrets": {"existingSecret": "team-agent-secrets"}, "autoscaling": {"hpa": {"enabled": True}}},
    "secured": {
        "kafka": {
            "bootstrapServers": "b-1.example:9096,b-2.example:9096",
            "securityProtocol": "SASL_SSL",
            "saslMechanism": "OAUTHBEARER",
            "oauthbearer": {
                "method": "oidc",
                "clientId": "agent-service",
                "tokenEndpointUrl": "https://idp.example/oauth2/token",
                "scope": "kafka",
                "extensions": "logicalCluster=lkc-1",
            },
            "tls": {"secretName": "kafka-ca", "caFile": "ca.crt"},
            "config": {"client.rack": "use1-az1", "socket.keepalive.enable": True},
            "consumerConfig": {"fetch.wait.max.ms": 200},
        },
        "secrets": {
            "adminToken": "admin-secret-value",
            "readToken": "read-secret-value",
            "submitToken": "submit-secret-value",
            "llmApiKey": "llm-secret-value",
            "redisUrl": "rediss://:redis-secret-value@redis.example:6380/0",
            "kafkaOauthClientSecret": "oauth-secret-value",
            "llmFallbacks": [{"base_url": "http://fallback.example/v1", "api_key": "fb-secret-value", "model": "small"}],
            "llmReplicas": [{"base_url": "http://replica.example/v1", "api_key": "rep-secret-value", "name": "east"}],
        },
        "extraEnv": {"AGENT_LEDGER__LEASE_MS": 45000},
    },
}
SECRET_VALUES = ("admin", "read", "submit", "llm", "redis", "oauth", "fb", "rep")  # each "<word>-secret-value" above


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def tool(name: str) -> str:
    local = TOOLS_BIN / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found in .tools/bin or on PATH: `make helm-tools` builds it")
    return found


def run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, input=stdin, capture_output=True, text=True, timeout=300, check=False)


def values_file(name: str, tmp: Path) -> Path:
    path = tmp / f"values-{name}.yaml"
    path.write_text(yaml.safe_dump(VALUE_SETS[name]), encoding="utf-8")
    return path


@functools.cache
def rendered_text(name: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        proc = run(tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                   "-f", str(values_file(name, Path(tmp))))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def rendered(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered_text(name)) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] in {"Deployment", "StatefulSet"}]
    assert len(found) == 1, [d["kind"] for d in found]
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [only] = workload(docs)["spec"]["template"]["spec"]["containers"]
    return only


_DEFS_REF = "/api/_definitions.json#/$defs/"
_LOCAL_REF = "#/$defs/"


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith((_DEFS_REF, _LOCAL_REF)):
            yield ref.removeprefix(_DEFS_REF).removeprefix(_LOCAL_REF)
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _local_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: (_LOCAL_REF + v.removeprefix(_DEFS_REF) if k == "$ref" and isinstance(v, str)
                    and v.startswith(_DEFS_REF) else _local_refs(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_local_refs(v) for v in node]
    return node


@pytest.fixture(scope="module")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> str:
    """kubeconform's -schema-location: standalone schemas made from kubernetes-validate's.

    The package's schemas point into one shared ``/api/_definitions.json``, a reference only its
    own loader resolves; each one is written here with the definitions it reaches inlined.
    """
    source = Path(str(importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
                      / f"{SCHEMA_VERSION}-local-strict"))
    assert (source / "deployment-apps-v1.json").is_file(), f"no Kubernetes schemas in {source}"
    defs = json.loads((source / "_definitions.json").read_text(encoding="utf-8"))["$defs"]
    target = tmp_path_factory.mktemp("k8s-schemas")
    for path in source.glob("*.json"):
        if path.name.startswith("_") or path.name.split("-")[0] not in SCHEMA_KINDS:
            continue
        schema = json.loads(path.read_text(encoding="utf-8"))
        reached: dict[str, Any] = {}
        pending = list(_refs(schema))
        while pending:
            name = pending.pop()
            if name not in reached:
                reached[name] = defs[name]
                pending.extend(_refs(defs[name]))
        schema.pop("$id", None)
        (target / path.name).write_text(json.dumps(_local_refs({**schema, "$defs": reached})), encoding="utf-8")
    crd_schemas = sorted(CRD_SCHEMAS.glob("*.json"))
    assert len(crd_schemas) == len(CRD_KINDS), f"no CRD schemas in {CRD_SCHEMAS}: `make helm-tools` writes them"
    for path in crd_schemas:
        shutil.copy(path, target / path.name)
    return f"{target}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json"


def kubeconform(manifests: str, schemas: str) -> subprocess.CompletedProcess[str]:
    return run(tool("kubeconform"), "-strict", "-summary", "-output", "json", "-schema-location", schemas, "-",
               stdin=manifests)


# --------------------------------------------------------------------------------------
# helm lint, helm template | kubeconform
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint(name: str, tmp_path: Path) -> None:
    proc = run(tool("helm"), "lint", "--strict", str(CHART), "-f", str(values_file(name, tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendering_matches_the_kubernetes_schemas(name: str, schemas: str) -> None:
    text = rendered_text(name)
    proc = kubeconform(text, schemas)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)["summary"]
    assert summary == {"valid": len(rendered(name)), "invalid": 0, "errors": 0, "skipped": 0}


def test_kubeconform_rejects_a_misspelt_field(schemas: str) -> None:
    """The schema check has teeth: an unknown field and a wrong type are found invalid."""

    def status(doc: dict[str, Any]) -> list[str]:
        proc = kubeconform(yaml.safe_dump(doc), schemas)
        return [r["status"] for r in json.loads(proc.stdout)["resources"]]

    docs = rendered("default")
    assert status(workload(docs)) == [], "a valid resource is not listed"
    broken = copy.deepcopy(workload(docs))
    broken["spec"]["replica"] = 2
    assert status(broken) == ["statusInvalid"]
    broken = copy.deepcopy(workload(docs))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    assert status(broken) == ["statusInvalid"]
    broken = copy.deepcopy(one(docs, "Service"))
    broken["spec"]["selector"] = ["app"]
    assert status(broken) == ["statusInvalid"]
    crds = rendered("keda")
    assert status(one(crds, "ServiceMonitor")) == status(one(crds, "ScaledObject")) == []
    broken = copy.deepcopy(one(crds, "ServiceMonitor"))
    broken["spec"]["endpoints"][0]["intervall"] = "30s"
    assert status(broken) == ["statusInvalid"]
    broken = copy.deepcopy(one(crds, "ScaledObject"))
    broken["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 50  # KEDA wants strings there
    assert status(broken) == ["statusInvalid"]
    broken = copy.deepcopy(one(crds, "PrometheusRule"))
    broken["spec"]["groups"][0]["rules"][0]["for"] = 120
    assert status(broken) == ["statusInvalid"]


def test_an_invalid_value_fails_to_render(tmp_path: Path) -> None:
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}}))
    proc = run(tool("helm"), "template", RELEASE, str(CHART), "-f", str(both))
    assert proc.returncode != 0 and "cannot both be enabled" in proc.stderr


# --------------------------------------------------------------------------------------
# what the rendering holds
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_selectors_match_the_pods(name: str) -> None:
    docs = rendered(name)
    work = workload(docs)
    labels = work["spec"]["template"]["metadata"]["labels"]
    selector = work["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= labels.items()
    for service in (d for d in docs if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]["name"]
        [port] = service["spec"]["ports"]
        assert port["targetPort"] == "http"
    assert {p["name"] for p in container(docs)["ports"]} == {"http"}
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    for kind in ("ScaledObject", "HorizontalPodAutoscaler"):
        for scaler in (d for d in docs if d["kind"] == kind):
            ref = scaler["spec"]["scaleTargetRef"]
            assert (ref["kind"], ref["name"]) == (work["kind"], work["metadata"]["name"])
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        service = next(d for d in docs if d["kind"] == "Service" and "clusterIP" not in d["spec"])
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
        # the alert rules select job="agent-service"
        assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "agent-service"


def pod_env(name: str) -> dict[str, str]:
    """The environment a pod of the rendering starts with (secrets and the pod name stood in)."""
    docs = rendered(name)
    env = {k: str(v) for k, v in one(docs, "ConfigMap")["data"].items()}
    pod_name = f"{workload(docs)['metadata']['name']}-0"
    for item in container(docs)["env"]:
        if "value" in item:
            env[item["name"]] = item["value"].replace("$(POD_NAME)", pod_name)
        elif "fieldRef" in item["valueFrom"]:
            env[item["name"]] = pod_name
        elif item["name"] == "AGENT_LLM__FALLBACKS":
            env[item["name"]] = json.dumps([{"base_url": "http://f/v1", "model": "m"}])
        elif item["name"] == "AGENT_LLM__REPLICAS":
            env[item["name"]] = json.dumps([{"base_url": "http://r/v1"}])
        elif item["name"] == "AGENT_REDIS__URL":
            env[item["name"]] = "redis://redis:6379/0"
        else:
            env[item["name"]] = "dummy"
    return env


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_agent_variable_is_a_setting_the_service_accepts(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in pod_env(name).items() if k.startswith("AGENT_")}
    unknown = set(env) - settings_env_names()
    assert not unknown, sorted(unknown)
    settings = build_settings(env, monkeypatch)
    assert settings.http.host == "0.0.0.0" and settings.http.port == 8000
    assert settings.kafka.group_id == "agent-workers"


def test_secured_values_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = build_settings({k: v for k, v in pod_env("secured").items() if k.startswith("AGENT_")}, monkeypatch)
    kafka = settings.kafka
    assert (kafka.security_protocol, kafka.sasl_mechanism, kafka.sasl_oauthbearer_method) == ("SASL_SSL", "OAUTHBEARER", "oidc")
    assert kafka.ssl_ca_location == "/etc/agent-service/kafka-tls/ca.crt"
    docs = rendered("secured")
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in workload(docs)["spec"]["template"]["spec"]["volumes"]}
    assert mounts["kafka-tls"] == "/etc/agent-service/kafka-tls"
    assert volumes["kafka-tls"]["secret"]["secretName"] == "kafka-ca"
    assert settings.ledger.lease_ms == 45000
    config = json.loads(one(docs, "ConfigMap")["data"]["AGENT_KAFKA__CONFIG"])
    assert config == {"client.rack": "use1-az1", "socket.keepalive.enable": True}
    assert len(settings.llm.fallbacks) == 1
    assert len(settings.llm.replicas) == 1


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_credentials_only_come_from_a_secret(name: str) -> None:
    docs = rendered(name)
    configmap = one(docs, "ConfigMap")["data"]
    assert not set(configmap) & CREDENTIAL_ENV
    env = {item["name"]: item for item in container(docs)["env"]}
    expected_secret = VALUE_SETS[name].get("secrets", {}).get("existingSecret") or f"{RELEASE}-secrets"
    for var in CREDENTIAL_ENV:
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == expected_secret, var
        assert ref.get("optional", False) is (var not in {"AGENT_ADMIN_TOKEN", "AGENT_REDIS__URL"}), var
    secrets = [d for d in docs if d["kind"] == "Secret"]
    if VALUE_SETS[name].get("secrets", {}).get("existingSecret"):
        assert not secrets, "an existing Secret is used, not made"
    else:
        [secret] = secrets
        assert secret["metadata"]["name"] == expected_secret
        assert {ref["valueFrom"]["secretKeyRef"]["key"] for ref in env.values() if "secretKeyRef" in ref.get("valueFrom", {})
                if not ref["valueFrom"]["secretKeyRef"].get("optional")} <= set(secret["data"])
    # a credential appears nowhere in plain text (the Secret holds it base64-encoded)
    plain = yaml.safe_dump([d for d in docs if d["kind"] != "Secret"])
    for word in SECRET_VALUES:
        assert f"{word}-secret-value" not in plain


def test_secret_values_land_in_the_secret() -> None:
    secret = one(rendered("secured"), "Secret")["data"]
    decoded = {k: base64.b64decode(v).decode() for k, v in secret.items()}
    assert decoded["admin-token"] == "admin-secret-value"
    assert decoded["submit-token"] == "submit-secret-value"
    assert decoded["redis-url"].startswith("rediss://")
    assert json.loads(decoded["llm-fallbacks"])[0]["model"] == "small"
    assert json.loads(decoded["llm-replicas"])[0]["name"] == "east"
    assert len(base64.b64decode(one(rendered("default"), "Secret")["data"]["admin-token"])) >= 32
    assert "submit-token" not in one(rendered("default"), "Secret")["data"], "unset: only the admin token submits"


def test_deployment_by_default_statefulset_when_transactional(monkeypatch: pytest.MonkeyPatch) -> None:
    default = rendered("default")
    assert workload(default)["kind"] == "Deployment"
    assert "AGENT_KAFKA__TRANSACTIONAL_ID" not in {e["name"] for e in container(default)["env"]}
    assert one(default, "ConfigMap")["data"]["AGENT_KAFKA__TRANSACTIONAL"] == "false"

    docs = rendered("transactional")
    sts = workload(docs)
    assert sts["kind"] == "StatefulSet"
    assert one(docs, "ConfigMap")["data"]["AGENT_KAFKA__TRANSACTIONAL"] == "true"
    headless = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None")
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    names = [e["name"] for e in container(docs)["env"]]
    assert names.index("POD_NAME") < names.index("AGENT_KAFKA__TRANSACTIONAL_ID"), "$(POD_NAME) expands only if set first"
    # each pod gets its own id, the same after every restart of that pod
    settings = build_settings({k: v for k, v in pod_env("transactional").items() if k.startswith("AGENT_")}, monkeypatch)
    assert settings.kafka.transactional is True
    assert settings.kafka.transactional_producer_config()["transactional.id"] == f"agent-workers-{sts['metadata']['name']}-0"

    keda = rendered("transactional-keda")
    ref = one(keda, "ScaledObject")["spec"]["scaleTargetRef"]
    assert ref["kind"] == "StatefulSet"
    assert one(keda, "ScaledObject")["spec"]["maxReplicaCount"] == 4
    assert "replicas" not in workload(keda)["spec"], "the autoscaler owns the replica count"


def test_probes_and_pod_security_match_the_k8s_manifests() -> None:
    from test_deploy import deployment_container, k8s_one

    chart = container(rendered("default"))
    k8s = deployment_container()
    for key in ("startupProbe", "livenessProbe", "readinessProbe", "securityContext", "resources"):
        assert chart[key] == k8s[key], key
    chart_pod = workload(rendered("default"))["spec"]["template"]["spec"]
    k8s_pod = k8s_one("Deployment")["spec"]["template"]["spec"]
    for key in ("securityContext", "terminationGracePeriodSeconds", "automountServiceAccountToken", "volumes"):
        assert chart_pod[key] == k8s_pod[key], key


def test_keda_matches_the_k8s_scaledobject() -> None:
    from test_deploy import configmap_data, k8s_one

    chart = one(rendered("keda"), "ScaledObject")["spec"]
    k8s = k8s_one("ScaledObject")["spec"]
    for key in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount", "advanced", "triggers"):
        assert chart[key] == k8s[key], key
    data = one(rendered("default"), "ConfigMap")["data"]
    for key, value in configmap_data().items():
        if key != "AGENT_REDIS__URL":  # a Secret in the chart
            assert data[key] == value, key


def test_prometheus_rule_is_deploy_prometheus_alerts() -> None:
    rule = one(rendered("keda"), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    assert {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]} == {r["alert"] for r in alert_rules()}
    assert (CHART / "files" / "alerts.yml").read_bytes() == ALERTS.read_bytes(), (
        "deploy/helm/agent-service/files/alerts.yml must be a copy of deploy/prometheus/alerts.yml: "
        "cp deploy/prometheus/alerts.yml deploy/helm/agent-service/files/alerts.yml"
    )
    assert not [d for d in rendered("default") if d["kind"] in CRD_KINDS], "CRD kinds are opt-in"


def test_notes_render() -> None:
    # helm template leaves NOTES.txt out; install --dry-run=client renders it without a cluster
    proc = run(tool("helm"), "install", RELEASE, str(CHART), "--dry-run=client", "--set", "kafka.transactional=true")
    assert proc.returncode == 0, proc.stderr
    assert "StatefulSet agent-service" in proc.stdout
    assert "agent-workers-<pod name>" in proc.stdout
