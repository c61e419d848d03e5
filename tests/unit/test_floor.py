"""The raw floor's coordinator logic (bench/floor.py ``transition``): the order saga's
steps, its compensation, and that repeated or out-of-step inputs change nothing."""

from __future__ import annotations

from typing import Any

import pytest

from bench.floor import (
    COMPENSATED,
    COMPLETED,
    IGNORED,
    SagaState,
    Step,
    Task,
    effect_kind,
    expected_effects,
    outcome_of,
    transition,
)

SAGA = "order-1"


def _start(declined: bool = False) -> dict[str, Any]:
    return {"type": "start", "declined": declined}


def _result(action: str, outcome: str = "ok") -> dict[str, Any]:
    return {"type": "result", "action": action, "outcome": outcome}


def _run(declined: bool) -> tuple[SagaState, list[Task], list[str], list[str]]:
    """Drive one saga to its end as the floor's processes would, with no broker; returns
    its final state, the tasks sent, the done outcomes and the effect kinds written."""
    step = transition(SAGA, None, _start(declined))
    state, tasks, done, effects = step.state, [], [], []
    while step.task is not None:
        task = step.task
        tasks.append(task)
        outcome = outcome_of(task.action, task.declined)
        effects.append(effect_kind(task.action, outcome))
        step = transition(SAGA, state, _result(task.action, outcome))
        state = step.state or state
    if step.done is not None:
        done.append(step.done)
    assert state is not None
    return state, tasks, done, sorted(effects)


def test_an_accepted_order_reserves_charges_schedules_and_completes() -> None:
    state, tasks, done, effects = _run(declined=False)
    assert [t.action for t in tasks] == ["reserve", "charge", "schedule"]
    assert [t.service for t in tasks] == ["inventory", "payment", "shipping"]
    assert state == SagaState(COMPLETED, declined=False)
    assert state.terminal
    assert done == [COMPLETED]
    assert effects == expected_effects(False)


def test_a_declined_charge_releases_the_reservation_and_compensates() -> None:
    state, tasks, done, effects = _run(declined=True)
    assert [t.action for t in tasks] == ["reserve", "charge", "release"]
    assert [t.service for t in tasks] == ["inventory", "payment", "inventory"]
    assert state == SagaState(COMPENSATED, declined=True)
    assert done == [COMPENSATED]
    assert effects == expected_effects(True) == ["charge-declined", "release", "reserve"]


def test_start_sends_the_reservation_with_a_task_id_per_saga_and_action() -> None:
    step = transition(SAGA, None, _start(declined=True))
    assert step == Step(SagaState("reserve", True), Task(SAGA, "reserve", True))
    assert step.task is not None
    assert step.task.task_id == f"{SAGA}:reserve"


@pytest.mark.parametrize(
    ("state", "event"),
    [
        # A start sent twice.
        (SagaState("reserve", False), _start()),
        # A result delivered again after the saga moved on (participants are at least once).
        (SagaState("charge", False), _result("reserve")),
        (SagaState(COMPLETED, False), _result("schedule")),
        (SagaState(COMPENSATED, True), _result("release")),
        # A result for a step the saga does not wait on.
        (SagaState("reserve", False), _result("charge")),
        # An outcome the step does not have.
        (SagaState("schedule", False), _result("schedule", "declined")),
        # A result for a saga the coordinator never started.
        (None, _result("reserve")),
        # Not an input at all.
        (None, {"type": "noise"}),
        (SagaState("reserve", False), {}),
    ],
)
def test_repeated_or_out_of_step_inputs_change_nothing(
    state: SagaState | None, event: dict[str, Any]
) -> None:
    assert transition(SAGA, state, event) is IGNORED


def test_only_a_declining_cards_charge_is_refused() -> None:
    assert outcome_of("charge", True) == "declined"
    assert outcome_of("charge", False) == "ok"
    assert outcome_of("reserve", True) == "ok"
    assert effect_kind("charge", "declined") == "charge-declined"
    assert effect_kind("schedule", "ok") == "schedule"
