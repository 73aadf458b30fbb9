"""The breaker's decisions as a state machine on a fake clock: whatever interleaving of calls,
failures, successes, outages and time, no caller waits past its bound once the endpoint answers,
the breaker opens only when different tasks fail in a row, and a task that just failed is never
the probe."""

from __future__ import annotations

import asyncio

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from service.core.errors import LLMUnavailable
from service.core.metrics import Metrics
from service.llm.guard import EndpointGuard, GuardConfig

TASKS = [f"healthy-{i}" for i in range(4)] + [f"poison-{i}" for i in range(3)]
MAX_ATTEMPTS = 4
CONFIG = GuardConfig(failure_threshold=3, open_s=5.0, retry_ratio=0.2, retry_floor=2, window_s=10.0)
# the longest a caller waits once the endpoint answers: the open period, then the retry budget's window
BOUND_S = CONFIG.open_s + CONFIG.window_s + 1.0


class Breaker(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.down = False  # every call fails (an outage), else only the poison tasks fail
        self.up_since = self.now
        self.loop = asyncio.new_event_loop()
        self.guard = EndpointGuard("http://llm.local:8080/v1", Metrics(), CONFIG, clock=lambda: self.now,
                                   probe=self._probe)
        self.waiting: dict[str, float] = {}  # task -> since when its calls have been told to wait
        self.failed_at: dict[str, float] = {}  # task -> its last failure
        self.streak: set[str] = set()  # different tasks failing since the last success
        self.failures: dict[str, int] = {}  # a task's failed attempts: at MAX_ATTEMPTS it has ended
        self.opened_at = -1e9  # when the breaker last opened

    async def _probe(self) -> None:
        if self.down:
            raise LLMUnavailable("HTTP 503")

    def teardown(self) -> None:
        self.loop.run_until_complete(self.guard.aclose())
        self.loop.close()

    def _settle(self) -> None:
        """Let a probe of the guard's own finish (its answer is immediate)."""
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))

    def _decide(self, task: str, retry: bool) -> bool:
        async def decide() -> bool:
            return self.guard.decide(retry=retry, task=task).delay <= 0

        return self.loop.run_until_complete(decide())

    @rule(task=st.sampled_from(TASKS), retry=st.booleans())
    def call(self, task: str, retry: bool) -> None:
        if self.failures.get(task, 0) >= MAX_ATTEMPTS:
            return  # its attempts are spent: the task was dead-lettered `exhausted`
        before = self.guard._probing
        if not self._decide(task, retry):
            self.waiting.setdefault(task, self.now)
            self._settle()
            return
        self.waiting.pop(task, None)
        if self.guard._probing == task and before != task:
            # the probe is never a task that failed within the suspect window
            last = self.failed_at.get(task)
            assert last is None or self.now - last >= self.guard._suspect_s
        if self.down or task.startswith("poison"):
            self.failed_at[task] = self.now
            self.failures[task] = self.failures.get(task, 0) + 1
            self.streak.add(task)
            opened_before = self.guard.is_open
            if self.guard.failure(task) and not opened_before:
                self.opened_at = self.now
                # opened by a failed probe, or by enough different tasks failing in a row
                assert before == task or len(self.streak) >= CONFIG.failure_threshold, self.streak
        else:
            self.streak.clear()
            self.failed_at.pop(task, None)  # its latest call succeeded: no longer a suspect
            self.guard.success(task)
        self._settle()

    @rule(seconds=st.floats(min_value=0.01, max_value=8.0))
    def time_passes(self, seconds: float) -> None:
        """Time passes in steps of at most a second; at each, every waiting caller asks again, as
        :meth:`EndpointGuard.acquire` does."""
        while seconds > 0:
            step = min(seconds, 1.0)
            self.now += step
            seconds -= step
            self._settle()
            for task in list(self.waiting):
                self.call(task, retry=False)

    @precondition(lambda self: not self.down)
    @rule()
    def outage_starts(self) -> None:
        self.down = True

    @precondition(lambda self: self.down)
    @rule()
    def outage_ends(self) -> None:
        self.down = False
        self.up_since = self.now

    @invariant()
    def no_caller_waits_past_its_bound_while_the_endpoint_answers(self) -> None:
        """While the endpoint answers, no caller asking again and again waits longer than the bound
        after the breaker last opened. (Tasks that fail every time can open it again only until
        their attempts are spent, so the waits end.)"""
        if self.down:
            return
        for task, since in self.waiting.items():
            waited = self.now - max(since, self.up_since, self.opened_at)
            assert waited <= BOUND_S, (task, since, self.now, self.guard.why_waiting())


Breaker.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
TestBreaker = Breaker.TestCase
