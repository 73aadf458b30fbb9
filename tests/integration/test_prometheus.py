"""The service's /metrics as a real Prometheus server scrapes and queries it.

The service runs with its HTTP app on a loopback port; Debian's ``prometheus`` scrapes it every
second while a few tasks (and one poison record) go through, and the answers of its query API
are checked against what the service and the fake model counted. ``promtool check metrics``
lints the exposition text. A missing ``prometheus`` or ``promtool`` fails the test; CI installs
both (Debian package ``prometheus``).
"""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.core.settings import Settings
from service.devtools import processes
from service.devtools.fakellm import FakeLLM
from service.devtools.local import free_port
from service.runtime.wiring import build, ensure_topics
from tests.support import classify, metric, produce, wait_for

pytestmark = pytest.mark.integration

SUCCEEDED = 6  # two tasks per partition
PARTITIONS = 3


def _binary(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(path).is_file():
        pytest.fail(f"{name} is not installed (Debian package 'prometheus'); this test needs the real binary")
    return path


class Prometheus:
    """A ``prometheus`` process that scrapes one target every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: agent\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    _binary("prometheus"), f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        processes.stop(self.process, grace_s=10)  # SIGTERM, SIGKILL after 10 s; reaped either way


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    """Starts a ``prometheus`` scraping the given ``host:port``; stops it at teardown."""
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        workdir = tmp_path / f"prometheus-{len(started)}"
        workdir.mkdir()
        server = Prometheus(workdir, target)
        started.append(server)
        return server

    yield start
    processes.stop_all([server.process for server in started], grace_s=10)


async def query(client: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    """The instant-query result vector of ``expr``."""
    r = await client.get("/api/v1/query", params={"query": expr})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success", body
    assert body["data"]["resultType"] == "vector", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def scalar(result: list[dict[str, Any]]) -> float | None:
    """The value of a one-element vector (``None`` when empty)."""
    if not result:
        return None
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_prometheus_scrapes_and_queries_the_service(
    make_settings: Any, fake_llm: FakeLLM, prometheus: Callable[[str], Prometheus]
) -> None:
    for name in ("prometheus", "promtool"):
        _binary(name)  # fails the test before anything starts
    port = free_port()
    s: Settings = make_settings(http={"enabled": True, "host": "127.0.0.1", "port": port})
    topic = s.kafka.input_topic
    target = f"127.0.0.1:{port}"

    async def scenario() -> str:
        await asyncio.to_thread(ensure_topics, s)
        service = build(s, llm_base_url=fake_llm.base_url)
        run = asyncio.create_task(service.run())
        try:
            async with httpx.AsyncClient(base_url=f"http://{target}", timeout=10) as app:

                async def serving() -> bool:
                    if run.done():
                        run.result()  # a failed start fails the test here
                    try:
                        return (await app.get("/healthz")).status_code == 200
                    except httpx.TransportError:
                        return False

                await wait_for(serving, 30, 0.1, what="the HTTP app")
                await wait_for(lambda: len(service.runner.assignment) == PARTITIONS or run.done(), 60, 0.1,
                               what="all partitions assigned")
                assert not run.done(), run

                prom = prometheus(target)
                async with httpx.AsyncClient(base_url=prom.base_url, timeout=10) as api:

                    async def prometheus_ready() -> bool:
                        assert prom.process.poll() is None, f"prometheus exited:\n{prom.log()}"
                        try:
                            return (await api.get("/-/ready")).status_code == 200  # the API answers 503 before
                        except httpx.TransportError:
                            return False

                    async def target_up() -> bool:
                        return scalar(await query(api, 'up{job="agent"}')) == 1

                    await wait_for(prometheus_ready, 20, 0.1, what="prometheus ready")
                    await wait_for(target_up, 20, 0.2, what="prometheus target up == 1")

                    # Tasks go through while Prometheus scrapes, so the duration buckets have a rate.
                    for p in range(PARTITIONS):
                        records = [(f"prom-{p}-{i}".encode(), classify(f"prom-{p}-{i}")) for i in range(2)]
                        await asyncio.to_thread(produce, s.kafka.bootstrap_servers, topic, records, p)
                    poison = [(b"prom-poison", b"{not json")]
                    await asyncio.to_thread(produce, s.kafka.bootstrap_servers, topic, poison, 0)
                    await wait_for(
                        lambda: metric(service, "agent_tasks_total", {"outcome": "succeeded"}) == SUCCEEDED
                        and metric(service, "agent_dead_letters_total", {"reason": "decode"}) == 1,
                        30, what="tasks processed",
                    )
                    llm_requests = fake_llm.stats()["requests"]
                    assert llm_requests >= SUCCEEDED

                    async def scraped(expr: str, want: float) -> bool:
                        return scalar(await query(api, expr)) == want

                    await wait_for(lambda: scraped('agent_tasks_total{outcome="succeeded"}', SUCCEEDED),
                                   15, 0.25, what="succeeded count in prometheus")
                    await wait_for(lambda: scraped('agent_dead_letters_total{reason="decode"}', 1),
                                   15, 0.25, what="decode dead letter in prometheus")
                    await wait_for(lambda: scraped("sum(agent_llm_requests_total)", llm_requests),
                                   15, 0.25, what="LLM request count in prometheus")
                    assert fake_llm.stats()["requests"] == llm_requests

                    # The runner reports lag every RunnerConfig.lag_interval_s (5 s).
                    assigned = {str(p) for _t, p in service.runner.assignment}
                    lag_expr = f'agent_consumer_lag{{job="agent",topic="{topic}"}}'

                    async def lag_reported() -> bool:
                        series = await query(api, lag_expr)
                        return {x["metric"]["partition"] for x in series} == assigned

                    await wait_for(lag_reported, 20, 0.5, what="consumer lag for every assigned partition")
                    for series in await query(api, lag_expr):
                        value = float(series["value"][1])
                        produced = 3 if series["metric"]["partition"] == "0" else 2
                        assert 0 <= value <= produced, series

                    p50 = await query(
                        api, "histogram_quantile(0.5, sum(rate(agent_task_duration_seconds_bucket[1m])) by (le))"
                    )
                    median = scalar(p50)
                    assert median is not None and math.isfinite(median) and median >= 0, p50

                exposition = (await app.get("/metrics")).text
        finally:
            service.runner.stop()
            await asyncio.wait_for(run, 60)
        return exposition

    exposition = asyncio.run(scenario())
    assert "agent_tasks_total" in exposition

    check = subprocess.run([_binary("promtool"), "check", "metrics"], input=exposition.encode(),
                           capture_output=True, timeout=30)
    output = (check.stdout + check.stderr).decode(errors="replace")
    assert check.returncode == 0, f"promtool check metrics (exit {check.returncode}):\n{output}"
    assert not output.strip(), f"promtool check metrics reported problems:\n{output}"
