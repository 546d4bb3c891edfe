"""The worker's step bookkeeping, its counters, its pushes in flight and its event-loop thread, without
any service."""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
import socket
import threading

import numpy as np
import pytest

from psq.counters import LoopCounters
from psq.inflight import InFlight
from psq.loop_thread import MAX_SKIPPED_POLLS, FewReleasesSelector, LoopThread, run_threadsafe
from psq.pushes import (
    RECORD_WAIT_STEPS,
    GradientSubmission,
    PendingGradient,
    RecordedGradients,
    Submission,
    finite_gradients,
    pooled_moments,
)
from psq.stats import GradientMeans, Moments, pool, pool_gradients
from psq.steps import ClosedStep, ExchangeSteps, StepBook


def test_a_layer_reporting_twice_closes_the_step_with_everything_in_it():
    book: StepBook[str, str] = StepBook()
    assert book.submit("a", "a0") is None and book.submit("b", "b0") is None
    book.submit_gradient("b", "gb0")
    book.submit_gradient("b", "gb0'")  # recomputed by activation checkpointing: both kept
    assert book.enter("c") is None  # a layer new to the step does not close it
    closed = book.submit("a", "a1")
    assert (closed.number, dict(closed.entries), dict(closed.gradients)) == (
        0,
        {"a": "a0", "b": "b0"},
        {"b": ["gb0", "gb0'"]},
    )
    assert book.number == 1 and book.is_open  # a1 opened step 1
    assert book.enter("a").entries == {"a": "a1"} and not book.is_open


def test_without_auto_step_only_close_ends_a_step_and_gradients_without_a_forward_wait():
    book: StepBook[str, str] = StepBook(auto_step=False)
    book.submit("a", "a0")
    assert book.submit("a", "a0 again") is None and book.enter("a") is None
    first = book.close()
    assert (first.number, dict(first.entries)) == (0, {"a": "a0 again"})
    book.submit_gradient("a", "late")  # the backward of step 0, after close()
    empty = book.close()
    assert (empty.number, dict(empty.entries), dict(empty.gradients)) == (1, {}, {})
    book.submit("a", "a2")
    assert dict(book.close().gradients) == {"a": ["late"]}  # it joined the next step with a forward


def test_sync_mode_begins_a_step_at_a_layers_second_exchange():
    steps = ExchangeSteps()
    assert [steps.begin(n) for n in ("a", "b", "a", "b", "b")] == [0, 0, 1, 1, 2]
    assert steps.close() == 2 and steps.begin("a") == 3 and steps.begin("b") == 3  # step() between


def test_counters_summarize_with_the_mean_staleness():
    counters = LoopCounters()
    assert counters.summary(0)["mean_staleness_steps"] is None
    counters.pushes, counters.answered = 3, 2
    for steps in (1, 2, 6):
        counters.note_staleness(steps)
    summary = counters.summary(5)
    assert summary["steps"] == 5 and summary["pushes"] == 3 and summary["mean_staleness_steps"] == 3.0
    assert "staleness_sum" not in summary and "staleness_n" not in summary


def test_the_loop_thread_opens_serves_closes_and_runs_coroutines_for_other_threads():
    host, events = LoopThread("psq-test"), []

    async def opened() -> None:
        events.append(("open", threading.current_thread().name))

    async def closed() -> None:
        events.append(("close", threading.current_thread().name))

    host.start(opened, closed, timeout_s=5)
    assert host.running and host.loop is not None

    async def answer() -> int:
        return 42

    async def forever() -> None:
        await asyncio.Event().wait()

    assert run_threadsafe(host.loop, answer(), timeout_s=5) == 42
    with pytest.raises(concurrent.futures.TimeoutError):
        run_threadsafe(host.loop, forever(), timeout_s=0.05)
    with pytest.raises(RuntimeError, match="already started"):
        host.start(opened, closed, timeout_s=5)
    host.stop(timeout_s=5)
    assert events == [("open", "psq-test"), ("close", "psq-test")] and not host.running
    assert not [t for t in threading.enumerate() if t.name == "psq-test"]


