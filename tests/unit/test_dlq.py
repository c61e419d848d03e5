"""What ``sagaline dlq retry`` may send again, decided from the letter's decoded input, and
how it reports and resumes a run: refusals, repeated inputs, the ``--after`` mark, and
deliveries Kafka never confirmed. No broker: an unreachable one where Kafka is needed."""

from __future__ import annotations

import pytest

from orchestrator import errors
from orchestrator.cli import _distinct, _next_time, main
from orchestrator.dlq import (
    KNOWN_REASONS,
    UNKNOWN,
    DeadLetterRecord,
    RetryDecision,
    decoding_codec,
    plan_retry,
    republish,
)
from orchestrator.protocol.codec import AvroCodec
from orchestrator.protocol.payloads import encode_json
from orchestrator.protocol.records import (
    ActivityResult,
    ActivityStatus,
    CancelWorkflow,
    CompletePromise,
    Failure,
    IfClosed,
    InboxBody,
    SignalWorkflow,
    StartWorkflow,
    TerminateWorkflow,
    UpdateWorkflow,
)
from orchestrator.protocol.topics import Topics
from orchestrator.replay.engine import REJECTED_REASONS
from orchestrator.settings import KafkaSettings

TOPICS = Topics("shop")
CODEC = AvroCodec()
WID = "order-1"
START = StartWorkflow(WID, "order.process", encode_json({}), 0, if_closed=IfClosed.ALLOW)
RESULT = ActivityResult(WID, f"{WID}/r/1", 1, 1, ActivityStatus.COMPLETED, 0, encode_json(1))


def _letter(
    body: InboxBody | bytes,
    reason: str = "unknown-workflow",
    offset: int = 5,
    error: str | None = None,
) -> DeadLetterRecord:
    """A dead letter of ``body`` from the inbox, at ``offset`` of DLQ partition 0, with the
    ``error`` header the process that refused it wrote."""
    headers = {} if error is None else {"sagaline.dlq.error": error}
    value = body if isinstance(body, bytes) else CODEC.encode_inbox(body)
    named = {
        "sagaline.dlq.reason": reason,
        "sagaline.dlq.topic": TOPICS.inbox,
        "sagaline.dlq.partition": "2",
        "sagaline.dlq.offset": "9",
        **headers,
    }
    return DeadLetterRecord(
        TOPICS.dlq, 0, offset, 0, WID.encode(), value, {k: v.encode() for k, v in named.items()}
    )


def _refusal(letter: DeadLetterRecord, **options: bool) -> str | None:
    decision = plan_retry(letter, TOPICS, codec=decoding_codec(), **options)
    assert (decision.target is None) == (decision.refusal is not None)
    return decision.refusal


def test_every_reason_the_code_writes_is_known() -> None:
    """`--reason` is checked against KNOWN_REASONS: each reason a process writes is in it."""
    decode_errors = {
        cls.reason
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.RecordDecodeError)
    }
    assert decode_errors <= KNOWN_REASONS
    assert REJECTED_REASONS <= KNOWN_REASONS
    assert {"run-terminated", "oversized", "undeliverable", "too-large-to-hold"} <= KNOWN_REASONS


@pytest.mark.parametrize(
    "body",
    [START, SignalWorkflow(WID, "go", encode_json(1), "s-1", 0, start=START)],
    ids=["start", "signal-with-start"],
)
def test_a_start_goes_again_only_with_include_starts(body: InboxBody) -> None:
    """Its request id is forgotten once the run's record is removed (7 days) while the DLQ
    keeps it 30; with if_closed=ALLOW and no request id a resend is a whole new run."""
    refusal = _refusal(_letter(body))
    assert refusal is not None and "--include-starts" in refusal
    assert _refusal(_letter(body), include_starts=True) is None


@pytest.mark.parametrize(
    "body", [CancelWorkflow(WID, "why", 0), TerminateWorkflow(WID, "why", 0)], ids=str
)
def test_a_cancel_or_terminate_goes_again_only_when_named(body: InboxBody) -> None:
    """They carry no run id: under --all they would end whatever newer run the id has."""
    refusal = _refusal(_letter(body), include_starts=True)
    assert refusal is not None and "names no run" in refusal and "--offset" in refusal
    assert _refusal(_letter(body), named=True) is None


@pytest.mark.parametrize(
    "body",
    [
        RESULT,
        SignalWorkflow(WID, "go", encode_json(1), "s-1", 0),
        UpdateWorkflow(WID, "u-1", "set", encode_json(1), 0),
        CompletePromise(WID, f"{WID}/r1/p3", 0, payload=encode_json(1)),
    ],
    ids=["result", "signal", "update", "promise"],
)
def test_inputs_deduplicated_by_their_workflow_go_again(body: InboxBody) -> None:
    assert _refusal(_letter(body)) is None


def test_an_input_held_for_a_terminated_run_is_refused() -> None:
    refusal = _refusal(_letter(RESULT, "run-terminated"), named=True, include_starts=True)
    assert refusal is not None and "whatever run the id has now" in refusal


