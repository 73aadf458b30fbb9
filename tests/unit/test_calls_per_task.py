"""``python -m benchmarks.calls``: calls per task by where the function lives, from cProfile's stats."""

from __future__ import annotations

import sysconfig
from collections import Counter
from pathlib import Path

from benchmarks.calls import BUILTINS, by_place, per_task, table, where
from benchmarks.env import REPO

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_a_function_is_placed_by_its_package_module_or_the_repositorys_package() -> None:
    assert where("~", "<built-in method builtins.isinstance>") == BUILTINS
    assert where("/venv/lib/python3.11/site-packages/aiohttp/client.py", "_request") == "aiohttp"
    assert where("/venv/lib/python3.11/site-packages/yarl/_url.py", "__new__") == "yarl"
    assert where(str(STDLIB / "asyncio" / "tasks.py"), "current_task") == "stdlib asyncio"
    assert where(str(STDLIB / "contextlib.py"), "__enter__") == "stdlib contextlib"
    assert where(str(REPO / "service" / "pipeline" / "calls.py"), "call_once") == "service/pipeline"
    assert where(str(REPO / "dedup" / "batch.py"), "run") == "dedup"
    assert where(str(REPO / "benchmarks" / "naive_consumer.py"), "handle") == "benchmarks"
    assert where("<frozen importlib._bootstrap>", "_find_and_load") == "other"


def test_prometheus_client_is_split_into_the_metrics_updates_and_the_reads_of_metrics() -> None:
    lib = "/venv/lib/python3.11/site-packages/prometheus_client/"
    assert where(lib + "metrics.py", "inc") == "prometheus_client (updates)"
    assert where(lib + "values.py", "inc") == "prometheus_client (updates)"
    assert where(lib + "metrics.py", "_raise_if_not_observable") == "prometheus_client (updates)"
    assert where(lib + "exposition.py", "generate_latest") == "prometheus_client (reads of /metrics)"
    assert where(lib + "metrics.py", "_multi_samples") == "prometheus_client (reads of /metrics)"


def test_calls_are_summed_by_place_counting_recursive_calls_too() -> None:
    aio = "/venv/lib/python3.11/site-packages/aiohttp/client.py"
    stats = {
        ("~", 0, "<built-in method builtins.len>"): (10, 10, 0.0, 0.0, {}),
        (aio, 1, "_request"): (3, 3, 0.0, 0.0, {}),
        (aio, 9, "_connect"): (2, 5, 0.0, 0.0, {}),  # 2 primitive calls, 5 with the recursive ones
    }
    assert by_place(stats) == Counter({BUILTINS: 10, "aiohttp": 8})


def test_per_task_is_the_larger_runs_calls_less_the_smaller_ones_over_the_extra_tasks() -> None:
    small = Counter({"aiohttp": 1_300, "stdlib asyncio": 5_000, "gone": 7})
    large = Counter({"aiohttp": 2_300, "stdlib asyncio": 5_500, "new": 40})
    assert per_task(small, large, 100) == {"aiohttp": 10.0, "stdlib asyncio": 5.0, "gone": -0.07, "new": 0.4}


def test_the_table_puts_the_services_largest_first_folds_the_small_ones_and_gives_the_ratios() -> None:
    naive = {BUILTINS: 300.0, "aiohttp": 150.0, "stdlib json": 20.0, "yarl": 0.5}
    service = {BUILTINS: 600.0, "aiohttp": 140.0, "service/pipeline": 140.0, "yarl": 0.5, "stdlib json": 0.25}
    lines = table(naive, service).splitlines()
    assert [line.split()[0] for line in lines[1:5]] == [BUILTINS.split()[0], "aiohttp", "service/pipeline", "stdlib"]
    assert lines[5].split()[:4] == ["1", "other", "places", "0.5"]  # yarl, under 1 call in both
    assert lines[6].split() == ["all", "calls", "470.5", "880.8", "410.2", "1.87x"]
    assert lines[7].split() == ["calls", "of", "Python", "functions", "170.5", "280.8", "110.2", "1.65x"]
