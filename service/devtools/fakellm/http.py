"""The HTTP side of the fake servers: ASGI types, reading a request and sending (or dropping) a response."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Final

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY_BYTES: Final = 16 * 1024 * 1024
_DROP_WAIT_S: Final = 5.0
_JSON: Final = (b"content-type", b"application/json")


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def read_body(receive: Receive, send: Send) -> bytes | None:
    """The whole request body; None when the client left or the body was refused as too large."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            await respond(send, 413, error_body(413, f"the request body exceeds {MAX_BODY_BYTES} bytes"))
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> bytes:
    if status == 429:
        kind = "requests"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    return dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


async def respond(send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [_JSON, (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})


async def drop_connection(receive: Receive, send: Send) -> None:
    """Close the client's connection without a response.

    ASGI cannot express this, so the transport comes from the server's ``send`` (uvicorn's
    request cycle); once it is closed, wait for the disconnect so the server sends nothing.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None or not callable(getattr(transport, "close", None)):
        raise ConnectionAbortedError("disconnect fault: the server exposes no transport to close")
    transport.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_DROP_WAIT_S):
            while (await receive())["type"] != "http.disconnect":
                pass


def url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def json_body(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError as exc:
        raise ValueError(f"the request body is not valid JSON: {exc}") from exc


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