def test_the_selector_answers_some_zero_timeout_polls_itself_and_loses_no_event():
    selector, (a, b) = FewReleasesSelector(), socket.socketpair()
    try:
        selector.register(a, selectors.EVENT_READ)
        b.send(b"x")
        for _ in range(MAX_SKIPPED_POLLS):
            assert selector.select(0) == []  # "anything new?" answered without the call
        ready = selector.select(0)  # then a real poll: the event was kept
        assert [key.fileobj for key, _ in ready] == [a]
        assert [key.fileobj for key, _ in selector.select(0.5)] == [a]  # a poll that may wait: never skipped
        assert [key.fileobj for key, _ in selector.select(None)] == [a]
    finally:
        selector.close()
        a.close()
        b.close()


def test_the_loop_thread_sees_io_while_callbacks_keep_it_busy():
    """A loop whose callbacks are always ready (every poll a zero-timeout one) still reads a socket."""
    host, (a, b) = LoopThread("psq-test-busy"), socket.socketpair()
    a.setblocking(False)

    async def nothing() -> None:
        pass

    async def read_while_busy() -> bytes:
        loop, busy = asyncio.get_running_loop(), True

        def spin() -> None:
            if busy:
                loop.call_soon(spin)

        spin()
        loop.call_later(0.05, b.send, b"y")  # after sock_recv found nothing and waits on the selector
        try:
            return await asyncio.wait_for(loop.sock_recv(a, 1), timeout=5)
        finally:
            busy = False

    host.start(nothing, nothing, timeout_s=5)
    try:
        assert host.loop is not None
        assert run_threadsafe(host.loop, read_while_busy(), timeout_s=10) == b"y"
    finally:
        host.stop(timeout_s=5)
        a.close()
        b.close()


def test_an_error_while_opening_is_raised_on_the_callers_thread():
    host = LoopThread("psq-failing")

    async def fails() -> None:
        raise OSError("no socket for you")

    async def never() -> None:
        raise AssertionError("close must not run when open failed")

    with pytest.raises(OSError, match="no socket for you"):
        host.start(fails, never, timeout_s=5)
    assert not host.running


def test_pushes_in_flight_count_from_their_hand_over_and_flushes_wait_on_them():
    host, lock = LoopThread("psq-inflight"), threading.Condition()
    in_flight, release, ran = InFlight(lock), threading.Event(), []

    async def nothing() -> None:
        pass

    async def push(n: int) -> None:
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 5)
        ran.append(n)

    host.start(nothing, in_flight.cancel, timeout_s=5)
    assert host.loop is not None
    with lock:
        in_flight.hand_over(host.loop, push(1))
        in_flight.hand_over(host.loop, push(2))
        assert in_flight.count == 2, "counted on hand-over, before either is a task"
        assert not in_flight.wait(0.05), "nothing settled while the pushes are held"
    assert run_threadsafe(host.loop, in_flight.drained(0.05), timeout_s=5) is False
    release.set()
    with lock:
        assert in_flight.wait(5) and in_flight.count == 0
    assert sorted(ran) == [1, 2]
    assert run_threadsafe(host.loop, in_flight.drained(0.05), timeout_s=5) is True
    host.stop(timeout_s=5)


def test_a_drained_wait_sees_a_push_handed_over_from_another_thread_and_cancel_settles_all():
    lock = threading.Condition()
    in_flight, release = InFlight(lock), asyncio.Event()

    async def push() -> None:
        await release.wait()

    async def main() -> tuple[bool, bool, int]:
        loop = asyncio.get_running_loop()

        def from_another_thread() -> None:
            with lock:
                in_flight.hand_over(loop, push())

        await asyncio.to_thread(from_another_thread)  # handed over; not yet a task
        waiting = asyncio.ensure_future(in_flight.drained(5))
        await asyncio.sleep(0.05)
        still_waiting = not waiting.done()
        release.set()
        drained = await waiting
        with lock:
            in_flight.hand_over(loop, push())  # cancelled before it ever runs
            in_flight.hand_over(loop, push())
        release.clear()
        await asyncio.sleep(0)
        await in_flight.cancel()
        return still_waiting, drained, in_flight.count

    assert asyncio.run(main()) == (True, True, 0)


