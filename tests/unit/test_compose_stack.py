"""The compose stack as it stands, checked without a container engine.

docker-compose.yml must agree with the README's "The compose stack" section (the services it names,
the URLs it gives), start each service only once what it depends on is healthy, hand the service
only real settings, send the service's traces through the OpenTelemetry collector to Jaeger, and
run the fake model with a command line that really serves chat completions (started here as a
subprocess). The gateway's nginx configuration is checked by ``nginx -t`` (Debian's nginx-light,
installed by ``make system-deps``; a missing nginx fails the test). The compose-spec schema check and
the Prometheus and Grafana files are tested in test_deploy.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
README = REPO / "README.md"
SERVICE = "agent-service"
HTTP_PORT = 8000
GATEWAY = "api"
FAKE_MODEL = "fake-model"
LOCAL_MODEL = "local-model"
COLLECTOR = "otel-collector"
JAEGER = "jaeger"
JAEGER_UI_PORT = 16686
# what the brief of the stack promises: the service waits for these to be healthy
HEALTHY_BEFORE_SERVICE = {"kafka", "redis", FAKE_MODEL}

_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::?(?P<op>[-?])(?P<arg>[^}]*))?\}")


def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as fh:
        doc: dict[str, Any] = yaml.safe_load(fh)
    return doc


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def interpolate_default(value: Any) -> str:
    """Compose interpolation with an empty environment: ``${X:-d}`` becomes ``d``."""
    return _INTERPOLATION.sub(lambda m: m.group("arg") or "", str(value)).replace("$$", "$")


def environment(name: str) -> dict[str, str]:
    env = services()[name].get("environment", {})
    if isinstance(env, list):
        env = dict(str(item).split("=", 1) for item in env)
    return {str(k): interpolate_default("" if v is None else v) for k, v in env.items()}


def depends_on(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The long form of ``depends_on``; the short form means ``service_started``."""
    deps = spec.get("depends_on", {})
    if isinstance(deps, list):
        return {str(name): {"condition": "service_started"} for name in deps}
    return {str(name): dict(value or {"condition": "service_started"}) for name, value in deps.items()}


def published_ports(spec: dict[str, Any]) -> dict[int, int]:
    """host port -> container port, for every port a service publishes."""
    ports: dict[int, int] = {}
    for entry in spec.get("ports", []):
        if isinstance(entry, dict):
            ports[int(entry["published"])] = int(entry["target"])
            continue
        parts = str(entry).split(":")
        assert len(parts) >= 2, f"{entry}: a port without a host side is published at random"
        ports[int(parts[-2])] = int(parts[-1].split("/")[0])
    return ports


def readme_compose_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("### The compose stack")
    end = text.find("\n#", start + 1)
    return text[start:] if end == -1 else text[start:end]


