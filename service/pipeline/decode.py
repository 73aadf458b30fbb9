"""The consumer's decode edge: a record's bytes to a task, its agent and its validated input."""

from __future__ import annotations

from pydantic import BaseModel

from consumers.records import Record
from service.agents.base import Agent
from service.agents.registry import AgentRegistry
from service.agents.tasks import Task, decode_task
from service.core.errors import PoisonError
from service.core.schema_registry import ValueReader


async def read_task(record: Record, max_bytes: int, read: ValueReader | None) -> None:
    """Decode a record written through a Schema Registry off the event loop (the first value of each
    schema id asks the registry, which may be slow to answer): the task rides on ``record.memo``.

    Raises :class:`PoisonError` for the record's fault and
    :class:`~service.core.schema_registry.RegistryUnavailable` when the registry does not answer."""
    if read is not None and not isinstance(record.memo, Task):
        record.memo = await read.off_loop(decode_task, record.value, record.headers, max_bytes, read)


def decode_record(record: Record, agents: AgentRegistry, max_bytes: int) -> tuple[Task, Agent, BaseModel]:
    """The consumer's whole decode edge: bytes to a task, its agent (the version that runs this task,
    in a rollout) and its validated input.

    Raises nothing but :class:`PoisonError`, whatever the record holds: whatever the decoder or an
    input validator raises is the record's fault.
    """
    memo = record.memo  # decoded by the replay screen already
    task = memo if isinstance(memo, Task) else decode_task(record.value, record.headers, max_bytes)
    try:
        agent = agents.get(task.kind).version_for(task.key)
        return task, agent, agent.parse_input(task.event.input)
    except PoisonError as exc:
        exc.task_key = task.key
        raise
    except Exception as exc:  # noqa: BLE001 - a validator's own exception is still the record's fault
        raise PoisonError("schema", f"input of {task.kind}: {type(exc).__name__}: {str(exc)[:300]}",
                          task.key) from exc


def key_of(record: Record, max_bytes: int) -> str | None:
    """The task key of a record, or None when even the envelope does not decode."""
    if isinstance(record.memo, Task):
        return record.memo.key
    try:
        return decode_task(record.value, record.headers, max_bytes).key
    except PoisonError:
        return None