def test_steps_sent_in_one_message_pool_each_layers_moments_and_images():
    def sub(values: list[float], images: float | None) -> Submission:
        x = np.array(values)
        return Submission(float(x.size), np.array([x.mean()]), np.array([x.var()]), None, images)

    steps = [
        ClosedStep(0, {"a": sub([1.0, 2.0], 1.0), "b": sub([5.0], None)}),
        ClosedStep(1, {"a": sub([4.0, 6.0, 8.0], 3.0)}),  # layer b did not run in this step
        ClosedStep(2, {"b": sub([7.0, 9.0], None)}),
    ]
    stats, images = pooled_moments(steps)
    want_a = Moments.of(np.array([[1.0], [2.0], [4.0], [6.0], [8.0]]), 0)
    want_b = Moments.of(np.array([[5.0], [7.0], [9.0]]), 0)
    for got, want in ((stats["a"], want_a), (stats["b"], want_b)):
        assert got.count == want.count
        np.testing.assert_allclose([got.mean, got.var], [want.mean, want.var], rtol=1e-14)
    assert images == {"a": 4.0}  # b's submissions name no images: each element counts as one


def test_layers_of_any_widths_and_part_counts_pool_as_each_layer_alone_would():
    """Pooled together (channels end to end, a few numpy calls a group of layers), each layer's
    moments and gradient means are its own pooled alone (psq.stats.pool, pool_gradients)."""
    rng = np.random.default_rng(3)
    widths, runs = {"a": 2, "b": 3, "c": 1, "d": 4}, {"a": 3, "b": 3, "c": 1, "d": 2}  # d skips a step

    def sub(c: int) -> Submission:
        return Submission(float(rng.integers(1, 50)), rng.normal(size=c), rng.random(c), None, 1.0)

    steps = [ClosedStep(i, {n: sub(c) for n, c in widths.items() if i < runs[n]}) for i in range(3)]
    stats, _ = pooled_moments(steps)
    grads = {n: [GradientSubmission(float(rng.integers(1, 50)), *rng.normal(size=(2, c))) for _ in range(runs[n])]
             for n, c in widths.items()}  # fmt: skip
    pooled_grads, dropped = finite_gradients(2, grads)
    assert dropped == 0 and set(stats) == set(pooled_grads) == set(widths)
    for n in widths:
        want = pool([Moments(c.entries[n].count, c.entries[n].mean, c.entries[n].var) for c in steps if n in c.entries])
        got = stats[n]
        assert got.count == want.count
        np.testing.assert_allclose([got.mean, got.var], [want.mean, want.var], rtol=1e-14, atol=0)
        want_g = pool_gradients([GradientMeans(g.count, g.dy, g.dy_xhat) for g in grads[n]])
        got_g = pooled_grads[n]
        assert got_g.count == want_g.count
        np.testing.assert_allclose([got_g.dy, got_g.dy_xhat], [want_g.dy, want_g.dy_xhat], rtol=1e-14, atol=0)


def test_a_layers_gradient_part_that_is_not_finite_is_left_out_and_the_others_pool():
    finite = GradientSubmission(4.0, np.array([1.0, 2.0]), np.array([0.5, 0.5]))
    grads = {
        "a": [finite, GradientSubmission(4.0, np.array([np.nan, 1.0]), np.array([0.0, 0.0]))],
        "b": [GradientSubmission(2.0, np.array([np.inf]), np.array([0.0]))],  # none finite: not sent
        "c": [finite, finite],
    }
    pooled, dropped = finite_gradients(7, grads)
    assert dropped == 2 and set(pooled) == {"a", "c"}
    np.testing.assert_array_equal(pooled["a"].dy, finite.dy)
    assert pooled["a"].count == 4.0 and pooled["c"].count == 8.0