def command_argv(spec: dict[str, Any]) -> list[str]:
    def as_list(value: Any) -> list[str]:
        if value is None:
            return []
        return value.split() if isinstance(value, str) else [str(v) for v in value]

    return as_list(spec.get("entrypoint")) + as_list(spec.get("command"))


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def healthcheck_argv(spec: dict[str, Any]) -> list[str]:
    test = spec["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] in {"CMD", "CMD-SHELL"}, test
    return [str(t) for t in test]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def collector_config() -> dict[str, Any]:
    spec = services()[COLLECTOR]
    config_arg = next(a for a in command_argv(spec) if a.startswith("--config="))
    target = config_arg.removeprefix("--config=")
    mounts = {}
    for volume in spec["volumes"]:
        source, mounted = str(volume).split(":")[:2]
        mounts[mounted] = source
    assert target in mounts, f"{target} is not mounted into the collector"
    with (REPO / mounts[target]).open(encoding="utf-8") as fh:
        config: dict[str, Any] = yaml.safe_load(fh)
    return config


def host_port(endpoint: str) -> tuple[str, int]:
    parts = urlsplit(endpoint if "//" in endpoint else f"//{endpoint}")
    assert parts.hostname and parts.port, endpoint
    return parts.hostname, parts.port


# ---------------------------------------------------------------------------------- the README


def test_readme_names_every_service_and_only_those() -> None:
    named = set(re.findall(r"^- `([\w-]+)`", readme_compose_section(), flags=re.MULTILINE))
    assert named == set(services()), f"README only: {named - set(services())}; compose only: {set(services()) - named}"


def test_readme_urls_are_the_published_ports() -> None:
    section = readme_compose_section()
    in_readme = {int(p) for p in re.findall(r"http://localhost:(\d+)", section)}
    published = {port for spec in services().values() for port in published_ports(spec)}
    assert in_readme == published
    assert {HTTP_PORT, JAEGER_UI_PORT} <= published
    assert "docker compose --profile local-model up" in section


def test_readme_curl_examples_reach_the_api() -> None:
    """``curl localhost:8000/...`` elsewhere in the README lands on the gateway, which proxies to the replicas."""
    curl_ports = {int(p) for p in re.findall(r"curl [^\n]*?localhost:(\d+)", README.read_text(encoding="utf-8"))}
    assert curl_ports == {HTTP_PORT}
    gateway = services()[GATEWAY]
    container_port = published_ports(gateway)[HTTP_PORT]
    config = gateway_config_source().read_text(encoding="utf-8")
    assert re.search(rf"^\s*listen\s+{container_port};", config, flags=re.MULTILINE)
    # Docker's DNS, asked again as replicas come and go: a variable in proxy_pass resolves per request
    assert re.search(r"^\s*resolver\s+127\.0\.0\.11\b", config, flags=re.MULTILINE)
    target = re.search(r"^\s*set\s+\$(\w+)\s+(\S+);", config, flags=re.MULTILINE)
    assert target is not None
    assert target[2] == f"http://{SERVICE}:{HTTP_PORT}"
    assert re.search(rf"^\s*proxy_pass\s+\${target[1]};", config, flags=re.MULTILINE)
    assert depends_on(gateway)[SERVICE]["condition"] == "service_healthy"


def test_readme_curl_tokens_reach_the_service() -> None:
    """The tokens the README's curl lines send are the ones the stack hands the service from the shell."""
    text = README.read_text(encoding="utf-8")
    sent = set(re.findall(r"Bearer \$(AGENT_\w+)", text))
    assert sent == {"AGENT_ADMIN_TOKEN", "AGENT_READ_TOKEN"}
    raw = services()[SERVICE]["environment"]
    for name in sent:
        assert str(raw[name]).startswith(f"${{{name}"), f"{name} is not taken from the shell"
        assert re.search(rf"^export [^\n]*\b{name}=", readme_compose_section(), flags=re.MULTILINE), name


def gateway_config_source() -> Path:
    volume = next(str(v) for v in services()[GATEWAY]["volumes"] if str(v).endswith(".conf:ro"))
    return REPO / volume.split(":")[0]


def nginx_test(config: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on a server block, inside the http block the image's own nginx.conf gives it."""
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if nginx is None:
        pytest.fail("nginx not found: make system-deps installs Debian's nginx-light")
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp_path}/body;\n"
        f"  proxy_temp_path {tmp_path}/proxy;\n  include {config};\n}}\n",
        encoding="utf-8",
    )
    return subprocess.run([nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(main)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_gateway_config_passes_nginx_t(tmp_path: Path) -> None:
    proc = nginx_test(gateway_config_source(), tmp_path)
    assert proc.returncode == 0, proc.stderr
    broken = tmp_path / "broken.conf"
    broken.write_text(gateway_config_source().read_text(encoding="utf-8").replace("proxy_pass", "proxy_pas"))
    assert nginx_test(broken, tmp_path).returncode != 0, "nginx -t must reject an unknown directive"


# ---------------------------------------------------------------------------------- start order


def test_every_dependency_is_waited_for_by_its_healthcheck() -> None:
    stack = services()
    for name, spec in stack.items():
        for target, dep in depends_on(spec).items():
            assert target in stack, f"{name} depends on unknown service {target}"
            if dep["condition"] == "service_completed_successfully":
                assert stack[target].get("restart") == "no", f"{target} is a one-shot job"
                continue
            assert dep["condition"] == "service_healthy", f"{name} -> {target}: {dep['condition']}"
            test = healthcheck_argv(stack[target])
            assert test[1:] and test[1] != "NONE", f"{target} has no healthcheck"


def test_the_service_waits_for_kafka_redis_and_the_model() -> None:
    deps = depends_on(services()[SERVICE])
    for target in HEALTHY_BEFORE_SERVICE:
        assert deps[target] == {"condition": "service_healthy"}, target
    # the local model counts only when its profile is on
    assert deps[LOCAL_MODEL] == {"condition": "service_healthy", "required": False}
    assert healthcheck_argv(services()[SERVICE])


def test_images_are_pinned() -> None:
    for name, spec in services().items():
        if "build" in spec:
            continue
        image = spec["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert re.match(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin {image} by full version"


def test_agent_variables_are_real_settings() -> None:
    from service.core.settings import Settings
    from service.core.settings_sources import setting_names

    known = setting_names(Settings)
    for name in services():
        unknown = {key for key in environment(name) if key.startswith("AGENT_")} - known
        assert not unknown, f"{name}: Settings reads none of {sorted(unknown)}"


# ---------------------------------------------------------------------------------- traces


def test_collector_pipeline_exports_to_jaeger() -> None:
    config = collector_config()
    [pipeline_name] = [p for p in config["service"]["pipelines"] if p.split("/")[0] == "traces"]
    pipeline = config["service"]["pipelines"][pipeline_name]
    for kind in ("receivers", "processors", "exporters"):
        undefined = set(pipeline.get(kind, [])) - set(config.get(kind) or {})
        assert not undefined, f"{pipeline_name} uses undefined {kind}: {undefined}"
    assert "otlp" in pipeline["receivers"]
    to_jaeger = [
        config["exporters"][name] for name in pipeline["exporters"]
        if name.split("/")[0] in {"otlp", "otlphttp"}
        and host_port(config["exporters"][name]["endpoint"])[0] == JAEGER
    ]
    assert len(to_jaeger) == 1, f"no exporter of {pipeline_name} sends to {JAEGER}"
    [exporter] = to_jaeger
    _, port = host_port(exporter["endpoint"])
    assert port == 4317 and exporter["tls"]["insecure"] is True  # Jaeger's OTLP/gRPC port, plaintext
    jaeger = services()[JAEGER]
    assert environment(JAEGER).get("COLLECTOR_OTLP_ENABLED", "true") == "true"
    assert published_ports(jaeger)[JAEGER_UI_PORT] == JAEGER_UI_PORT
    assert depends_on(services()[COLLECTOR])[JAEGER]["condition"] == "service_healthy"


def test_the_service_exports_its_traces_to_the_collector() -> None:
    from service.core.tracing import TracingConfig

    config = TracingConfig.from_env(environment(SERVICE))
    assert config.enabled and "otlp" in config.exporters
    host, port = host_port(config.endpoint)
    assert host == COLLECTOR
    assert urlsplit(config.endpoint).path == "/v1/traces"
    receiver = collector_config()["receivers"]["otlp"]["protocols"]["http"]
    listen_host, listen_port = host_port(receiver["endpoint"])
    assert listen_port == port and listen_host == "0.0.0.0", "the receiver must listen beyond the container"


# ---------------------------------------------------------------------------------- the models


def test_fake_model_runs_from_the_service_image() -> None:
    stack = services()
    fake = stack[FAKE_MODEL]
    assert fake["image"] == stack[SERVICE]["image"] and fake["build"] == stack[SERVICE]["build"]
    argv = command_argv(fake)
    base_url = environment(SERVICE)["AGENT_LLM__BASE_URL"]
    assert host_port(base_url) == (FAKE_MODEL, int(flag(argv, "--port")))
    assert urlsplit(base_url).path == "/v1"
    assert flag(argv, "--host") == "0.0.0.0"


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def test_fake_model_command_serves_chat_completions(tmp_path: Path) -> None:
    """The service's command line, on a free port here: its healthcheck passes and it answers a chat."""
    fake = services()[FAKE_MODEL]
    argv = command_argv(fake)
    assert argv[0] == "python"
    compose_port = flag(argv, "--port")
    port = free_port()
    argv = [sys.executable, *argv[1:]]
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--host") + 1] = "127.0.0.1"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "fake-model.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while _get(f"http://127.0.0.1:{port}/health") != 200:
            assert proc.poll() is None, log.read_text(encoding="utf-8", errors="replace")
            assert time.monotonic() < deadline, "the fake model did not come up"
            time.sleep(0.2)
        check = healthcheck_argv(fake)
        assert check[0] == "CMD" and check[1] == "python"
        probe = [sys.executable, *(part.replace(compose_port, str(port)) for part in check[2:])]
        assert subprocess.run(probe, env=env, timeout=60, check=False).returncode == 0
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}]}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer not-needed"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        assert answer["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    assert _get(f"http://127.0.0.1:{port}/health") == 0


def test_local_model_is_a_profile_serving_the_pinned_model() -> None:
    stack = services()
    local = stack[LOCAL_MODEL]
    assert local["profiles"] == [LOCAL_MODEL]
    assert all(LOCAL_MODEL not in spec.get("profiles", []) for name, spec in stack.items() if name != LOCAL_MODEL)
    dockerfile = (REPO / local["build"]["context"] / local["build"]["dockerfile"]).read_text(encoding="utf-8")
    extra = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    pins = extra["project"]["optional-dependencies"]["local-llm"]
    for pin in pins:
        assert pin in dockerfile, f"the local model image must install {pin}, as the local-llm extra does"
    # the default llama.cpp build picks an AMX path that many CPUs cannot run
    assert "-DGGML_NATIVE=OFF" in dockerfile and "-DGGML_AMX_INT8=OFF" in dockerfile
    argv = command_argv(local)
    assert flag(argv, "--model_alias") == "smollm2"
    assert flag(argv, "--host") == "0.0.0.0"
    assert f"{LOCAL_MODEL}:{flag(argv, '--port')}" in readme_compose_section()
    assert healthcheck_argv(local)
