"""When the replay screen screens: the share of recent claims that found their task done."""

from __future__ import annotations

from typing import Any

from service.pipeline.screen import DuplicateShare, ReplayScreen


def screen(share: DuplicateShare) -> ReplayScreen:
    nothing: Any = None  # wanted() reads only the share
    return ReplayScreen(nothing, nothing, share, max_bytes=1024, transactional=False)


def test_a_replay_keeps_the_screen_on_and_new_work_turns_it_off() -> None:
    share = DuplicateShare(span=512)
    s = screen(share)
    assert s.wanted()  # nothing seen yet: a replay after a start is screened from its first batch
    for _ in range(ReplayScreen.MIN_SEEN - 1):
        share.note(0, 1)
    assert s.wanted()  # too few claims to tell
    share.note(0, 1)
    assert not s.wanted()  # new work: it pays for the screen of its first batches only
    for _ in range(ReplayScreen.MIN_SEEN):
        share.note(1, 1)
    assert s.wanted()
    for _ in range(5_000):  # a long run of new work: the replay is over
        share.note(0, 1)
    assert not s.wanted()
    assert share.seen < 512  # the counts halve: they follow what the topic holds now


def test_a_trickle_of_duplicates_in_new_work_does_not_turn_it_on() -> None:
    share = DuplicateShare()
    for i in range(10_000):
        share.note(1 if i % 10 == 0 else 0, 1)  # one redelivery in ten
    assert not screen(share).wanted()
    assert 0.05 < share.share() < 0.15


def test_the_share_comes_back_within_a_span_when_a_replay_starts_after_new_work() -> None:
    share = DuplicateShare(span=512)
    for _ in range(100_000):
        share.note(0, 1)
    s = screen(share)
    turned_on_after = None
    for n in range(1, 2_000):
        share.note(1, 1)
        if s.wanted():
            turned_on_after = n
            break
    assert turned_on_after is not None and turned_on_after <= 256