def test_a_letter_that_cannot_be_decoded_is_refused() -> None:
    refusal = _refusal(_letter(b"\x00\x00\x00\x00\x07rest", "unknown-schema"), named=True)
    assert refusal is not None and refusal.startswith("this sagaline cannot decode it")


def test_an_oversized_start_recorded_failed_is_refused_even_with_include_starts() -> None:
    recorded = _letter(START, "oversized", error="workflow order-1 closed")
    refusal = _refusal(recorded, include_starts=True, named=True)
    assert refusal is not None and "duplicate start and changes nothing" in refusal
    # Refused when read (the limit since raised): it never started, so it may go again.
    read = _letter(START, "oversized", error="record is 9 bytes, above")
    assert _refusal(read, include_starts=True) is None
    assert _refusal(_letter(RESULT, "oversized")) is None


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (SignalWorkflow(WID, "go", encode_json(1), "", 0), "invalid"),
        (SignalWorkflow(WID, "", encode_json(1), "s-1", 0), "invalid"),
        (
            SignalWorkflow(
                WID,
                "go",
                encode_json(1),
                "s-1",
                0,
                start=StartWorkflow("x", "t", encode_json(1), 0),
            ),
            "another workflow id",
        ),
    ],
    ids=["no-signal-id", "bad-name", "start-for-another-id"],
)
def test_a_signal_refused_for_its_bytes_is_refused(body: SignalWorkflow, why: str) -> None:
    refusal = _refusal(_letter(body, "signal-refused"), include_starts=True)
    assert refusal is not None and why in refusal


def test_a_signal_refused_for_room_may_go_again() -> None:
    """No room in the record is not a property of the bytes (a continue-as-new frees it)."""
    assert (
        _refusal(_letter(SignalWorkflow(WID, "go", encode_json(1), "s", 0), "signal-refused"))
        is None
    )


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (CompletePromise(WID, f"{WID}/r1/p3", 0), "neither or both"),
        (
            CompletePromise(
                WID, f"{WID}/r1/p3", 0, payload=encode_json(1), failure=Failure("E", "m")
            ),
            "neither or both",
        ),
        (CompletePromise(WID, "other/r1/p3", 0, payload=encode_json(1)), "no promise of this"),
        (CompletePromise(WID, "not-a-promise-id", 0, payload=encode_json(1)), "no promise of"),
    ],
    ids=["neither", "both", "other-workflow", "not-an-id"],
)
def test_a_promise_refused_for_its_bytes_is_refused(body: CompletePromise, why: str) -> None:
    refusal = _refusal(_letter(body, "promise-refused"))
    assert refusal is not None and why in refusal


def _sendable(offset: int, body: InboxBody = RESULT, partition: int = 0) -> RetryDecision:
    letter = _letter(body, offset=offset)
    letter = DeadLetterRecord(
        letter.topic, partition, offset, 0, letter.key, letter.value, letter.headers
    )
    return RetryDecision(letter, TOPICS.inbox, None)


def test_a_repeated_input_is_sent_once() -> None:
    """A resent input that fails again is a new letter with the same bytes: with both in
    the DLQ, --all must not send it twice (and twice as often every run)."""
    first, other, again = _sendable(3), _sendable(4, CancelWorkflow(WID, "r", 0)), _sendable(8)
    chosen, repeats = _distinct([first, other, again])
    assert chosen == [other, again]
    assert repeats == [(first, again)]


def test_the_next_mark_stops_before_the_first_letter_not_sent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _next_time({0: 17, 1: 4}, [])
    assert capsys.readouterr().out == "next time: --after 0:17,1:4\n"
    _next_time({0: 17, 1: 4}, [_sendable(12), _sendable(9), _sendable(3, partition=1)])
    assert capsys.readouterr().out == "next time: --after 0:8,1:2\n"
    _next_time({}, [])
    assert capsys.readouterr().out == ""


def test_letters_not_confirmed_in_time_are_purged_and_unknown() -> None:
    """An unreachable broker: the producer must not go on sending after the command ends."""
    settings = KafkaSettings(kafka_bootstrap="127.0.0.1:1", topic_prefix="shop")
    outcome = republish(settings, [_sendable(3), _sendable(4)], timeout_s=1.0)
    assert [error for _decision, error in outcome] == [UNKNOWN, UNKNOWN]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["dlq", "retry", "--all", "--reason", "unknown-workflo"], "not a dead-letter reason"),
        (["dlq", "retry", "--offset", "0:1", "--after", "0:5"], "--after goes with --all"),
        (["dlq", "retry", "--all", "--after", "0:x"], "is not PARTITION:OFFSET"),
        (["dlq", "retry", "--all", "--after", ","], "give PARTITION:OFFSET"),
        (["dlq", "retry", "--offset", f"0:{2**63}"], "out of range"),
        (["dlq", "retry", "--all", "--max", "0"], "'--max'"),
        (["dlq", "retry", "--all", "--timeout", "0"], "'--timeout'"),
    ],
)
def test_bad_retry_arguments_are_usage_errors(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], lines
