"""PushPacer: the gap between a WorkerLoop's messages, from the interval and the CPU they cost."""

from __future__ import annotations

import pytest

from psq.pacing import COST_WEIGHT, PushPacer


def test_the_first_message_goes_at_once_and_the_next_after_the_interval():
    pacer = PushPacer(0.05, 0.025)
    assert pacer.wait_s(100.0) == 0.0
    pacer.sent(100.0, cpu_s=1.0)
    assert pacer.wait_s(100.01) == pytest.approx(0.04)
    assert pacer.wait_s(100.2) == 0.0


def test_messages_that_cost_more_than_the_share_are_spaced_out():
    pacer = PushPacer(0.05, 0.025)
    pacer.sent(0.0, cpu_s=10.0)
    pacer.sent(0.05, cpu_s=10.004)  # 4 ms of the thread's CPU since the last: 4 / 0.025 = 160 ms
    assert pacer.cost_s == pytest.approx(0.004)
    assert pacer.gap_s == pytest.approx(0.16)
    assert pacer.wait_s(0.06) == pytest.approx(0.15)


def test_cheap_messages_keep_the_interval():
    pacer = PushPacer(0.05, 0.025)
    pacer.sent(0.0, cpu_s=0.0)
    pacer.sent(0.05, cpu_s=0.0005)  # 0.5 ms: 20 ms at the share, under the interval
    assert pacer.gap_s == 0.05


def test_the_cost_follows_the_newest_messages_by_a_running_mean():
    pacer = PushPacer(0.0, 0.5)
    pacer.sent(0.0, cpu_s=0.0)
    pacer.sent(1.0, cpu_s=0.010)
    pacer.sent(2.0, cpu_s=0.012)  # 2 ms this time
    assert pacer.cost_s == pytest.approx(0.010 + COST_WEIGHT * (0.002 - 0.010))
    assert pacer.gap_s == pytest.approx(pacer.cost_s / 0.5)


def test_without_the_threads_cpu_the_interval_alone_paces():
    """Inside a trainer's own asyncio loop the thread's CPU is the trainer's: not a message's cost."""
    pacer = PushPacer(0.05, 0.025)
    for t in range(5):
        pacer.sent(float(t), cpu_s=None)
    assert pacer.cost_s == 0.0 and pacer.gap_s == 0.05


def test_a_new_threads_cpu_clock_is_not_read_against_the_old_ones():
    pacer = PushPacer(0.0, 0.5)
    pacer.sent(0.0, cpu_s=10.0)
    pacer.sent(1.0, cpu_s=10.004)
    pacer.new_thread()  # a loop started again: its thread's CPU time counts from about 0
    pacer.sent(2.0, cpu_s=0.5)  # nothing to measure from yet: the estimate stands
    assert pacer.cost_s == pytest.approx(0.004)
    pacer.sent(3.0, cpu_s=0.504)
    assert pacer.cost_s == pytest.approx(0.004)


@pytest.mark.parametrize(
    ("interval_s", "share", "says"),
    [
        (-1.0, 0.025, "push_interval_s must be a non-negative number of seconds, got -1.0"),
        (float("nan"), 0.025, "push_interval_s must be a non-negative number"),
        (0.05, 0.0, r"push_cpu_share must be in \(0, 1\], got 0.0"),
        (0.05, 1.5, r"push_cpu_share must be in \(0, 1\], got 1.5"),
    ],
)
def test_bad_settings_say_what_was_expected(interval_s, share, says):
    with pytest.raises(ValueError, match=says):
        PushPacer(interval_s, share)
