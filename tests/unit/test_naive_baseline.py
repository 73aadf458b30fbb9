"""The naive baseline of ``python -m benchmarks --only naive``: the same work as the service, figures beside it."""

from __future__ import annotations

import json

from benchmarks.env import task_record
from benchmarks.naive import Pass, figures, median_pass, redis_calls, reset_redis_stats, rounds_figure
from benchmarks.naive_consumer import request_body
from service.agents.base import Previous
from service.agents.registry import default_agents


def test_the_naive_consumer_asks_the_model_what_the_service_asks() -> None:
    _key, value = task_record("t-1")
    task = json.loads(value)
    agent = default_agents().get("classify")
    step = agent.steps[0]
    task_input = agent.parse_input(task["input"])
    body = request_body(task)
    assert body["messages"] == step.messages(task_input, Previous())
    assert body["response_format"]["schema"] == step.schema(task_input, Previous())


def test_figures_put_the_service_beside_the_naive_consumer_with_the_ratios() -> None:
    naive = Pass(seconds=2.0, cpu={"consumer": 0.6, "redis": 0.1}, results=1000)
    service = Pass(seconds=4.0, cpu={"consumer": 0.9, "redis": 0.2}, results=1000)
    by_name = {f.name: f for f in figures(1000, naive, service)}
    assert by_name["naive consumer, CPU per task"].value == 0.6
    assert by_name["service, CPU per task"].value == 0.9
    assert by_name["service, throughput"].value == 250
    cpu_ratio = by_name["CPU per task, service / naive"]
    assert cpu_ratio.value == 1.5 and cpu_ratio.status == "MISSED"
    rate_ratio = by_name["throughput, service / naive"]
    assert rate_ratio.value == 0.5 and rate_ratio.status == "MISSED"
    faster = {f.name: f for f in figures(1000, naive, Pass(1.0, {"consumer": 0.3}, 1000))}
    assert faster["CPU per task, service / naive"].status == "ok"
    assert faster["throughput, service / naive"].status == "ok"


def test_redis_commands_per_task_stand_beside_each_other() -> None:
    naive = Pass(seconds=2.0, cpu={"consumer": 0.6}, results=1000, redis_calls={"set": 1000})
    service = Pass(seconds=4.0, cpu={"consumer": 0.9}, results=1000, redis_calls={"evalsha": 3000, "hget": 500})
    by_name = {f.name: f for f in figures(1000, naive, service)}
    assert by_name["naive consumer, Redis commands per task"].value == 1.0
    mine = by_name["service, Redis commands per task"]
    assert mine.value == 3.5 and mine.baseline == "naive 1.00"
    assert "evalsha 3.00" in mine.detail and "hget 0.50" in mine.detail
    assert "service, Redis commands per task" not in {f.name for f in figures(1000, naive, Pass(1.0, {"consumer": 0.3}, 1000))}


def test_the_redis_commands_of_a_pass_are_counted_from_the_servers_own_stats(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        reset_redis_stats(redis_url)
        for i in range(3):
            client.set(f"naive-stats-{i}", 1)
        client.get("naive-stats-0")
        calls = redis_calls(redis_url)
        assert (calls["set"], calls["get"]) == (3, 1)
        assert "info" not in calls and "config" not in calls  # the counting's own commands are left out
    finally:
        client.delete(*(f"naive-stats-{i}" for i in range(3)))
        client.close()


def test_rounds_report_each_consumers_median_pass_and_the_median_of_the_rounds_own_ratios() -> None:
    def run(cpu: float) -> Pass:
        return Pass(seconds=1.0, cpu={"consumer": cpu}, results=1000)

    naive = [run(0.40), run(0.30), run(0.35)]
    service = [run(0.60), run(0.40), run(0.70)]
    assert median_pass(naive, 1000).cpu_ms(1000) == 0.35
    assert median_pass(service, 1000).cpu_ms(1000) == 0.6
    assert median_pass([run(0.5), run(0.2)], 1000).cpu_ms(1000) == 0.2  # the lower middle of an even count
    ratios = rounds_figure(1000, {"naive": naive, "service": service, "service on uvloop": service})
    assert round(ratios.value, 6) == 1.5  # the rounds' own ratios: 1.5x, 1.33x, 2.0x (0.70 / 0.35)
    assert ratios.baseline == "range 1.33-2.00x"
    assert "naive 0.400 / 0.300 / 0.350 ms" in ratios.detail


def test_the_median_of_an_even_count_of_rounds_ratios_is_the_mean_of_the_middle_two() -> None:
    naive = [Pass(1.0, {"consumer": 0.4}, 1000), Pass(1.0, {"consumer": 0.4}, 1000)]
    service = [Pass(1.0, {"consumer": 0.6}, 1000), Pass(1.0, {"consumer": 0.8}, 1000)]
    ratios = rounds_figure(1000, {"naive": naive, "service": service, "service on uvloop": service})
    assert round(ratios.value, 6) == 1.75  # 1.5x and 2.0x: neither round's alone
    assert ratios.baseline == "range 1.50-2.00x"
