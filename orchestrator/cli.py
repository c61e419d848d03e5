"""The ``sagaline`` command: run processes, manage topics, start, inspect and repair workflows.

Built on click. ``main(argv)`` returns the exit code instead of exiting, so tests and
scripts call it directly: 0 success; 1 the command ran and says no (a check found
problems, an unknown id, a dead letter that cannot be sent again); 2 a bad argument or a
configuration error (Kafka out of reach too); 3 a fatal error, or any error nobody
foresaw. Each is one line on stderr (see docs/cli.md).

Everything heavy (the Kafka client, the runtime, PostgreSQL) is imported inside the
commands that need it: ``sagaline replay --file`` and ``sagaline check`` work without a
Kafka client library, and ``--help`` is instant.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click

from orchestrator.errors import ConfigurationError, SagalineError
from orchestrator.logs import ECHOED, FORMATS, configure_logging, level_number
from orchestrator.protocol.records import IfClosed, IfRunning, WorkflowStatus

if TYPE_CHECKING:  # the client (and Kafka) load only for the commands that use it
    from pydantic_settings import BaseSettings

    from orchestrator.client import WorkflowClient, WorkflowResult
    from orchestrator.dlq import DeadLetterRecord, RetryDecision
    from orchestrator.settings import KafkaSettings
    from orchestrator.visibility.models import EventRow, WorkflowRow
    from orchestrator.visibility.store import VisibilityStore
    from orchestrator.workflow import WorkflowRegistry

log = logging.getLogger("sagaline")
EXIT_PROBLEMS = 1
EXIT_CONFIG = 2
EXIT_USAGE = 2
EXIT_FATAL = 3
EXIT_INTERRUPTED = 130
_S = TypeVar("_S", bound="BaseSettings")
# Epoch milliseconds a time option may name: years 1 to 9999, as datetime and PostgreSQL's
# bigint both hold them (a relative time of 99999999999999999w would overflow the query).
MIN_MS: Final = -62_135_596_800_000
MAX_MS: Final = 253_402_300_799_999
MAX_COUNT: Final = 2**31 - 1  # counts and partitions: an Avro int, a PostgreSQL LIMIT
MAX_OFFSET: Final = 2**63 - 1  # a Kafka offset is a signed 64-bit number
MAX_SECONDS: Final = 365 * 86_400.0  # librdkafka takes timeouts as int milliseconds


class _Seconds(click.FloatRange):
    """Seconds: finite (nan would pass a plain range check), within the range."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return number


SECONDS: Final = _Seconds(min=0, min_open=True, max=MAX_SECONDS)
"""Every ``--timeout``: more than 0 seconds."""
WAIT_SECONDS: Final = _Seconds(min=0, max=MAX_SECONDS)
"""``--wait``: 0 means do not wait."""


class CommandFailedError(SagalineError):
    """The command ran and its answer is no: an unknown workflow id, a dead letter that
    cannot be sent again. ``main`` prints the message as one line and exits 1."""


# --- loading the user's code ------------------------------------------------------------


def _cwd_importable() -> None:
    """Put the current directory first on ``sys.path``, as ``celery -A`` does, so
    ``sagaline orchestrator myapp.workflows:registry`` finds ``myapp`` in the project
    directory it runs from without PYTHONPATH (an installed ``sagaline`` script's own
    directory comes first otherwise)."""
    cwd = os.getcwd()
    if not sys.path or sys.path[0] not in ("", cwd):
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module written since start-up must be found too


def load_object(spec: str) -> Any:
    """Import ``module:attribute`` (the current directory comes first on the path)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(f"{spec!r} must look like 'package.module:attribute'")
    try:
        module = load_module(module_name)
    except _ImportFailedError as exc:
        raise _ImportFailedError(spec, exc.original) from exc.original
    try:
        return getattr(module, attribute)
    except AttributeError as exc:
        raise ConfigurationError(f"{module_name!r} has no attribute {attribute!r}") from exc


def load_module(name: str) -> Any:
    """Import module ``name`` (the current directory comes first on the path)."""
    _cwd_importable()
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {name!r}: {exc}") from exc
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # the module's own code failed: a SyntaxError, NameError
        # A SystemExit above all must not end the command with its code (0 would pass
        # `sagaline check`): one configuration error line instead.
        raise _ImportFailedError(name, exc) from exc


class _ImportFailedError(ConfigurationError):
    """Importing the user's module ran its code, and that code failed (``original``)."""

    def __init__(self, spec: str, original: BaseException) -> None:
        super().__init__(_one_line(f"importing {spec!r} failed: {original!r}"))
        self.original = original


