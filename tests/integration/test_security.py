"""Redis AUTH and TLS wired through; secrets never reach logs, metrics, dead letters or errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest

from dedup.ledger import LedgerUnavailable
from service.api.app import create_app
from service.core.settings import Settings
from service.devtools import local
from service.devtools.fakellm import FakeLLM
from service.runtime.wiring import redis_client
from tests.support import classify, metric, produce, read_topic, running, wait_for

pytestmark = pytest.mark.integration

REDIS_PASSWORD = "redis-pw-7f3a91"
API_KEY = "sk-live-4e8d2b6c"
ADMIN_TOKEN = "admin-token-91c0"
READ_TOKEN = "read-token-3b7e"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    port = local.free_port()
    server = local.start_redis(
        d / "data", port, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(d / "server.crt"),
        "--tls-key-file", str(d / "server.key"), "--tls-ca-cert-file", str(d / "ca.crt"),
        "--tls-auth-clients", "no", "--requirepass", REDIS_PASSWORD,
    )
    try:
        yield f"rediss://{server.address}/0", d / "ca.crt"
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def api(service: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client:
        yield client


def test_ledger_over_tls_with_auth_and_no_secret_anywhere(
    make_settings: Any, fake_llm: FakeLLM, tls_redis: tuple[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    url, ca = tls_redis
    s: Settings = make_settings(
        redis={"url": url, "password": REDIS_PASSWORD, "ssl_ca_certs": str(ca)},
        llm={"api_key": API_KEY}, admin_token=ADMIN_TOKEN, read_token=READ_TOKEN,
    )
    secrets = (REDIS_PASSWORD, API_KEY, ADMIN_TOKEN, READ_TOKEN)
    for secret in secrets:
        assert secret not in repr(s) and secret not in str(s.model_dump())
    caplog.set_level(logging.DEBUG)

    async def scenario() -> tuple[str, list[str]]:
        async with running(s, fake_llm.base_url) as svc, api(svc) as http:
            produce(s.kafka.bootstrap_servers, s.kafka.input_topic,
                    [(b"sec-1", classify("sec-1")), (b"sec-bad", b"\xff not json")])
            await wait_for(lambda: metric(svc, "agent_tasks_total", {"outcome": "succeeded"}) == 1
                           and metric(svc, "agent_tasks_total", {"outcome": "dead_lettered"}) == 1, what="both")
            record = await svc.ledger.get("sec-1")
            assert record is not None and record.state == "succeeded"  # the ledger lives behind TLS + AUTH
            # results and payloads only with a token; the open endpoints carry no error text
            for path in ("/tasks/sec-1", "/dlq"):
                assert (await http.get(path)).status_code == 401
                assert (await http.get(path, headers={"Authorization": f"Bearer {READ_TOKEN}"})).status_code == 200
            open_answers = [(await http.get(path)).text for path in ("/healthz", "/readyz")]
            for text in open_answers:
                assert "error" not in text.lower() and "Traceback" not in text, text
            return generate_latest(svc.metrics.registry).decode(), open_answers

    metrics_text, open_answers = asyncio.run(scenario())
    dead = read_topic(s.kafka.bootstrap_servers, s.kafka.dlq_topic, expect=1)
    exposed = [caplog.text, metrics_text, *open_answers] + [repr(m.headers) + repr(m.value) for m in dead]
    for secret in secrets:
        assert all(secret not in text for text in exposed), "a secret leaked"
    # the key did reach the model endpoint, as a bearer token, and only there
    assert fake_llm.stats()["requests"] == 1


def test_wrong_redis_password_fails_without_echoing_it(make_settings: Any, tls_redis: tuple[str, Path]) -> None:
    url, ca = tls_redis
    wrong = "not-the-password-5521"
    s: Settings = make_settings(redis={"url": url, "password": wrong, "ssl_ca_certs": str(ca)})

    async def scenario() -> str:
        client = redis_client(s)  # the client factory the service uses
        try:
            from dedup.ledger import Ledger

            with pytest.raises(LedgerUnavailable) as err:
                await Ledger(client).ping()
            return str(err.value)
        finally:
            await client.aclose(close_connection_pool=True)

    message = asyncio.run(scenario())
    assert wrong not in message and REDIS_PASSWORD not in message
