"""``agent-service try KIND --input JSON``: one task of a kind run in-process, without Kafka or Redis,
each step printed (name, attempts, output, tool calls), then the result or the dead letter's reason.

The model is ``--model fake`` (the fake model, answering random instances of each step's schema, on
a free port of this process), ``local`` (``AGENT_LLM__BASE_URL`` when set, else the embedded local
model) or the base URL of an OpenAI-compatible endpoint. The kinds are the service's own
(built-in, entry points, ``AGENT_AGENTS``) and those of ``--kinds FILE`` (or ``AGENT_KINDS_FILE``).
The steps' tools are the kinds' own: they act. Exit code 0 when the task succeeds, 1 when it is
dead-lettered or parks, 2 when it cannot run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.agents.base import Agent
from service.agents.loading import AgentsNotLoaded, load_agents
from service.cli.base import PROG
from service.core.errors import PoisonError
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.llm.client import LLMClient
from service.runtime.trial import TRIAL_CONFIG, TrialRefused, TrialRun, run_trial


def try_command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        task_input = json.loads(args.task_input)
    except ValueError as exc:
        print(f"{PROG}: --input is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(task_input, dict):
        print(f"{PROG}: --input must be a JSON object", file=sys.stderr)
        return 2
    try:
        agent = load_agents(spec=settings.agents, kinds_file=args.kinds or settings.kinds_file).get(args.kind)
    except (AgentsNotLoaded, PoisonError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    with _model(settings, args.model) as (llm, url):
        try:
            outcome = asyncio.run(_run(llm, url, agent, task_input))
        except TrialRefused as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 2
    print(render(outcome))
    return 0 if outcome.ok else 1


async def _run(settings: Settings, url: str, agent: Agent, task_input: dict[str, Any]) -> TrialRun:
    config = dataclasses.replace(
        TRIAL_CONFIG, max_attempts=settings.llm.max_attempts, backoff_base_s=settings.llm.backoff_base_s,
        backoff_max_s=settings.llm.backoff_max_s, llm_timeout_s=settings.llm.timeout_s,
        context_tokens=settings.llm.context_tokens, max_output_tokens=settings.llm.max_tokens)
    client = LLMClient(settings.llm, url, Metrics())
    try:
        return await run_trial(agent, task_input, client, task_id="try-1", config=config,
                               model_name=settings.llm.model)
    finally:
        await client.aclose()


@contextlib.contextmanager
def _model(settings: Settings, model: str) -> Iterator[tuple[Settings, str]]:
    """The settings to call the model with and its base URL, the fake or local model started for the run."""
    if model == "fake":
        from service.devtools.fakellm import MODEL_NAME, FakeLLM

        with FakeLLM() as fake:
            yield _llm(settings, model=MODEL_NAME), fake.base_url
        return
    if model == "local" and settings.llm.base_url is None:
        from service.devtools.embedded import with_local_model
        from service.devtools.local import start_local_model

        with tempfile.TemporaryDirectory(prefix="agent-try-") as data:
            server = start_local_model(Path(data), gguf=settings.llm.local_gguf)
            try:
                yield with_local_model(settings), f"http://{server.address}/v1"
            finally:
                server.stop()
        return
    yield settings, (settings.llm.base_url or "") if model == "local" else model


def _llm(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(update={"llm": settings.llm.model_copy(update=update)})


def render(outcome: TrialRun) -> str:
    """Each step (name, attempts, output, its tool calls), then the result or why there is none."""
    lines = []
    for step in outcome.steps:
        lines.append(f"step {step.name}  attempts {step.attempts}")
        for call in (c for c in outcome.tool_calls if c["step"] == step.name):
            lines.append(f"  tool {call['tool']} {_json(call['arguments'])} -> {call['outcome']} {_json(call['result'])}")
        lines.append(f"  output {_json(step.output) if step.output is not None else '(none)'}")
    if outcome.status == "succeeded":
        lines.append(f"succeeded: {_json(outcome.result)}")
    elif outcome.status == "parked":
        lines.append(f"parked: {outcome.error}")
    else:
        lines.append(f"dead letter: {outcome.reason}: {outcome.error}")
    return "\n".join(lines)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
