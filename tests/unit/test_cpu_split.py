"""The CPU split of the pinned ``workers`` series: the service on some CPUs, what it talks to on the others."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.pinning import (
    Split,
    cpu_list,
    measurable_workers,
    pin,
    pinned,
    require_taskset,
    split_cpus,
    worker_counts,
)
from benchmarks.report import Figure
from benchmarks.workers import Pass, pinned_figures


def test_two_cpus_put_one_worker_on_one_and_the_model_broker_and_redis_on_the_other() -> None:
    assert measurable_workers({0, 1}) == 1
    assert split_cpus({0, 1}, 1) == Split(service=(0,), others=(1,))
    assert split_cpus({0, 1}, 2) is None  # nothing would be left for the model
    assert worker_counts({0, 1}) == [1, 2]


def test_a_third_of_the_cpus_is_kept_for_the_others_and_the_same_ones_in_every_pass() -> None:
    six = set(range(6))
    assert measurable_workers(six) == 4
    assert worker_counts(six) == [1, 2, 4]
    assert split_cpus(six, 1) == Split(service=(0,), others=(4, 5))
    assert split_cpus(six, 4) == Split(service=(0, 1, 2, 3), others=(4, 5))
    assert split_cpus(six, 5) is None
    assert measurable_workers(set(range(4))) == 2
    assert worker_counts(set(range(4))) == [1, 2]


def test_the_split_follows_the_affinity_set_not_the_cpu_numbers() -> None:
    assert split_cpus({7, 2, 5}, 2) == Split(service=(2, 5), others=(7,))
    assert split_cpus({7, 2, 5}, 3) is None


def test_one_cpu_leaves_nothing_to_measure() -> None:
    assert measurable_workers({3}) == 0
    assert split_cpus({3}, 1) is None
    assert worker_counts({3}) == [1, 2]


def test_a_missing_taskset_fails_with_a_message_that_names_it(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="taskset.*util-linux"):
        require_taskset(path=str(tmp_path))
    fake = tmp_path / "taskset"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert require_taskset(path=str(tmp_path)) == str(fake)


def _threaded_child() -> subprocess.Popen[bytes]:
    code = ("import threading, time; e = threading.Event(); "
            "[threading.Thread(target=e.wait, daemon=True).start() for _ in range(3)]; "
            "print('ready', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def _thread_affinities(pid: int) -> list[set[int]]:
    return [os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


def test_pinning_moves_every_thread_of_a_running_process_and_the_block_puts_them_back() -> None:
    cpus = os.sched_getaffinity(0)
    one = {max(cpus)}
    proc = _threaded_child()
    try:
        assert len(_thread_affinities(proc.pid)) >= 4
        pin(proc.pid, one)
        assert all(a == one for a in _thread_affinities(proc.pid))
        pin(proc.pid, cpus)
        with pinned([proc.pid], one):
            assert all(a == one for a in _thread_affinities(proc.pid))
        assert all(a == cpus for a in _thread_affinities(proc.pid))
    finally:
        proc.kill()
        proc.wait(60)
        assert proc.stdout is not None
        proc.stdout.close()


def test_pinning_a_process_that_is_gone_fails_loudly() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(60)
    time.sleep(0.1)
    with pytest.raises(RuntimeError, match=str(proc.pid)):
        pin(proc.pid, os.sched_getaffinity(0))


def _pass(workers: int, rate: float) -> Pass:
    return Pass(workers, 6, 1000, rate, 1000 / rate, {"service": 1.0}, 4.0, 21.0, 90.0, 2100.0)


def test_the_pinned_figures_give_each_count_its_ratio_to_one_worker_and_say_why_one_is_missing() -> None:
    six = set(range(6))
    figures = pinned_figures(six, {1: _pass(1, 800), 2: _pass(2, 1500), 4: _pass(4, 2400)})
    by_name = {f.name: f for f in figures}
    assert by_name["--workers 1, pinned"].value == 800
    assert "CPU 0" in by_name["--workers 1, pinned"].detail
    assert "CPUs 4-5" in by_name["--workers 1, pinned"].detail
    assert by_name["--workers 2 / 1 worker, pinned"].value == pytest.approx(1500 / 800)
    assert by_name["--workers 4 / 1 worker, pinned"].value == 3.0
    assert by_name["--workers 4, pinned"].detail.startswith("service on CPUs 0-3")

    two = {f.name: f for f in pinned_figures({0, 1}, {1: _pass(1, 800)})}
    assert two["--workers 1, pinned"].value == 800
    missing: Figure = two["--workers 2, pinned"]
    assert missing.value is None and missing.status == "unavailable"
    assert "2 CPUs" in missing.detail and "not measured" in missing.detail
    assert two["--workers 2 / 1 worker, pinned"].status == "unavailable"


def test_cpu_lists_are_written_as_taskset_reads_them() -> None:
    assert cpu_list({0}) == "0"
    assert cpu_list({7, 0, 2, 3, 4}) == "0,2-4,7"
    assert cpu_list({4, 5}) == "4-5"
