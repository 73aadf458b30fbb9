"""Every Redis key the ledger uses, in one place.

A task's keys share the hash tag ``{<task key>}`` so that all of them live in one slot and the
Lua scripts run unchanged on Redis Cluster. Task keys are validated before they get here
(:data:`TASK_KEY_PATTERN`): no braces, no whitespace, so a task cannot leave its hash tag or
choose another prefix.
"""

from __future__ import annotations

import functools
import re

TASK_KEY_PATTERN = r"^[A-Za-z0-9._:@/+=-]{1,200}$"
_TASK_KEY_RE = re.compile(TASK_KEY_PATTERN)
# A tenant id: a short, printable label that is safe as a key's hash tag and as a metric label
# (no braces, no colon, no whitespace or control characters)
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TENANT_MAX_LEN = 64
_TENANT_RE = re.compile(TENANT_PATTERN)


@functools.lru_cache(maxsize=65_536)  # a task's key is checked for each of its ledger calls
def is_valid_task_key(task_key: str) -> bool:
    return bool(_TASK_KEY_RE.fullmatch(task_key))


def is_valid_tenant(tenant: str) -> bool:
    return len(tenant) <= TENANT_MAX_LEN and bool(_TENANT_RE.fullmatch(tenant))


class Keys:
    """Key names under one prefix (``agent`` by default)."""

    def __init__(self, prefix: str = "agent") -> None:
        self.prefix = prefix

    def _tagged(self, task_key: str, suffix: str) -> str:
        if not is_valid_task_key(task_key):
            raise ValueError(f"invalid task key {task_key!r}")
        return f"{self.prefix}:{{{task_key}}}:{suffix}"

    def task(self, task_key: str) -> str:
        """Hash: state, fence, owner, lease_until, fingerprint, attempts, result, ..."""
        return self._tagged(task_key, "task")

    def endpoint(self, endpoint_tag: str, suffix: str) -> str:
        """Per-endpoint state shared by every replica (rate limits, Retry-After)."""
        return f"{self.prefix}:endpoint:{{{endpoint_tag}}}:{suffix}"

    def tenant_budget(self, tenant: str) -> str:
        """Hash: a tenant's token budget in the current period (``period``, ``used``). Its own hash
        tag ``{tenant}``; tenants are validated here too (:data:`TENANT_PATTERN`)."""
        if not is_valid_tenant(tenant):
            raise ValueError(f"invalid tenant {tenant[:80]!r}")
        return f"{self.prefix}:tenant:{{{tenant}}}:budget"

    def definition(self, name: str, version: str) -> str:
        """String: the digest of a declared definition ``name`` at ``version``, kept for ever. Its own
        hash tag ``{name@version}``; names and versions are validated by the caller (no braces)."""
        if not is_valid_task_key(name) or not is_valid_task_key(version):
            raise ValueError(f"invalid definition name or version {name!r} {version!r}")
        return f"{self.prefix}:definition:{{{name}@{version}}}:digest"

    def steps(self, task_key: str) -> str:
        """Hash: step name -> JSON ``{"output", "digest", "prompt_version", "fence"}``."""
        return self._tagged(task_key, "steps")

    def tools(self, task_key: str) -> str:
        """Hash: the task's tool calls, their decisions, approvals and undos (:mod:`dedup.effects`)."""
        return self._tagged(task_key, "tools")

    def cancel(self, task_key: str) -> str:
        """String: why the task's parent cancelled it (:meth:`dedup.children.Children.cancel`); a claim
        of the task, not started yet, that finds it ends the task ``dead(cancelled)``."""
        return self._tagged(task_key, "cancel")

    def audit(self, task_key: str) -> str:
        """List: the task's audit trail, one JSON entry per side effect or decision."""
        return self._tagged(task_key, "audit")

    def dead_letter(self, topic: str, partition: int, offset: int) -> str:
        """String: the ``dlq.id`` of the dead letter given to the record at these coordinates. Hash tag
        ``{topic:partition}``; a topic name (Kafka's ``[a-zA-Z0-9._-]``) never holds a brace."""
        if "{" in topic or "}" in topic:
            raise ValueError(f"invalid topic {topic[:80]!r}")
        return f"{self.prefix}:dlq:{{{topic}:{int(partition)}}}:{int(offset)}"

    def schedule(self, name: str) -> str:
        """Hash: a schedule's ``last_ms``, ``last_fired_ms``, ``produced``, ``skipped``
        (:mod:`dedup.schedules`). Its own hash tag ``{name}``; names are validated here too."""
        if not is_valid_task_key(name):
            raise ValueError(f"invalid schedule name {name[:80]!r}")
        return f"{self.prefix}:schedule:{{{name}}}"

    def schedule_lease(self, name: str) -> str:
        """String: the id of the replica producing a schedule's slots, with a TTL (the schedule's slot)."""
        return f"{self.schedule(name)}:lease"

    def session(self, session_id: str) -> str:
        """Hash: a session's ``kind``, ``version``, ``state``, ``summary``, its holder and each task's
        ticket, fence and applied mark (:mod:`dedup.sessions`). Its own hash tag ``{id}``, shared by its
        queue and turns (one slot); ids are validated here too."""
        if not is_valid_task_key(session_id):
            raise ValueError(f"invalid session id {session_id[:80]!r}")
        return f"{self.prefix}:session:{{{session_id}}}"

    def session_queue(self, session_id: str) -> str:
        """Sorted set: the session's waiting tasks by ticket (arrival order), its head first."""
        return f"{self.session(session_id)}:queue"

    def session_turns(self, session_id: str) -> str:
        """List: the session's turns, one JSON ``{task_id, input, result, at}`` each, in order."""
        return f"{self.session(session_id)}:turns"

    def session_applied(self, session_id: str) -> str:
        """Sorted set: the tasks whose update the session applied, by the version the apply made (the
        newest :data:`dedup.sessions_scripts.MARKS_MAX` kept)."""
        return f"{self.session(session_id)}:applied"

    def sessions(self) -> str:
        """Sorted set: session ids by their last change (ms), for listing; outside every session's slot."""
        return f"{self.prefix}:sessions"

    def parked(self) -> str:
        """Sorted set: tasks waiting for a person, by deadline (ms)."""
        return f"{self.prefix}:parked"
