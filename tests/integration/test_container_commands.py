"""Every sagaline service of infra/docker-compose.yml, run as a plain process against the
local stack: there is no container engine here, so this is how the compose file's commands,
environments and health checks are exercised for real.

Each process gets its service's exact ``command`` and ``environment`` and the image's
``ENV``, in a working directory laid out as the Dockerfile lays out the image's (what its
build-context ``COPY`` instructions put under ``WORKDIR``), with only the sagaline packages
importable besides it, as from the image's venv. Only what cannot be the same
outside the compose network is replaced: the Kafka and PostgreSQL addresses (the local
stack's), the topic prefix (one per test) and the ports (free ones). topics-init must exit
0 and create the topics; every other service must serve /metrics, pass its own compose
health check, carry an order saga through together, and exit 0 on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from examples.order_saga.harness import free_port, make_orders
from orchestrator.client import WorkflowClient
from orchestrator.protocol.records import WorkflowStatus
from orchestrator.protocol.topics import Topics
from orchestrator.settings import KafkaSettings
from tests.unit.test_containers import (
    ROOT,
    compose_env,
    compose_services,
    dockerfile_stages,
    is_sagaline,
    option_value,
)

pytestmark = pytest.mark.integration

READY_S = 90.0  # start-up includes group joins and restores on a loaded 2-core machine
TOPICS_S = 120.0
SAGA_S = 120.0
STOP_S = 30.0
# Variables whose compose value only makes sense inside the compose network.
PORT_VARIABLES = ("SAGALINE_METRICS_PORT", "SAGALINE_UI_PORT")


@dataclass
class ServiceProcess:
    """One compose service run as a process, its output in a log file."""

    name: str
    command: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start ``sagaline COMMAND`` as the image's entrypoint would."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", *self.command],
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def returncode(self) -> int | None:
        """Its exit code, or None while it runs."""
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.poll()

    def stop(self) -> int:
        """SIGTERM, as `docker compose stop` sends; the exit code, or a failure if it does
        not exit within STOP_S."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"{self.name} did not exit within {STOP_S} s of SIGTERM\n{self.tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL if it still runs (cleanup after a failure)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, lines: int = 40) -> str:
        """The end of its log, for failure messages."""
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class Deployment:
    """The compose file's sagaline services as processes of one test."""

    processes: list[ServiceProcess] = field(default_factory=list)

    def kill_all(self) -> None:
        """Stop whatever still runs."""
        for process in self.processes:
            process.kill()


def image_workdir(into: Path) -> dict[str, str]:
    """Lay out the final image's working directory in ``into`` from the Dockerfile (its
    COPY instructions from the build context) and return the image's ENV, with paths under
    the working directory moved to ``into`` and PATH left to the test's interpreter."""
    final = dockerfile_stages()[-1]
    (workdir,) = final.all("WORKDIR")
    for copy in final.all("COPY"):
        if copy.startswith("--from="):
            continue  # the venv: here, the interpreter running the tests
        *sources, destination = [w for w in shlex.split(copy) if not w.startswith("--")]
        target = into / Path(destination).relative_to(workdir)
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(origin, target, ignore=ignore, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)
    return {
        name: value.replace(workdir, str(into))
        for name, value in final.env().items()
        if name != "PATH"
    }


def installed_packages(into: Path) -> Path:
    """A directory holding just the sagaline packages (links to this checkout's), as the
    image's venv holds them: the repository root, with its examples, is not importable."""
    into.mkdir()
    for package in ("orchestrator", "participants"):
        (into / package).symlink_to(ROOT / package, target_is_directory=True)
    return into


def local_environment(
    service: str,
    compose: Mapping[str, str],
    *,
    stack: Mapping[str, str],
    prefix: str,
    dsn: str,
    hosts: set[str],
) -> dict[str, str]:
    """A service's compose environment with the compose network's addresses replaced by
    the local stack's, its own topic prefix and free ports; fails if any other value
    still names a compose host (it would not resolve here, and the test would not say)."""
    env = dict(compose)
    assert "SAGALINE_KAFKA_BOOTSTRAP" in env, f"{service}: no SAGALINE_KAFKA_BOOTSTRAP"
    env["SAGALINE_KAFKA_BOOTSTRAP"] = stack["SAGALINE_KAFKA_BOOTSTRAP"]
    env["SAGALINE_TOPIC_PREFIX"] = prefix
    for name in env:
        if name.endswith("_DSN"):
            env[name] = dsn
    for name in PORT_VARIABLES:
        if name in env:
            env[name] = str(free_port())
    for name, value in env.items():
        for host in hosts:
            assert not re.search(rf"(^|[/@,]){re.escape(host)}:\d", value), (
                f"{service}: {name} still names the compose host {host!r}"
            )
    return env


