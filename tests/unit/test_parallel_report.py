"""The ``parallel_consumer`` benchmark's report: the whole service beside pyrallel-consumer and Confluent's
Parallel Consumer from the same run, with the service's ratio to pyrallel-consumer against its target."""

from __future__ import annotations

from benchmarks.parallel import TARGET_VS_PYRALLEL, service_figures


def test_the_service_is_reported_beside_pyrallel_and_the_parallel_consumer_with_its_ratio() -> None:
    by_name = {f.name: f for f in service_figures(8.0, "detail", pyrallel_wall=10.0, pc_wall=4.0)}
    wall = by_name["whole service wall time"]
    assert wall.value == 8.0 and "pyrallel 10.00s" in wall.baseline and "Parallel Consumer 4.00s" in wall.baseline
    ratio = by_name["whole service / pyrallel-consumer"]
    assert ratio.value == 10.0 / 8.0
    assert ratio.target == (">=", TARGET_VS_PYRALLEL) and TARGET_VS_PYRALLEL == 1.5
    assert ratio.status == "MISSED"
    assert by_name["whole service / Parallel Consumer"].value == 4.0 / 8.0
    faster = {f.name: f for f in service_figures(6.0, "detail", pyrallel_wall=9.0, pc_wall=None)}
    assert faster["whole service / pyrallel-consumer"].status == "ok"
    assert faster["whole service / Parallel Consumer"].status == "unavailable"


def test_without_pyrallel_the_ratio_says_unavailable_and_why() -> None:
    by_name = {f.name: f for f in service_figures(8.0, "detail", pyrallel_wall=None, pc_wall=None,
                                                  pyrallel_why="no Python 3.12")}
    ratio = by_name["whole service / pyrallel-consumer"]
    assert ratio.value is None and ratio.status == "unavailable" and ratio.detail == "no Python 3.12"
    assert by_name["whole service wall time"].value == 8.0
