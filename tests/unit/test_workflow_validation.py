"""Every public argument is validated where it is given (issue 10, item 7).

A wrong argument is a ``ConfigurationError`` at the call that takes it, never a different
behaviour later (a str iterated as characters after a restart). Inside a workflow the
same errors park it (``tests/unit/test_engine_robustness.py``).
"""

from __future__ import annotations

import enum
from typing import Any

import pytest

from orchestrator import (
    ConfigurationError,
    RetryPolicy,
    Saga,
    WorkflowContext,
    WorkflowRegistry,
    workflow,
)
from orchestrator.workflow import MAX_ATTEMPTS
from tests.unit.conftest import WorkflowRun, assert_encodable


def test_a_str_where_a_sequence_of_error_types_is_expected_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"got the str 'PaymentDeclined'.*\('Pay"):
        RetryPolicy(non_retryable_error_types="PaymentDeclined")


@pytest.mark.parametrize(
    "types",
    [["PaymentDeclined", "CardExpired"], ("PaymentDeclined", "CardExpired")],
    ids=["list", "tuple"],
)
def test_any_sequence_of_error_types_is_kept_as_a_tuple(types: Any) -> None:
    policy = RetryPolicy(non_retryable_error_types=types)
    assert policy.non_retryable_error_types == ("PaymentDeclined", "CardExpired")
    assert type(policy.non_retryable_error_types) is tuple


def test_a_generator_of_error_types_is_read_once() -> None:
    policy = RetryPolicy(non_retryable_error_types=(name for name in ["A", "B"]))
    assert policy.non_retryable_error_types == ("A", "B")
    assert policy == RetryPolicy(non_retryable_error_types=("A", "B"))


class _Tag(str):
    """A str subclass whose equality a record could not keep."""

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = str.__hash__


def test_error_types_are_stored_as_plain_str() -> None:
    policy = RetryPolicy(non_retryable_error_types=[_Tag("Declined")])
    assert [type(t) for t in policy.non_retryable_error_types] == [str]


@pytest.mark.parametrize(
    ("types", "fragment"),
    [
        (42, "iterable of str, got int"),
        ([42], "only str, got int"),
        ([b"Declined"], "only str, got bytes"),
        ([""], "1-200 characters"),
        (["Declined\ud800"], "'Declined\\\\ud800'"),
        (["Dec\x00lined"], "without NUL"),
        (["E" * 201], "1-200 characters"),
    ],
    ids=["int", "int-item", "bytes-item", "empty", "surrogate", "nul", "too-long"],
)
def test_error_types_that_could_never_match_or_be_written_are_refused(
    types: Any, fragment: str
) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        RetryPolicy(non_retryable_error_types=types)


class _Attempts(enum.IntEnum):
    FIVE = 5


@pytest.mark.parametrize(
    ("attempts", "fragment"),
    [
        (True, "must be an int, got bool"),
        (2.0, "must be an int, got float"),
        ("3", "must be an int, got str"),
        (None, "must be an int, got NoneType"),
        (0, "between 1 and"),
        (-1, "between 1 and"),
        (MAX_ATTEMPTS + 1, "between 1 and"),
    ],
)
def test_max_attempts_must_be_an_int_that_fits_the_record(attempts: Any, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        RetryPolicy(max_attempts=attempts)


def test_max_attempts_is_stored_as_a_plain_int() -> None:
    policy = RetryPolicy(max_attempts=_Attempts.FIVE)
    assert policy.max_attempts == 5 and type(policy.max_attempts) is int


def test_the_largest_policy_encodes_in_the_record() -> None:
    registry = WorkflowRegistry()

    @registry.workflow("t.policy")
    async def policy(ctx: WorkflowContext, _: Any) -> Any:
        retry = RetryPolicy(max_attempts=MAX_ATTEMPTS, non_retryable_error_types=["E" * 200])
        return await ctx.activity("p.work", retry=retry)

    run = WorkflowRun(registry, "t.policy")
    run.start()
    assert_encodable(run.record)
    assert run.tasks() == ["wf-1/0/1 p.work"]


# --- the registry --------------------------------------------------------------------


async def _flow(ctx: WorkflowContext, value: Any) -> Any:
    return value


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        (_flow, "must be a str, got function; write @registry.workflow"),
        (None, "must be a str, got NoneType"),
        ("", "1-200 characters"),
        ("order\ud800", "1-200 characters"),
        ("order\x00", "1-200 characters"),
        ("o" * 201, "1-200 characters"),
    ],
    ids=["no-parentheses", "none", "empty", "surrogate", "nul", "too-long"],
)
def test_a_workflow_type_name_is_checked_when_it_is_given(name: Any, fragment: str) -> None:
    registry = WorkflowRegistry()
    with pytest.raises(ConfigurationError, match=fragment):
        registry.workflow(name)
    with pytest.raises(ConfigurationError, match=fragment):
        workflow(name)


def test_a_unicode_workflow_type_name_is_fine() -> None:
    registry = WorkflowRegistry()
    registry.workflow("commande.traitée")(_flow)
    assert registry.get("commande.traitée") is _flow


async def _one(ctx: WorkflowContext) -> Any:
    return None


async def _three(ctx: WorkflowContext, value: Any, extra: Any) -> Any:
    return None


async def _with_default(ctx: WorkflowContext, value: Any, extra: Any = None) -> Any:
    return None


async def _variadic(*args: Any) -> Any:
    return None


@pytest.mark.parametrize("fn", [_one, _three], ids=["one-argument", "three-arguments"])
def test_a_workflow_function_must_take_ctx_and_input(fn: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"two positional arguments \(ctx, input\)"):
        WorkflowRegistry().workflow("t.flow")(fn)


@pytest.mark.parametrize("fn", [_with_default, _variadic], ids=["default", "variadic"])
def test_a_workflow_function_that_can_take_ctx_and_input_is_accepted(fn: Any) -> None:
    registry = WorkflowRegistry()
    registry.workflow("t.flow")(fn)
    assert registry.get("t.flow") is fn


def test_saga_needs_the_workflow_context() -> None:
    with pytest.raises(ConfigurationError, match="WorkflowContext, got object"):
        Saga(object())  # type: ignore[arg-type]
