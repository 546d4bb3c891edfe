"""psq.logs.Throttled: a repeated refusal is one line per interval, with a count."""

from __future__ import annotations

import logging

import pytest

from psq.logs import Throttled


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def throttled(caplog):
    caplog.set_level(logging.WARNING, logger="test.throttled")
    clock = Clock()
    return Throttled(logging.getLogger("test.throttled"), interval_s=10.0, max_keys=3, clock=clock), clock, caplog


def test_repeats_within_the_interval_are_counted_and_reported_with_the_next_line(throttled):
    log, clock, caplog = throttled
    assert log.warning("peer-a", "refused %s", "a")
    for _ in range(7):
        clock.now += 1.0
        assert not log.warning("peer-a", "refused %s", "a")
    clock.now = 12.0
    assert log.warning("peer-a", "refused %s", "a")
    assert [r.getMessage() for r in caplog.records] == ["refused a", "refused a (7 more like it in the last 12 s)"]


def test_each_key_has_its_own_interval_and_the_keys_remembered_are_bounded(throttled):
    log, _, caplog = throttled
    for key in ("a", "b", "c"):
        assert log.warning(key, "refused %s", key)
    assert not log.warning("a", "refused %s", "a")
    assert log.warning("d", "refused %s", "d")  # the longest quiet, "b", is forgotten; "a" kept at it
    assert log.warning("b", "refused %s", "b") and not log.warning("a", "refused %s", "a")
    assert len(log._last) == 3
    assert [r.getMessage() for r in caplog.records] == ["refused a", "refused b", "refused c", "refused d", "refused b"]


def test_flush_reports_the_count_once_the_repeats_stop_and_an_evicted_key_reports_its_own(throttled):
    log, clock, caplog = throttled
    log.warning("a", "refused %s", "a")
    log.warning("a", "refused %s", "a")
    log.warning("a", "refused %s", "a")
    log.flush()  # the interval is not over: nothing yet
    clock.now = 10.0
    log.flush()
    log.flush()  # said once
    log.warning("b", "refused %s", "b")
    log.warning("b", "refused %s", "b")
    for key in ("c", "d", "e"):  # "a" then "b" are pushed out; "b" had a repeat to report
        log.warning(key, "refused %s", key)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == ["refused a", "refused a (2 more like it in the last 10 s)"]
    assert "refused b (1 more like it in the last 0 s)" in messages and len(messages) == 7