def _workflow_registry(spec: str) -> WorkflowRegistry:
    """The registry ``module:attribute`` names, or the one registry ``module`` defines."""
    from orchestrator.workflow import WorkflowRegistry

    try:
        found = load_object(spec) if ":" in spec else load_module(spec)
    except (ConfigurationError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # the module's own code failed: a NameError, sys.exit(0)
        # A SystemExit, above all, must not end the gate with its code (0 would pass it).
        raise ConfigurationError(f"importing {spec!r} failed: {exc!r}") from exc
    if ":" in spec:
        if not isinstance(found, WorkflowRegistry):
            raise ConfigurationError(f"{spec} is a {type(found).__name__}, not a WorkflowRegistry")
        return found
    named = {
        name: value for name, value in vars(found).items() if isinstance(value, WorkflowRegistry)
    }
    distinct = {id(value): value for value in named.values()}
    if len(distinct) != 1:
        which = f"several ({', '.join(sorted(named))})" if named else "no"
        raise ConfigurationError(
            f"module {spec!r} defines {which} WorkflowRegistry; name one as {spec}:ATTRIBUTE"
        )
    return next(iter(distinct.values()))


# --- settings, clients, signals ------------------------------------------------------------


def _settings(cls: type[_S]) -> _S:
    """``cls()`` from the SAGALINE_* environment; an invalid value is a one-line
    ConfigurationError naming its variable."""
    from pydantic import ValidationError

    try:
        return cls()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = error.get("loc") or ()
            name = f"SAGALINE_{str(where[0]).upper()}: " if where else ""
            problems.append(f"{name}{error.get('msg', 'invalid')}")
        raise ConfigurationError("; ".join(problems)) from exc
    except ValueError as exc:  # pydantic-settings' SettingsError: a value that is not JSON
        raise ConfigurationError(_one_line(str(exc))) from exc


def _kafka_settings() -> KafkaSettings:
    from orchestrator.settings import KafkaSettings

    return _settings(KafkaSettings)


def _client() -> WorkflowClient:
    """The Kafka client the workflow commands share, from the SAGALINE_* settings."""
    from orchestrator.client import WorkflowClient

    return WorkflowClient(_kafka_settings())


def _serve_metrics(port: int, host: str) -> None:
    from orchestrator import metrics

    served = metrics.serve(port, host)
    if served:
        log.info("metrics at http://%s:%d/metrics", host, served)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        log.info("signal=%d stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def _json_option(text: str, option: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"{option} is not JSON: {exc}") from exc


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _progress() -> Callable[[str], None] | None:
    """Progress lines for stderr, only when a person watches it (a TTY)."""
    return _to_stderr if sys.stderr.isatty() else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- rendering -----------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def cell(value: object, width: int | None = 60) -> str:
    """``value`` as one table cell: None as ``-``, control characters escaped (a workflow
    id cannot move the cursor), at most ``width`` characters (cut with ``...``)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = value if isinstance(value, str) else str(value)
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    if width is not None and len(text) > width:
        text = text[: max(0, width - 3)] + "..."
    return text


def render_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, width: int | None = 60
) -> str:
    """An aligned text table: a header line, a rule, one line per row (cells via
    :func:`cell`); trailing blanks trimmed."""
    body = [[cell(v, width) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))

    def line(texts: Sequence[str]) -> str:
        return "  ".join(t.ljust(w) for t, w in zip(texts, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, body)])


def render_fields(pairs: Iterable[tuple[str, object]], *, width: int | None = None) -> str:
    """``name  value`` lines with the values aligned (a record shown field by field)."""
    shown = [(name, cell(value, width)) for name, value in pairs]
    pad = max((len(name) for name, _ in shown), default=0)
    return "\n".join(f"{name.ljust(pad)}  {value}".rstrip() for name, value in shown)


def format_ms(ms: int | None) -> str | None:
    """Epoch milliseconds as UTC ISO-8601 to the second (``2024-05-01T12:00:03Z``)."""
    if ms is None:
        return None
    return (
        datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, default=str))


# --- times ---------------------------------------------------------------------------------

_RELATIVE = re.compile(r"(\d+)\s*(s|m|h|d|w)")
_UNIT_MS: Final = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_when(text: str, now_ms: int) -> int:
    """Epoch milliseconds of ``text``: relative to ``now_ms`` (``90s``, ``15m``, ``2h``,
    ``3d``, ``1w`` ago) or ISO-8601 (``2024-05-01``, ``2024-05-01T12:00``,
    ``2024-05-01T12:00:00+02:00``, ``...Z``; without an offset, UTC).

    Raises:
        ValueError: neither form, or out of the years 1 to 9999.
    """
    stripped = text.strip()
    relative = _RELATIVE.fullmatch(stripped.lower())
    if relative is not None:
        when = now_ms - int(relative.group(1)) * _UNIT_MS[relative.group(2)]
    else:
        try:
            moment = datetime.fromisoformat(stripped)
        except ValueError:
            raise ValueError(
                f"{text!r} is neither a time ago (15m, 2h, 3d) nor ISO-8601 (2024-05-01T12:00Z)"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        when = int(moment.timestamp() * 1000)
    if not MIN_MS <= when <= MAX_MS:
        raise ValueError(f"{text!r} is out of range (years 1 to 9999)")
    return when


def _when(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``--since``/``--until``: the value as epoch milliseconds."""
    if value is None:
        return None
    try:
        return parse_when(value, int(time.time() * 1000))
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _statuses(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[str, ...]:
    """``--status`` values, case-insensitive, as the statuses they name."""
    known = [s.value for s in WorkflowStatus]
    chosen = []
    for value in values:
        status = value.strip().upper()
        if status not in known:
            raise click.BadParameter(
                f"{value!r} is not a workflow status ({', '.join(known)})", ctx, param
            )
        chosen.append(status)
    return tuple(chosen)


def _partition_offsets(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[tuple[int, int], ...]:
    """``--offset P:O`` values as (partition, offset) pairs."""
    return tuple(_pair(value, ctx, param) for value in values)


def _pair(value: str, ctx: click.Context, param: click.Parameter) -> tuple[int, int]:
    """One ``PARTITION:OFFSET``, each within what Kafka can have."""
    partition, sep, offset = value.strip().partition(":")
    if not sep or not partition.isascii() or not partition.isdigit():
        raise click.BadParameter(f"{value!r} is not PARTITION:OFFSET (e.g. 0:1207)", ctx, param)
    if not offset.isascii() or not offset.isdigit():
        raise click.BadParameter(f"{value!r} is not PARTITION:OFFSET (e.g. 0:1207)", ctx, param)
    if int(partition) > MAX_COUNT or int(offset) > MAX_OFFSET:
        raise click.BadParameter(f"{value!r} is out of range", ctx, param)
    return int(partition), int(offset)


def _high_water(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> dict[int, int] | None:
    """``--after P:O[,P:O...]`` as {partition: offset} (a partition named twice: the
    highest)."""
    if value is None:
        return None
    marks: dict[int, int] = {}
    for part in value.split(","):
        if part.strip():
            partition, offset = _pair(part, ctx, param)
            marks[partition] = max(marks.get(partition, -1), offset)
    if not marks:
        raise click.BadParameter("give PARTITION:OFFSET[,PARTITION:OFFSET...]", ctx, param)
    return marks


def _dead_letter_reasons(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[str, ...]:
    """``dlq retry --reason`` values, each a reason dead letters are written with (a typo
    would select nothing and look like an empty DLQ)."""
    from orchestrator.dlq import KNOWN_REASONS

    for value in values:
        if value not in KNOWN_REASONS:
            raise click.BadParameter(
                f"{value!r} is not a dead-letter reason ({', '.join(sorted(KNOWN_REASONS))})",
                ctx,
                param,
            )
    return values


# --- the command group ---------------------------------------------------------------------


class _Group(click.Group):
    """Lists its commands in the order they were added (the order of docs/cli.md)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


def _check_level(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        level_number(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    return value.upper()


_CONTEXT: Final[dict[str, Any]] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

_json_flag = click.option(
    "--json", "as_json", is_flag=True, help="print JSON instead of a readable table"
)


@click.group(cls=_Group, context_settings=_CONTEXT, no_args_is_help=False)
@click.option(
    "--log-level",
    default="INFO",
    envvar="SAGALINE_LOG_LEVEL",
    show_default=True,
    callback=_check_level,
    help="DEBUG, INFO, WARNING, ERROR or CRITICAL [env SAGALINE_LOG_LEVEL]",
)
@click.option(
    "--log-format",
    type=click.Choice(FORMATS, case_sensitive=False),
    default="text",
    envvar="SAGALINE_LOG_FORMAT",
    show_default=True,
    help="text, or one JSON object per line [env SAGALINE_LOG_FORMAT]",
)
def cli(log_level: str, log_format: str) -> None:
    """Durable workflows on Apache Kafka. Settings come from SAGALINE_* environment
    variables; MODULE:ATTRIBUTE paths import from the current directory."""
    configure_logging(log_level, log_format)


# --- processes -----------------------------------------------------------------------------


@cli.command("orchestrator", short_help="run an orchestrator", context_settings=_CONTEXT)
@click.argument("app", metavar="MODULE:REGISTRY")
def orchestrator_command(app: str) -> int:
    """Run an orchestrator of the workflows in MODULE:REGISTRY
    (e.g. examples.order_saga.workflows:registry) until SIGTERM or SIGINT."""
    from orchestrator.runtime import Orchestrator
    from orchestrator.settings import OrchestratorSettings
    from orchestrator.workflow import WorkflowRegistry

    registry = load_object(app)
    if not isinstance(registry, WorkflowRegistry):
        raise ConfigurationError(f"{app} is a {type(registry).__name__}, not a WorkflowRegistry")
    settings = _settings(OrchestratorSettings)
    log.info("settings %s", settings.redacted())
    _serve_metrics(settings.metrics_port, settings.metrics_host)
    Orchestrator(settings, registry).run(_stop_on_signals())
    return 0


@cli.command("participant", short_help="run participant services", context_settings=_CONTEXT)
@click.argument("specs", nargs=-1, required=True, metavar="MODULE:PARTICIPANT...")
def participant_command(specs: tuple[str, ...]) -> int:
    """Run participant services (e.g. examples.order_saga.services:payment), one thread
    each, until SIGTERM or SIGINT."""
    from orchestrator.settings import ParticipantSettings
    from participants import Participant
    from participants.runtime import run_participant

    hosted = [load_object(spec) for spec in specs]
    for spec, obj in zip(specs, hosted, strict=True):
        if not isinstance(obj, Participant):
            raise ConfigurationError(f"{spec} is a {type(obj).__name__}, not a Participant")
    settings = _settings(ParticipantSettings)
    log.info("settings %s", settings.redacted())
    _serve_metrics(settings.metrics_port, settings.metrics_host)
    stop = _stop_on_signals()
    failures: list[BaseException] = []

    def host(participant: Participant) -> None:
        try:
            run_participant(participant, settings, stop)
        except BaseException as exc:
            log.exception("participant=%s crashed", participant.name)
            failures.append(exc)
            stop.set()

    threads = [
        threading.Thread(target=host, args=(p,), name=f"participant-{p.name}") for p in hosted
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return EXIT_FATAL if failures else 0


@cli.command(
    "projector",
    short_help="run the visibility projector (history -> PostgreSQL)",
    context_settings=_CONTEXT,
)
def projector_command() -> int:
    """Run the visibility projector: the history topic into PostgreSQL
    (SAGALINE_POSTGRES_DSN), for list, describe, history and the web UI."""
    from orchestrator.settings import ProjectorSettings

    settings = _settings(ProjectorSettings)
    try:
        from orchestrator.visibility.projector import run_projector
    except ImportError as exc:
        raise ConfigurationError(f"the projector cannot be loaded: {exc}") from exc
    log.info("settings %s", settings.redacted())
    _serve_metrics(settings.metrics_port, settings.metrics_host)
    run_projector(settings, _stop_on_signals())
    return 0


@cli.command("ui", short_help="serve the web UI", context_settings=_CONTEXT)
def ui_command() -> int:
    """Serve the web UI over the visibility tables on SAGALINE_UI_HOST:SAGALINE_UI_PORT."""
    from orchestrator.settings import ProjectorSettings

    settings = _settings(ProjectorSettings)
    try:
        from orchestrator.visibility.ui import serve_forever
    except ImportError as exc:
        raise ConfigurationError(f"the web UI cannot be loaded: {exc}") from exc
    log.info("settings %s", settings.redacted())
    serve_forever(settings, _stop_on_signals())
    return 0


# --- topics --------------------------------------------------------------------------------


@cli.group(
    "topics",
    short_help="create, describe and check topics",
    cls=_Group,
    context_settings=_CONTEXT,
    no_args_is_help=False,
)
def topics_group() -> None:
    """Create, describe and check the deployment's topics."""


def _quiet_kafka() -> dict[str, Any]:
    """librdkafka settings for the short-lived clients of a command: its own log (a line
    per failed connection attempt, dozens a second) only at --log-level DEBUG, since the
    command says in one line what went wrong. SAGALINE_KAFKA_EXTRA overrides it."""
    debug = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    return {"log_level": 7 if debug else 2}


def _admin(settings: KafkaSettings) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient({**_quiet_kafka(), **settings.kafka_common()})


@contextmanager
def _kafka_reach(settings: KafkaSettings, timeout_s: float) -> Iterator[None]:
    """Turn a broker that does not answer, or refuses, into one configuration error line."""
    from confluent_kafka import KafkaError, KafkaException

    unreachable = {
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
    }
    where = f"Kafka at {settings.kafka_bootstrap} (SAGALINE_KAFKA_BOOTSTRAP)"
    try:
        yield
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if isinstance(error, KafkaError) and error.code() not in unreachable:
            raise ConfigurationError(f"{where} refused: {error.str()}") from exc
        said = error.str() if isinstance(error, KafkaError) else str(exc)
        raise ConfigurationError(f"cannot reach {where} within {timeout_s:g} s: {said}") from exc


def _reach(settings: KafkaSettings, timeout_s: float) -> None:
    """Fail within ``timeout_s`` if Kafka does not answer: the client's own metadata waits
    are 30 s whatever the command's --timeout."""
    with _kafka_reach(settings, timeout_s):
        _admin(settings).list_topics(timeout=timeout_s)


@topics_group.command(
    "create", short_help="create the topics that are missing", context_settings=_CONTEXT
)
@click.option("--partitions", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--participants", default="", help="comma-separated participant names needing a tasks topic"
)
@click.option("--replication-factor", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--min-insync-replicas",
    type=click.IntRange(min=1),
    default=None,
    help="min.insync.replicas of the topics created (default: the broker's)",
)
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True, help="seconds")
def topics_create(
    partitions: int,
    participants: str,
    replication_factor: int,
    min_insync_replicas: int | None,
    timeout: float,
) -> int:
    """Create the topics that are missing (existing ones are left as they are). A missing
    inbox or history is created with the partition count of the other one when it exists
    (exit 2, creating nothing, if --partitions is given and differs)."""
    from orchestrator.admin import ensure_topics, participant_names

    source = click.get_current_context().get_parameter_source("partitions")
    given = source is not click.core.ParameterSource.DEFAULT

    if min_insync_replicas is not None and min_insync_replicas > replication_factor:
        raise click.UsageError(
            f"--min-insync-replicas {min_insync_replicas} is above --replication-factor "
            f"{replication_factor}: no write could succeed"
        )
    names = participant_names(participants)
    settings = _kafka_settings()
    with _kafka_reach(settings, timeout):
        created = ensure_topics(
            _admin(settings),
            settings.topics,
            partitions=partitions,
            participants=names,
            replication_factor=replication_factor,
            min_insync_replicas=min_insync_replicas,
            timeout_s=timeout,
            progress=_progress(),
            partitions_given=given,
        )
    click.echo(f"created {len(created)} topic(s): {', '.join(created) or 'none needed'}")
    return 0


@topics_group.command(
    "describe", short_help="show the topics beside what sagaline expects", context_settings=_CONTEXT
)
@click.option("--participants", default="", help="comma-separated participants expected")
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True, help="seconds")
@_json_flag
def topics_describe(participants: str, timeout: float, as_json: bool) -> int:
    """Show the deployment's topics as the broker has them, beside what sagaline expects."""
    from orchestrator.admin import (
        SHOWN_CONFIGS,
        TopicSpec,
        describe_topics,
        expected_topics,
        participant_names,
    )
    from orchestrator.protocol.topics import tasks_config

    settings = _kafka_settings()
    with _kafka_reach(settings, timeout):
        states = describe_topics(_admin(settings), settings.topics, timeout_s=timeout)
    specs = {s.name: s for s in expected_topics(settings.topics, participant_names(participants))}
    if not states:
        raise CommandFailedError(
            f"no topics of prefix {settings.topic_prefix!r} at {settings.kafka_bootstrap} "
            "(SAGALINE_TOPIC_PREFIX; sagaline topics create makes them)"
        )
    found = {s.name for s in states}
    missing = [name for name in specs if name not in found]
    # Tasks topics of participants not named are expected to be as any tasks topic.
    for state in states:
        specs.setdefault(state.name, TopicSpec(state.name, "tasks", None, tasks_config(), False))
    if as_json:
        _print_json(
            {
                "prefix": settings.topic_prefix,
                "topics": [
                    {**state.to_json(), "expected": dict(specs[state.name].config)}
                    for state in states
                ],
                "missing": missing,
            }
        )
        return 0
    rows: list[list[object]] = [
        [
            state.name,
            state.partitions,
            state.replication_factor,
            *(state.config.get(key) for key in SHOWN_CONFIGS),
            specs[state.name].expectation(),
        ]
        for state in states
    ]
    for name in missing:
        rows.append([name, "MISSING", None, None, None, None, None, specs[name].expectation()])
    headers = ["topic", "partitions", "replicas", *SHOWN_CONFIGS, "expected"]
    click.echo(render_table(headers, rows, width=None))
    return 0


@topics_group.command(
    "check",
    short_help="check the topics (exit 1 with a line per problem)",
    context_settings=_CONTEXT,
)
@click.option("--participants", default="", help="comma-separated participants that need topics")
@click.option(
    "--replication-factor",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="replicas every topic needs at least",
)
@click.option(
    "--min-insync-replicas",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="min.insync.replicas every topic needs at least",
)
@click.option(
    "--max-record-bytes",
    type=click.IntRange(min=1024),
    default=900_000,
    show_default=True,
    help="the orchestrators' SAGALINE_MAX_RECORD_BYTES",
)
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True, help="seconds")
@_json_flag
def topics_check(
    participants: str,
    replication_factor: int,
    min_insync_replicas: int,
    max_record_bytes: int,
    timeout: float,
    as_json: bool,
) -> int:
    """Check the broker's topics against what sagaline needs; exit 1 with a line per
    problem (missing topics, inbox and history partition counts, cleanup.policy,
    replication, min.insync.replicas, max.message.bytes)."""
    from orchestrator.admin import describe_topics, participant_names, topic_problems

    names = participant_names(participants)
    settings = _kafka_settings()
    with _kafka_reach(settings, timeout):
        states = describe_topics(_admin(settings), settings.topics, timeout_s=timeout)
    problems = topic_problems(
        states,
        settings.topics,
        participants=names,
        replication_factor=replication_factor,
        min_insync_replicas=min_insync_replicas,
        max_record_bytes=max_record_bytes,
    )
    if as_json:
        _print_json(
            {
                "prefix": settings.topic_prefix,
                "ok": not problems,
                "problems": problems,
                "topics": [s.to_json() for s in states],
            }
        )
    elif problems:
        for problem in problems:
            click.echo(problem)
    else:
        click.echo(
            f"ok: the {len(states)} topic(s) of prefix {settings.topic_prefix!r} are as "
            "sagaline needs them"
        )
    return EXIT_PROBLEMS if problems else 0


# --- workflows over Kafka ------------------------------------------------------------------


@cli.command(
    "start",
    short_help="start a workflow and print its run (JSON)",
    context_settings=_CONTEXT,
    help="Start a workflow and wait for the orchestrator's answer: the run id and whether "
    "this start created it (one JSON line). --if-running and --if-closed decide what "
    "happens when the id already has a run; sending again with the same --request-id is "
    f"safe. Exits {EXIT_FATAL} if the policy refuses or no answer comes within --timeout.",
)
@click.argument("workflow_type")
@click.option("--input", "input_json", default="null", help="JSON input")
@click.option("--id", "workflow_id", default=None, help="workflow id (default: a new UUID)")
@click.option(
    "--if-running",
    type=click.Choice([p.value for p in IfRunning]),
    default=None,
    help="when the id has an open run (default FAIL)",
)
@click.option(
    "--if-closed",
    type=click.Choice([p.value for p in IfClosed]),
    default=None,
    help="when the id's last run has closed (default REJECT)",
)
@click.option("--request-id", default=None, help="dedupe id (default: a new UUID)")
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True, help="seconds to wait")
@click.option(
    "--no-wait",
    is_flag=True,
    help="send the start and print the workflow id without waiting (an id that has a run "
    "is then left as it is)",
)
def start_command(
    workflow_type: str,
    input_json: str,
    workflow_id: str | None,
    if_running: str | None,
    if_closed: str | None,
    request_id: str | None,
    timeout: float,
    no_wait: bool,
) -> int:
    if workflow_id == "":
        raise ConfigurationError("--id must not be empty (leave it out for a generated id)")
    value = _json_option(input_json, "--input")
    if no_wait and (if_running or if_closed or request_id):
        raise click.UsageError("--no-wait takes no --if-running, --if-closed or --request-id")
    _reach(_kafka_settings(), timeout)
    client = _client()
    if no_wait:
        wid = client.start(workflow_type, value, workflow_id=workflow_id)
        client.flush()
        click.echo(wid)
        return 0
    try:
        started = client.start_workflow(
            workflow_type,
            value,
            workflow_id=workflow_id,
            if_running=IfRunning[if_running or "FAIL"],
            if_closed=IfClosed[if_closed or "REJECT"],
            request_id=request_id,
            timeout_s=timeout,
        )
    finally:
        client.close()
    _print_json(
        {
            "workflow_id": started.workflow_id,
            "run_id": started.run_id,
            "created": started.created,
            "status": started.status.value,
        }
    )
    return 0


def _print_answer(answer: Any, as_json: bool) -> None:
    """A handler's JSON answer: as JSON with --json or when it is not an object, else as
    one field per line."""
    if as_json or not isinstance(answer, dict) or not answer:
        _print_json(answer)
        return
    click.echo(render_fields((str(k), json.dumps(v, default=str)) for k, v in answer.items()))


@cli.command(
    "result",
    short_help="wait for a workflow to close and show how it ended",
    context_settings=_CONTEXT,
    help="Wait until the workflow is closed and print its status, result and failure. "
    "Reads only the history partition of the id, from its end. Exits "
    f"{EXIT_FATAL} if it does not close within --timeout.",
)
@click.argument("workflow_id", metavar="ID")
@click.option("--timeout", type=SECONDS, default=60.0, show_default=True, help="seconds to wait")
@_json_flag
def result_command(workflow_id: str, timeout: float, as_json: bool) -> int:
    _reach(_kafka_settings(), timeout)
    client = _client()
    try:
        outcome = client.result(workflow_id, timeout_s=timeout)
    finally:
        client.close()
    failure = outcome.failure
    if as_json:
        _print_json(
            {
                "workflow_id": workflow_id,
                "status": outcome.status.value,
                "result": outcome.value,
                "failure": None
                if failure is None
                else {"error_type": failure.error_type, "message": failure.message},
            }
        )
        return 0
    record = outcome.record
    click.echo(
        render_fields(
            [
                ("workflow", workflow_id),
                ("run", record.run_id),
                ("type", record.workflow_type),
                ("status", outcome.status.value),
                ("result", None if failure else json.dumps(outcome.value, default=str)),
                ("error", None if failure is None else f"{failure.error_type}: {failure.message}"),
            ]
        )
    )
    return 0


@cli.command(
    "signal",
    short_help="send a signal to a workflow",
    context_settings=_CONTEXT,
    help="Send the signal NAME with a JSON value to a workflow and print its signal id; the "
    "workflow takes it with ctx.wait_signal(NAME). Signals sent before the wait are kept in "
    "order; sending again with the same --signal-id is ignored. With --start-type, a "
    "workflow that does not exist is started first (signal-with-start).",
)
@click.argument("workflow_id", metavar="ID")
@click.argument("name")
@click.option("--value", default="null", help="JSON value (default null)")
@click.option("--signal-id", default=None, help="dedupe id (default: a new UUID)")
@click.option("--start-type", default=None, help="signal-with-start: workflow type")
@click.option("--start-input", default="null", help="signal-with-start: JSON input")
def signal_command(
    workflow_id: str,
    name: str,
    value: str,
    signal_id: str | None,
    start_type: str | None,
    start_input: str,
) -> int:
    sent = _json_option(value, "--value")
    start = None
    if start_type is not None:
        start = (start_type, _json_option(start_input, "--start-input"))
    elif start_input != "null":
        raise ConfigurationError("--start-input needs --start-type")
    client = _client()
    sid = client.signal(workflow_id, name, sent, signal_id=signal_id, start=start)
    client.flush()
    click.echo(sid)
    return 0


def _closed_within(
    client: WorkflowClient, workflow_id: str, wait_s: float
) -> WorkflowResult | None:
    """How the workflow ended, if it closes within ``wait_s``; None otherwise."""
    from orchestrator.client import ResultTimeoutError

    try:
        return client.result(workflow_id, timeout_s=wait_s)
    except ResultTimeoutError:
        return None


@cli.command(
    "cancel",
    short_help="cancel a running workflow (its compensations run)",
    context_settings=_CONTEXT,
    help="Ask a running workflow to cancel: its code sees WorkflowCancelledError at the "
    "await it is blocked on, Saga blocks compensate, and it ends CANCELLED. Waits up to "
    "--wait seconds to report how it ended (a closed workflow is left as it is).",
)
@click.argument("workflow_id", metavar="ID")
@click.option("--reason", default="", help="why (kept in its record)")
@click.option(
    "--wait", type=WAIT_SECONDS, default=30.0, show_default=True, help="seconds (0: do not)"
)
def cancel_command(workflow_id: str, reason: str, wait: float) -> int:
    client = _client()
    client.cancel(workflow_id, reason)
    client.flush()
    if wait <= 0:
        click.echo(f"asked workflow {workflow_id} to cancel")
        return 0
    outcome = _closed_within(client, workflow_id, wait)
    if outcome is None:
        click.echo(
            f"asked workflow {workflow_id} to cancel; it did not close within {wait:g} s "
            "(its compensations may still run; a cancel for a workflow that does not exist "
            "goes to the dead-letter topic as unknown-workflow)"
        )
        return 0
    if outcome.status is WorkflowStatus.CANCELLED:
        click.echo(f"workflow {workflow_id} cancelled")
    else:
        click.echo(
            f"workflow {workflow_id} had already closed {outcome.status.value}: the cancel "
            "changed nothing"
        )
    return 0


@cli.command(
    "terminate",
    short_help="end a workflow now as TERMINATED (no compensations)",
    context_settings=_CONTEXT,
    help="End a workflow now as TERMINATED: its code does not run again, so no compensation "
    "runs (use cancel for that); its children follow their parent close policy. A closed "
    "workflow is left as it is.",
)
@click.argument("workflow_id", metavar="ID")
@click.option("--reason", default="", help="why (kept in its record)")
@click.option(
    "--wait", type=WAIT_SECONDS, default=30.0, show_default=True, help="seconds (0: do not)"
)
def terminate_command(workflow_id: str, reason: str, wait: float) -> int:
    client = _client()
    client.terminate(workflow_id, reason)
    client.flush()
    if wait <= 0:
        click.echo(f"asked to terminate workflow {workflow_id}")
        return 0
    outcome = _closed_within(client, workflow_id, wait)
    if outcome is None:
        click.echo(f"asked to terminate workflow {workflow_id}; it did not close within {wait:g} s")
        return 0
    click.echo(f"workflow {workflow_id} is {outcome.status.value}")
    return 0


@cli.command(
    "query",
    short_help="ask a running workflow's query handler",
    context_settings=_CONTEXT,
    help="Ask the query handler NAME (ctx.on_query) of an open workflow; the orchestrator "
    "that owns it answers from its current state and records nothing. An object answer is "
    "shown field by field, anything else (and everything with --json) as JSON. "
    f"Exits {EXIT_FATAL} on a failure or if no answer comes within --timeout.",
)
@click.argument("workflow_id", metavar="ID")
@click.argument("name")
@click.option("--value", default="null", help="JSON argument (default null)")
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True, help="seconds to wait")
@_json_flag
def query_command(workflow_id: str, name: str, value: str, timeout: float, as_json: bool) -> int:
    argument = _json_option(value, "--value")
    _reach(_kafka_settings(), timeout)
    client = _client()
    try:
        answer = client.query(workflow_id, name, argument, timeout_s=timeout)
    finally:
        client.close()
    _print_answer(answer, as_json)
    return 0


@cli.command(
    "update",
    short_help="apply an update to a running workflow",
    context_settings=_CONTEXT,
    help="Apply the update NAME (ctx.on_update) to a running workflow: its validator runs "
    "first (a rejection records nothing), then the update is recorded and its handler's "
    "JSON answer printed once committed. Sending again with the same --update-id applies "
    "nothing more.",
)
@click.argument("workflow_id", metavar="ID")
@click.argument("name")
@click.option("--value", default="null", help="JSON argument (default null)")
@click.option("--update-id", default=None, help="dedupe id (default: a new UUID)")
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True, help="seconds to wait")
def update_command(
    workflow_id: str, name: str, value: str, update_id: str | None, timeout: float
) -> int:
    argument = _json_option(value, "--value")
    _reach(_kafka_settings(), timeout)
    client = _client()
    try:
        answer = client.update(workflow_id, name, argument, update_id=update_id, timeout_s=timeout)
    finally:
        client.close()
    _print_json(answer)
    return 0


