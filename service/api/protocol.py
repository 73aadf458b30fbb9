"""What the HTTP app needs of the service it serves, and nothing more.

:class:`service.runtime.wiring.Service` is one; a test may hand in its own. The app depends on this
protocol rather than on the wiring, so the runtime can build the app without an import cycle.
"""

from __future__ import annotations

from typing import Protocol

from consumers.producers import Publisher
from consumers.runner import Runner
from dedup.ledger import Ledger
from service.agents.registry import AgentRegistry
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.pipeline.processor import TaskProcessor


class Served(Protocol):
    """The running service as the routes see it: read-only attributes."""

    @property
    def settings(self) -> Settings: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def ledger(self) -> Ledger: ...

    @property
    def publisher(self) -> Publisher: ...

    @property
    def agents(self) -> AgentRegistry: ...

    @property
    def processor(self) -> TaskProcessor: ...

    @property
    def runner(self) -> Runner: ...
