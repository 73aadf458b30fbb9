"""A user's own agents on a real broker and redis-server: a package found by its entry point, and a
kind declared in a file, each run end to end by a service built the normal way; and a declared
kind's version that cannot silently change its meaning."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from dedup.client import close, connect
from dedup.keys import Keys
from dedup.ledger import Ledger
from service.agents.declared import DeclaredAgent
from service.core.settings import Settings
from service.devtools.fakellm import FakeLLM
from service.runtime.wiring import StartupRefused, build, ensure_topics
from tests.support import metric, produce, read_topic, running, succeeded, task_value, wait_for

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "kinds.toml"


def run_one(s: Settings, fake_llm: FakeLLM, task_id: str, kind: str, task_input: dict[str, Any]) -> dict[str, Any]:
    """Produce one task, wait for its result, and return the result event from the results topic."""
    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:  # no agents handed in: the service loads them
            assert svc.agents.get(kind) is not None
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic, [(task_id.encode(), task_value(kind, task_input,
                                                                                                   task_id))])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1,
                           what=f"the {kind} task to succeed", service=svc)
            assert metric(svc, "agent_dead_letters_total") == 0

    asyncio.run(scenario())
    results = succeeded(read_topic(s.kafka.bootstrap_servers, s.kafka.results_topic, expect=1))
    assert len(results) == 1 and results[0].key == task_id.encode()
    body: dict[str, Any] = results[0].json()
    assert body["status"] == "succeeded" and body["kind"] == kind and body["task_id"] == task_id
    return body


def test_an_agent_of_an_installed_package_runs_end_to_end(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings()
    body = run_one(s, fake_llm, "tt-1", "ticket_triage",
                   {"subject": "Charged twice", "body": "My card was charged twice for order 1182."})
    assert body["result"]["queue"] in {"billing", "technical", "account", "other"}
    assert isinstance(body["result"]["urgent"], bool)
    assert body["prompt_version"] == "summarize@triage-summarize-v1+route@triage-route-v1"
    by_key = fake_llm.stats()["by_step"]
    assert by_key["tt-1:summarize"] == 1 and by_key["tt-1:route"] == 1  # the model once per step
    assert fake_llm.calls_for("tt-1:") == 2


def test_a_kind_declared_in_a_file_runs_end_to_end(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(kinds_file=EXAMPLE)
    body = run_one(s, fake_llm, "sr-1", "support_reply",
                   {"customer": "Ana", "message": "The kettle arrived with a cracked lid.", "product": "kettle"})
    assert set(body["result"]) == {"subject", "body"} and body["result"]["subject"]
    assert body["prompt_version"] == "facts@v1+reply@v1"  # the kind's version, recorded with the result
    by_key = fake_llm.stats()["by_step"]
    assert by_key["sr-1:facts"] == 1 and by_key["sr-1:reply"] == 1
    assert fake_llm.calls_for("sr-1:") == 2


JOIN_KIND = """
[[kinds]]
name = "brief"
version = "v1"
input_schema = { type = "object", required = ["topic"], properties.topic = { type = "string" } }

[[kinds.steps]]
name = "pros"
needs = []
prompt = "The arguments for {topic}."
model = "pros-model"
temperature = 0.0
output_schema = { type = "object", required = ["points"], properties.points = { type = "array", items = { type = "string" } } }

[[kinds.steps]]
name = "cons"
needs = []
prompt = "The arguments against {topic}."
output_schema = { type = "object", required = ["points"], properties.points = { type = "array", items = { type = "string" } } }

