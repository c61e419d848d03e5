"""The ``sagaline`` command: run processes, manage topics, start and signal workflows."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import ConfigurationError, SagalineError
from orchestrator.protocol.records import IfClosed, IfRunning

if TYPE_CHECKING:  # the client (and Kafka) load only for the commands that use it
    from orchestrator.client import WorkflowClient, WorkflowResult
    from orchestrator.settings import KafkaSettings
    from orchestrator.workflow import WorkflowRegistry

log = logging.getLogger("sagaline")
EXIT_CONFIG = 2
EXIT_FATAL = 3


def load_object(spec: str) -> Any:
    """Import ``module:attribute`` (the current directory is importable, as for uvicorn)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(f"{spec!r} must look like 'package.module:attribute'")
    module = load_module(module_name)
    try:
        return getattr(module, attribute)
    except AttributeError as exc:
        raise ConfigurationError(f"{module_name!r} has no attribute {attribute!r}") from exc


def load_module(name: str) -> Any:
    """Import module ``name`` (the current directory is importable)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {name!r}: {exc}") from exc


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        log.info("signal=%d stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def _run_orchestrator(args: argparse.Namespace) -> int:
    from orchestrator import metrics
    from orchestrator.runtime import Orchestrator
    from orchestrator.settings import OrchestratorSettings
    from orchestrator.workflow import WorkflowRegistry

    registry = load_object(args.app)
    if not isinstance(registry, WorkflowRegistry):
        raise ConfigurationError(
            f"{args.app} is a {type(registry).__name__}, not a WorkflowRegistry"
        )
    settings = OrchestratorSettings()
    log.info("settings %s", settings.redacted())
    port = metrics.serve(settings.metrics_port, settings.metrics_host)
    if port:
        log.info("metrics at http://%s:%d/metrics", settings.metrics_host, port)
    Orchestrator(settings, registry).run(_stop_on_signals())
    return 0


def _run_participants(args: argparse.Namespace) -> int:
    from orchestrator import metrics
    from orchestrator.settings import ParticipantSettings
    from participants import Participant
    from participants.runtime import run_participant

    hosted = [load_object(spec) for spec in args.participants]
    for spec, obj in zip(args.participants, hosted, strict=True):
        if not isinstance(obj, Participant):
            raise ConfigurationError(f"{spec} is a {type(obj).__name__}, not a Participant")
    settings = ParticipantSettings()
    log.info("settings %s", settings.redacted())
    port = metrics.serve(settings.metrics_port, settings.metrics_host)
    if port:
        log.info("metrics at http://%s:%d/metrics", settings.metrics_host, port)
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


def _create_topics(args: argparse.Namespace) -> int:
    from confluent_kafka.admin import AdminClient

    from orchestrator.admin import ensure_topics
    from orchestrator.settings import KafkaSettings

    settings = KafkaSettings()
    admin = AdminClient(settings.kafka_common())
    created = ensure_topics(
        admin,
        settings.topics,
        partitions=args.partitions,
        participants=[p for p in args.participants.split(",") if p],
        replication_factor=args.replication_factor,
    )
    print(f"created {len(created)} topic(s): {', '.join(created) or 'none needed'}")
    return 0


def _start(args: argparse.Namespace) -> int:
    if args.id == "":
        raise ConfigurationError("--id must not be empty (leave it out for a generated id)")
    value = _json_option(args.input, "--input")
    client = _client()
    if args.no_wait:
        if args.if_running or args.if_closed or args.request_id:
            raise ConfigurationError("--no-wait takes no --if-running, --if-closed or --request-id")
        wid = client.start(args.workflow_type, value, workflow_id=args.id)
        client.flush()
        print(wid)
        return 0
    try:
        started = client.start_workflow(
            args.workflow_type,
            value,
            workflow_id=args.id,
            if_running=IfRunning[args.if_running or "FAIL"],
            if_closed=IfClosed[args.if_closed or "REJECT"],
            request_id=args.request_id,
            timeout_s=args.timeout,
        )
    finally:
        client.close()
    print(
        json.dumps(
            {
                "workflow_id": started.workflow_id,
                "run_id": started.run_id,
                "created": started.created,
                "status": started.status.value,
            }
        )
    )
    return 0


def _query(args: argparse.Namespace) -> int:
    client = _client()
    try:
        answer = client.query(
            args.id, args.name, _json_option(args.value, "--value"), timeout_s=args.timeout
        )
    finally:
        client.close()
    print(json.dumps(answer))
    return 0


def _update(args: argparse.Namespace) -> int:
    client = _client()
    try:
        answer = client.update(
            args.id,
            args.name,
            _json_option(args.value, "--value"),
            update_id=args.update_id,
            timeout_s=args.timeout,
        )
    finally:
        client.close()
    print(json.dumps(answer))
    return 0


def _client() -> WorkflowClient:
    """The Kafka client the workflow commands share, from the SAGALINE_* settings."""
    from orchestrator.client import WorkflowClient
    from orchestrator.settings import KafkaSettings

    return WorkflowClient(KafkaSettings())


def _json_option(text: str, option: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"{option} is not JSON: {exc}") from exc


def _signal(args: argparse.Namespace) -> int:
    value = _json_option(args.value, "--value")
    start = None
    if args.start_type is not None:
        start = (args.start_type, _json_option(args.start_input, "--start-input"))
    elif args.start_input != "null":
        raise ConfigurationError("--start-input needs --start-type")
    client = _client()
    sid = client.signal(args.id, args.name, value, signal_id=args.signal_id, start=start)
    client.flush()
    print(sid)
    return 0


def _result(args: argparse.Namespace) -> int:
    client = _client()
    outcome = client.result(args.id, timeout_s=args.timeout)
    failure = outcome.failure
    print(
        json.dumps(
            {
                "workflow_id": args.id,
                "status": outcome.status.value,
                "result": outcome.value,
                "failure": None
                if failure is None
                else {"error_type": failure.error_type, "message": failure.message},
            }
        )
    )
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


def _cancel(args: argparse.Namespace) -> int:
    from orchestrator.protocol.records import WorkflowStatus

    client = _client()
    client.cancel(args.id, args.reason)
    client.flush()
    if args.wait <= 0:
        print(f"asked workflow {args.id} to cancel")
        return 0
    outcome = _closed_within(client, args.id, args.wait)
    if outcome is None:
        print(
            f"asked workflow {args.id} to cancel; it did not close within {args.wait:g} s "
            "(its compensations may still run; a cancel for a workflow that does not exist "
            "goes to the dead-letter topic as unknown-workflow)"
        )
        return 0
    if outcome.status is WorkflowStatus.CANCELLED:
        print(f"workflow {args.id} cancelled")
    else:
        print(
            f"workflow {args.id} had already closed {outcome.status.value}: the cancel "
            "changed nothing"
        )
    return 0


def _terminate(args: argparse.Namespace) -> int:
    client = _client()
    client.terminate(args.id, args.reason)
    client.flush()
    if args.wait <= 0:
        print(f"asked to terminate workflow {args.id}")
        return 0
    outcome = _closed_within(client, args.id, args.wait)
    if outcome is None:
        print(f"asked to terminate workflow {args.id}; it did not close within {args.wait:g} s")
        return 0
    print(f"workflow {args.id} is {outcome.status.value}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from orchestrator.check import Finding, check_registry, format_report, registries_in
    from orchestrator.workflow import WorkflowRegistry

    findings: list[Finding] = []
    for spec in args.modules:
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
    print(format_report(findings))
    return 1 if findings else 0


def _promise(args: argparse.Namespace) -> int:
    client = _client()
    if args.action == "complete":
        client.complete_promise(args.id, _json_option(args.value, "--value"))
    else:
        if not args.error_type:
            raise ConfigurationError("fail needs --error-type")
        client.fail_promise(args.id, args.error_type, args.message)
    client.flush()
    print(f"sent: {args.action} {args.id}")
    return 0


def _resume(args: argparse.Namespace) -> int:
    if bool(args.id) == bool(args.all_stuck):
        raise ConfigurationError("give either a workflow id or --all-stuck")
    client = _client()
    if args.all_stuck:
        partitions = client.resume_all_stuck()
        client.flush()
        print(f"asked the orchestrators to resume every stuck workflow ({partitions} partitions)")
    else:
        client.resume(args.id)
        client.flush()
        print(f"asked the orchestrators to resume {args.id}")
    return 0


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


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _kafka_settings() -> KafkaSettings:
    from orchestrator.settings import KafkaSettings

    try:
        return KafkaSettings()
    except ValueError as exc:  # pydantic's ValidationError: a SAGALINE_* variable is invalid
        raise ConfigurationError(str(exc)) from exc


def _replay(args: argparse.Namespace) -> int:
    from orchestrator import gate

    registry = _workflow_registry(args.app)
    progress = gate.Progress(_to_stderr)
    try:
        if args.topic:
            return gate.replay_topic(
                registry,
                _kafka_settings(),
                sys.stdout,
                include_closed=args.all,
                max_lines=args.max_lines,
                progress=progress,
                timeout_s=args.timeout,
            )
        if args.all:
            raise ConfigurationError(
                "--all applies to --topic: a file is replayed whole (export it with --all)"
            )
        paths = [Path(args.file)] if args.file else gate.avro_files(Path(args.dir))
        return gate.replay_files(
            registry, paths, sys.stdout, max_lines=args.max_lines, progress=progress
        )
    except SagalineError:
        raise
    except Exception:
        # A pipeline gating on this reads exit 1 as "diverges": a crash must not say that.
        log.exception("replay failed")
        return EXIT_FATAL


def _export(args: argparse.Namespace) -> int:
    from orchestrator import gate

    settings = _kafka_settings()
    try:
        written, left_out = gate.export_history(
            settings,
            Path(args.out),
            include_closed=args.all,
            limit=args.limit,
            workflow_ids=args.workflow_id,
            progress=gate.Progress(_to_stderr),
            timeout_s=args.timeout,
        )
    except SagalineError:
        raise
    except Exception:
        # Exit 1 says "some were left out": a crash (Kafka failing mid-read, a record the
        # Avro writer rejects) must not say that.
        log.exception("export failed")
        return EXIT_FATAL
    for verdict in left_out:
        _to_stderr(f"left out: {verdict.line()}")
    dropped = f"; {len(left_out)} left out (cannot decode)" if left_out else ""
    print(f"exported {written} workflow(s) to {args.out}{dropped}")
    return 1 if left_out else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sagaline``."""
    parser = argparse.ArgumentParser(
        prog="sagaline",
        description="Durable workflows on Apache Kafka. Settings come from "
        "SAGALINE_* environment variables.",
    )
    parser.add_argument("--log-level", default=os.environ.get("SAGALINE_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    orch = sub.add_parser("orchestrator", help="run an orchestrator")
    orch.add_argument("app", help="module:registry, e.g. examples.order_saga.workflows:registry")
    orch.set_defaults(func=_run_orchestrator)

    part = sub.add_parser("participant", help="run participant services")
    part.add_argument(
        "participants",
        nargs="+",
        help="module:participant, e.g. examples.order_saga.services:payment",
    )
    part.set_defaults(func=_run_participants)

    topics = sub.add_parser("topics", help="manage topics")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True)
    create = topics_sub.add_parser("create", help="create missing topics")
    create.add_argument("--partitions", type=int, default=4)
    create.add_argument(
        "--participants", default="", help="comma-separated participant names needing a tasks topic"
    )
    create.add_argument("--replication-factor", type=int, default=1)
    create.set_defaults(func=_create_topics)

    start = sub.add_parser(
        "start",
        help="start a workflow and print its run (JSON)",
        description="Start a workflow and wait for the orchestrator's answer: the run id and "
        "whether this start created it. --if-running and --if-closed decide what happens "
        "when the id already has a run; sending again with the same --request-id is safe. "
        f"Exits {EXIT_FATAL} if the policy refuses or no answer comes within --timeout.",
    )
    start.add_argument("workflow_type")
    start.add_argument("--input", default="null", help="JSON input")
    start.add_argument("--id", default=None, help="workflow id (default: a new UUID)")
    start.add_argument(
        "--if-running",
        choices=[p.value for p in IfRunning],
        default=None,
        help="when the id has an open run (default FAIL)",
    )
    start.add_argument(
        "--if-closed",
        choices=[p.value for p in IfClosed],
        default=None,
        help="when the id's last run has closed (default REJECT)",
    )
    start.add_argument("--request-id", default=None, help="dedupe id (default: a new UUID)")
    start.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    start.add_argument(
        "--no-wait",
        action="store_true",
        help="send the start and print the workflow id without waiting (an id that has a "
        "run is then left as it is)",
    )
    start.set_defaults(func=_start)

    query = sub.add_parser(
        "query",
        help="ask a running workflow's query handler (prints its JSON answer)",
        description="Ask the query handler NAME (ctx.on_query) of an open workflow; the "
        "orchestrator that owns it answers from its current state and records nothing. "
        f"Exits {EXIT_FATAL} on a failure or if no answer comes within --timeout.",
    )
    query.add_argument("id", help="the workflow id")
    query.add_argument("name", help="the query's name")
    query.add_argument("--value", default="null", help="JSON argument (default null)")
    query.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    query.set_defaults(func=_query)

    upd = sub.add_parser(
        "update",
        help="apply an update to a running workflow (prints its JSON answer)",
        description="Apply the update NAME (ctx.on_update) to a running workflow: its "
        "validator runs first (a rejection records nothing), then the update is recorded "
        "and its handler's answer printed once committed. Sending again with the same "
        "--update-id applies nothing more.",
    )
    upd.add_argument("id", help="the workflow id")
    upd.add_argument("name", help="the update's name")
    upd.add_argument("--value", default="null", help="JSON argument (default null)")
    upd.add_argument("--update-id", default=None, help="dedupe id (default: a new UUID)")
    upd.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    upd.set_defaults(func=_update)

    sig = sub.add_parser(
        "signal",
        help="send a signal to a workflow (prints its signal id)",
        description="Send the signal NAME with a JSON value to a workflow; the workflow "
        "takes it with ctx.wait_signal(NAME). Signals sent before the wait are kept in "
        "order; sending again with the same --signal-id is ignored. With --start-type, a "
        "workflow that does not exist is started first (signal-with-start).",
    )
    sig.add_argument("id", help="the workflow id")
    sig.add_argument("name", help="the signal's name")
    sig.add_argument("--value", default="null", help="JSON value (default null)")
    sig.add_argument("--signal-id", default=None, help="dedupe id (default: a new UUID)")
    sig.add_argument("--start-type", default=None, help="signal-with-start: workflow type")
    sig.add_argument("--start-input", default="null", help="signal-with-start: JSON input")
    sig.set_defaults(func=_signal)

    can = sub.add_parser(
        "cancel",
        help="cancel a running workflow (its compensations run)",
        description="Ask a running workflow to cancel: its code sees WorkflowCancelledError "
        "at the await it is blocked on, Saga blocks compensate, and it ends CANCELLED. Waits "
        "up to --wait seconds to report how it ended (a closed workflow is left as it is).",
    )
    can.add_argument("id", help="the workflow id")
    can.add_argument("--reason", default="", help="why (kept in its record)")
    can.add_argument("--wait", type=float, default=30.0, help="seconds to wait (0: do not)")
    can.set_defaults(func=_cancel)

    term = sub.add_parser(
        "terminate",
        help="end a workflow now as TERMINATED (no compensations)",
        description="End a workflow now as TERMINATED: its code does not run again, so no "
        "compensation runs (use cancel for that); its children follow their parent close "
        "policy. A closed workflow is left as it is.",
    )
    term.add_argument("id", help="the workflow id")
    term.add_argument("--reason", default="", help="why (kept in its record)")
    term.add_argument("--wait", type=float, default=30.0, help="seconds to wait (0: do not)")
    term.set_defaults(func=_terminate)

    chk = sub.add_parser(
        "check",
        help="flag non-deterministic calls in workflow code (exit 1 if any)",
        description="Statically check the workflows of each MODULE (package.module, every "
        "WorkflowRegistry it defines, or package.module:registry) for calls that make a "
        "replay diverge: the clock, random numbers, uuids, I/O, threads, asyncio. Prints "
        "file:line:column, the call and the ctx method to use instead; exits 1 if it finds "
        "any. Exempt a line with '# sagaline: allow'.",
    )
    chk.add_argument("modules", nargs="+", metavar="MODULE")
    chk.set_defaults(func=_check)

    res = sub.add_parser(
        "result",
        help="wait for a workflow to close and print how it ended (JSON)",
        description="Wait until the workflow is closed and print its status, result and "
        "failure as JSON. Reads only the history partition of the id, from its end. Exits "
        f"{EXIT_FATAL} if it does not close within --timeout.",
    )
    res.add_argument("id", help="the workflow id")
    res.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    res.set_defaults(func=_result)

    prom = sub.add_parser(
        "promise",
        help="complete or fail a workflow's promise by its id",
        description="Complete (with a JSON value) or fail (with an error type and message) "
        "the promise a workflow made with ctx.promise and handed out by its id "
        "('<workflow id>/<run id>/p<step>'). A promise completes once.",
    )
    prom.add_argument("action", choices=("complete", "fail"))
    prom.add_argument("id", help="the promise id")
    prom.add_argument("--value", default="null", help="complete: JSON value")
    prom.add_argument("--error-type", default="", help="fail: the error type")
    prom.add_argument("--message", default="", help="fail: the message")
    prom.set_defaults(func=_promise)

    resume = sub.add_parser(
        "resume",
        help="re-drive a STUCK workflow (or all of them) with the code deployed now",
        description="Re-drive a STUCK workflow with the code deployed now: its code runs "
        "again and the inputs held while it was parked are applied in order. Workflows "
        "that are not stuck are left alone. Orchestrators also do this after every restore.",
    )
    resume.add_argument("id", nargs="?", help="the workflow id")
    resume.add_argument(
        "--all-stuck", action="store_true", help="every stuck workflow, in every partition"
    )
    resume.set_defaults(func=_resume)

    rep = sub.add_parser(
        "replay",
        help="replay recorded workflows against this code (exit 1 if any would diverge)",
        description="Run each recorded workflow's code over its history, as an orchestrator "
        "does after every input, and report every workflow that would diverge (naming the "
        "first differing command) or that the code cannot run. Sources: the live history "
        "topic (its open workflows, or all with --all), a file written by 'sagaline "
        "export', or every *.avro file of a directory. Exits 0 if all replay, 1 if any "
        f"diverges or is broken, {EXIT_CONFIG} on a configuration error (bad module, "
        f"unreadable file, Kafka out of reach), {EXIT_FATAL} if the replay itself fails. "
        "Progress goes to stderr.",
    )
    rep.add_argument(
        "app", metavar="MODULE[:registry]", help="the workflows (a module's one registry)"
    )
    source = rep.add_mutually_exclusive_group(required=True)
    source.add_argument("--topic", action="store_true", help="the history topic (SAGALINE_*)")
    source.add_argument("--file", help="a file written by sagaline export")
    source.add_argument("--dir", help="a directory of such files (*.avro, in name order)")
    rep.add_argument(
        "--all", action="store_true", help="--topic: closed workflows too (default: open ones)"
    )
    rep.add_argument(
        "--max-lines", type=int, default=20, help="workflows listed per message (default 20)"
    )
    rep.add_argument("--timeout", type=float, default=30.0, help="Kafka timeout (default 30 s)")
    rep.set_defaults(func=_replay)

    exp = sub.add_parser(
        "export",
        help="write workflows of the history topic to an Avro file (for sagaline replay)",
        description="Write the latest record of workflows on the history topic to an Avro "
        "Object Container File of io.sagaline.WorkflowRecord (any Avro tool reads it; "
        "'sagaline replay --file' replays it): the open workflows, every one with --all, "
        "or exactly the --workflow-id ones; sorted by id, at most --limit. Exits 0 if all "
        "were written, 1 if some could not be decoded (listed on stderr, left out), "
        f"{EXIT_CONFIG} on a configuration error (Kafka out of reach, an unknown "
        f"--workflow-id, a file that cannot be written), {EXIT_FATAL} if the export itself "
        "fails.",
    )
    exp.add_argument("--out", required=True, help="the file to write (replaced whole)")
    exp.add_argument("--all", action="store_true", help="closed workflows too")
    exp.add_argument("--limit", type=int, default=None, help="at most this many workflows")
    exp.add_argument(
        "--workflow-id",
        nargs="+",
        action="extend",
        default=[],
        metavar="ID",
        help="only these workflows, whatever their status",
    )
    exp.add_argument("--timeout", type=float, default=30.0, help="Kafka timeout (default 30 s)")
    exp.set_defaults(func=_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sagaline`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        result: int = args.func(args)
        return result
    except ConfigurationError as exc:
        log.error("configuration error: %s", exc)
        return EXIT_CONFIG
    except SagalineError as exc:
        log.error("fatal: %s", exc)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
