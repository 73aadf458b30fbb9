"""Prometheus metrics on an explicit registry (never the global one).

Labels are bounded: outcomes, reasons, directions, topic and partition numbers; never a task id.

Under ``agent-service run --workers N`` every worker writes its values to the supervisor's
``PROMETHEUS_MULTIPROC_DIR`` and one scrape of the supervisor adds them up: counters and histograms
are summed over every worker that ever ran (a restarted worker's counts stay), and each gauge says
how its workers' values combine (``multiprocess_mode``, ignored by a single process): in-flight
records, paused and assigned partitions are the sum over live workers, a breaker or a degraded
endpoint is the largest (1 when any worker sees it), and a partition's lag is the latest value
written by a live worker (the one that owns it now).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TASK_OUTCOMES = ("succeeded", "duplicate", "dead_lettered", "conflict", "parked")
DLQ_REASONS = (
    "decode", "schema", "oversize", "conflict", "expired", "permanent", "exhausted", "invalid_output",
    "internal", "rejected", "unavailable", "budget", "crashed", "session_busy", "session",
)
# why a record of the replies topic was skipped (``agent_replies_skipped_total``): a closed set
REPLY_SKIP_REASONS = ("tombstone", "oversize", "encoding", "json", "schema", "task_key", "mismatch", "unknown_parent",
                      "unplanned", "refused", "internal")
LLM_OUTCOMES = (
    "ok", "timeout", "rate_limited", "server_error", "client_error", "connection_error",
    "truncated", "refused", "invalid_output",
)


class Metrics:
    """Every metric the service exports. One instance per process, handed in where needed.

    The metrics are declared by area, one method each (records, ledger, model calls, endpoint,
    tenancy, tools and parking, liveness); every one is an attribute of the instance.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._records(self.registry)
        self._ledger(self.registry)
        self._model_calls(self.registry)
        self._endpoint(self.registry)
        self._tenancy(self.registry)
        self._tools_and_parking(self.registry)
        self._delegation(self.registry)
        self._schedules(self.registry)
        self._sessions(self.registry)
        self._liveness(self.registry)
        self._label_children()

    def _records(self, r: CollectorRegistry) -> None:
        """The records read and how their tasks ended: outcomes, dead letters, versions and shadow runs."""
        self.messages_consumed = Counter(
            "agent_messages_consumed", "Records read from the input topic.", registry=r
        )
        self.tasks = Counter(
            "agent_tasks", "Tasks finished, by outcome.", ["outcome"], registry=r
        )
        self.dead_letters = Counter(
            "agent_dead_letters", "Records written to the dead-letter topic.", ["reason"], registry=r
        )
        self.internal_errors = Counter(
            "agent_internal_errors", "Failures of the service's own code while processing a record.", registry=r
        )
        self.task_duration = Histogram(
            "agent_task_duration_seconds", "Time from record receipt to durable outcome.",
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r,
        )
        self.task_versions = Counter(
            "agent_task_versions", "Tasks finished, by kind and the prompt version that ran them.",
            ["kind", "version", "outcome"], registry=r,
        )
        self.shadow_runs = Counter(
            "agent_shadow_runs", "Duplicates re-run in shadow (never written), by whether the answer differed.",
            ["outcome"], registry=r,
        )
        self.rollout_divergence = Counter(
            "agent_rollout_divergence",
            "Duplicates of a kind in rollout re-run in shadow on the version that did not answer, by whether "
            "that version's answer differed.", ["kind", "outcome"], registry=r,
        )
        self.degraded_answers = Counter(
            "agent_degraded_answers",
            "Results answered (in some step) by a fallback endpoint, flagged degraded: true, by kind.",
            ["kind"], registry=r,
        )

    def _ledger(self, r: CollectorRegistry) -> None:
        """What reaches the ledger and the broker: the replay screen, fenced writes, results, commits, audit."""
        self.screened = Counter(
            "agent_replay_screened",
            "Records finished by the replay screen, one ledger read per batch: done and published before.",
            registry=r,
        )
        self.stale_fence_writes = Counter(
            "agent_stale_fence_writes", "Ledger writes refused because a newer fence holds the task.",
            registry=r,
        )
        self.results_published = Counter(
            "agent_results_published", "Result events acknowledged by the broker.", registry=r
        )
        self.committed_offsets = Counter(
            "agent_offset_commits", "Offset commits sent to the broker.", registry=r
        )
        self.audit_exports = Counter(
            "agent_audit_events", "Audit entries sent to the audit topic.", registry=r,
        )

    def _model_calls(self, r: CollectorRegistry) -> None:
        """One model call: its HTTP attempts, tokens, latency, retries and where it went."""
        self.llm_requests = Counter(
            "agent_llm_requests", "LLM HTTP attempts, by outcome.", ["outcome"], registry=r
        )
        self.llm_tokens = Counter(
            "agent_llm_tokens", "LLM tokens reported by the endpoint.", ["direction"], registry=r
        )
        self.llm_latency = Histogram(
            "agent_llm_latency_seconds", "Latency of one LLM HTTP attempt, by kind and endpoint (the loaded "
            "kinds and the configured endpoints; any other is other).", ["kind", "endpoint"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r,
        )
        self.llm_prompt_tokens = Counter(
            "agent_llm_prompt_tokens", "Prompt tokens the endpoint reported, by kind and endpoint (bounded as "
            "the latency's labels).", ["kind", "endpoint"], registry=r,
        )
        self.llm_cached_prompt_tokens = Counter(
            "agent_llm_cached_prompt_tokens", "Of the prompt tokens, those the endpoint read from its prompt cache "
            "(usage.prompt_tokens_details.cached_tokens), by kind and endpoint.", ["kind", "endpoint"], registry=r,
        )
        self.retries = Counter("agent_retries", "LLM calls retried after a failure.", registry=r)
        self.fallbacks = Counter(
            "agent_fallbacks",
            "Model calls sent to a fallback endpoint while the primary was unavailable, by endpoint name.",
            ["endpoint"], registry=r,
        )
        self.steps_reused = Counter(
            "agent_steps_reused", "Journaled agent steps re-used instead of calling the model again.",
            registry=r,
        )

    def _endpoint(self, r: CollectorRegistry) -> None:
        """What protects an endpoint: the breaker, the retry budget, the fleet's window, the rate limits."""
        self.breaker_open = Gauge(
            "agent_llm_breaker_open", "1 while the circuit breaker of an LLM endpoint is open.", ["endpoint"],
            registry=r, multiprocess_mode="livemax",
        )
        self.breaker_probes = Counter(
            "agent_llm_breaker_probes", "Half-open probes the breaker made with a call of its own, while only "
            "tasks that had just failed waited.", ["endpoint"], registry=r,
        )
        self.breaker_opens = Counter(
            "agent_llm_breaker_opens", "Times an LLM endpoint's circuit breaker opened.", registry=r
        )
        self.endpoint_degraded = Gauge(
            "agent_endpoint_degraded",
            "1 while an LLM endpoint cannot serve any task (revoked key, unknown model, unreachable), by reason.",
            ["endpoint", "reason"], registry=r, multiprocess_mode="livemax",
        )
        self.retry_budget_refusals = Counter(
            "agent_retry_budget_refusals", "Retries held back because the retry budget was spent.", registry=r
        )
        self.llm_window = Gauge(
            "agent_llm_window",
            "Model calls the fleet may have open on an endpoint: the adaptive window (slow start, then AIMD), "
            "as this worker last saw it.",
            ["endpoint"], registry=r, multiprocess_mode="livemostrecent",
        )
        self.llm_window_waits = Counter(
            "agent_llm_window_waits",
            "Times a model call waited because the fleet's window on the endpoint was full.", ["endpoint"], registry=r,
        )
        self.llm_window_cuts = Counter(
            "agent_llm_window_cuts",
            "Times a call cut the fleet's window: rate_limited or timeout (multiplied by the backoff), "
            "outage (back to the initial size).", ["endpoint", "reason"], registry=r,
        )
        self.rate_limited = Counter(
            "agent_rate_limit_waits", "Times a call waited for the shared requests/tokens per minute budget.",
            ["priority"], registry=r,
        )

    def _tenancy(self, r: CollectorRegistry) -> None:
        """How tenants share the quota and what they spend."""
        self.fair_yields = Counter(
            "agent_fair_yields",
            "Times a call had room in the shared quota but yielded it to a tenant further behind its share, "
            "by tenant (named tenants, default, other).", ["tenant"], registry=r,
        )
        self.tenant_tokens = Counter(
            "agent_tenant_tokens",
            "LLM tokens reported by the endpoint, by tenant (named tenants, default, other), kind and direction.",
            ["tenant", "kind", "direction"], registry=r,
        )
        self.tenant_cost = Counter(
            "agent_tenant_cost",
            "What the model calls cost by the price table (AGENT_TENANCY__PRICES), by tenant and kind.",
            ["tenant", "kind"], registry=r,
        )
        self.budget_refusals = Counter(
            "agent_budget_refusals",
            "Model calls refused because the tenant's token budget for the period was spent, by tenant and what "
            "the task did (wait, dead_letter).", ["tenant", "policy"], registry=r,
        )

    def _tools_and_parking(self, r: CollectorRegistry) -> None:
        """Tool calls, tasks parked for a person and the decisions on them, compensations."""
        self.tool_calls = Counter(
            "agent_tool_calls",
            "Tool calls by tool and outcome: executed, replayed (from the journal), refused (by the tool), "
            "invalid (arguments or name; never run), limit (over the step's bound), reconciled_landed, "
            "reconciled_absent, stale (a newer claim held the task when the result came back).",
            ["tool", "outcome"], registry=r,
        )
        self.parked_tasks = Gauge(
            "agent_parked_tasks", "Tasks waiting for a person (an approval, or an operator's answer to a reconcile).",
            registry=r, multiprocess_mode="livemax",  # every worker reads the same count from Redis
        )
        self.parkings = Counter(
            "agent_parkings", "Tasks parked, by what they wait for (approval, reconcile).", ["what"], registry=r,
        )
        self.decisions = Counter(
            "agent_wait_decisions", "Decisions on parked tasks: approved, rejected, expired, landed, absent.",
            ["decision"], registry=r,
        )
        self.approvals_skipped = Counter(
            "agent_approvals_skipped", "Records of the approvals topic skipped without a decision applied, by "
            "reason: tombstone, oversize, encoding, json, schema, task_key, unknown_task, not_waiting, refused, "
            "internal (one that kept failing the consumer's loop).",
            ["reason"], registry=r,
        )
        self.compensations = Counter(
            "agent_compensations", "Undos of tool calls run by a compensation, by outcome (undone, skipped, failed).",
            ["outcome"], registry=r,
        )

    def _batch_lane(self, r: CollectorRegistry) -> None:
        """The batch lane (service.pipeline.batch_lane): its calls by state, its batches by end, their age."""
        self.batch_tasks = Counter(
            "agent_batch_tasks", "Model calls of the batch lane, by state: queued (parked for a batch), done "
            "(answered by their batch), invalid (their line failed the schema: online), online (the batch failed, "
            "expired or passed the task's share of its deadline).", ["state"], registry=r)
        self.batches = Counter("agent_batches", "Batches of the batch lane, by how they ended at the provider "
                               "(submitted, completed, failed, expired, cancelled).", ["status"], registry=r)
        self.batch_age = Gauge("agent_batch_age_seconds", "Age of the oldest batch not ended, as this worker's "
                               "poller last saw it.", registry=r, multiprocess_mode="livemax")

    def _delegation(self, r: CollectorRegistry) -> None:
        """Child tasks: started, fanned out, waited for, and the replies that end the waits."""
        self.children_started = Counter(
            "agent_children_started", "Child tasks produced, the first time per child id, by the child's kind.",
            ["kind"], registry=r,
        )
        self.fanout = Histogram(
            "agent_fanout", "Children per delegating step, by the delegating task's kind.", ["kind"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r,
        )
        self.waiting_parents = Gauge(
            "agent_waiting_parents", "Parents parked until their children end (waiting_children).",
            registry=r, multiprocess_mode="livemax",  # every worker reads the same count from Redis
        )
        self.replies = Counter(
            "agent_replies", "Replies of children read from the replies topic, by what they were: succeeded or "
            "dead (folded into the parent), duplicate (the child's reply was folded before).", ["state"], registry=r,
        )
        self._batch_lane(r)
        self.replies_skipped = Counter(
            "agent_replies_skipped", "Records of the replies topic skipped without a fold, by reason: "
            f"{', '.join(REPLY_SKIP_REASONS)}.", ["reason"], registry=r,
        )

    def _schedules(self, r: CollectorRegistry) -> None:
        """Schedules: slots produced and skipped, how late, the newest slot and the next fire time."""
        self.schedule_slots = Counter(
            "agent_schedule_slots", "Slots of a schedule handled by this replica, by outcome: produced (a task), "
            "skipped (missed, beyond the catch-up policy).", ["schedule", "outcome"], registry=r,
        )
        self.schedule_lag = Histogram(
            "agent_schedule_lag_seconds", "How late after its fire time a slot was produced, by schedule.",
            ["schedule"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600), registry=r,
        )
        self.schedule_last_slot = Gauge(
            "agent_schedule_last_slot_timestamp_seconds", "The newest slot handled (produced or skipped), by "
            "schedule, read from the ledger.", ["schedule"], registry=r, multiprocess_mode="livemax",
        )
        self.schedule_next_fire = Gauge(
            "agent_schedule_next_fire_timestamp_seconds", "When the slot after the newest handled fires, by "
            "schedule, read from the ledger: in the past, a slot is due and not produced yet.", ["schedule"],
            registry=r, multiprocess_mode="livemin",
        )
        self.schedule_errors = Counter(
            "agent_schedule_errors", "Ticks of a schedule that failed (Redis or the broker away, a bug): tried "
            "again next tick.", ["schedule"], registry=r,
        )

    def _sessions(self, r: CollectorRegistry) -> None:
        """Sessions (docs/SESSIONS.md): turns applied, conflicts reduced again, waits for a turn."""
        self.session_turns = Counter(
            "agent_session_turns", "Updates of a session applied (a turn or a reduced state), once per task, by "
            "kind.", ["kind"], registry=r,
        )
        self.session_conflicts = Counter(
            "agent_session_conflicts", "Applies that found the session's version moved (an operator's PUT, "
            "another task's apply) and read and reduced again, by kind.", ["kind"], registry=r,
        )
        self.session_wait = Histogram(
            "agent_session_wait_seconds", "How long a task waited for its session's turn, by kind.", ["kind"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300), registry=r,
        )
        self.session_summaries = Counter(
            "agent_session_summaries", "Summaries of a session's oldest turns stored (its history outgrew "
            "history_share of the window), by kind.", ["kind"], registry=r,
        )
        self.session_updates_dropped = Counter(
            "agent_session_updates_dropped", "Updates of a session not applied after the task's result was "
            "accepted: the state had moved and the kind's reduce refused it (or it kept moving), by kind.",
            ["kind"], registry=r,
        )

    def _liveness(self, r: CollectorRegistry) -> None:
        """Whether work moves: records in flight or waiting, partitions paused or assigned, lag, stalls."""
        self.waiting_records = Gauge(
            "agent_waiting_records", "Records waiting before a model call, by what they wait for (budget, endpoint, "
            "window, refused, backoff).", ["why"], registry=r, multiprocess_mode="livesum",
        )
        self.inflight = Gauge("agent_inflight_tasks", "Records held in flight.", registry=r,
                              multiprocess_mode="livesum")
        self.paused_partitions = Gauge(
            "agent_paused_partitions", "Assigned partitions paused for backpressure.", registry=r,
            multiprocess_mode="livesum",
        )
        self.stalled_seconds = Gauge(
            "agent_stalled_seconds", "Seconds since a record last finished while work is pending (records "
            "in flight, or paused partitions with lag); 0 otherwise.", registry=r, multiprocess_mode="livemax",
        )
        self.assigned_partitions = Gauge(
            "agent_assigned_partitions", "Partitions assigned to this worker.", registry=r,
            multiprocess_mode="livesum",
        )
        # when records began and last ended, to the microsecond (a rate over a short run needs no
        # scrape at its ends): each worker's own first record, the latest finish over all of them
        self.first_record_time = Gauge(
            "agent_first_record_timestamp_seconds", "Unix time this worker read its first record (0 before).",
            registry=r, multiprocess_mode="liveall",
        )
        self.last_finish_time = Gauge(
            "agent_last_finish_timestamp_seconds", "Unix time a record last finished: its outcome durable, or "
            "found durable before (0 before).", registry=r, multiprocess_mode="max",
        )
        self.consumer_lag = Gauge(
            "agent_consumer_lag", "High watermark minus committed offset.", ["topic", "partition"],
            registry=r, multiprocess_mode="livemostrecent",
        )

    def _label_children(self) -> None:
        """Every bounded label value shows from the start (at 0), and the hot children are looked up once."""
        for outcome in TASK_OUTCOMES:
            self.tasks.labels(outcome=outcome)
        for reason in DLQ_REASONS:
            self.dead_letters.labels(reason=reason)
        for outcome in LLM_OUTCOMES:
            self.llm_requests.labels(outcome=outcome)
        for priority in ("interactive", "batch"):
            self.rate_limited.labels(priority=priority)
        for outcome in ("same", "different", "failed"):
            self.shadow_runs.labels(outcome=outcome)
        for direction in ("input", "output"):
            self.llm_tokens.labels(direction=direction)
        for state in ("succeeded", "dead", "duplicate"):
            self.replies.labels(state=state)
        for reason in REPLY_SKIP_REASONS:
            self.replies_skipped.labels(reason=reason)
        # the children every task touches, looked up once: ``labels()`` validates and locks on each call
        self.task_outcome = {outcome: self.tasks.labels(outcome=outcome) for outcome in TASK_OUTCOMES}
        self.llm_outcome = {outcome: self.llm_requests.labels(outcome=outcome) for outcome in LLM_OUTCOMES}
        self.tokens_in = self.llm_tokens.labels(direction="input")
        self.tokens_out = self.llm_tokens.labels(direction="output")
        self._versions: dict[tuple[str, str, str], Any] = {}
        self._model_kinds: frozenset[str] = frozenset()
        self._endpoints: frozenset[str] = frozenset()
        self._latencies: dict[tuple[str, str], Any] = {}
        self._prompts: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._tenant_tokens: dict[tuple[str, str], tuple[Any, Any]] = {}

    def name_models(self, kinds: Iterable[str], endpoints: Iterable[str]) -> None:
        """The kinds and endpoints ``agent_llm_latency_seconds`` names; any other is ``other``."""
        self._model_kinds, self._endpoints = frozenset(kinds), frozenset(endpoints)
        self._latencies.clear()
        self._prompts.clear()

    def model_latency(self, kind: str | None, endpoint: str) -> Any:
        """``llm_latency`` for a call of a task of ``kind`` to ``endpoint`` (bounded labels)."""
        key = (kind if kind in self._model_kinds else "other", endpoint if endpoint in self._endpoints else "other")
        child = self._latencies.get(key)
        if child is None:
            child = self._latencies[key] = self.llm_latency.labels(kind=key[0], endpoint=key[1])
        return child

    def prompt_tokens(self, kind: str | None, endpoint: str) -> tuple[Any, Any]:
        """``llm_prompt_tokens`` and ``llm_cached_prompt_tokens`` for ``kind`` and ``endpoint`` (bounded labels)."""
        key = (kind if kind in self._model_kinds else "other", endpoint if endpoint in self._endpoints else "other")
        children = self._prompts.get(key)
        if children is None:
            labels = {"kind": key[0], "endpoint": key[1]}
            children = self._prompts[key] = (self.llm_prompt_tokens.labels(**labels),
                                             self.llm_cached_prompt_tokens.labels(**labels))
        return children

    def tenant_tokens_of(self, tenant: str, kind: str) -> tuple[Any, Any]:
        """``tenant_tokens`` input and output for a tenant's label and a kind (both bounded)."""
        children = self._tenant_tokens.get((tenant, kind))
        if children is None:
            children = self._tenant_tokens[(tenant, kind)] = (
                self.tenant_tokens.labels(tenant=tenant, kind=kind, direction="input"),
                self.tenant_tokens.labels(tenant=tenant, kind=kind, direction="output"))
        return children

    def task_version(self, kind: str, version: str, outcome: str) -> Any:
        """``task_versions`` for one kind, prompt version and outcome (bounded: the loaded kinds)."""
        key = (kind, version, outcome)
        child = self._versions.get(key)
        if child is None:
            child = self._versions[key] = self.task_versions.labels(kind=kind, version=version, outcome=outcome)
        return child