def start_order(services: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The sagaline services in an order that respects their depends_on among themselves."""
    ours = {name for name, s in services.items() if is_sagaline(s)}
    done: list[str] = []
    while len(done) < len(ours):
        ready = [
            name
            for name in sorted(ours - set(done))
            if set(services[name].get("depends_on", {})) & ours <= set(done)
        ]
        assert ready, f"depends_on has a cycle among {sorted(ours - set(done))}"
        done.extend(ready)
    return done


def http_get(url: str) -> tuple[int, bytes]:
    """Status and body of a GET (an HTTP error status is returned, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_serving(process: ServiceProcess, url: str) -> None:
    """Poll ``url`` until it answers 200; fail if the process exits or READY_S passes."""
    end = time.monotonic() + READY_S
    last = "no answer yet"
    while time.monotonic() < end:
        code = process.returncode()
        if code is not None:
            raise AssertionError(f"{process.name} exited {code}\n{process.tail()}")
        try:
            status, _ = http_get(url)
        except OSError as exc:
            last = str(exc)
        else:
            if status == 200:
                return
            last = f"HTTP {status}"
        time.sleep(0.2)  # polling interval of the deadline loop
    raise AssertionError(f"{process.name}: {url} not up within {READY_S} s ({last})")


def run_healthcheck(process: ServiceProcess, test: list[str]) -> None:
    """Run a compose health check's command in the service's environment; it must exit 0."""
    assert test[0] == "CMD", f"{process.name}: an exec-form check is expected: {test}"
    argv = [sys.executable if word == "python" else word for word in test[1:]]
    done = subprocess.run(
        argv, env=process.env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, (
        f"{process.name}: its compose health check exited {done.returncode}: {done.stderr}"
    )


@pytest.fixture
def prefix(admin: AdminClient) -> Iterator[str]:
    """A topic prefix no topic has yet (topics-init must create them), cleaned up after."""
    name = f"c{uuid.uuid4().hex[:10]}"
    yield name
    try:
        ours = [t for t in admin.list_topics(timeout=10).topics if t.startswith(name + ".")]
        if ours:
            for future in admin.delete_topics(ours, operation_timeout=30).values():
                future.result(60)
    except Exception as exc:  # cleanup only: the test's verdict stands
        warnings.warn(f"deleting the topics of {name} failed: {exc}", stacklevel=1)


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    """The processes a test starts; whatever still runs afterwards is killed."""
    running = Deployment()
    yield running
    running.kill_all()


@dataclass(frozen=True)
class LocalImage:
    """The image, as far as plain processes can have it: its working directory laid out
    from the Dockerfile, and the environment every container starts from."""

    workdir: Path
    env: dict[str, str]


@pytest.fixture
def image(tmp_path: Path) -> LocalImage:
    """The final image's working directory and environment in ``tmp_path``."""
    app = tmp_path / "app"
    image_env = image_workdir(app)
    # Only the image's variables and then the service's own: none of the test runner's.
    base = {
        k: v for k, v in os.environ.items() if not k.startswith("SAGALINE_") and k != "PYTHONPATH"
    }
    base["PYTHONPATH"] = str(installed_packages(tmp_path / "site"))
    return LocalImage(app, {**base, **image_env})


def service_process(
    name: str,
    services: Mapping[str, Mapping[str, Any]],
    image: LocalImage,
    *,
    stack: Mapping[str, str],
    prefix: str,
    dsn: str,
    logs: Path,
) -> ServiceProcess:
    """Compose service ``name`` as a process of ``image``, on the local stack."""
    env = local_environment(
        name,
        compose_env(services[name]),
        stack=stack,
        prefix=prefix,
        dsn=dsn,
        hosts=set(services),
    )
    command = [str(word) for word in services[name]["command"]]
    return ServiceProcess(name, command, {**image.env, **env}, image.workdir, logs / f"{name}.log")


def test_every_compose_command_comes_up_and_stops_cleanly(
    stack: dict[str, str],
    postgres_dsn: str,
    admin: AdminClient,
    prefix: str,
    deployment: Deployment,
    image: LocalImage,
    tmp_path: Path,
) -> None:
    services = compose_services()
    processes = {
        name: service_process(
            name, services, image, stack=stack, prefix=prefix, dsn=postgres_dsn, logs=tmp_path
        )
        for name in start_order(services)
    }
    one_shot = [p for name, p in processes.items() if "healthcheck" not in services[name]]
    long_running = [p for name, p in processes.items() if "healthcheck" in services[name]]
    assert [p.command[0] for p in one_shot] == ["topics"]
    deployment.processes.extend(processes.values())

    # topics-init first (everything else depends on it completing), as compose runs it.
    (init,) = one_shot
    init.start()
    assert init.proc is not None
    try:
        code = init.proc.wait(TOPICS_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{init.name} still runs after {TOPICS_S} s\n{init.tail()}") from None
    assert code == 0, f"{init.name} exited {code}\n{init.tail()}"
    topics = Topics(prefix)
    wanted = {topics.inbox, topics.history, topics.dlq, topics.replies} | {
        topics.tasks(p) for p in option_value(init.command, "--participants").split(",")
    }
    existing = set(admin.list_topics(timeout=30).topics)
    assert wanted <= existing, f"{init.name} did not create {sorted(wanted - existing)}"

    for process in long_running:
        process.start()
    for process in long_running:
        port = process.env["SAGALINE_METRICS_PORT"]
        wait_serving(process, f"http://127.0.0.1:{port}/metrics")
        run_healthcheck(process, services[process.name]["healthcheck"]["test"])
    projector = next(p for p in long_running if p.command[0] == "projector")
    ui = f"http://127.0.0.1:{projector.env['SAGALINE_UI_PORT']}"
    wait_serving(projector, f"{ui}/")
    wait_serving(projector, f"{ui}/healthz")

    # Together they are the order saga's deployment: one order goes all the way through,
    # and the projector shows it in the UI's API.
    order = make_orders(1, declined_every=0, run_id=prefix)[0]
    client = WorkflowClient(
        KafkaSettings(kafka_bootstrap=stack["SAGALINE_KAFKA_BOOTSTRAP"], topic_prefix=prefix)
    )
    try:
        client.start("order.process", order, workflow_id=order["order_id"])
        client.flush()
        outcome = client.result(order["order_id"], timeout_s=SAGA_S)
    finally:
        client.close()
    assert outcome.status is WorkflowStatus.COMPLETED, outcome
    shown = wait_ui_status(projector, ui, order["order_id"], WorkflowStatus.COMPLETED.value)
    assert shown["workflow"]["workflow_type"] == "order.process"

    for process in reversed(long_running):
        code = process.stop()
        assert code == 0, f"{process.name} exited {code} on SIGTERM\n{process.tail()}"


def wait_ui_status(
    projector: ServiceProcess, ui: str, workflow_id: str, status: str
) -> dict[str, Any]:
    """Poll the UI's API until it shows ``workflow_id`` with ``status``; its answer."""
    url = f"{ui}/api/workflows/{urllib.parse.quote(workflow_id, safe='')}"
    end = time.monotonic() + READY_S
    last: Any = None
    while time.monotonic() < end:
        if projector.returncode() is not None:
            raise AssertionError(f"the projector exited\n{projector.tail()}")
        code, body = http_get(url)
        last = (code, body[:300])
        if code == 200:
            answer: dict[str, Any] = json.loads(body)
            if answer["workflow"]["status"] == status:
                return answer
        time.sleep(0.2)  # polling interval of the deadline loop
    raise AssertionError(f"the UI did not show {workflow_id} {status} in {READY_S} s: {last}")


def test_every_compose_command_exits_2_on_a_bad_setting(
    stack: dict[str, str],
    postgres_dsn: str,
    prefix: str,
    deployment: Deployment,
    image: LocalImage,
    tmp_path: Path,
) -> None:
    """A container that cannot work as configured stops at once with exit 2 and a line
    naming the setting, rather than crash-looping on a traceback."""
    services = compose_services()
    roles: dict[str, str] = {}
    for name in start_order(services):
        role = str(services[name]["command"][0])
        if role in roles:
            continue  # one service per role is enough
        roles[role] = name
        process = service_process(
            name, services, image, stack=stack, prefix=prefix, dsn=postgres_dsn, logs=tmp_path
        )
        # Every role reads SAGALINE_KAFKA_EXTRA (KafkaSettings), as a JSON object.
        process.env["SAGALINE_KAFKA_EXTRA"] = "{not json"
        deployment.processes.append(process)
        process.start()
        assert process.proc is not None
        try:
            code = process.proc.wait(READY_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{name} still runs with a bad setting\n{process.tail()}"
            ) from None
        assert code == 2, f"{name} exited {code}, not 2\n{process.tail()}"
        assert "kafka_extra" in process.tail().lower(), process.tail()
    assert set(roles) == {"topics", "orchestrator", "participant", "projector"}
