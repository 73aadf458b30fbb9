"""What the console's pages show, computed from the metrics, the ledger's records and the forms.

Nothing here speaks HTTP or reads a session: each function takes what a page found and returns
what its template renders, so each reads (and is tested) alone.
"""

from __future__ import annotations

import json
from collections import deque
from datetime import UTC, datetime
from graphlib import TopologicalSorter
from typing import Any

from prometheus_client import CollectorRegistry

from service.agents.base import Agent

HOUR_S = 3600.0
Samples = dict[str, list[tuple[dict[str, str], float]]]  # sample name -> (labels, value) of each sample


def iso_ms(ms: float | int | None) -> str:
    """A time in milliseconds since the epoch, as the pages show it (``-`` for none)."""
    if not ms:
        return "-"
    return datetime.fromtimestamp(float(ms) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def pretty(value: Any) -> str:
    """A value as indented, sorted JSON."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def samples(registry: CollectorRegistry) -> Samples:
    """Every sample of ``registry``, by sample name: its labels and its value."""
    out: Samples = {}
    for family in registry.collect():
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` that carry ``labels``."""
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def overview_figures(found: Samples) -> dict[str, Any]:
    """The overview's figures that the metrics alone give: outcomes, the in-flight window, the
    partitions and their lag, the breakers and degraded endpoints, parked tasks, results published."""
    lag = sorted(((lab.get("topic", ""), int(lab.get("partition", "0") or 0), v)
                  for lab, v in found.get("agent_consumer_lag", [])))
    breakers = sorted((lab.get("endpoint", ""), v) for lab, v in found.get("agent_llm_breaker_open", []))
    degraded = sorted((lab.get("endpoint", ""), lab.get("reason", "")) for lab, v in
                      found.get("agent_endpoint_degraded", []) if v)
    outcomes = {lab.get("outcome", ""): v for lab, v in found.get("agent_tasks_total", [])}
    return {
        "outcomes": outcomes, "inflight": total(found, "agent_inflight_tasks"),
        "paused": total(found, "agent_paused_partitions"), "assigned": total(found, "agent_assigned_partitions"),
        "lag": lag, "breakers": breakers, "degraded": degraded, "parked_gauge": total(found, "agent_parked_tasks"),
        "published": total(found, "agent_results_published_total"), "prompt_cache": prompt_cache(found),
    }


def prompt_cache(found: Samples) -> list[tuple[str, str, float, float]]:
    """Per kind and endpoint with prompt tokens: the prompt tokens, the cached ones and their ratio."""
    cached = {(lab.get("kind", ""), lab.get("endpoint", "")): v
              for lab, v in found.get("agent_llm_cached_prompt_tokens_total", [])}
    return sorted((lab.get("kind", ""), lab.get("endpoint", ""), v,
                   cached.get((lab.get("kind", ""), lab.get("endpoint", "")), 0.0))
                  for lab, v in found.get("agent_llm_prompt_tokens_total", []) if v)


def prompt_versions(agent: Agent | None) -> dict[str, str]:
    """Which prompt versions ``agent`` runs now (``current``) and tries (``candidate``)."""
    versions: dict[str, str] = {}
    if agent is not None:
        for step in agent.steps:
            versions.setdefault(step.prompt_version, "current")
        if agent.candidate is not None:
            for step in agent.candidate.steps:
                versions.setdefault(step.prompt_version, "candidate")
    return versions


def recent(history: deque[tuple[float, dict[str, float]]], now: float,
            counts: dict[str, float]) -> tuple[dict[str, float], float]:
    """Dead letters by reason over the last hour, from the counts this page saw (kept once a minute
    for an hour): what it can cover, the window it covers in seconds (0: nothing seen before)."""
    if not history or now - history[-1][0] >= 60:
        history.append((now, dict(counts)))
    while history and now - history[0][0] > HOUR_S:
        history.popleft()
    then, before = history[0]
    return {r: n - before.get(r, 0.0) for r, n in counts.items() if n - before.get(r, 0.0)}, now - then


def step_rows(record: dict[str, Any], agent_graph: dict[str, tuple[str, ...]] | None) -> list[dict[str, Any]]:
    """The journaled steps in the order of their ``needs`` (pieces of a map-reduce after their step),
    each with its depth in the graph."""
    steps: dict[str, Any] = record.get("steps") or {}
    graph: dict[str, tuple[str, ...]] = dict(agent_graph or {})
    for name in steps:
        base = name.split("-part-")[0]
        if base not in graph and name not in graph:
            graph[name] = ()
    try:
        order = list(TopologicalSorter(graph).static_order())
    except Exception:  # noqa: BLE001 - a graph from the ledger alone: keep its own order
        order = list(graph)
    depth: dict[str, int] = {}
    for name in order:
        depth[name] = 1 + max((depth.get(n, 0) for n in graph.get(name, ())), default=-1)
    rows = []
    for name in order:
        parts = sorted(n for n in steps if n.startswith(name + "-part-"))
        for journal_name in [name, *parts]:
            rec = steps.get(journal_name)
            if rec is None and journal_name != name:
                continue
            rows.append({"name": journal_name, "needs": graph.get(name, ()) if journal_name == name else (name,),
                         "depth": depth.get(name, 0), "record": rec, "part": journal_name != name})
    return rows


def parse_time(text: str) -> float | None:
    """An ISO 8601 time (UTC unless it says) in milliseconds since the epoch; None for none or nonsense."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp() * 1000


def selection(form: dict[str, list[str]]) -> list[tuple[int, int]]:
    """The dead letters a form selects (``sel`` values ``PARTITION:OFFSET``), each once, in order."""
    out: set[tuple[int, int]] = set()
    for item in form.get("sel", [])[:1000]:
        p, _, o = item.partition(":")
        if p.isdigit() and o.isdigit() and int(p) < 2**31 and int(o) < 2**63:
            out.add((int(p), int(o)))
    return sorted(out)
