"""Who may call what: the admin token for writes, the read token (or the admin one) for reads,
the submit token (or the admin one) for producing tasks (``POST /tasks``) and nothing else.

Tokens are compared in constant time, every accepted one each time, so the timing says nothing
about which matched; a request path with a control character is refused before any route.
"""

from __future__ import annotations

import hmac
import re
from typing import Annotated, Any, cast

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.api.protocol import Served

ADMIN_DISABLED = "admin writes are disabled: set AGENT_ADMIN_TOKEN"
SUBMIT_DISABLED = "producing tasks is disabled: set AGENT_SUBMIT_TOKEN or AGENT_ADMIN_TOKEN"
READS_DISABLED = (
    "reads of results and payloads are disabled: set AGENT_READ_TOKEN, or AGENT_READS_OPEN=true to open them"
)


def get_service(request: Request) -> Served:
    return cast(Served, request.app.state.service)


ServiceDep = Annotated[Served, Depends(get_service)]
bearer = HTTPBearer(
    auto_error=False,
    description="Writes: AGENT_ADMIN_TOKEN. Reads of tasks and dead letters: AGENT_READ_TOKEN or AGENT_ADMIN_TOKEN. "
                "Producing tasks (POST /tasks): AGENT_SUBMIT_TOKEN or AGENT_ADMIN_TOKEN.",
)


async def require_admin(
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    token = service.settings.admin_token
    expected = token.get_secret_value() if token is not None else ""
    if not expected:
        raise HTTPException(403, ADMIN_DISABLED)
    given = credentials.credentials if credentials is not None else ""
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, "missing or invalid admin token", headers={"WWW-Authenticate": "Bearer"})


def _secrets(*tokens: SecretStr | None) -> list[str]:
    return [secret for token in tokens if token is not None and (secret := token.get_secret_value())]


def _matches(credentials: HTTPAuthorizationCredentials | None, accepted: list[str]) -> bool:
    given = (credentials.credentials if credentials is not None else "").encode()
    matched = False
    for expected in accepted:  # compare with every token, so the timing says nothing about which
        matched |= hmac.compare_digest(given, expected.encode())
    return bool(given) and matched


def may_read(settings: Any, credentials: HTTPAuthorizationCredentials | None) -> bool:
    """Whether these credentials may read task records (reads open, the read or the admin token)."""
    return bool(settings.reads_open) or _matches(credentials, _secrets(settings.read_token, settings.admin_token))


async def require_read(
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Reads return model output and raw payloads: the read token or the admin token, unless open."""
    settings = service.settings
    if settings.reads_open:
        return
    accepted = _secrets(settings.read_token, settings.admin_token)
    if not accepted:
        raise HTTPException(403, READS_DISABLED)
    if not _matches(credentials, accepted):
        raise HTTPException(401, "missing or invalid read token", headers={"WWW-Authenticate": "Bearer"})


async def require_submit(
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Producing a task: the submit token or the admin token."""
    accepted = _secrets(service.settings.submit_token, service.settings.admin_token)
    if not accepted:
        raise HTTPException(403, SUBMIT_DISABLED)
    if not _matches(credentials, accepted):
        raise HTTPException(401, "missing or invalid submit token", headers={"WWW-Authenticate": "Bearer"})


Admin = [Depends(require_admin)]
Reader = [Depends(require_read)]
Submitter = [Depends(require_submit)]


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class RejectControlCharacters:
    """Answers 400 to a request whose decoded path holds a control character (``%0A``, ``%00``, ...).

    No resource of this API has one in its name, and the router's path patterns do not match
    across a newline: without this such a request would miss its route (404) before the token
    check, telling an unauthenticated caller which paths exist.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and _CONTROL_CHARS.search(scope.get("path", "")):
            await JSONResponse({"detail": "control characters in the request path"}, 400)(scope, receive, send)
            return
        await self.app(scope, receive, send)
