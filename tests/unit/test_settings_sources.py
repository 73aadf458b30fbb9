"""Settings from a TOML or YAML file (AGENT_CONFIG_FILE) under the environment; a misspelt AGENT_*
variable, or a file naming what is no setting, is refused at start with the closest known name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.settings import Settings
from service.core.settings_sources import NOT_SETTINGS, SettingsRefused, setting_names

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_agent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AGENT_") and not name.startswith("AGENT_TEST_"):
            monkeypatch.delenv(name)


TOML = """
max_in_flight = 32
[kafka]
bootstrap_servers = "k1:9092,k2:9092"
group_id = "from-file"
security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "svc"
sasl_password = "file-secret-1"
[kafka.config]
"client.rack" = "use1-az1"
[kafka.consumer_config]
"fetch.wait.max.ms" = 50
[llm]
model = "gpt-4o-mini"
[tenancy.tenants.acme]
weight = 3
"""

YAML = """
max_in_flight: 32
kafka:
  bootstrap_servers: k1:9092,k2:9092
  group_id: from-file
  config: {"client.rack": use1-az1}
  consumer_config: {"fetch.wait.max.ms": 50}
llm:
  model: gpt-4o-mini
tenancy:
  tenants: {acme: {weight: 3}}
"""


@pytest.mark.parametrize(("name", "text"), [("agent.toml", TOML), ("agent.yaml", YAML), ("agent.yml", YAML)])
def test_a_file_sets_what_the_environment_does_not(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    monkeypatch.setenv("AGENT_CONFIG_FILE", str(path))
    monkeypatch.setenv("AGENT_KAFKA__GROUP_ID", "from-env")
    monkeypatch.setenv("AGENT_LLM__MAX_TOKENS", "99")
    s = Settings()
    assert s.kafka.bootstrap_servers == "k1:9092,k2:9092" and s.max_in_flight == 32
    assert s.kafka.group_id == "from-env" and s.llm.max_tokens == 99 and s.llm.model == "gpt-4o-mini"
    conf = s.kafka.consumer_config()
    assert conf["client.rack"] == "use1-az1" and conf["fetch.wait.max.ms"] == "50"
    assert s.tenancy.tenants["acme"].weight == 3
    if name.endswith(".toml"):
        assert conf["sasl.password"] == "file-secret-1" and "file-secret-1" not in repr(s)


def test_without_a_file_the_environment_and_defaults_hold() -> None:
    assert Settings().kafka.group_id == "agent-workers"


@pytest.mark.parametrize(("text", "expected"), [
    ("[kafka]\nbootstrap_server = 'k:9092'\n", "kafka.bootstrap_server is not a setting; did you mean kafka.bootstrap_servers?"),
    ("max_inflight = 3\n", "max_inflight is not a setting; did you mean max_in_flight?"),
    ("[kafkaa]\ngroup_id = 'g'\n", "kafkaa is not a setting; did you mean kafka?"),
    ("[kafka\n", "does not parse"),
])
def test_a_file_that_does_not_parse_or_names_no_setting_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                   text: str, expected: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    monkeypatch.setenv("AGENT_CONFIG_FILE", str(path))
    with pytest.raises(SettingsRefused) as caught:
        Settings()
    assert expected in str(caught.value) and str(path) in str(caught.value)


def test_a_missing_file_or_an_unknown_format_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AGENT_CONFIG_FILE", str(tmp_path / "absent.toml"))
    with pytest.raises(SettingsRefused, match="absent.toml"):
        Settings()
    (tmp_path / "agent.ini").write_text("[kafka]\n")
    monkeypatch.setenv("AGENT_CONFIG_FILE", str(tmp_path / "agent.ini"))
    with pytest.raises(SettingsRefused, match=r"\.toml, \.yaml or \.yml"):
        Settings()


def test_a_value_the_file_gets_wrong_is_refused_naming_the_field(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[kafka]\nsession_timeout_ms = 5\n")
    monkeypatch.setenv("AGENT_CONFIG_FILE", str(path))
    with pytest.raises(ValidationError, match="kafka.session_timeout_ms"):
        Settings()


@pytest.mark.parametrize(("name", "suggestion"), [
    ("AGENT_KAFKA__BOOTSTRAP_SERVER", "AGENT_KAFKA__BOOTSTRAP_SERVERS"),
    ("AGENT_MAX_INFLIGHT", "AGENT_MAX_IN_FLIGHT"),
    ("AGENT_LLM_MODEL", "AGENT_LLM__MODEL"),
    ("agent_kafka__group_idd", "AGENT_KAFKA__GROUP_ID"),
])
def test_an_unknown_agent_variable_is_refused_with_the_closest_name(monkeypatch: pytest.MonkeyPatch, name: str,
                                                                    suggestion: str) -> None:
    monkeypatch.setenv(name, "x")
    with pytest.raises(SettingsRefused) as caught:
        Settings()
    assert str(caught.value) == f"{name.upper()} is not a setting; did you mean {suggestion}?"


def test_a_name_like_no_setting_is_refused_without_a_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_ZZZZ_QQQQ", "x")
    with pytest.raises(SettingsRefused, match="AGENT_ZZZZ_QQQQ is not a setting"):
        Settings()


def test_every_setting_and_every_variable_read_outside_the_settings_is_accepted(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    names = setting_names(Settings)
    assert {"AGENT_KAFKA__BOOTSTRAP_SERVERS", "AGENT_KAFKA__CONSUMER_CONFIG", "AGENT_KAFKA__CONSUMER_EXTRA",
            "AGENT_KAFKA", "AGENT_LLM__FALLBACKS", "AGENT_SCHEDULER__SCHEDULES"} <= names
    (tmp_path / "empty.toml").write_text("")
    for name in [*NOT_SETTINGS, "AGENT_TEST_BROKERS", "AGENT_TEST_ANYTHING", "AGENT_TENANCY__TENANTS__ACME__WEIGHT"]:
        monkeypatch.setenv(name, str(tmp_path / "empty.toml") if name == "AGENT_CONFIG_FILE" else "1")
    Settings()


def test_the_cli_refuses_a_misspelt_variable_at_start() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    env.update(PYTHONPATH=str(REPO), AGENT_KAFKA__BOOTSTRAP_SERVER="k:9092")
    done = subprocess.run([sys.executable, "-m", "service.cli", "task", "show", "t-1"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert ("AGENT_KAFKA__BOOTSTRAP_SERVER is not a setting; did you mean AGENT_KAFKA__BOOTSTRAP_SERVERS?"
            in done.stderr), done.stderr