@cli.command(
    "promise",
    short_help="complete or fail a workflow's promise",
    context_settings=_CONTEXT,
    help="Complete (with a JSON value) or fail (with an error type and message) the promise "
    "a workflow made with ctx.promise and handed out by its id "
    "('<workflow id>/<run id>/p<step>'). A promise completes once.",
)
@click.argument("action", type=click.Choice(["complete", "fail"]))
@click.argument("promise_id", metavar="ID")
@click.option("--value", default="null", help="complete: JSON value")
@click.option("--error-type", default="", help="fail: the error type")
@click.option("--message", default="", help="fail: the message")
def promise_command(action: str, promise_id: str, value: str, error_type: str, message: str) -> int:
    if action == "complete":
        completed = _json_option(value, "--value")
        client = _client()
        client.complete_promise(promise_id, completed)
    else:
        if not error_type:
            raise ConfigurationError("fail needs --error-type")
        client = _client()
        client.fail_promise(promise_id, error_type, message)
    client.flush()
    click.echo(f"sent: {action} {promise_id}")
    return 0


@cli.command(
    "resume",
    short_help="re-drive a STUCK workflow (or all of them)",
    context_settings=_CONTEXT,
    help="Re-drive a STUCK workflow with the code deployed now: its code runs again and the "
    "inputs held while it was parked are applied in order. Workflows that are not stuck "
    "are left alone. Orchestrators also do this after every restore.",
)
@click.argument("workflow_id", metavar="[ID]", required=False)
@click.option("--all-stuck", is_flag=True, help="every stuck workflow, in every partition")
def resume_command(workflow_id: str | None, all_stuck: bool) -> int:
    if bool(workflow_id) == all_stuck:
        raise ConfigurationError("give either a workflow id or --all-stuck")
    client = _client()
    if all_stuck:
        partitions = client.resume_all_stuck()
        client.flush()
        click.echo(
            f"asked the orchestrators to resume every stuck workflow ({partitions} partitions)"
        )
    else:
        assert workflow_id is not None
        client.resume(workflow_id)
        client.flush()
        click.echo(f"asked the orchestrators to resume {workflow_id}")
    return 0


