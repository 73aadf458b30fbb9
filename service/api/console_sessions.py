"""The console's sessions: who is logged in, with which role, and which sessions ended early.

A session lives in a cookie signed with a key every replica shares (:func:`session_key`); it holds
the role and a session id, never a token, and lives :data:`SESSION_MAX_AGE_S`. Its CSRF token is
derived from the session id. A logout revokes the session on every replica (:class:`Sessions`, with
:class:`RevokedInRedis`). :func:`role_for` says which role a typed token grants.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from itsdangerous import BadSignature, URLSafeTimedSerializer
from redis.exceptions import RedisError

from dedup.client import RedisClient
from service.api.protocol import Served
from service.core.settings import Settings

log = logging.getLogger(__name__)

SESSION_MAX_AGE_S = 8 * 3600
Role = Literal["read", "admin"]


@dataclass(frozen=True, slots=True)
class Session:
    role: Role | None  # None: nobody logged in (reads may still be open)
    sid: str
    csrf: str
    expires_at: float = 0.0  # Unix time the cookie stops being accepted

    @property
    def admin(self) -> bool:
        return self.role == "admin"


NO_SESSION = Session(None, "", "")


def session_key(settings: Settings) -> bytes:
    """The key of the console's cookies and CSRF tokens: the same for every replica of ``settings``.

    From ``http.session_secret``; else derived (HMAC-SHA256 under a fixed label, as HKDF's extract
    step) from the admin and read tokens, which every replica is given; the key does not reveal
    them. With no secret and no token nobody can log in, and a key of this process does."""
    secret = settings.http.session_secret
    if secret is not None and secret.get_secret_value():
        material = b"secret\0" + secret.get_secret_value().encode()
    else:
        tokens = [t.get_secret_value() if t is not None else "" for t in (settings.admin_token, settings.read_token)]
        if not any(tokens):
            return secrets.token_bytes(32)
        material = b"tokens\0" + "\0".join(tokens).encode()
    return hmac.new(b"agent-console-session-key/v1", material, hashlib.sha256).digest()


class RevokedInRedis:
    """Revoked session ids in Redis, each kept as long as its cookie could still be used."""

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def key(self, sid: str) -> str:
        return f"{self.prefix}:console:revoked:{sid}"

    async def add(self, sid: str, ttl_s: int) -> None:
        await self.client.set(self.key(sid), b"1", ex=max(1, ttl_s))

    async def holds(self, sid: str) -> bool:
        return bool(await self.client.exists(self.key(sid)))


class Sessions:
    """Signed session cookies and the CSRF tokens tied to them, with a key every replica shares
    (:func:`session_key`), and the sessions revoked before their end (``store``: in Redis, for
    every replica; always in this process too, pruned when they expire)."""

    def __init__(self, secret: bytes | None = None, *, store: RevokedInRedis | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self._signer = URLSafeTimedSerializer(self._secret, salt="agent-console-session")
        self._store = store
        self._clock = clock
        self.revoked_here: dict[str, float] = {}  # session id -> when it may be forgotten (clock time)

    def csrf_for(self, sid: str) -> str:
        return hmac.new(self._secret, b"csrf:" + sid.encode(), hashlib.sha256).hexdigest()

    def issue(self, role: Role) -> tuple[str, Session]:
        self._prune()
        sid = secrets.token_urlsafe(18)
        session = Session(role, sid, self.csrf_for(sid), time.time() + SESSION_MAX_AGE_S)
        return self._signer.dumps({"role": role, "sid": sid}), session

    def signed(self, cookie: str | None) -> Session | None:
        """The session a cookie signed with this key holds, not yet expired (revocation not asked)."""
        if not cookie:
            return None
        try:
            data, signed_at = self._signer.loads(cookie, max_age=SESSION_MAX_AGE_S, return_timestamp=True)
        except BadSignature:
            return None
        if not isinstance(data, dict) or data.get("role") not in ("read", "admin"):
            return None
        sid = str(data.get("sid", ""))
        if not sid:
            return None
        return Session(data["role"], sid, self.csrf_for(sid), signed_at.timestamp() + SESSION_MAX_AGE_S)

    async def read(self, cookie: str | None) -> Session | None:
        """The cookie's session, unless it was revoked on any replica."""
        session = self.signed(cookie)
        if session is None:
            return None
        self._prune()
        if session.sid in self.revoked_here:
            return None
        if self._store is not None:
            try:
                if await self._store.holds(session.sid):
                    return None
            except RedisError as exc:  # the console stays usable; this replica's revocations still hold
                log.warning("console: revoked sessions not read from Redis: %s", exc)
        return session

    async def revoke(self, session: Session) -> None:
        """End the session on every replica, for as long as its cookie could still be used."""
        self._prune()
        self.revoked_here[session.sid] = self._clock() + SESSION_MAX_AGE_S
        if self._store is not None:
            try:
                await self._store.add(session.sid, math.ceil(session.expires_at - time.time()))
            except RedisError as exc:
                log.warning("console: a logout holds on this replica only (Redis did not answer): %s", exc)

    def _prune(self) -> None:
        now = self._clock()
        for sid in [sid for sid, until in self.revoked_here.items() if until <= now]:
            del self.revoked_here[sid]

    def login_nonce(self) -> tuple[str, str]:
        """A pre-session cookie and the CSRF token of the login form tied to it."""
        nonce = secrets.token_urlsafe(18)
        return self._signer.dumps({"login": nonce}), self.csrf_for("login:" + nonce)

    def login_csrf(self, cookie: str | None) -> str | None:
        if not cookie:
            return None
        try:
            data = self._signer.loads(cookie, max_age=3600)
        except BadSignature:
            return None
        nonce = data.get("login") if isinstance(data, dict) else None
        return self.csrf_for("login:" + str(nonce)) if nonce else None


def secret_values(service: Served) -> tuple[str, str]:
    """The admin and read tokens of ``service`` (empty when unset)."""
    s = service.settings
    admin = s.admin_token.get_secret_value() if s.admin_token is not None else ""
    read = s.read_token.get_secret_value() if s.read_token is not None else ""
    return admin, read


def role_for(service: Served, given: str) -> Role | None:
    """The role a typed token grants, compared in constant time with every token that is set."""
    admin, read = secret_values(service)
    raw = given.encode()
    is_admin = bool(admin) & hmac.compare_digest(raw, admin.encode())
    is_read = bool(read) & hmac.compare_digest(raw, read.encode())
    if not given:
        return None
    return "admin" if is_admin else "read" if is_read else None
