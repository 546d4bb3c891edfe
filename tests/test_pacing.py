"""PushPacer: the gap between a WorkerLoop's messages, from the interval and the CPU they cost."""

from __future__ import annotations

import pytest

from psq.pacing import COST_WEIGHT, MAX_GAP_S, PushPacer


def sent_costing(pacer: PushPacer, messages: int, cost_s: float, start_s: float = 0.0) -> float:
    """``messages`` messages one second apart, each after ``cost_s`` of the thread's CPU."""
    cpu_s = 5.0
    for i in range(messages):
        pacer.sent(start_s + i, cpu_s=cpu_s)
        cpu_s += cost_s
    return start_s + messages - 1


def test_the_first_message_goes_at_once_and_the_next_after_the_interval():
    pacer = PushPacer(0.05, 0.025)
    assert pacer.wait_s(100.0) == 0.0
    pacer.sent(100.0, cpu_s=1.0)
    assert pacer.wait_s(100.01) == pytest.approx(0.04)
    assert pacer.wait_s(100.2) == 0.0


def test_messages_that_cost_more_than_the_share_are_spaced_out():
    pacer = PushPacer(0.05, 0.025)
    last_s = sent_costing(pacer, 40, 0.004)  # 4 ms a message: 4 / 0.025 = 160 ms
    assert pacer.cost_s == pytest.approx(0.004, rel=1e-3)
    assert pacer.gap_s == pytest.approx(0.16, rel=1e-3)
    assert pacer.wait_s(last_s + 0.01) == pytest.approx(0.15, rel=1e-2)


def test_cheap_messages_keep_the_interval():
    pacer = PushPacer(0.05, 0.025)
    sent_costing(pacer, 40, 0.0005)  # 0.5 ms: 20 ms at the share, under the interval
    assert pacer.gap_s == 0.05


def test_the_cost_is_a_running_mean_from_the_first_message_measured():
    pacer = PushPacer(0.0, 0.5)
    pacer.sent(0.0, cpu_s=0.0)  # the first: nothing to measure from
    assert pacer.cost_s == 0.0
    pacer.sent(1.0, cpu_s=0.010)  # a cold 10 ms moves the estimate by its weight only
    assert pacer.cost_s == pytest.approx(COST_WEIGHT * 0.010)
    pacer.sent(2.0, cpu_s=0.030)
    first = COST_WEIGHT * 0.010
    assert pacer.cost_s == pytest.approx(first + COST_WEIGHT * (0.020 - first))
    assert pacer.gap_s == pytest.approx(pacer.cost_s / 0.5)


def test_the_share_never_asks_for_more_than_the_longest_gap_nor_less_than_the_interval():
    pacer = PushPacer(0.05, 0.001)
    sent_costing(pacer, 40, 0.1)  # 100 ms a message: 100 s at a thousandth of a core
    assert pacer.gap_s == MAX_GAP_S
    slow = PushPacer(2.0, 0.001)  # an interval longer than the cap still holds
    sent_costing(slow, 40, 0.1)
    assert slow.gap_s == 2.0


def test_without_the_threads_cpu_the_interval_alone_paces():
    """Inside a trainer's own asyncio loop the thread's CPU is the trainer's: not a message's cost."""
    pacer = PushPacer(0.05, 0.025)
    for t in range(5):
        pacer.sent(float(t), cpu_s=None)
    assert pacer.cost_s == 0.0 and pacer.gap_s == 0.05


def test_a_loop_opened_again_starts_measuring_afresh():
    """Its thread is new (its CPU clock from about 0), or it is a trainer's: no old estimate stays."""
    pacer = PushPacer(0.05, 0.001)
    last_s = sent_costing(pacer, 40, 0.004)
    assert pacer.gap_s > 0.05
    pacer.restart()
    assert pacer.cost_s == 0.0 and pacer.gap_s == 0.05
    pacer.sent(last_s + 1, cpu_s=0.001)  # the new clock, read against nothing
    assert pacer.cost_s == 0.0


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