# --- the visibility tables -----------------------------------------------------------------


@contextmanager
def _visibility() -> Iterator[VisibilityStore]:
    """The visibility store of SAGALINE_POSTGRES_DSN; a PostgreSQL that cannot be read is
    one configuration error line (the DSN itself is never printed: it may hold a
    password)."""
    import psycopg

    from orchestrator.settings import ProjectorSettings

    settings = _settings(ProjectorSettings)
    try:
        from orchestrator.visibility.store import VisibilityStore
    except ImportError as exc:
        raise ConfigurationError(f"the visibility store cannot be loaded: {exc}") from exc
    try:
        store = VisibilityStore(
            settings.postgres_dsn.get_secret_value(),
            connect_timeout_s=settings.db_connect_timeout_s,
        )
    except psycopg.Error as exc:
        raise ConfigurationError(_postgres_problem(exc)) from exc
    try:
        yield store
    except psycopg.errors.UndefinedTable as exc:
        raise ConfigurationError(
            "the visibility tables do not exist in SAGALINE_POSTGRES_DSN's database: "
            "start `sagaline projector` (it creates and fills them)"
        ) from exc
    except psycopg.Error as exc:
        raise ConfigurationError(_postgres_problem(exc)) from exc
    finally:
        store.close()


def _postgres_problem(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot read the visibility tables (SAGALINE_POSTGRES_DSN): {first}"


def _unknown(workflow_id: str, run_id: str | None) -> CommandFailedError:
    run = f" run {run_id}" if run_id else ""
    return CommandFailedError(
        f"no workflow {cell(workflow_id, None)}{run} in the visibility tables "
        "(is `sagaline projector` running?)"
    )


@cli.command("list", short_help="list workflows (visibility tables)", context_settings=_CONTEXT)
@click.option("--type", "workflow_type", default=None, help="only this workflow type")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    callback=_statuses,
    metavar="STATUS",
    help="only this status, any case (repeatable)",
)
@click.option("--id-prefix", default=None, help="only workflow ids starting so")
@click.option(
    "--since", callback=_when, metavar="WHEN", help="started at or after (15m, 2h, 3d, ISO-8601)"
)
@click.option(
    "--until", callback=_when, metavar="WHEN", help="started before (15m, 2h, 3d, ISO-8601)"
)
@click.option(
    "--limit",
    type=click.IntRange(min=1, max=MAX_COUNT),
    default=50,
    show_default=True,
    help="at most N runs",
)
@_json_flag
def list_command(
    workflow_type: str | None,
    statuses: tuple[str, ...],
    id_prefix: str | None,
    since: int | None,
    until: int | None,
    limit: int,
    as_json: bool,
) -> int:
    """List workflow runs from the visibility tables, newest first, with the counts by
    status of the runs matching every filter but --status. Times are UTC."""
    from orchestrator.visibility.models import WorkflowFilter

    if since is not None and until is not None and since >= until:
        raise click.UsageError("--since must be before --until")
    flt = WorkflowFilter(
        workflow_type=workflow_type,
        statuses=statuses,
        id_prefix=id_prefix,
        started_after_ms=since,
        started_before_ms=until,
        limit=limit,
    )
    with _visibility() as store:
        rows = store.list_workflows(flt)
        counts = store.count_by_status(flt)
    if as_json:
        _print_json({"workflows": [row.to_json() for row in rows], "counts": counts})
        return 0
    click.echo(workflow_table(rows))
    click.echo(counts_line(counts, len(rows), limit))
    return 0


