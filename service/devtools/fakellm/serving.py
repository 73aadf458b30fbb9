"""A fake server's thread: uvicorn serving the app on a socket of its own, started and stopped
from any thread, and waits that a stop cuts short."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from types import FrameType, TracebackType
from typing import ClassVar, Final, Self

import uvicorn

from service.devtools.fakellm.http import Receive, Scope, Send, bind, url_host

logger = logging.getLogger(__name__)

_START_TIMEOUT_S: Final = 10.0
_STOP_TIMEOUT_S: Final = 10.0


class Serving:
    """Serve ``self`` (an ASGI app) on ``host:port`` in a background thread."""

    base_path: ClassVar[str] = ""  # what base_url adds to http://host:port, where clients aim

    def __init__(self, host: str, port: int) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be within 0-65535: {port!r}")
        self._host = host
        self._port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None  # set on stop: cuts every injected wait short
        self._failure: BaseException | None = None
        self._base_url: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError

    @property
    def base_url(self) -> str:
        """``http://host:port`` and :attr:`base_path`; kept after :meth:`stop` so clients can aim at
        a dead server."""
        if self._base_url is None:
            raise RuntimeError(f"{type(self).__name__} has not been started")
        return self._base_url

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return int(self._socket.getsockname()[1])

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> str:
        """Serve in a background thread; returns the base URL once the server accepts requests."""
        if self._thread is not None:
            return self.base_url
        sock = bind(self._host, self._port)
        port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self,
            host=self._host,
            port=port,
            http="auto",
            loop="asyncio",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        self._failure = None
        name = type(self).__name__
        thread = threading.Thread(target=self._run, args=(server, sock), name=f"{name}-{port}", daemon=True)
        self._server, self._thread, self._socket = server, thread, sock
        thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start on {self._host}:{port}") from self._failure
            time.sleep(0.002)
        self._base_url = f"http://{url_host(self._host)}:{port}{self.base_path}"
        logger.info("%s listening on %s", name, self._base_url)
        return self._base_url

    def stop(self) -> None:
        """Stop serving and wait for the server thread; waiting faults are cut short."""
        server, thread, sock = self._server, self._thread, self._socket
        if server is None or thread is None:
            return
        server.should_exit = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(wake.set)
        thread.join(_STOP_TIMEOUT_S)
        if thread.is_alive():
            logger.warning("%s did not stop within %.0f s; forcing it", type(self).__name__, _STOP_TIMEOUT_S)
            server.force_exit = True
            thread.join(_STOP_TIMEOUT_S)
        if sock is not None:
            sock.close()
        self._server = self._thread = self._socket = None
        self._loop = self._wake = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self, server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            asyncio.run(self._serve(server, sock))
        except BaseException as exc:  # noqa: BLE001 - reported by start(); a thread has no caller
            self._failure = exc
            if not isinstance(exc, SystemExit):
                logger.exception("%s server thread failed", type(self).__name__)

    async def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        await server.serve(sockets=[sock])

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        wake = self._wake
        if wake is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await wake.wait()


def serve_until_stopped(server: Serving, name: str) -> int:
    """Serve ``server`` in the foreground of a command: say where it listens (``<name> listening on
    <url>``), then serve until SIGINT or SIGTERM. Returns the exit status."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with server:
            print(f"{name} listening on {server.base_url}", flush=True)
            while not stopping.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
