"""The process's HTTP port from its first moment, and the wait for the dependencies behind it.

:class:`Front` serves ``/healthz`` and ``/readyz`` while :func:`wait_for_dependencies` waits for
Redis, the broker, the topics and a model endpoint, then serves the service's app on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

from dedup.client import close
from service.api.app import create_starting_app
from service.core.settings import Settings
from service.runtime.connections import redis_client
from service.runtime.liveness import Dependencies, Startup
from service.runtime.topics import ensure_topics

log = logging.getLogger(__name__)


class Front:
    """The process's one HTTP port, served from the start: the starting app (``/healthz`` 200,
    ``/readyz`` 503 naming what is missing) while the process waits for its dependencies, then the
    service's app, without closing the port in between."""

    def __init__(self, settings: Settings, startup: Startup) -> None:
        self.app: Any = create_starting_app(lambda: startup.checks)
        self.server: Any = None
        self.task: asyncio.Task[None] | None = None
        if settings.http.enabled:
            import uvicorn

            config = uvicorn.Config(self, host=settings.http.host, port=settings.http.port, log_level="warning",
                                    access_log=False, lifespan="off", interface="asgi3")
            self.server = http_server(config)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    def start(self) -> None:
        if self.server is not None:
            self.task = asyncio.create_task(self.server.serve(), name="http")

    async def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


def http_server(config: Any) -> Any:
    """A uvicorn server without its own signal handling: the service drains on signals itself
    (uvicorn would otherwise re-raise the signal it caught, which reads as a second one)."""
    import uvicorn

    class QuietServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    return QuietServer(config)


def model_urls(settings: Settings, llm_base_url: str) -> list[str]:
    """The model endpoints a start waits for (any one answering will do)."""
    return [llm_base_url, *(f.base_url for f in settings.llm.fallbacks)]


async def wait_for_dependencies(settings: Settings, llm_base_url: str, front_of: Callable[[Startup], Front],
                                ) -> tuple[Startup, Front] | None:
    """Serve the HTTP port, then wait until Redis, the broker, the topics and a model endpoint
    answer (see :class:`~service.runtime.liveness.Startup`). None when a signal came first: the
    port is closed again and the process exits without having started."""
    client = redis_client(settings, 2)
    startup = Startup(settings, Dependencies(settings, client, model_urls(settings, llm_base_url)),
                      lambda create: ensure_topics(settings, create=create))
    front = front_of(startup)
    front.start()
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signalled.set)
    waiting = asyncio.create_task(startup.wait(), name="dependencies")
    stop = asyncio.create_task(signalled.wait(), name="signal")
    watched = [waiting, stop, *([front.task] if front.task is not None else [])]
    try:
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiting, stop):
            task.cancel()
        await asyncio.gather(waiting, stop, return_exceptions=True)
        await close(client)
    if not waiting.cancelled() and waiting.exception() is None:
        return startup, front
    await front.stop()
    if front.task is not None and front.task.done() and not front.task.cancelled():
        front.task.result()  # the port could not be served
    if not waiting.cancelled():
        waiting.result()  # a configuration error found while waiting: raised
    log.warning("signalled while waiting for the dependencies: exiting")
    return None