def workflow_table(rows: Sequence[WorkflowRow]) -> str:
    """The table ``sagaline list`` prints."""
    return render_table(
        ["workflow id", "run", "type", "status", "started", "closed", "step / error"],
        [
            [
                row.workflow_id,
                row.run_id[:8],
                row.workflow_type,
                row.status,
                format_ms(row.started_at_ms),
                format_ms(row.closed_at_ms),
                row.current_step or row.error_type,
            ]
            for row in rows
        ],
        width=48,
    )


def counts_line(counts: dict[str, int], shown: int, limit: int) -> str:
    """``shown 3 of 12: RUNNING 2, COMPLETED 10`` under the list."""
    total = sum(counts.values())
    parts = ", ".join(f"{status} {n:,}" for status, n in sorted(counts.items()) if n)
    more = " (raise --limit or narrow the filter for the rest)" if shown >= limit else ""
    return f"shown {shown:,}{more}; matching by status: {parts or 'none'} ({total:,} in all)"


@cli.command(
    "describe", short_help="show one workflow run (visibility tables)", context_settings=_CONTEXT
)
@click.argument("workflow_id", metavar="WORKFLOW_ID")
@click.option("--run", "run_id", default=None, help="this run (default: the latest)")
@_json_flag
def describe_command(workflow_id: str, run_id: str | None, as_json: bool) -> int:
    """Show one workflow run from the visibility tables: status, type, times (UTC),
    current step, attempts, error, result, whether it is archived."""
    with _visibility() as store:
        row = store.describe(workflow_id, run_id)
    if row is None:
        raise _unknown(workflow_id, run_id)
    if as_json:
        _print_json(row.to_json())
        return 0
    click.echo(describe_fields(row))
    return 0


