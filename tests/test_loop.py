"""WorkerLoop against real services, without torch: threads, steps, outages, forks."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq
from conftest import wait_until

from psq import pushes
from psq.loop import DEFAULT_PUSH_INTERVAL_S, ForkedLoop, GradientSubmission, Submission, WorkerLoop
from psq.pacing import MAX_GAP_S
from psq.stats import History, Moments, merge


def submission(seed: int, channels: int = 4, count: float = 8.0) -> Submission:
    rng = np.random.default_rng(seed)
    return Submission(count, rng.normal(size=channels), rng.random(channels))


def test_steps_are_pushed_in_the_background_and_history_comes_back(cluster):
    c = cluster(2, "--half-life", "100")
    reference = {name: History(100.0) for name in ("a", "b", "c")}
    with WorkerLoop(c.endpoints.frontend, job="job", worker="w0", dtype="<f8") as loop:
        for step in range(5):
            for i, name in enumerate(reference):
                s = submission(10 * step + i)
                loop.submit(name, s)
                reference[name].update(Moments(s.count, s.mean, s.var))
            assert loop.step() == step
            assert loop.flush(10)  # one step at a time, so the history follows a known order
        for name, h in reference.items():
            got = loop.history(name)
            assert got is not None and got.version == 5 and got.step == 4
            np.testing.assert_allclose(got.moments.mean, h.moments.mean, rtol=1e-12)
            np.testing.assert_allclose(got.moments.var, h.moments.var, rtol=1e-12)
        summary = loop.summary()
    assert summary["pushes"] == 5 and summary["answered"] == 5 and summary["unavailable"] == 0


def test_a_layer_submitting_twice_closes_the_step_by_itself(cluster):
    c = cluster(1, "--half-life", "1e12")  # no decay to speak of: the history counts every sample
    with WorkerLoop(c.endpoints.frontend, job="job", worker="w0") as loop:
        for _ in range(3):
            loop.submit("a", submission(1))
            loop.submit("b", submission(2))
        assert loop.current_step == 2  # steps 0 and 1 closed by the repeats; step 2 is open
        assert loop.flush(10)
        # pushes made while one is in flight are merged into one update: count samples, not versions
        assert loop.history("a").moments.count == pytest.approx(3 * 8.0, rel=1e-4)


def steps_then_flush(loop: WorkerLoop, seeds: range) -> tuple[int, float]:
    """A step of layer "a" per seed, as fast as they come, then a flush: the messages sent, and
    how long the steps took."""
    before, started = loop.client.stats["messages"], time.monotonic()
    for seed in seeds:
        loop.submit("a", submission(seed))
        loop.step()
    elapsed_s = time.monotonic() - started
    assert loop.flush(10)
    return loop.client.stats["messages"] - before, elapsed_s


def test_by_default_steps_faster_than_the_push_interval_share_a_message(cluster):
    c = cluster(1, "--half-life", "1e12")  # no decay to speak of: the history counts every sample
    with WorkerLoop(c.endpoints.frontend, job="job", worker="w0") as loop:
        assert loop.push_interval_s == DEFAULT_PUSH_INTERVAL_S > 0
        assert loop.wait_ready(10)
        sent, elapsed_s = steps_then_flush(loop, range(20))  # a fast trainer: 20 steps in far less than one interval
        assert loop.history("a").moments.count == pytest.approx(20 * 8.0, rel=1e-4)  # every sample
        assert loop.summary()["answered"] == 20  # every step's push was answered, by a shared reply
    # one send at once, one after the interval with the rest merged (more only if this test stalled)
    assert sent <= 2 + elapsed_s / DEFAULT_PUSH_INTERVAL_S


def test_messages_that_cost_more_than_their_cpu_share_are_spaced_out(cluster):
    """With a share no message can fit (a millionth of a core), the loop measures the CPU its
    thread spent between messages (each sent by a flush) and holds the steps after them, pooled,
    for the longest gap (here, until the next flush)."""
    c = cluster(1, "--half-life", "1e12")
    with WorkerLoop(c.endpoints.frontend, job="job", worker="w0", push_interval_s=0.0, push_cpu_share=1e-6) as loop:
        assert loop.wait_ready(10)
        for step in range(2):
            loop.submit("a", submission(step))
            loop.step()
            assert loop.flush(10)
        assert loop.push_gap_s == MAX_GAP_S  # any CPU at all, over a millionth of a core: the longest gap
        sent, elapsed_s = steps_then_flush(loop, range(2, 20))
        assert loop.history("a").moments.count == pytest.approx(20 * 8.0, rel=1e-4)  # every sample
    # the flush's, 18 steps pooled (one more per longest gap only if this test stalled)
    assert sent <= 1 + elapsed_s / MAX_GAP_S


def test_a_loop_started_again_measures_its_new_thread_afresh(cluster):
    """The gap a first run's messages asked for does not carry over: a new thread's CPU clock
    starts near 0, and nothing is measured until two of its messages went."""
    c = cluster(1)
    loop = WorkerLoop(c.endpoints.frontend, job="job", worker="w0", push_interval_s=0.0, push_cpu_share=1e-6)
    for run in range(2):
        loop.start()
        try:
            assert loop.wait_ready(10)
            assert loop.push_gap_s == 0.0  # nothing measured on this thread yet
            for step in range(2):
                loop.submit("a", submission(step))
                loop.step()
                assert loop.flush(10)
            assert loop.push_gap_s == MAX_GAP_S, run
        finally:
            loop.stop()


@pytest.mark.asyncio
async def test_inside_a_trainers_event_loop_the_interval_alone_paces(cluster):
    """There the thread's CPU is the trainer's own: no message is charged with it."""
    c = cluster(1)
    async with WorkerLoop(
        c.endpoints.frontend, job="job", worker="w0", push_interval_s=0.0, push_cpu_share=1e-6
    ) as loop:
        for i in range(3):
            loop.submit("a", submission(i))
            loop.step()
            assert await loop.aflush(10)
        assert loop.push_gap_s == 0.0


def test_the_loops_pacing_settings_are_checked():
    with pytest.raises(ValueError, match=r"push_cpu_share must be in \(0, 1\], got 2"):
        WorkerLoop("tcp://127.0.0.1:1", job="job", worker="w0", push_cpu_share=2)
    with pytest.raises(ValueError, match="push_interval_s must be a non-negative number of seconds"):
        WorkerLoop("tcp://127.0.0.1:1", job="job", worker="w0", push_interval_s=-0.5)


@contextlib.contextmanager
def first_message_sent(frontend: str, dtype: str = "<f4") -> Iterator[WorkerLoop]:
    """A loop with a 30 s push interval whose first message (layer "a", ``submission(0)``) went
    at once and was answered: every step closed next waits, pooled, for a flush."""
    with WorkerLoop(frontend, job="job", worker="w0", dtype=dtype, push_interval_s=30.0) as loop:
        assert loop.wait_ready(10)
        loop.submit("a", submission(0))
        loop.step()
        assert loop.flush(10)
        yield loop


def test_steps_waiting_out_the_interval_go_as_one_exact_update_and_a_flush_sends_them_at_once(cluster):
    c = cluster(1, "--half-life", "100")
    reference = History(100.0)
    with first_message_sent(c.endpoints.frontend, dtype="<f8") as loop:
        first = submission(0)
        reference.update(Moments(first.count, first.mean, first.var))
        waiting = [submission(1 + i, count=4.0 + i) for i in range(4)]
        for s in waiting:  # all within the 30 s interval: they wait, pooled, for the next message
            loop.submit("a", s)
            loop.step()
        assert loop.summary()["in_flight"] == 4
        started = time.monotonic()
        assert loop.flush(10) and time.monotonic() - started < 10, "a flush does not wait out the interval"
        pooled = functools.reduce(merge, [Moments(s.count, s.mean, s.var) for s in waiting])
        reference.update(pooled)  # the aggregator saw one update of the four steps' samples
        got, summary = loop.history("a"), loop.summary()
    assert got.version == 2 and got.step == 4
    np.testing.assert_allclose(got.moments.count, reference.moments.count, rtol=1e-12)
    np.testing.assert_allclose(got.moments.mean, reference.moments.mean, rtol=1e-12)
    np.testing.assert_allclose(got.moments.var, reference.moments.var, rtol=1e-12)
    assert summary["pushes"] == summary["answered"] == 5 and summary["in_flight"] == 0


def test_a_step_whose_gradients_are_not_finite_leaves_out_its_own_not_those_it_is_pooled_with(cluster):
    c = cluster(1, "--half-life", "1e12")
    with first_message_sent(c.endpoints.frontend) as loop:
        for dy in (np.full(4, np.nan), np.ones(4), np.full(4, 3.0)):  # pooled into one message
            loop.submit("a", submission(1))
            loop.submit_gradient("a", GradientSubmission(8.0, dy, np.zeros(4)))
            loop.step()
        assert loop.flush(10)
        g, summary = loop.history("a").gradient, loop.summary()
    assert summary["nonfinite_gradients"] == 1
    assert g.count == pytest.approx(16.0, rel=1e-6)
    np.testing.assert_allclose(g.dy, np.full(4, 2.0), rtol=1e-6)


def test_a_step_whose_device_copies_never_land_is_dropped_and_the_steps_pooled_with_it_still_go(
    cluster, monkeypatch, caplog
):
    monkeypatch.setattr(pushes, "LANDING_TIMEOUT_S", 0.3)  # a CUDA copy that never lands, given less time
    c = cluster(1, "--half-life", "1e12")
    with first_message_sent(c.endpoints.frontend) as loop:
        stuck = submission(1)
        loop.submit("a", Submission(stuck.count, stuck.mean, stuck.var, ready=lambda: False))
        loop.step()  # step 1: never lands
        loop.submit("a", submission(2, count=5.0))
        loop.step()  # step 2: pooled with step 1 in the flush's message
        assert loop.flush(10)
        h = loop.history("a")
    assert h.version == 2 and h.moments.count == pytest.approx(8.0 + 5.0, rel=1e-4)
    assert any("step 1's device copies did not land" in r.getMessage() for r in caplog.records)


def test_the_loop_keeps_going_while_the_broker_is_away_and_recovers(cluster, spawn, caplog):
    c = cluster(1)
    with WorkerLoop(c.endpoints.frontend, job="job", worker="w0", timeout_s=0.2, retries=1) as loop:
        for i in range(3):
            loop.submit("a", submission(i))
            loop.step()
        assert loop.flush(10)
        before = loop.history("a").version
        c.broker.kill(signal.SIGKILL)
        for i in range(3):
            loop.submit("a", submission(i))
            loop.step()
            assert loop.summary()["in_flight"] >= 1, "step() hands the push over and returns before any answer"
        assert loop.flush(20)
        assert loop.summary()["unavailable"] >= 1
        spawn("broker", "--frontend", c.endpoints.frontend, "--backend", c.endpoints.backend)

        def advanced() -> bool:
            loop.submit("a", submission(9))
            loop.step()
            loop.flush(5)
            h = loop.history("a")
            return h is not None and h.version > before

        wait_until(advanced, timeout_s=30, what="history versions to advance after the broker restart")
    messages = [r.getMessage() for r in caplog.records if r.name == "psq.loop"]
    assert sum("unreachable" in m for m in messages) == 1  # logged once, not every step
    assert any("answers again" in m for m in messages)


def test_stop_leaves_no_thread_and_no_socket(cluster):
    c = cluster(1)
    before = set(threading.enumerate())
    loop = WorkerLoop(c.endpoints.frontend, job="job", worker="w0").start()
    loop.submit("a", submission(0))
    loop.flush(10)
    client = loop.client
    assert client is not None and client.connected
    loop.stop()
    assert set(threading.enumerate()) == before
    assert not client.connected and loop.client is None


def test_stop_returns_even_when_the_service_never_answers(ipc_dir):
    loop = WorkerLoop(f"ipc://{ipc_dir}/nobody", job="job", worker="w0", timeout_s=5.0).start()
    loop.submit("a", submission(0))
    loop.step()
    assert [t for t in threading.enumerate() if t.name == "psq-w0"]
    loop.stop(timeout_s=5.0)
    assert not [t for t in threading.enumerate() if t.name == "psq-w0"]


def _use_in_child(loop: WorkerLoop, out: multiprocessing.connection.Connection) -> None:
    try:
        loop.submit("a", submission(0))
        out.send("used")
    except ForkedLoop as exc:
        out.send(f"refused: {exc}")


def test_a_forked_process_cannot_use_the_loop_and_the_parent_carries_on(cluster):
    c = cluster(1)
    with WorkerLoop(c.endpoints.frontend, job="job", worker="w0") as loop:
        loop.submit("a", submission(0))
        loop.flush(10)
        ctx = multiprocessing.get_context("fork")
        parent_end, child_end = ctx.Pipe()
        child = ctx.Process(target=_use_in_child, args=(loop, child_end))
        child.start()
        child.join(20)
        assert child.exitcode == 0
        assert parent_end.recv().startswith("refused: this WorkerLoop belongs to the process")
        loop.submit("a", submission(1))
        assert loop.flush(10) and loop.history("a").version == 2


@pytest.mark.asyncio
async def test_inside_the_trainers_own_event_loop(cluster):
    c = cluster(1, "--half-life", "1e12")
    async with WorkerLoop(c.endpoints.frontend, job="job", worker="w0") as loop:
        for i in range(3):
            loop.submit("a", submission(i))
            loop.step()
            await asyncio.sleep(0)
        assert await loop.aflush(10)
        assert loop.history("a").moments.count == pytest.approx(3 * 8.0, rel=1e-4)
        with pytest.raises(RuntimeError, match="own event loop"):
            loop.flush(1)


def test_sync_mode_exchanges_block_until_every_worker_is_in(cluster):
    c = cluster(1, "--mode", "sync", "--sync-workers", "2")
    results: dict[str, object] = {}

    def worker(name: str, seed: int) -> None:
        with WorkerLoop(c.endpoints.frontend, job="job", worker=name, mode="sync", dtype="<f8") as loop:
            results[name] = loop.exchange("a", submission(seed))

    threads = [threading.Thread(target=worker, args=(f"w{i}", i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    (p0, complete0), (p1, complete1) = results["w0"], results["w1"]
    assert complete0 and complete1 and p0.count == p1.count == 16.0
    np.testing.assert_allclose(p0.mean, (submission(0).mean + submission(1).mean) / 2, rtol=1e-12)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be"):
        WorkerLoop(job="j", worker="w", mode="fast")


def test_history_from_a_restarted_aggregator_replaces_the_old_one(cluster, spawn):
    """A restarted aggregator without snapshot counts versions from 1 again: the newest answer
    still wins over the higher-numbered old one."""
    from conftest import wait_for_owner

    c = cluster(1)
    with WorkerLoop(c.endpoints.frontend, job="job", worker="w0", timeout_s=0.3, retries=1) as loop:
        for i in range(5):
            loop.submit("a", submission(i))
            assert loop.flush(10)
        assert loop.history("a").version == 5
        c.aggregators[0].kill(signal.SIGKILL)
        fresh = spawn("aggregator", "--shard", "0/1", "--backend", c.endpoints.backend)
        wait_for_owner(c.endpoints.frontend, 0, fresh)

        def answered_by_the_new_one() -> bool:
            loop.submit("a", submission(9))
            loop.flush(5)
            return loop.history("a").version < 5

        wait_until(answered_by_the_new_one, timeout_s=30, what="the restarted aggregator's history")
        np.testing.assert_allclose(loop.history("a").moments.mean, submission(9).mean, rtol=1e-6)


def test_a_loop_that_cannot_start_says_why(ipc_dir):
    with pytest.raises(zmq.ZMQError):
        WorkerLoop("bogus://nowhere", job="job", worker="w0").start(timeout_s=5)


def test_an_unknown_wire_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be"):
        WorkerLoop(job="j", worker="w", dtype="<f2")


def test_gradient_statistics_that_are_not_finite_are_left_out_and_the_step_still_goes(cluster):
    """A mixed-precision step whose loss scale overflowed: its gradient means are infinite."""
    c = cluster(1)
    with WorkerLoop(c.endpoints.frontend, job="job", worker="w0") as loop:
        loop.submit("a", submission(1))
        loop.submit_gradient("a", GradientSubmission(8.0, np.array([np.inf, 0, 0, 0]), np.zeros(4)))
        loop.submit("b", submission(2))
        loop.submit_gradient("b", GradientSubmission(8.0, np.ones(4), np.full(4, 0.5)))
        assert loop.flush(10)
        summary = loop.summary()
        assert summary["rejected"] == 0 and summary["nonfinite_gradients"] == 1
        a = loop.history("a")
        assert a.version == 1 and a.gradient.count == 0  # its moments went, its gradients did not
        np.testing.assert_allclose(loop.history("b").gradient.dy, np.ones(4), rtol=1e-6)
