"""The participant pipeline's rules without a broker or database: offsets, the in-flight
bound, the heartbeat throttle, written-off workers and an attempt's reports."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, cast

import pytest

from orchestrator.protocol import ActivityTask, Payload, activity_id, decode_json, encode_json
from orchestrator.protocol.payloads import PayloadEncodingError
from orchestrator.protocol.records import ActivityHeartbeat, ActivityStarted
from orchestrator.settings import ParticipantSettings
from participants.delivery import Outgoing, ResultDeliveryError
from participants.flow import InFlightGate, OffsetTracker, Throttle
from participants.participant import (
    SCHEDULE_TO_CLOSE_TIMEOUT,
    START_TO_CLOSE_TIMEOUT,
    Deadline,
    Participant,
    attempt_deadline,
)
from participants.runtime import (
    DETAILS_ONLY_INTERVAL_S,
    WRITE_OFF_GRACE_MS,
    _AttemptReports,
    _Job,
    _ParticipantLoop,
    _Workers,
    heartbeat_interval_s,
    max_in_flight,
)

WAIT_S = 10.0
T = "unit.tasks.payment"


# --- offsets -------------------------------------------------------------------------------


def test_the_commit_point_is_the_lowest_offset_still_in_flight() -> None:
    tracker = OffsetTracker()
    tickets = [tracker.take((T, 0), offset) for offset in range(10, 15)]
    assert tracker.in_flight == 5
    # Taking offset 10 first says where the group stood: nothing to commit yet.
    assert tracker.committable() == {}
    for ticket in tickets[1:]:  # 11..14 finish, 10 hangs
        tracker.finish(ticket)
    assert tracker.in_flight == 1
    assert tracker.committable() == {}, "a stuck task holds its partition's commit"
    tracker.finish(tickets[0])
    assert tracker.committable() == {(T, 0): 15}
    tracker.committed((T, 0), 15)
    assert tracker.committable() == {}


def test_out_of_order_completion_commits_only_up_to_the_first_gap() -> None:
    tracker = OffsetTracker()
    tickets = {offset: tracker.take((T, 1), offset) for offset in range(0, 6)}
    for offset in (3, 1, 5, 0):
        tracker.finish(tickets[offset])
    assert tracker.committable() == {(T, 1): 2}
    assert tracker.lowest_in_flight((T, 1)) == 2
    tracker.committed((T, 1), 2)
    tracker.finish(tickets[4])
    assert tracker.committable() == {}, "offset 2 still runs"
    tracker.finish(tickets[2])
    assert tracker.committable() == {(T, 1): 6}
    assert tracker.lowest_in_flight((T, 1)) is None


def test_gaps_between_offsets_taken_do_not_hold_the_commit() -> None:
    # Transaction markers and aborted records are never handed to the consumer.
    tracker = OffsetTracker()
    first = tracker.take((T, 0), 0)
    second = tracker.take((T, 0), 7)
    tracker.finish(first)
    assert tracker.committable() == {(T, 0): 7}
    tracker.finish(second)
    assert tracker.committable() == {(T, 0): 8}


def test_partitions_are_independent_and_can_be_committed_one_by_one() -> None:
    tracker = OffsetTracker()
    stuck = tracker.take((T, 0), 0)
    tracker.finish(tracker.take((T, 0), 1))
    tracker.finish(tracker.take((T, 2), 4))
    tracker.take((T, 2), 5)  # in flight: partition 2 commits up to it
    tracker.finish(tracker.take((T, 2), 6))
    assert tracker.committable() == {(T, 2): 5}
    assert tracker.committable(only={(T, 0)}) == {}
    tracker.finish(stuck)
    assert tracker.committable(only={(T, 0)}) == {(T, 0): 2}


def test_a_revoked_partition_is_forgotten_and_its_late_tasks_change_nothing() -> None:
    tracker = OffsetTracker()
    old = tracker.take((T, 3), 20)
    tracker.take((T, 3), 21)
    assert tracker.in_flight == 2
    tracker.forget([(T, 3)])
    assert tracker.in_flight == 0 and tracker.committable() == {}
    # The partition comes back and offset 20 is redelivered: the old run finishing must
    # not count as the new run's answer.
    new = tracker.take((T, 3), 20)
    assert new.generation != old.generation
    tracker.finish(old)
    assert tracker.in_flight == 1 and tracker.lowest_in_flight((T, 3)) == 20
    tracker.finish(new)
    assert tracker.in_flight == 0


def test_taking_the_same_offset_twice_counts_it_once() -> None:
    tracker = OffsetTracker()
    ticket = tracker.take((T, 0), 3)
    tracker.take((T, 0), 3)
    assert tracker.in_flight == 1
    tracker.finish(ticket)
    tracker.finish(ticket)
    assert tracker.in_flight == 0


# --- the in-flight bound -------------------------------------------------------------------


def test_the_gate_refills_in_chunks_and_pauses_only_when_the_limit_lasts() -> None:
    gate = InFlightGate(8, pause_after_s=0.5)
    assert (gate.room(0), gate.room(5), gate.room(8), gate.room(9)) == (8, 3, 0, 0)
    assert gate.decide(7, 10.0) is None and not gate.full and gate.room(7) == 1
    # A burst fills the pipeline: nothing more is taken, but nothing is paused either...
    assert gate.decide(8, 10.0) is None and gate.full and not gate.paused
    # ...until a quarter of the limit is free again: no task-by-task refill.
    assert gate.decide(7, 10.1) is None and gate.room(7) == 0
    assert gate.decide(6, 10.2) is None and not gate.full and gate.room(6) == 2
    assert gate.decide(7, 10.3) is None and gate.room(7) == 1
    # Full for longer than pause_after_s: the partitions are paused.
    assert gate.decide(8, 11.0) is None and gate.full
    assert gate.decide(8, 11.49) is None and not gate.paused
    assert gate.decide(7, 11.5) == "pause" and gate.paused and gate.room(0) == 0
    assert gate.decide(9, 11.6) is None, "already paused"
    assert gate.decide(7, 11.7) is None, "one free slot is not enough to resume"
    assert gate.decide(6, 11.8) == "resume" and not gate.paused and not gate.full
    assert gate.decide(6, 11.9) is None and gate.room(6) == 2
    assert gate.decide(8, 12.0) is None and not gate.paused, "full again: a new wait"


@pytest.mark.parametrize(("limit", "resume_at"), [(1, 0), (2, 1), (3, 2), (4, 3), (32, 24)])
def test_the_gate_always_resumes_below_its_limit(limit: int, resume_at: int) -> None:
    gate = InFlightGate(limit, pause_after_s=0.0)
    assert gate.resume_at == resume_at
    assert gate.decide(limit, 0.0) == "pause"
    assert gate.decide(resume_at + 1, 1.0) is None and gate.room(resume_at + 1) == 0
    assert gate.decide(resume_at, 2.0) == "resume"
    assert gate.room(resume_at) >= 1


def test_a_gate_needs_room_for_one_task() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        InFlightGate(0)


def test_max_in_flight_defaults_to_four_per_worker_and_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SAGALINE_MAX_IN_FLIGHT", raising=False)
    assert max_in_flight(ParticipantSettings(concurrency=3)) == 12
    monkeypatch.setenv("SAGALINE_MAX_IN_FLIGHT", "5")
    assert max_in_flight(ParticipantSettings(concurrency=3)) == 5
    monkeypatch.setenv("SAGALINE_MAX_IN_FLIGHT", "0")
    assert max_in_flight(ParticipantSettings(concurrency=3)) == 12
    monkeypatch.setenv("SAGALINE_MAX_IN_FLIGHT", "-1")
    with pytest.raises(ValueError, match="max_in_flight"):
        max_in_flight(ParticipantSettings(concurrency=3))


# --- deadlines -----------------------------------------------------------------------------


def _task(
    *,
    deadline_ms: int | None = None,
    start_to_close_ms: int | None = None,
    heartbeat_timeout_ms: int | None = None,
    heartbeat_details: Payload | None = None,
    report_start: bool = False,
) -> ActivityTask:
    return ActivityTask(
        workflow_id="wf-1",
        workflow_type="order.process",
        activity_id=activity_id("wf-1", 2, 1),
        seq=2,
        attempt=1,
        participant="svc",
        activity="work",
        payload=encode_json({}),
        scheduled_at_ms=1_000,
        deadline_ms=deadline_ms,
        start_to_close_ms=start_to_close_ms,
        heartbeat_timeout_ms=heartbeat_timeout_ms,
        heartbeat_details=heartbeat_details,
        report_start=report_start,
    )


def test_an_attempt_without_timeouts_has_no_deadline() -> None:
    assert attempt_deadline(_task(), 5_000) is None


@pytest.mark.parametrize(
    ("deadline_ms", "start_to_close_ms", "expected"),
    [
        (9_000, None, Deadline(9_000, SCHEDULE_TO_CLOSE_TIMEOUT, 4_000)),
        (None, 2_500, Deadline(7_500, START_TO_CLOSE_TIMEOUT, 2_500)),
        (9_000, 2_500, Deadline(7_500, START_TO_CLOSE_TIMEOUT, 2_500)),
        (6_000, 2_500, Deadline(6_000, SCHEDULE_TO_CLOSE_TIMEOUT, 1_000)),
        # A tie: no other attempt could finish in time either.
        (7_500, 2_500, Deadline(7_500, SCHEDULE_TO_CLOSE_TIMEOUT, 2_500)),
        # Already past when the attempt starts: what is left is nothing.
        (4_000, 2_500, Deadline(4_000, SCHEDULE_TO_CLOSE_TIMEOUT, 0)),
    ],
)
def test_the_deadline_is_the_earlier_of_schedule_to_close_and_start_to_close(
    deadline_ms: int | None, start_to_close_ms: int | None, expected: Deadline
) -> None:
    task = _task(deadline_ms=deadline_ms, start_to_close_ms=start_to_close_ms)
    assert attempt_deadline(task, 5_000) == expected


def test_a_timeout_failure_is_retryable_and_says_what_happened() -> None:
    task = _task(start_to_close_ms=250)
    cancelled = Deadline(1_250, START_TO_CLOSE_TIMEOUT, 250).failure(task, ran=True)
    assert (cancelled.error_type, cancelled.retryable) == (START_TO_CLOSE_TIMEOUT, True)
    assert "250 ms" in cancelled.message and "rolled back" in cancelled.message
    assert "svc.work" in cancelled.message and task.activity_id in cancelled.message
    skipped = Deadline(900, SCHEDULE_TO_CLOSE_TIMEOUT, 0).failure(task, ran=False)
    assert (skipped.error_type, skipped.retryable) == (SCHEDULE_TO_CLOSE_TIMEOUT, True)
    assert "not run" in skipped.message


@pytest.mark.parametrize(
    ("heartbeat_timeout_ms", "interval_s"),
    [(None, DETAILS_ONLY_INTERVAL_S), (30_000, 10.0), (3_000, 1.0), (600, 0.25), (4_500, 1.5)],
)
def test_heartbeats_are_throttled_to_a_third_of_their_timeout_at_least_a_quarter_second(
    heartbeat_timeout_ms: int | None, interval_s: float
) -> None:
    assert heartbeat_interval_s(_task(heartbeat_timeout_ms=heartbeat_timeout_ms)) == interval_s


# --- the throttle --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_sends_at_once_then_keeps_only_the_latest_until_the_window_ends() -> None:
    clock = Clock()
    sent: list[int] = []
    throttle: Throttle[int] = Throttle(1.0, clock)
    assert throttle.offer(1, sent.append)
    clock.now += 0.2
    assert not throttle.offer(2, sent.append)
    clock.now += 0.2
    assert not throttle.offer(3, sent.append)
    assert sent == [1] and throttle.has_pending and throttle.due_at() == 101.0
    clock.now = 100.9
    assert not throttle.flush_due(sent.append), "the window has not ended"
    clock.now = 101.0
    assert throttle.flush_due(sent.append)
    assert sent == [1, 3], "the latest details are sent, the superseded ones dropped"
    assert not throttle.has_pending and not throttle.flush_due(sent.append)
    # The flush started a new window.
    clock.now = 101.5
    assert not throttle.offer(4, sent.append)
    clock.now = 102.0
    assert throttle.offer(5, sent.append), "a window ended: sent at once, replacing 4"
    assert sent == [1, 3, 5] and not throttle.has_pending


def test_a_closed_throttle_drops_its_pending_item_and_sends_nothing_more() -> None:
    clock = Clock()
    sent: list[str] = []
    throttle: Throttle[str] = Throttle(1.0, clock)
    throttle.offer("first", sent.append)
    throttle.offer("pending", sent.append)
    throttle.close()
    clock.now += 5
    assert not throttle.flush_due(sent.append)
    assert not throttle.offer("late", sent.append)
    assert sent == ["first"] and throttle.closed and not throttle.has_pending


def test_close_waits_for_a_send_under_way() -> None:
    """Once close() returns nothing more is sent, so the result published after it comes
    after every heartbeat."""
    throttle: Throttle[str] = Throttle(1.0)
    in_send, release, closed = threading.Event(), threading.Event(), threading.Event()

    def slow_send(item: str) -> None:
        in_send.set()
        assert release.wait(WAIT_S)

    sender = threading.Thread(target=throttle.offer, args=("beat", slow_send))
    sender.start()
    assert in_send.wait(WAIT_S)

    def close() -> None:
        throttle.close()
        closed.set()

    closer = threading.Thread(target=close)
    closer.start()
    closer.join(timeout=0.2)
    assert closer.is_alive() and not closed.is_set(), "close() returned during a send"
    release.set()
    assert closed.wait(WAIT_S)
    sender.join(WAIT_S)
    closer.join(WAIT_S)


# --- written-off workers -------------------------------------------------------------------


class Jobs:
    """Jobs that block until released, and a record of which ran."""

    def __init__(self) -> None:
        self.release: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.finished: dict[str, threading.Event] = {}
        self.workers: _Workers | None = None
        self.deadlines: dict[str, int | None] = {}

    def job(self, name: str, *, deadline_ms: int | None = None, block: bool = True) -> _Job:
        self.release[name] = threading.Event()
        if not block:
            self.release[name].set()
        self.started[name] = threading.Event()
        self.finished[name] = threading.Event()
        self.deadlines[name] = deadline_ms
        task = dataclasses.replace(_task(), activity=name)
        ticket = OffsetTracker().take((T, 0), 0)
        return _Job(task, ticket, 0, 0)

    def run(self, job: _Job) -> None:
        name = job.task.activity
        assert self.workers is not None
        self.workers.set_deadline(self.deadlines[name])
        self.started[name].set()
        assert self.release[name].wait(WAIT_S * 3)
        self.finished[name].set()


def test_a_worker_past_its_deadline_is_written_off_and_replaced_up_to_the_cap() -> None:
    jobs = Jobs()
    workers = _Workers("unit", size=1, spare=1, run=jobs.run)
    jobs.workers = workers
    try:
        workers.submit(jobs.job("hung-1", deadline_ms=1_000))
        assert jobs.started["hung-1"].wait(WAIT_S)
        workers.submit(jobs.job("quick-1", block=False))
        assert not jobs.started["quick-1"].wait(0.2), "one worker, and it is busy"
        assert workers.write_off_overdue(1_000 + WRITE_OFF_GRACE_MS - 1) == ([], [])
        written, stuck = workers.write_off_overdue(1_000 + WRITE_OFF_GRACE_MS)
        assert [b.job.task.activity for b in written] == ["hung-1"] and not stuck
        assert workers.written_off == 1
        # The replacement takes the queued task while the written-off one still hangs.
        assert jobs.finished["quick-1"].wait(WAIT_S)
        assert not jobs.finished["hung-1"].is_set()
        # At the cap, the next overdue worker keeps its place: logged once, not replaced.
        workers.submit(jobs.job("hung-2", deadline_ms=1_000))
        assert jobs.started["hung-2"].wait(WAIT_S)
        written, stuck = workers.write_off_overdue(10_000)
        assert not written and [b.job.task.activity for b in stuck] == ["hung-2"]
        assert workers.write_off_overdue(10_000) == ([], []), "logged once"
        # The written-off worker ends with its task, making room under the cap.
        jobs.release["hung-1"].set()
        assert jobs.finished["hung-1"].wait(WAIT_S)
        _wait_for(lambda: workers.written_off == 0)
        written, _ = workers.write_off_overdue(10_000)
        assert [b.job.task.activity for b in written] == ["hung-2"]
        workers.submit(jobs.job("quick-2", block=False))
        assert jobs.finished["quick-2"].wait(WAIT_S)
    finally:
        for event in jobs.release.values():
            event.set()
        workers.close(WAIT_S)


def test_tasks_without_a_deadline_are_never_written_off() -> None:
    jobs = Jobs()
    workers = _Workers("unit", size=1, spare=1, run=jobs.run)
    jobs.workers = workers
    try:
        workers.submit(jobs.job("long"))
        assert jobs.started["long"].wait(WAIT_S)
        assert workers.write_off_overdue(10**15) == ([], [])
    finally:
        jobs.release["long"].set()
        workers.close(WAIT_S)


def test_closing_drops_queued_tasks_and_waits_for_running_ones() -> None:
    jobs = Jobs()
    workers = _Workers("unit", size=1, spare=1, run=jobs.run)
    jobs.workers = workers
    workers.submit(jobs.job("running"))
    assert jobs.started["running"].wait(WAIT_S)
    workers.submit(jobs.job("queued", block=False))
    closer = threading.Thread(target=workers.close, args=(WAIT_S,))
    closer.start()
    jobs.release["running"].set()
    closer.join(WAIT_S * 2)
    assert not closer.is_alive()
    assert jobs.finished["running"].is_set()
    assert not jobs.started["queued"].is_set(), "a queued task stays unanswered (uncommitted)"


def _wait_for(condition: Any) -> None:
    done = threading.Event()
    for _ in range(int(WAIT_S / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("condition not met in time")


# --- an attempt's start report and heartbeats ----------------------------------------------


class FakePublisher:
    """Builds report records without a codec and keeps what was sent, in order."""

    def __init__(self, max_details: int = 1_000) -> None:
        self.max_details = max_details
        self.bodies: list[ActivityStarted | ActivityHeartbeat] = []
        self.sent: list[ActivityStarted | ActivityHeartbeat] = []
        self.fail_with: Exception | None = None

    def report(self, body: ActivityStarted | ActivityHeartbeat) -> Outgoing:
        details = body.details if isinstance(body, ActivityHeartbeat) else None
        if details is not None and len(details.data) > self.max_details:
            raise PayloadEncodingError("heartbeat details too large")
        self.bodies.append(body)
        index = str(len(self.bodies) - 1).encode()
        return Outgoing("inbox", body.workflow_id.encode(), index, best_effort=True)

    def send_report(self, record: Outgoing) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        assert record.value is not None
        self.sent.append(self.bodies[int(record.value)])


class FakeLoop:
    def __init__(self) -> None:
        self.name = "svc"
        self.participant = Participant("svc")
        self.publisher = FakePublisher()
        self.watched: set[Any] = set()
        self.failed: list[BaseException] = []
        self.deadlines: list[int | None] = []
        self.workers = self

    def set_deadline(self, deadline_ms: int | None) -> None:
        self.deadlines.append(deadline_ms)

    def watch(self, reports: Any) -> None:
        self.watched.add(reports)

    def unwatch(self, reports: Any) -> None:
        self.watched.discard(reports)

    def fail(self, exc: BaseException) -> None:
        self.failed.append(exc)


def _reports(task: ActivityTask, clock: Clock) -> tuple[_AttemptReports, FakeLoop]:
    loop = FakeLoop()
    return _AttemptReports(cast(_ParticipantLoop, loop), task, clock), loop


def test_a_task_without_report_start_or_heartbeats_publishes_nothing_extra() -> None:
    reports, loop = _reports(_task(start_to_close_ms=5_000), Clock())
    reports.started(1_000, Deadline(6_000, START_TO_CLOSE_TIMEOUT, 5_000))
    reports.close()
    assert loop.publisher.sent == []
    assert reports.ran and loop.deadlines == [6_000], "the worker knows its deadline"


def test_the_start_report_is_sent_before_the_handler_runs_when_asked_for() -> None:
    reports, loop = _reports(_task(start_to_close_ms=5_000, report_start=True), Clock())
    reports.started(1_234, None)
    assert loop.publisher.sent == [ActivityStarted("wf-1", "wf-1/2/1", 2, 1, 1_234)]


def test_heartbeats_are_throttled_and_the_latest_details_are_sent_when_the_window_ends() -> None:
    clock = Clock()
    reports, loop = _reports(_task(heartbeat_timeout_ms=6_000), clock)  # 2 s windows
    reports.heartbeat(encode_json({"done": 1}))
    reports.heartbeat(encode_json({"done": 2}))
    reports.heartbeat(encode_json({"done": 3}))
    assert [decode(b) for b in loop.publisher.sent] == [{"done": 1}]
    assert loop.watched == {reports}, "the loop flushes the pending one"
    assert reports.flush_due(), "still pending: the window has not ended"
    clock.now += 2.0
    assert not reports.flush_due(), "sent: nothing pending any more"
    assert [decode(b) for b in loop.publisher.sent] == [{"done": 1}, {"done": 3}]
    sent = loop.publisher.sent
    assert all(isinstance(b, ActivityHeartbeat) for b in sent)
    assert {(b.workflow_id, b.activity_id, b.seq, b.attempt) for b in sent} == {
        ("wf-1", "wf-1/2/1", 2, 1)
    }


def test_no_heartbeat_is_sent_after_the_attempt_ended() -> None:
    clock = Clock()
    reports, loop = _reports(_task(heartbeat_timeout_ms=3_000), clock)
    reports.heartbeat(encode_json(1))
    reports.heartbeat(encode_json(2))  # pending
    reports.close()
    assert loop.watched == set()
    clock.now += 60
    assert not reports.flush_due()
    reports.heartbeat(encode_json(3))  # a thread the handler left behind
    assert [decode(b) for b in loop.publisher.sent] == [1]


def test_a_first_heartbeat_after_the_attempt_ended_is_not_sent_either() -> None:
    reports, loop = _reports(_task(heartbeat_timeout_ms=3_000), Clock())
    reports.started(1, None)
    reports.close()
    reports.heartbeat(encode_json("from a thread the handler left behind"))
    assert loop.publisher.sent == [] and loop.watched == set()


def test_a_heartbeat_without_details_keeps_the_latest_ones() -> None:
    clock = Clock()
    previous = encode_json({"cursor": 7})
    reports, loop = _reports(_task(heartbeat_timeout_ms=3_000, heartbeat_details=previous), clock)
    reports.heartbeat(None)
    clock.now += 1
    reports.heartbeat(encode_json({"cursor": 9}))
    clock.now += 1
    reports.heartbeat(None)
    assert [decode(b) for b in loop.publisher.sent] == [{"cursor": 7}, {"cursor": 9}, {"cursor": 9}]


def test_details_too_large_raise_at_the_call_and_other_send_errors_never_do() -> None:
    clock = Clock()
    reports, loop = _reports(_task(heartbeat_timeout_ms=3_000, report_start=True), clock)
    loop.publisher.max_details = 10
    with pytest.raises(PayloadEncodingError, match="too large"):
        reports.heartbeat(encode_json("x" * 100))
    loop.publisher.fail_with = RuntimeError("broker hiccup")
    reports.started(1, None)
    reports.heartbeat(encode_json("small"))
    assert loop.publisher.sent == [] and loop.failed == []
    loop.publisher.fail_with = ResultDeliveryError("producer fenced")
    clock.now += 5
    reports.heartbeat(encode_json("small"))
    assert [type(e) for e in loop.failed] == [ResultDeliveryError], "the loop stops on it"


def decode(body: ActivityStarted | ActivityHeartbeat) -> Any:
    assert isinstance(body, ActivityHeartbeat) and body.details is not None
    return decode_json(body.details)