def describe_fields(row: WorkflowRow) -> str:
    """The field list ``sagaline describe`` prints."""
    error = None if row.error_type is None else f"{row.error_type}: {row.error_message or ''}"
    return render_fields(
        [
            ("workflow", row.workflow_id),
            ("run", row.run_id),
            ("type", row.workflow_type),
            ("status", row.status),
            ("started", format_ms(row.started_at_ms)),
            ("updated", format_ms(row.updated_at_ms)),
            ("closed", format_ms(row.closed_at_ms)),
            ("current step", row.current_step),
            ("attempts", row.attempts),
            ("error", error),
            ("result", row.result),
            ("input", row.input),
            ("parent", row.parent_workflow_id),
            ("archived", row.archived),
            ("revision", row.revision),
            ("history at", f"partition {row.partition} offset {row.offset}"),
        ],
        width=400,
    )


@cli.command(
    "history", short_help="show a run's events (visibility tables)", context_settings=_CONTEXT
)
@click.argument("workflow_id", metavar="WORKFLOW_ID")
@click.option("--run", "run_id", default=None, help="this run (default: the latest)")
@_json_flag
def history_command(workflow_id: str, run_id: str | None, as_json: bool) -> int:
    """Show the events of one workflow run from the visibility tables, in order."""
    with _visibility() as store:
        row = store.describe(workflow_id, run_id)
        if row is None:
            raise _unknown(workflow_id, run_id)
        events = store.events(workflow_id, row.run_id)
    if as_json:
        _print_json(
            {
                "workflow_id": row.workflow_id,
                "run_id": row.run_id,
                "events": [event.to_json() for event in events],
            }
        )
        return 0
    click.echo(f"workflow {cell(row.workflow_id, None)} run {row.run_id} ({row.status})")
    click.echo(events_table(events))
    return 0


def events_table(events: Sequence[EventRow]) -> str:
    """The table ``sagaline history`` prints."""
    return render_table(
        ["#", "at", "event", "seq", "attempt", "name", "detail"],
        [
            [
                e.index,
                format_ms(e.at_ms),
                e.kind,
                e.seq,
                e.attempt,
                e.name,
                json.dumps(e.detail, default=str) if e.detail else None,
            ]
            for e in events
        ],
        width=80,
    )


# --- dead letters --------------------------------------------------------------------------


@cli.group(
    "dlq",
    short_help="list dead letters and send them again",
    cls=_Group,
    context_settings=_CONTEXT,
    no_args_is_help=False,
)
def dlq_group() -> None:
    """List dead letters and send them back where they came from."""


def _origin(letter: DeadLetterRecord) -> str | None:
    topic, partition, offset = letter.origin
    return None if topic is None else f"{topic}[{partition}]@{offset}"


@dlq_group.command("list", short_help="list dead letters", context_settings=_CONTEXT)
@click.option(
    "--topic",
    "topic_names",
    multiple=True,
    help="dead-letter topic (repeatable; default <prefix>.dlq)",
)
@click.option("--reason", "reasons", multiple=True, help="only this reason (repeatable)")
@click.option(
    "--limit",
    type=click.IntRange(min=1, max=MAX_COUNT),
    default=100,
    show_default=True,
    help="the last N",
)
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True, help="Kafka timeout")
@_json_flag
def dlq_list(
    topic_names: tuple[str, ...],
    reasons: tuple[str, ...],
    limit: int,
    timeout: float,
    as_json: bool,
) -> int:
    """List the newest dead letters: partition, offset, time (UTC), key, reason, source,
    where the original was, and what was wrong. Reads the topic from its start with a
    consumer that commits nothing."""
    from orchestrator.dlq import read_dead_letters

    settings = _kafka_settings()
    scans = [
        read_dead_letters(
            settings,
            topic,
            reasons=reasons,
            keep_last=limit,
            timeout_s=timeout,
            progress=_progress(),
            client_config=_quiet_kafka(),
        )
        for topic in (topic_names or (settings.topics.dlq,))
    ]
    if as_json:
        _print_json(
            {
                "topics": [
                    {
                        "topic": scan.topic,
                        "records": scan.total,
                        "dead_letters": [letter.to_json() for letter in scan.letters],
                    }
                    for scan in scans
                ]
            }
        )
        return 0
    for scan in scans:
        if not scan.letters:
            which = f" with reason {', '.join(reasons)}" if reasons else ""
            click.echo(f"{scan.topic}: no dead letters{which} ({scan.total:,} record(s) read)")
            continue
        click.echo(
            render_table(
                ["partition", "offset", "time", "key", "reason", "source", "origin", "error"],
                [
                    [
                        d.partition,
                        d.offset,
                        format_ms(d.timestamp_ms),
                        d.key_text,
                        d.reason,
                        d.source,
                        _origin(d),
                        d.error,
                    ]
                    for d in scan.letters
                ],
                width=60,
            )
        )
        which = f" with reason {', '.join(reasons)}" if reasons else ""
        click.echo(
            f"{scan.topic}: {scan.total:,} record(s); shown the last {len(scan.letters):,}{which}"
        )
    return 0