[[kinds.steps]]
name = "verdict"
needs = ["cons", "pros"]
prompt = "Weigh {cons} against {pros} on {topic}."
output_schema = { type = "object", required = ["verdict"], properties.verdict = { type = "string" } }
"""


def test_a_declared_kind_fans_out_and_joins_in_the_order_it_names(make_settings: Any, fake_llm: FakeLLM,
                                                                   tmp_path: Path) -> None:
    """Two branches with no dependency run, then a join that reads both: its prompt places them as the
    file names them, and each step's model and temperature reach the model's request."""
    kinds = tmp_path / "kinds.toml"
    kinds.write_text(JOIN_KIND)
    s: Settings = make_settings(kinds_file=kinds)
    body = run_one(s, fake_llm, "br-1", "brief", {"topic": "four-day weeks"})
    assert set(body["result"]) == {"verdict"} and body["prompt_version"] == "pros@v1+cons@v1+verdict@v1"
    pros, cons, verdict = (fake_llm.last_request(f"br-1:{step}") for step in ("pros", "cons", "verdict"))
    assert pros is not None and cons is not None and verdict is not None
    assert (pros["model"], pros["temperature"]) == ("pros-model", 0.0)
    assert cons["model"] != "pros-model"  # the endpoint's default

    async def journal() -> dict[str, Any]:
        client = connect(s.redis.url.get_secret_value())
        try:
            return await Ledger(client, keys=Keys(s.redis.key_prefix), lease_ms=1000, ttl_s=600).steps("br-1")
        finally:
            await close(client)

    steps = asyncio.run(journal())
    cons_out, pros_out = (json.dumps(steps[name]["output"], ensure_ascii=False) for name in ("cons", "pros"))
    assert verdict["messages"][-1]["content"] == f"Weigh {cons_out} against {pros_out} on four-day weeks."


def test_a_declared_input_off_its_schema_is_dead_lettered(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(kinds_file=EXAMPLE)

    async def scenario() -> None:
        async with running(s, fake_llm.base_url) as svc:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                    [(b"sr-bad", task_value("support_reply", {"customer": "Ana"}, "sr-bad"))])
            await wait_for(lambda: metric(svc, "agent_dead_letters_total", {"reason": "schema"}) == 1,
                           what="a schema dead letter", service=svc)

    asyncio.run(scenario())
    (dead,) = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=1)
    assert b"'message' is a required property" in dead.headers["dlq.error"]
    assert fake_llm.calls_for("sr-bad") == 0


async def start(s: Settings, fake_llm: FakeLLM) -> None:
    """Build a service and run its start checks, then close it."""
    svc = build(s, llm_base_url=fake_llm.base_url)
    try:
        await svc.preflight()
    finally:
        await svc.aclose()


def test_a_declared_kind_changed_without_a_new_version_refuses_to_start(
    make_settings: Any, fake_llm: FakeLLM, tmp_path: Path, any_redis_url: str
) -> None:
    first = make_settings(kinds_file=EXAMPLE, redis={"url": any_redis_url})  # one server, and a Redis Cluster
    ensure_topics(first)
    text = EXAMPLE.read_text()
    changed = tmp_path / "kinds.toml"
    changed.write_text(text.replace("Write a reply to {customer}.", "Write a warm reply to {customer}."))
    renewed = tmp_path / "kinds-v2.toml"
    renewed.write_text(changed.read_text().replace('version = "v1"', 'version = "v2"'))
    described = tmp_path / "kinds-described.toml"  # a description is for people: not a change of meaning
    described.write_text(text.replace('description = "A customer', 'description = "Any customer'))

    async def scenario() -> None:
        await start(first, fake_llm)  # records support_reply v1
        await start(first, fake_llm)  # the same definition again: fine, on every restart
        with pytest.raises(StartupRefused) as err:
            await start(first.model_copy(update={"kinds_file": changed}), fake_llm)
        assert str(err.value).startswith("kind support_reply version v1 was changed without a new version")
        assert f"kinds file {changed}" in str(err.value)
        await start(first.model_copy(update={"kinds_file": renewed}), fake_llm)  # a new version: fine
        await start(first.model_copy(update={"kinds_file": described}), fake_llm)
        # the first definition is what v1 means for good, in the ledger's Redis
        svc = build(first, llm_base_url=fake_llm.base_url)
        try:
            agent = svc.agents.get("support_reply")
            assert isinstance(agent, DeclaredAgent)
            key = svc.ledger.keys.definition("support_reply", "v1")
            assert key == f"{first.redis.key_prefix}:definition:{{support_reply@v1}}:digest"
            assert (await svc.redis.get(key)).decode() == agent.definition_digest
            assert await svc.redis.ttl(key) == -1  # kept for ever
        finally:
            await svc.aclose()

    asyncio.run(scenario())


def test_an_agent_that_cannot_load_refuses_to_start(make_settings: Any, fake_llm: FakeLLM) -> None:
    s: Settings = make_settings(agents="no_such_package_here.agents:all")
    with pytest.raises(StartupRefused, match="agents not loaded: AGENT_AGENTS no_such_package_here.agents:all: "
                                             "cannot import no_such_package_here.agents"):
        build(s, llm_base_url=fake_llm.base_url)