def _record(channels: int = 2) -> tuple[np.ndarray, Submission]:
    """A layer's record as a forward leaves it: moments written, the gradient means to come."""
    row, c = np.zeros(4 * channels + 1), channels
    pending = PendingGradient(row[2 * c : 3 * c], row[3 * c : 4 * c], row[4 * c :])
    return row, Submission(8.0, row[:c], row[c : 2 * c], None, 2.0, pending)


def _recorded(book: StepBook, name: str) -> np.ndarray:
    """Submit a layer's record (a step must not close here)."""
    row, submission = _record()
    assert book.submit(name, submission) is None
    return row


def _backward_writes(row: np.ndarray, value: float, channels: int = 2) -> None:
    """What psq's kernels do in a backward: write only into an open record."""
    if row[-1] == 0:
        row[2 * channels : 4 * channels] = value
        row[-1] = 8.0


def test_a_closing_step_collects_the_gradient_means_written_into_its_records():
    book: StepBook[Submission, GradientSubmission] = StepBook(auto_step=False)
    recorded = RecordedGradients()
    a, b = _recorded(book, "a"), _recorded(book, "b")
    _backward_writes(a, 1.0)
    closed = recorded.collect(book.close())
    assert list(closed.gradients) == ["a"] and closed.gradients["a"][0].count == 8.0
    np.testing.assert_array_equal(closed.gradients["a"][0].dy, [1.0, 1.0])
    # b's backward came after the close: it joins the next step with a forward, as a submitted gradient
    _backward_writes(b, 2.0)
    _recorded(book, "a")
    later = recorded.collect(book.close())
    assert list(later.gradients) == ["b"] and later.gradients["b"][0].dy[0] == 2.0


def test_a_record_still_empty_after_its_wait_is_sealed_and_a_replaced_forwards_record_is_kept():
    book: StepBook[Submission, GradientSubmission] = StepBook(auto_step=False)
    recorded = RecordedGradients()
    never = _recorded(book, "a")  # a forward whose backward never runs (say, under no_grad)
    recorded.collect(book.close())
    for _ in range(RECORD_WAIT_STEPS - 1):
        _recorded(book, "b")
        assert "a" not in recorded.collect(book.close()).gradients
        assert never[-1] == 0  # still open: its backward may come
    _recorded(book, "b")
    recorded.collect(book.close())
    assert never[-1] == -1  # sealed: psq's kernels write nothing into it now
    first = _recorded(book, "c")  # a layer run twice in a step (activation checkpointing)
    second = _recorded(book, "c")
    _backward_writes(first, 4.0), _backward_writes(second, 5.0)
    closed = recorded.collect(book.close())
    assert [g.dy[0] for g in closed.gradients["c"]] == [4.0, 5.0]
    moments = closed.entries["c"].mean  # the last forward's count
    assert np.shares_memory(moments, second) and not np.shares_memory(moments, first)


def test_a_layer_run_three_times_before_one_backward_keeps_every_gradient():
    """auto_step closes a step at each run of a shared layer: all three records wait for the
    backward that comes after the third, and join the step that closes next."""
    book: StepBook[Submission, GradientSubmission] = StepBook()
    recorded = RecordedGradients()
    rows, steps = [], []
    for _ in range(3):
        row, submission = _record()
        closed = book.submit("shared", submission)  # the 2nd and 3rd runs close the step before
        if closed is not None:
            steps.append(recorded.collect(closed))
        rows.append(row)
    assert len(steps) == 2 and not any(s.gradients for s in steps)
    for value, row in enumerate(rows):
        _backward_writes(row, float(value))
    last = recorded.collect(book.close())
    assert sorted(g.dy[0] for g in last.gradients["shared"]) == [0.0, 1.0, 2.0]