@dlq_group.command(
    "retry", short_help="send dead letters again to the inbox", context_settings=_CONTEXT
)
@click.option(
    "--offset",
    "offsets",
    multiple=True,
    callback=_partition_offsets,
    metavar="P:O",
    help="the dead letter at PARTITION:OFFSET of the DLQ (repeatable)",
)
@click.option("--all", "everything", is_flag=True, help="every dead letter (see --reason)")
@click.option(
    "--reason",
    "reasons",
    multiple=True,
    callback=_dead_letter_reasons,
    help="only this reason (repeatable)",
)
@click.option(
    "--after",
    callback=_high_water,
    metavar="P:O[,P:O...]",
    help="--all: only dead letters past these offsets (the mark the last run printed)",
)
@click.option(
    "--max",
    "most",
    type=click.IntRange(min=1, max=1_000_000),
    default=10_000,
    show_default=True,
    help="--all: at most N dead letters per run (the oldest)",
)
@click.option(
    "--include-starts",
    is_flag=True,
    help="send starts and signal-with-starts too (check with describe first)",
)
@click.option("--topic", default=None, help="dead-letter topic (default <prefix>.dlq)")
@click.option("--dry-run", is_flag=True, help="say what would be sent, send nothing")
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True, help="Kafka timeout")
def dlq_retry(
    offsets: tuple[tuple[int, int], ...],
    everything: bool,
    reasons: tuple[str, ...],
    after: dict[int, int] | None,
    most: int,
    include_starts: bool,
    topic: str | None,
    dry_run: bool,
    timeout: float,
) -> int:
    """Send dead letters again, whole, to the inbox they came from (keyed by workflow id,
    to the partition the orchestrators read it from). Refused, with a line each: tasks,
    letters that lost their value for size or cannot be decoded, reasons the same bytes
    would meet again, run-terminated inputs, starts and signal-with-starts (unless
    --include-starts: a start is deduplicated only while its run's record remembers the
    request id), and cancels and terminates unless named by --offset (they name no run).
    With --offset nothing is sent if any named letter is refused; with --all the others
    are sent, each distinct input once, and the run ends with the --after mark to pass
    next time. Exits 1 if anything selected was refused or not sent, 3 on a fatal Kafka
    error (see docs/cli.md)."""
    from orchestrator.dlq import UNKNOWN, decoding_codec, plan_retry, read_dead_letters

    if bool(offsets) == everything:
        raise click.UsageError("give --offset P:O (repeatable) or --all")
    if after and not everything:
        raise click.UsageError("--after goes with --all (--offset names letters itself)")
    settings = _kafka_settings()
    dlq_topic = topic or settings.topics.dlq
    scan = read_dead_letters(
        settings,
        dlq_topic,
        reasons=reasons,
        offsets=offsets,
        after=after,
        keep_first=most if everything else None,
        timeout_s=timeout,
        progress=_progress(),
        client_config=_quiet_kafka(),
    )
    found = {(d.partition, d.offset) for d in scan.letters}
    absent = [f"{p}:{o}" for p, o in offsets if (p, o) not in found]
    if absent:
        which = f" with reason {', '.join(reasons)}" if reasons else ""
        raise CommandFailedError(f"no dead letter{which} at {', '.join(absent)} of {dlq_topic}")
    codec = decoding_codec()
    decisions = [
        plan_retry(
            letter,
            settings.topics,
            include_starts=include_starts,
            named=bool(offsets),
            codec=codec,
        )
        for letter in scan.letters
    ]
    refused = [d for d in decisions if d.refusal is not None]
    for decision in refused:
        letter = decision.letter
        click.echo(
            f"not sent {letter.partition}:{letter.offset} (key {cell(letter.key_text)}): "
            f"{decision.refusal}",
            err=True,
        )
    if offsets and refused:
        raise CommandFailedError(f"sent nothing: {len(refused)} of the named dead letters refused")
    chosen, repeats = _distinct([d for d in decisions if d.refusal is None])
    for repeat, kept in repeats:
        click.echo(
            f"skipped {repeat.letter.partition}:{repeat.letter.offset}: the same input as "
            f"{kept.letter.partition}:{kept.letter.offset}, sent once"
        )
    more = (
        f"; {scan.left:,} more past --max {most}: run again with the --after below"
        if scan.left
        else ""
    )
    if dry_run or not chosen:
        for decision in chosen:
            letter = decision.letter
            click.echo(
                f"would send {letter.partition}:{letter.offset} (key {cell(letter.key_text)}, "
                f"{letter.reason}) to {decision.target}"
            )
        if not chosen:
            click.echo(f"nothing to send from {dlq_topic}{more}")
        if everything and not dry_run:
            _next_time(scan.marks, [])
        return EXIT_PROBLEMS if refused else 0
    outcome = _republish_with_bar(settings, chosen, timeout)
    unsent: list[RetryDecision] = []
    unknown = 0
    for decision, error in outcome:
        letter = decision.letter
        if error is None:
            click.echo(
                f"sent {letter.partition}:{letter.offset} (key {cell(letter.key_text)}, "
                f"{letter.reason}) to {decision.target}"
            )
            continue
        unsent.append(decision)
        if error == UNKNOWN:
            unknown += 1
            click.echo(f"unknown {letter.partition}:{letter.offset}: {error}", err=True)
        else:
            click.echo(f"failed {letter.partition}:{letter.offset}: {error}", err=True)
    failed = len(unsent) - unknown
    click.echo(
        f"sent {len(outcome) - len(unsent)} of {len(decisions)} dead letter(s) from {dlq_topic}"
        + (f"; {len(refused)} refused" if refused else "")
        + (f"; {len(repeats)} repeated input(s) skipped" if repeats else "")
        + (f"; {failed} failed" if failed else "")
        + (f"; {unknown} unknown (may still be delivered)" if unknown else "")
        + more
    )
    if everything:
        _next_time(scan.marks, unsent)
    return EXIT_PROBLEMS if refused or unsent else 0


def _distinct(
    decisions: list[RetryDecision],
) -> tuple[list[RetryDecision], list[tuple[RetryDecision, RetryDecision]]]:
    """Each distinct input once (the newest letter of it), and the repeats with the one
    sent instead. A resent input that fails again gets a new dead letter with the same
    key and value; sending both would send the input twice, and again every run."""
    newest: dict[tuple[bytes | None, bytes | None], RetryDecision] = {}
    for decision in decisions:
        newest[(decision.letter.key, decision.letter.value)] = decision  # later wins
    kept_ids = {id(d) for d in newest.values()}
    chosen = [d for d in decisions if id(d) in kept_ids]
    repeats = [
        (d, newest[(d.letter.key, d.letter.value)]) for d in decisions if id(d) not in kept_ids
    ]
    return chosen, repeats


def _next_time(marks: Mapping[int, int], unsent: list[RetryDecision]) -> None:
    """Print the ``--after`` mark for the next ``--all`` run: past every letter this run
    read, but before the first one it could not send (so the next run tries it again)."""
    mark = dict(marks)
    for decision in unsent:
        letter = decision.letter
        mark[letter.partition] = min(mark.get(letter.partition, letter.offset), letter.offset - 1)
    shown = ",".join(f"{p}:{o}" for p, o in sorted(mark.items()) if o >= 0)
    if shown:
        click.echo(f"next time: --after {shown}")


def _republish_with_bar(
    settings: KafkaSettings, chosen: list[RetryDecision], timeout: float
) -> list[tuple[RetryDecision, str | None]]:
    """Send ``chosen`` again, with a progress bar on stderr when it is a terminal."""
    from orchestrator.dlq import republish

    if not sys.stderr.isatty():
        return republish(settings, chosen, timeout_s=timeout, client_config=_quiet_kafka())
    with click.progressbar(length=len(chosen), label="sending", file=sys.stderr) as bar:
        return republish(
            settings,
            chosen,
            timeout_s=timeout,
            on_acked=lambda _d: bar.update(1),
            client_config=_quiet_kafka(),
        )


# --- code checks and the replay gate -------------------------------------------------------


@cli.command(
    "check",
    short_help="flag non-deterministic calls in workflow code",
    context_settings=_CONTEXT,
    help="Statically check the workflows of each MODULE (package.module, every "
    "WorkflowRegistry it defines, or package.module:registry) for calls that make a replay "
    "diverge: the clock, random numbers, uuids, I/O, threads, asyncio. Prints "
    "file:line:column, the call and the ctx method to use instead; exits 1 if it finds any. "
    "Exempt a line with '# sagaline: allow'.",
)
@click.argument("modules", nargs=-1, required=True, metavar="MODULE...")
def check_command(modules: tuple[str, ...]) -> int:
    from orchestrator.check import Finding, check_registry, format_report, registries_in
    from orchestrator.workflow import WorkflowRegistry

    findings: list[Finding] = []
    for spec in modules:
        if ":" in spec:
            found = load_object(spec)
            if not isinstance(found, WorkflowRegistry):
                raise ConfigurationError(f"{spec!r} is not a WorkflowRegistry")
            registries = [found]
        else:
            registries = registries_in(load_module(spec))
            if not registries:
                raise ConfigurationError(f"module {spec!r} defines no WorkflowRegistry")
        for registry in registries:
            try:
                findings.extend(check_registry(registry))
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from exc
    click.echo(format_report(findings))
    return 1 if findings else 0


