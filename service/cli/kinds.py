"""``agent-service kinds``: the kinds this service would run, where each came from, and its steps."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from service.agents.loading import AgentsNotLoaded, agents_from_settings, describe
from service.cli.base import PROG
from service.core.settings import Settings


def kinds_command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        items = describe(agents_from_settings(settings))
    except AgentsNotLoaded as exc:
        print(f"{PROG}: agents not loaded: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(items, indent=2, ensure_ascii=False))
        return 0
    for n, item in enumerate(items):
        if n:
            print()
        print(render(item))
    return 0


def render(item: dict[str, Any]) -> str:
    """A kind as text: name and source, one line per step, and its input schema."""
    head = f"{item['kind']}  ({item['source']})"
    if "version" in item:
        head += f"  version {item['version']}"
    lines = [head, "  steps:"]
    width = max(len(s["name"]) for s in item["steps"])
    for step in item["steps"]:
        line = f"    {step['name']:<{width}}  needs: {', '.join(step['needs']) or '-'}  prompt: {step['prompt_version']}"
        if "model" in step:
            line += f"  model: {step['model']}"
        if "temperature" in step:
            line += f"  temperature: {step['temperature']}"
        lines.append(line)
    if "rollout" in item:
        rollout = item["rollout"]
        lines.append(f"  rollout: {rollout['share']:.0%} of task keys run {rollout['candidate']}")
    lines.append("  input schema:")
    lines += ["    " + text for text in json.dumps(item["input_schema"], indent=2, ensure_ascii=False).splitlines()]
    return "\n".join(lines)
