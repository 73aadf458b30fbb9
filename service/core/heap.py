"""The cyclic garbage collector of a long-lived service (``AGENT_GC_FREEZE``, ``AGENT_GC_GEN0_THRESHOLD``).

Python's collector, left as it is, costs a record-at-a-time service much of its CPU: it runs the
youngest generation every 700 net allocations of containers (a few records' worth), so the objects
of the records in flight are walked again and again and end in the oldest generation, whose full
collections then walk everything the start made too (modules and the service's objects, some
130,000). On the parallel_consumer benchmark's workload about a fifth of the service's CPU went to
collections. :func:`settle`, called once the service is built, collects the start's garbage, moves
what is left out of the collector's sight (:func:`gc.freeze`: none of it is ever garbage) and runs
the youngest generation every ``gen0_threshold`` allocations instead. Memory held by cyclic garbage
stays bounded by that many allocations; reference counting frees everything else at once, as before.
"""

from __future__ import annotations

import gc


def settle(*, freeze: bool, gen0_threshold: int) -> str:
    """Set the collector for the service's life; returns a line for the start's log."""
    said = []
    if freeze:
        gc.collect()
        gc.freeze()
        said.append(f"froze {gc.get_freeze_count():,} objects of the start")
    if gen0_threshold:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0_threshold, gen1, gen2)
        said.append(f"gen0 {gen0_threshold}")
    return ", ".join(said) or "as Python sets it"