@cli.command(
    "replay",
    short_help="replay recorded workflows against this code",
    context_settings=_CONTEXT,
    help="Run each recorded workflow's code over its history, as an orchestrator does after "
    "every input, and report every workflow that would diverge (naming the first differing "
    "command) or that the code cannot run. Sources: the live history topic (its open "
    "workflows, or all with --all), a file written by 'sagaline export', or every *.avro "
    "file of a directory. Exits 0 if all replay, 1 if any diverges or is broken, "
    f"{EXIT_CONFIG} on a configuration error (bad module, unreadable file, Kafka out of "
    f"reach), {EXIT_FATAL} if the replay itself fails. Progress goes to stderr.",
)
@click.argument("app", metavar="MODULE[:registry]")
@click.option("--topic", "from_topic", is_flag=True, help="the history topic (SAGALINE_*)")
@click.option("--file", "from_file", default=None, help="a file written by sagaline export")
@click.option(
    "--dir", "from_dir", default=None, help="a directory of such files (*.avro, in name order)"
)
@click.option("--all", "everything", is_flag=True, help="--topic: closed workflows too")
@click.option(
    "--max-lines",
    type=click.IntRange(min=0, max=MAX_COUNT),
    default=20,
    show_default=True,
    help="workflows listed per message",
)
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True, help="Kafka timeout")
def replay_command(
    app: str,
    from_topic: bool,
    from_file: str | None,
    from_dir: str | None,
    everything: bool,
    max_lines: int,
    timeout: float,
) -> int:
    from orchestrator import gate

    if sum((from_topic, from_file is not None, from_dir is not None)) != 1:
        raise click.UsageError("give exactly one of --topic, --file or --dir")
    registry = _workflow_registry(app)
    progress = gate.Progress(_to_stderr)
    try:
        if from_topic:
            return gate.replay_topic(
                registry,
                _kafka_settings(),
                sys.stdout,
                include_closed=everything,
                max_lines=max_lines,
                progress=progress,
                timeout_s=timeout,
            )
        if everything:
            raise ConfigurationError(
                "--all applies to --topic: a file is replayed whole (export it with --all)"
            )
        paths = [Path(from_file)] if from_file else gate.avro_files(Path(str(from_dir)))
        return gate.replay_files(
            registry, paths, sys.stdout, max_lines=max_lines, progress=progress
        )
    except SagalineError:
        raise
    except Exception as exc:
        # A pipeline gating on this reads exit 1 as "diverges": a crash must not say that.
        return _crashed("replay", exc)


@cli.command(
    "export",
    short_help="write workflows of the history topic to an Avro file",
    context_settings=_CONTEXT,
    help="Write the latest record of workflows on the history topic to an Avro Object "
    "Container File of io.sagaline.WorkflowRecord (any Avro tool reads it; 'sagaline replay "
    "--file' replays it): the open workflows, every one with --all, or exactly the "
    "--workflow-id ones (--workflow-id A B C, or the option repeated); sorted by id, at most "
    "--limit. Exits 0 if all were written, 1 if some could not be decoded (listed on "
    f"stderr, left out), {EXIT_CONFIG} on a configuration error (Kafka out of reach, an "
    f"unknown --workflow-id, a file that cannot be written), {EXIT_FATAL} if the export "
    "itself fails.",
)
@click.option("--out", required=True, help="the file to write (replaced whole)")
@click.option("--all", "everything", is_flag=True, help="closed workflows too")
@click.option(
    "--limit", type=click.IntRange(min=1, max=MAX_COUNT), default=None, help="at most this many"
)
@click.option(
    "--workflow-id",
    "workflow_ids",
    multiple=True,
    metavar="ID",
    help="only these workflows, whatever their status",
)
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True, help="Kafka timeout")
# `--workflow-id A B` (the ids after the first) arrive here: the argparse CLI took an id list.
@click.argument("more_ids", nargs=-1, metavar="[ID...]")
def export_command(
    out: str,
    everything: bool,
    limit: int | None,
    workflow_ids: tuple[str, ...],
    timeout: float,
    more_ids: tuple[str, ...],
) -> int:
    from orchestrator import gate

    if more_ids and not workflow_ids:
        raise click.UsageError(f"unexpected argument {more_ids[0]!r} (ids follow --workflow-id)")
    settings = _kafka_settings()
    try:
        written, left_out = gate.export_history(
            settings,
            Path(out),
            include_closed=everything,
            limit=limit,
            workflow_ids=[*workflow_ids, *more_ids],
            progress=gate.Progress(_to_stderr),
            timeout_s=timeout,
        )
    except SagalineError:
        raise
    except Exception as exc:
        # Exit 1 says "some were left out": a crash (Kafka failing mid-read, a record the
        # Avro writer rejects) must not say that.
        return _crashed("export", exc)
    for verdict in left_out:
        _to_stderr(f"left out: {verdict.line()}")
    dropped = f"; {len(left_out)} left out (cannot decode)" if left_out else ""
    click.echo(f"exported {written} workflow(s) to {out}{dropped}")
    return 1 if left_out else 0


# --- entry point ---------------------------------------------------------------------------


def _usage_line(exc: click.ClickException) -> str:
    """A click error as one line naming the command and where its help is."""
    message = " ".join(exc.format_message().splitlines())
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        return f"{ctx.command_path}: {message} (see '{ctx.command_path} --help')"
    return f"sagaline: {message}"


def _bootstrap() -> str:
    """The Kafka bootstrap the settings name, for an error line (never fails)."""
    try:
        return _kafka_settings().kafka_bootstrap
    except Exception:  # the settings themselves are invalid: the raw variable, or nothing
        return os.environ.get("SAGALINE_KAFKA_BOOTSTRAP", "?")


def _kafka_failure(exc: Exception) -> str | None:
    """The one line for a Kafka client error that reached ``main``, None if ``exc`` is not
    one. Only checked when the Kafka modules are loaded (``--help`` never loads them)."""
    kafka = sys.modules.get("confluent_kafka")
    client = sys.modules.get("orchestrator.client")
    where = f"Kafka at {_bootstrap()} (SAGALINE_KAFKA_BOOTSTRAP)"
    if kafka is not None and isinstance(exc, kafka.KafkaException):
        error = exc.args[0] if exc.args else None
        said = error.str() if isinstance(error, kafka.KafkaError) else str(exc)
        return _one_line(f"cannot reach {where} or it refused: {said}")
    if client is not None and isinstance(exc, client.StartFailedError):
        return _one_line(f"{where} did not take the request: {exc}")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sagaline`` console script; returns the exit code.

    Every error is one line on stderr, printed whatever ``--log-level`` and
    ``--log-format`` say (it is the command's answer, not a log line); a traceback only
    at ``--log-level DEBUG``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = cli.main(args=args, prog_name="sagaline", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("sagaline: interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        click.echo(_usage_line(exc), err=True)
        return exc.exit_code
    except ConfigurationError as exc:
        return _fail(f"sagaline: {_one_line(str(exc))}", exc, EXIT_CONFIG)
    except CommandFailedError as exc:
        return _fail(f"sagaline: {_one_line(str(exc))}", exc, EXIT_PROBLEMS)
    except Exception as exc:
        kafka = _kafka_failure(exc)
        if kafka is not None:
            return _fail(f"sagaline: {kafka}", exc, EXIT_CONFIG)
        if isinstance(exc, SagalineError):
            return _fail(f"sagaline: fatal: {_one_line(str(exc))}", exc, EXIT_FATAL)
        # Anything else is a bug or a failure nobody foresaw: still one line and exit 3,
        # so a script never reads a crash as "the answer is no" (1).
        line = _one_line(f"sagaline: {type(exc).__name__}: {exc}")
        return _fail(line, exc, EXIT_FATAL)
    return result if isinstance(result, int) else 0


def _crashed(what: str, exc: Exception) -> int:
    """A replay or export that crashed: its line whatever the log level, and its traceback
    logged (a gate's crash is worth its traceback in the pipeline's log); exit 3."""
    click.echo(_one_line(f"sagaline: {what} failed: {type(exc).__name__}: {exc}"), err=True)
    log.error("%s failed", what, exc_info=exc)
    return EXIT_FATAL


def _fail(line: str, exc: BaseException, code: int = EXIT_FATAL) -> int:
    """Print ``line`` on stderr (whatever the log level: it is the command's answer), log
    it too for other handlers (ours skips it: it is printed already) and the traceback at
    DEBUG; return ``code``."""
    click.echo(line, err=True)
    log.error("%s", line.removeprefix("sagaline: "), extra={ECHOED: True})
    log.debug("%s", line, exc_info=exc)
    return code


if __name__ == "__main__":
    sys.exit(main())
