"""``python -m benchmarks.calls``: calls per task by where the function lives, from cProfile's stats."""

from __future__ import annotations

import sysconfig
from collections import Counter
from pathlib import Path

from benchmarks.calls import by_place, per_task, table, where
from benchmarks.env import REPO

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_a_function_is_placed_by_its_package_module_or_the_repositorys_package() -> None:
    assert where("/venv/lib/python3.11/site-packages/aiohttp/client.py", "_request") == "aiohttp"
    assert where(str(STDLIB / "site-packages" / "aiohttp" / "client.py"), "_request") == "aiohttp"  # pyenv's layout
    assert where("/venv/lib/python3.11/site-packages/yarl/_url.py", "__new__") == "yarl"
    assert where(str(STDLIB / "asyncio" / "tasks.py"), "current_task") == "stdlib asyncio"
    assert where(str(STDLIB / "contextlib.py"), "__enter__") == "stdlib contextlib"
    assert where("<frozen importlib._bootstrap>", "_find_and_load") == "stdlib importlib"
    assert where("<frozen os>", "fspath") == "stdlib os"
    assert where(str(REPO / "service" / "pipeline" / "calls.py"), "call_once") == "service/pipeline"
    assert where(str(REPO / "dedup" / "batch.py"), "run") == "dedup"
    assert where(str(REPO / "benchmarks" / "naive_consumer.py"), "handle") == "benchmarks"
    assert where("<string>", "__init__") == "other"


def test_a_function_written_in_c_is_placed_by_its_module() -> None:
    assert where("~", "<built-in method builtins.isinstance>") == "C: builtins"
    assert where("~", "<method 'get' of 'dict' objects>") == "C: builtins"
    assert where("~", "<built-in method __new__ of type object at 0x7f5254a5ea00>") == "C: builtins"
    assert where("~", "<built-in method orjson.dumps>") == "C: orjson"
    assert where("~", "<built-in method _asyncio.get_running_loop>") == "C: _asyncio"
    assert where("~", "<method 'done' of '_asyncio.Future' objects>") == "C: _asyncio"
    assert where("~", "<method 'call_soon' of 'uvloop.loop.Loop' objects>") == "C: uvloop"
    assert where("~", "<built-in method create_future of uvloop.Loop object at 0x7f10>") == "C: uvloop"
    assert where("~", "<method 'add' of 'multidict._multidict.CIMultiDict' objects>") == "C: multidict"
    assert where("~", "something cProfile never wrote") == "C: builtins"


def test_prometheus_client_is_split_into_the_metrics_updates_and_the_reads_of_metrics() -> None:
    lib = "/venv/lib/python3.11/site-packages/prometheus_client/"
    updates, reads = "prometheus_client (updates)", "prometheus_client (reads of /metrics)"
    assert where(lib + "metrics.py", "inc") == updates
    assert where(lib + "values.py", "inc") == updates
    assert where(lib + "metrics.py", "_raise_if_not_observable") == updates
    assert where(lib + "metrics.py", "<genexpr>") == updates  # labels()'s
    assert where(lib + "exposition.py", "generate_latest") == reads
    assert where(lib + "openmetrics/exposition.py", "generate_latest") == reads
    assert where(lib + "registry.py", "collect") == reads
    assert where(lib + "metrics.py", "_multi_samples") == reads
    assert where(lib + "values.py", "get") == reads


def test_calls_are_summed_by_place_counting_recursive_calls_too() -> None:
    aio = "/venv/lib/python3.11/site-packages/aiohttp/client.py"
    stats = {
        ("~", 0, "<built-in method builtins.len>"): (10, 10, 0.0, 0.0, {}),
        ("~", 0, "<method 'get' of 'dict' objects>"): (4, 4, 0.0, 0.0, {}),
        (aio, 1, "_request"): (3, 3, 0.0, 0.0, {}),
        (aio, 9, "_connect"): (2, 5, 0.0, 0.0, {}),  # 2 primitive calls, 5 with the recursive ones
    }
    assert by_place(stats) == Counter({"C: builtins": 14, "aiohttp": 8})


def test_per_task_is_the_larger_runs_calls_less_the_smaller_ones_over_the_extra_tasks() -> None:
    small = Counter({"aiohttp": 1_300, "stdlib asyncio": 5_000, "gone": 7})
    large = Counter({"aiohttp": 2_300, "stdlib asyncio": 5_500, "new": 40})
    assert per_task(small, large, 100) == {"aiohttp": 10.0, "stdlib asyncio": 5.0, "gone": -0.07, "new": 0.4}


def test_the_table_puts_the_services_largest_first_folds_the_small_ones_and_gives_the_ratios() -> None:
    naive = {"C: builtins": 300.0, "aiohttp": 150.0, "stdlib json": 20.0, "yarl": 0.5, "gone": -3.0, "none": 0.01}
    service = {"C: builtins": 600.0, "aiohttp": 140.0, "service/pipeline": 140.0, "yarl": 0.5, "stdlib json": 0.25,
               "gone": -2.0, "none": -0.02}
    lines = table(naive, service).splitlines()
    assert lines[0].split()[-3:] == ["service", "/", "naive"]
    assert [line.split()[0] for line in lines[1:6]] == ["C:", "aiohttp", "service/pipeline", "stdlib", "gone"]
    assert lines[5].split() == ["gone", "-3.0", "-2.0", "1.0"]  # negative in both, still shown
    assert lines[6].split() == ["1", "other", "places", "0.5", "0.5", "0.0"]  # yarl; "none" is 0.0 in both
    assert lines[7].split() == ["all", "calls", "467.5", "878.7", "411.2", "1.88x"]
    assert lines[8].split() == ["calls", "of", "Python", "functions", "167.5", "278.7", "111.2", "1.66x"]
    assert "-0.0" not in table({"a": 5.0}, {"a": 4.96})
