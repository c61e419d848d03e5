"""The container files, checked without a container engine: the Dockerfile, the compose file,
its Prometheus scrape config and the Kubernetes manifests are parsed, and every sagaline
command, environment variable, port, probe and health check in them is held against the
``sagaline`` CLI and the settings models of ``orchestrator/settings.py``.

``tests/integration/test_container_commands.py`` runs each compose command as a process.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from orchestrator.settings import (
    KafkaSettings,
    OrchestratorSettings,
    ParticipantSettings,
    ProjectorSettings,
)
from orchestrator.workflow import WorkflowRegistry
from participants import Participant

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = INFRA / "docker-compose.yml"
K8S = INFRA / "k8s"
PREFIX = "SAGALINE_"

# What each sagaline subcommand reads its settings with.
ROLE_SETTINGS: dict[str, type[BaseSettings]] = {
    "orchestrator": OrchestratorSettings,
    "participant": ParticipantSettings,
    "projector": ProjectorSettings,
    "topics": KafkaSettings,
}
# Roles that keep running (and so need health checks and probes); `topics` exits.
LONG_RUNNING = frozenset({"orchestrator", "participant", "projector"})
# SAGALINE_* variables read outside the settings models; each is checked to be read
# somewhere in the code, so this list cannot hide a typo.
READ_ELSEWHERE = frozenset({"SAGALINE_LOG_LEVEL", "SAGALINE_SCHEMA_DIR"})
# An image reference pinned to an exact release: name:MAJOR.MINOR.PATCH[-variant].
PINNED = re.compile(r"^[a-z0-9./_-]+:v?\d+\.\d+\.\d+(-[a-z0-9.-]+)?(@sha256:[0-9a-f]{64})?$")
# PostgreSQL numbers its releases MAJOR.MINOR: 16.6 is one exact release.
PINNED_POSTGRES = re.compile(r"^postgres:\d+\.\d+(-[a-z0-9.-]+)?(@sha256:[0-9a-f]{64})?$")


def pinned(image: str) -> bool:
    """Whether an image reference names one exact release (never ``latest``)."""
    return bool(PINNED.match(image) or PINNED_POSTGRES.match(image))


# --- parsing helpers (tests/integration/test_container_commands.py uses them too) -------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword (upper case) and its argument text."""

    keyword: str
    text: str


@dataclass(frozen=True)
class Stage:
    """One build stage: its base image, its name (``AS``), and its instructions."""

    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[str]:
        """The argument text of every ``keyword`` instruction of the stage, in order."""
        return [i.text for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """The variables its ENV instructions set (``ENV A=1 B=2`` form)."""
        found: dict[str, str] = {}
        for text in self.all("ENV"):
            for word in shlex.split(text):
                name, sep, value = word.partition("=")
                assert sep, f"ENV {text!r}: use the NAME=value form"
                found[name] = value
        return found


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    """The stages of a Dockerfile, continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, text = line.partition(" ")
        instruction = Instruction(keyword.upper(), text.strip())
        if instruction.keyword == "FROM":
            words = instruction.text.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, ()))
        else:
            assert stages, f"{line!r} comes before any FROM"
            last = stages[-1]
            stages[-1] = Stage(last.base, last.name, (*last.instructions, instruction))
    return stages


def load_yaml(path: Path) -> Any:
    """One YAML document (anchors and merge keys resolved)."""
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    """Every YAML document of a file, empty ones left out."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def compose_services() -> dict[str, dict[str, Any]]:
    """The services of infra/docker-compose.yml."""
    services: dict[str, dict[str, Any]] = load_yaml(COMPOSE)["services"]
    return services


def is_sagaline(service: Mapping[str, Any]) -> bool:
    """True for a compose service that runs the image this repository's Dockerfile builds."""
    return "build" in service


def compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    """A compose service's environment as a dict of strings (both compose forms)."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def image_env() -> dict[str, str]:
    """The SAGALINE_* variables the final image sets, which every container inherits."""
    return {k: v for k, v in dockerfile_stages()[-1].env().items() if k.startswith(PREFIX)}


def settings_field(model: type[BaseSettings], variable: str) -> str | None:
    """The field of ``model`` that environment variable ``variable`` sets, if any."""
    assert model.model_config.get("env_prefix") == PREFIX
    name = variable[len(PREFIX) :].lower() if variable.startswith(PREFIX) else ""
    return name if name in model.model_fields else None


def subcommand_path(args: Sequence[str]) -> list[str]:
    """The subcommand words at the start of a sagaline command line: the words before the
    first option or ``module:attribute`` argument (``topics create``, ``orchestrator``)."""
    path: list[str] = []
    for word in args:
        if word.startswith("-") or ":" in word:
            break
        path.append(word)
    return path


@functools.cache
def sagaline_help(path: tuple[str, ...]) -> str:
    """``sagaline PATH... --help``, run as the image's entrypoint runs it; fails the test
    unless it exits 0, which the CLI does only for a subcommand it has."""
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *path, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (
        f"`sagaline {' '.join(path)} --help` exited {done.returncode}: not a sagaline "
        f"command\n{done.stdout}{done.stderr}"
    )
    return done.stdout


def check_command(args: Sequence[str]) -> str:
    """Check a sagaline command line: a real subcommand, options it has, and
    ``module:attribute`` arguments that load what the role runs. Returns the role."""
    path = subcommand_path(args)
    assert path, f"{args!r} names no subcommand"
    role = path[0]
    assert role in ROLE_SETTINGS, f"{args!r}: unexpected role {role!r}"
    text = sagaline_help(tuple(path))
    rest = list(args[len(path) :])
    options = [word.split("=", 1)[0] for word in rest if word.startswith("--")]
    for option in options:
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), (
            f"`sagaline {' '.join(path)}` has no option {option} (its --help):\n{text}"
        )
    specs = [word for word in rest if ":" in word and not word.startswith("-")]
    wanted = {"orchestrator": WorkflowRegistry, "participant": Participant}.get(role)
    if wanted is not None:
        assert specs, f"{args!r}: the {role} needs module:attribute arguments"
    for spec in specs:
        found = load_spec(spec)
        assert wanted is not None and isinstance(found, wanted), (
            f"{spec} is a {type(found).__name__}, not a {wanted}"
        )
    return role


def load_spec(spec: str) -> Any:
    """What ``module:attribute`` names, imported as the CLI imports it."""
    from orchestrator.cli import load_object  # noqa: PLC0415 (the CLI module is heavy)

    return load_object(spec)


def option_value(args: Sequence[str], option: str) -> str:
    """The value given to ``option`` (``--opt value`` or ``--opt=value``) in ``args``."""
    for index, word in enumerate(args):
        if word == option:
            return args[index + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{option} is not given in {list(args)!r}")


def validated(
    monkeypatch: pytest.MonkeyPatch, role: str, env: Mapping[str, str], where: str
) -> BaseSettings:
    """The role's settings read from exactly ``env`` (plus the image's variables): every
    SAGALINE_* name in ``env`` must be a field of the role's model or a variable the code
    reads elsewhere, and every value must pass the model's validation."""
    model = ROLE_SETTINGS[role]
    for name in env:
        if name.startswith(PREFIX):
            assert settings_field(model, name) or name in READ_ELSEWHERE, (
                f"{where}: {name} is not a setting of {model.__name__} (a typo is silently "
                "ignored by the process)"
            )
    for name in list(os.environ):
        if name.upper().startswith(PREFIX):
            monkeypatch.delenv(name)
    for name, value in {**image_env(), **env}.items():
        if name.startswith(PREFIX):
            monkeypatch.setenv(name, value)
    try:
        return model()
    except ValidationError as exc:
        raise AssertionError(f"{where}: invalid {model.__name__}: {exc}") from exc


def served_ports(settings: BaseSettings) -> dict[str, int]:
    """The ports a role's process listens on: ``metrics`` and, for the projector, ``ui``."""
    ports = {"metrics": int(getattr(settings, "metrics_port", 0))}
    if isinstance(settings, ProjectorSettings):
        ports["ui"] = settings.ui_port
    return {name: port for name, port in ports.items() if port}


# --- Dockerfile -------------------------------------------------------------------------


def test_dockerfile_has_a_builder_and_a_final_stage_on_pinned_bases() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a multi-stage build: a builder and a final stage"
    assert stages[0].name == "builder"
    for stage in stages:
        assert PINNED.match(stage.base), f"FROM {stage.base}: pin an exact version tag"
        assert not stage.base.endswith(":latest")
    # The venv copied from the builder runs on the final stage's interpreter.
    assert len({stage.base for stage in stages}) == 1, "builder and final on one base"
    python = re.search(r"python:(\d+)\.(\d+)\.\d+", stages[-1].base)
    assert python, stages[-1].base
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(p) for p in required.removeprefix(">=").split("."))
    assert (int(python[1]), int(python[2])) >= minimum, f"{stages[-1].base} vs {required}"


def test_final_stage_runs_sagaline_as_a_numeric_non_root_user_without_build_tools() -> None:
    final = dockerfile_stages()[-1]
    users = final.all("USER")
    assert users, "the final stage must switch to a non-root user"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER {users[-1]}: a numeric, non-zero UID"
    assert not gid or (gid.isdigit() and int(gid) > 0), f"USER {users[-1]}"
    # Nothing runs after USER that would need root, and nothing installs packages.
    after_user = final.instructions[
        max(i for i, ins in enumerate(final.instructions) if ins.keyword == "USER") :
    ]
    assert not [i for i in after_user if i.keyword == "RUN"]
    for run in final.all("RUN"):
        assert not re.search(r"\b(apt-get|apt|apk|gcc|make|build-essential)\b", run), run
    assert final.all("ENTRYPOINT") == ['["sagaline"]']
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sagaline"] == "orchestrator.cli:main"
    # The final stage takes the venv from the builder, not a compiler with it.
    assert any(c.startswith("--from=builder ") for c in final.all("COPY"))


def test_image_environment_points_at_what_the_image_holds() -> None:
    final = dockerfile_stages()[-1]
    env = final.env()
    (workdir,) = final.all("WORKDIR")
    destinations = [shlex.split(c)[-1].rstrip("/") for c in final.all("COPY")]
    # The codec reads the Avro schemas from SAGALINE_SCHEMA_DIR: the wheel lacks them.
    schema_dir = env["SAGALINE_SCHEMA_DIR"]
    assert any(schema_dir.startswith(d + "/") for d in destinations), schema_dir
    assert (ROOT / Path(schema_dir).relative_to(workdir)).is_dir()
    assert env["PATH"].startswith("/opt/sagaline/bin:"), "the venv's sagaline comes first"
    # Containers must listen beyond their loopback.
    assert env["SAGALINE_METRICS_HOST"] == "0.0.0.0"
    assert env["SAGALINE_UI_HOST"] == "0.0.0.0"
    for name in image_env():
        assert name in READ_ELSEWHERE or any(
            settings_field(model, name) for model in ROLE_SETTINGS.values()
        ), f"ENV {name} is no sagaline setting"
    exposed = {int(p) for text in final.all("EXPOSE") for p in text.split()}
    defaults = {
        OrchestratorSettings.model_fields["metrics_port"].default,
        ParticipantSettings.model_fields["metrics_port"].default,
        ProjectorSettings.model_fields["metrics_port"].default,
        ProjectorSettings.model_fields["ui_port"].default,
    }
    assert exposed == defaults


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in dockerfile_stages():
        for copy in stage.all("COPY"):
            words = [w for w in shlex.split(copy) if not w.startswith("--")]
            if copy.startswith("--from="):
                continue
            for source in words[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
                assert in_build_context(source.rstrip("/"), ignore), (
                    f"COPY {source}: .dockerignore leaves it out of the build context"
                )


def in_build_context(path: str, patterns: Sequence[str]) -> bool:
    """Whether .dockerignore ``patterns`` keep ``path`` in the context (the last matching
    pattern wins; ``!`` re-includes)."""
    kept = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        bare = pattern.removeprefix("!").rstrip("/")
        if fnmatch.fnmatch(path, bare):
            kept = negated
    return kept


def test_the_wheel_carries_every_file_the_packages_need() -> None:
    """The image installs sagaline from a wheel, which holds only the package data that
    pyproject.toml declares: any other file of the packages (the UI's static pages) would
    be missing from the image."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared: dict[str, list[str]] = config["tool"]["setuptools"].get("package-data", {})
    missing = []
    for package in ("orchestrator", "participants"):
        for path in sorted((ROOT / package).rglob("*")):
            if path.is_dir() or "__pycache__" in path.parts or path.suffix in {".py", ".pyc"}:
                continue
            relative = path.relative_to(ROOT / package).as_posix()
            if not any(fnmatch.fnmatch(relative, p) for p in declared.get(package, [])):
                missing.append(f"{package}/{relative}")
    assert not missing, (
        f"not declared in pyproject.toml [tool.setuptools.package-data], so not in the "
        f"wheel the image installs: {missing}"
    )


# --- docker-compose ---------------------------------------------------------------------


def test_compose_runs_every_role_from_one_image() -> None:
    services = compose_services()
    ours = {name: s for name, s in services.items() if is_sagaline(s)}
    roles = {check_command(s["command"]) for s in ours.values()}
    assert roles == set(ROLE_SETTINGS), f"roles run: {roles}"
    orchestrators = [s for s in ours.values() if s["command"][0] == "orchestrator"]
    assert len(orchestrators) == 2
    assert len({(s["image"], str(s["build"])) for s in ours.values()}) == 1
    build = next(iter(ours.values()))["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert PINNED.match(next(iter(ours.values()))["image"])
    for name in ("kafka", "postgres", "prometheus", "grafana"):
        assert name in services, f"compose lacks {name}"


def test_third_party_images_are_pinned_and_kafka_is_the_tested_version() -> None:
    services = compose_services()
    for name, service in services.items():
        image = service["image"]
        assert pinned(image), f"{name}: {image} is not pinned to an exact version"
    pom = (INFRA / "kafka" / "pom.xml").read_text()
    tested = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom)
    assert tested
    assert services["kafka"]["image"] == f"apache/kafka:{tested[1]}"


def test_kafka_runs_kraft_with_a_listener_for_the_compose_network() -> None:
    kafka = compose_services()["kafka"]
    env = compose_env(kafka)
    assert "zookeeper" not in str(kafka).lower()
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    advertised = {item.split("://", 1)[1] for item in env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    # Every sagaline service reaches Kafka at an advertised address of the network.
    for name, service in compose_services().items():
        if is_sagaline(service):
            bootstrap = compose_env(service)["SAGALINE_KAFKA_BOOTSTRAP"]
            assert bootstrap in advertised, f"{name}: {bootstrap} is not advertised"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"


def test_compose_environment_is_valid_for_each_role(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose_services()
    created = topics_created(next(s["command"] for s in services.values() if is_role(s, "topics")))
    instance_ids: dict[str, set[str]] = {}
    for name, service in services.items():
        if not is_sagaline(service):
            continue
        role = check_command(service["command"])
        env = compose_env(service)
        settings = validated(monkeypatch, role, env, f"compose service {name}")
        assert isinstance(settings, KafkaSettings)
        assert settings.kafka_bootstrap == "kafka:9092"
        if role not in LONG_RUNNING:
            continue
        assert env.get("SAGALINE_METRICS_HOST") == "0.0.0.0", f"{name}: metrics unreachable"
        ports = served_ports(settings)
        assert "metrics" in ports, f"{name}: serves no /metrics"
        published = [str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])]
        assert set(published) <= {str(p) for p in ports.values()}, f"{name}: {published}"
        if isinstance(settings, ProjectorSettings):
            assert env.get("SAGALINE_UI_HOST") == "0.0.0.0"
            assert str(settings.ui_port) in published, f"{name}: the UI port is not published"
        if role in {"orchestrator", "participant"}:
            assert "SAGALINE_INSTANCE_ID" in env, f"{name}: set a stable SAGALINE_INSTANCE_ID"
            instance_ids.setdefault(role, set())
            assert env["SAGALINE_INSTANCE_ID"] not in instance_ids[role], f"{name}: not unique"
            instance_ids[role].add(env["SAGALINE_INSTANCE_ID"])
        if role == "participant":
            for spec in service["command"][1:]:
                hosted = load_spec(spec)
                assert hosted.name in created, f"{name}: no tasks topic for {hosted.name}"


def is_role(service: Mapping[str, Any], role: str) -> bool:
    """True for a compose service running ``sagaline ROLE ...``."""
    return is_sagaline(service) and service["command"][0] == role


def topics_created(command: Sequence[str]) -> set[str]:
    """The participants a ``sagaline topics create`` command makes tasks topics for."""
    return {p for p in option_value(command, "--participants").split(",") if p}


def test_every_long_running_service_has_a_health_check() -> None:
    for name, service in compose_services().items():
        if is_role(service, "topics"):
            assert service.get("restart") == "no", "topics-init runs once"
            assert "healthcheck" not in service
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name}: no check"
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name
        if is_sagaline(service):
            # The slim image has no curl: the check is Python asking /metrics on the port
            # the process was given.
            assert check["test"][:3] == ["CMD", "python", "-c"], name
            assert "SAGALINE_METRICS_PORT" in check["test"][3] and "/metrics" in check["test"][3]


def test_depends_on_waits_for_what_each_service_needs() -> None:
    services = compose_services()
    (topics_name,) = [n for n, s in services.items() if is_role(s, "topics")]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: use depends_on conditions"
        for target, condition in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            wanted = condition["condition"]
            if wanted == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no health check"
            elif wanted == "service_completed_successfully":
                assert target == topics_name
            else:
                raise AssertionError(f"{name}: depends_on {target} with {wanted}")
        if not is_sagaline(service):
            continue
        assert depends.get("kafka") == {"condition": "service_healthy"}, name
        env = compose_env(service)
        if any(k.endswith("_DSN") for k in env):
            assert depends.get("postgres") == {"condition": "service_healthy"}, name
        if name != topics_name:
            assert depends.get(topics_name) == {"condition": "service_completed_successfully"}


def test_prometheus_scrapes_every_sagaline_service_and_loads_the_alerts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = compose_services()
    prometheus = services["prometheus"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in prometheus["volumes"]}
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])
    source = (COMPOSE.parent / mounts[str(config_path.parent)]).resolve()
    assert source == INFRA / "prometheus"
    config = load_yaml(source / config_path.name)
    for rule_file in config["rule_files"]:
        assert (source / rule_file).is_file(), f"rule file {rule_file} is missing"
    assert "alerts.yml" in config["rule_files"]
    scraped = {
        target
        for job in config["scrape_configs"]
        for group in job.get("static_configs", [])
        for target in group["targets"]
    }
    wanted = set()
    for name, service in services.items():
        if is_sagaline(service) and service["command"][0] in LONG_RUNNING:
            role = service["command"][0]
            settings = validated(monkeypatch, role, compose_env(service), name)
            wanted.add(f"{name}:{served_ports(settings)['metrics']}")
    assert wanted <= scraped, f"not scraped: {sorted(wanted - scraped)}"
    for target in scraped - wanted:
        assert target.split(":")[0] in services or target.startswith("localhost:"), target
    # The same jobs as the config for the local stack: alerts and dashboards select by job.
    local = load_yaml(INFRA / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    local_jobs = {job["job_name"] for job in local["scrape_configs"]}
    assert jobs == local_jobs, f"compose.yml jobs {sorted(jobs)} != prometheus.yml {local_jobs}"


def test_grafana_gets_the_provisioning_and_dashboards_mounted() -> None:
    grafana = compose_services()["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"] if m.startswith("./")}
    sources = {target: (COMPOSE.parent / src).resolve() for target, src in mounts.items()}
    assert sources["/etc/grafana/provisioning"] == INFRA / "grafana" / "provisioning"
    dashboards = sources["/var/lib/grafana/dashboards"]
    assert dashboards == INFRA / "grafana" / "dashboards"
    assert list(dashboards.glob("*.json")), "no dashboard to provision"
    provisioning = INFRA / "grafana" / "provisioning"
    providers = [
        provider
        for path in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for provider in load_yaml(path).get("providers", [])
    ]
    assert providers, "no dashboard provider in provisioning/dashboards"
    assert {p["options"]["path"] for p in providers} <= set(sources), (
        "the dashboard provider reads a path the compose file does not mount"
    )
    datasources = [
        ds
        for path in sorted((provisioning / "datasources").glob("*.y*ml"))
        for ds in load_yaml(path).get("datasources", [])
    ]
    prometheus = [ds for ds in datasources if ds.get("type") == "prometheus"]
    assert prometheus, f"no Prometheus data source: {datasources}"
    services = compose_services()
    published = {str(p).rsplit(":", 1)[-1] for p in services["prometheus"]["ports"]}
    for ds in prometheus:
        # Grafana reaches Prometheus over the compose network, by service name.
        host, _, port = ds["url"].removeprefix("http://").rstrip("/").partition(":")
        assert host in services and port in published, ds["url"]


# --- Kubernetes -------------------------------------------------------------------------


def k8s_documents() -> list[dict[str, Any]]:
    """Every manifest kustomization.yaml lists, in its order."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    return [doc for name in kustomization["resources"] for doc in load_yaml_all(K8S / name)]


def by_kind(kind: str) -> list[dict[str, Any]]:
    """The manifests of one kind."""
    return [doc for doc in k8s_documents() if doc["kind"] == kind]


def workloads() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template spec) of every StatefulSet, Deployment and Job."""
    for doc in k8s_documents():
        if doc["kind"] in {"StatefulSet", "Deployment", "Job"}:
            yield doc, doc["spec"]["template"]["spec"]


def container_env(container: Mapping[str, Any], pod_name: str) -> dict[str, str]:
    """The environment a container gets: its ConfigMaps, then its own variables, with
    Secret references resolved and ``metadata.name`` as ``pod_name``."""
    maps = {doc["metadata"]["name"]: doc["data"] for doc in by_kind("ConfigMap")}
    secrets = {doc["metadata"]["name"]: doc["stringData"] for doc in by_kind("Secret")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]
        if "secretKeyRef" in ref:
            secret = secrets[ref["secretKeyRef"]["name"]]
            env[item["name"]] = secret[ref["secretKeyRef"]["key"]]
        else:
            assert ref["fieldRef"]["fieldPath"] == "metadata.name", item
            env[item["name"]] = pod_name
    return env


def test_kustomization_lists_every_manifest() -> None:
    listed = load_yaml(K8S / "kustomization.yaml")["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    for doc in k8s_documents():
        assert "namespace" not in doc["metadata"], "the namespace is the deployer's choice"
    kinds = {doc["kind"] for doc in k8s_documents()}
    assert {"ConfigMap", "Secret", "StatefulSet", "Deployment", "Service", "Job"} <= kinds


def test_k8s_workloads_run_real_commands_with_valid_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compose_image = next(s["image"] for s in compose_services().values() if is_sagaline(s))
    images = load_yaml(K8S / "kustomization.yaml")["images"]
    assert [i["name"] for i in images] == [compose_image.split(":")[0]]
    roles: dict[str, list[str]] = {}
    created: set[str] = set()
    hosted: set[str] = set()
    for doc, pod in workloads():
        for container in pod["containers"]:
            where = f"{doc['kind']} {doc['metadata']['name']}"
            assert container["image"] == compose_image, where
            assert "command" not in container, f"{where}: args only, keep the entrypoint"
            role = check_command(container["args"])
            roles.setdefault(role, []).append(doc["kind"])
            settings = validated(
                monkeypatch, role, container_env(container, f"{doc['metadata']['name']}-0"), where
            )
            if role == "topics":
                created |= topics_created(container["args"])
            if role == "participant":
                hosted |= {load_spec(s).name for s in container["args"][1:]}
            if role in LONG_RUNNING:
                assert getattr(settings, "metrics_host", None) == "0.0.0.0", where
    assert roles == {
        "orchestrator": ["StatefulSet"],
        "participant": ["Deployment"] * 3,
        "projector": ["Deployment"],
        "topics": ["Job"],
    }
    assert hosted <= created, f"no tasks topic for {sorted(hosted - created)}"


def test_instance_ids_are_the_pod_names() -> None:
    """Stable per replica (a StatefulSet's pod names survive restarts) and unique."""
    for doc, pod in workloads():
        for container in pod["containers"]:
            if container["args"][0] not in {"orchestrator", "participant"}:
                continue
            (item,) = [e for e in container["env"] if e["name"] == "SAGALINE_INSTANCE_ID"]
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            if container["args"][0] == "orchestrator":
                assert doc["kind"] == "StatefulSet"


def test_long_running_pods_have_probes_on_the_ports_they_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for doc, pod in workloads():
        for container in pod["containers"]:
            role = container["args"][0]
            where = f"{doc['kind']} {doc['metadata']['name']}"
            env = container_env(container, "pod-0")
            settings = validated(monkeypatch, role, env, where)
            named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            if role not in LONG_RUNNING:
                assert doc["spec"]["template"]["spec"]["restartPolicy"] in {"OnFailure", "Never"}
                continue
            assert named == served_ports(settings), f"{where}: container ports {named}"
            for probe in ("livenessProbe", "readinessProbe"):
                http = container[probe]["httpGet"]
                assert http["port"] in named, f"{where} {probe}: unknown port {http['port']}"
                wanted = "/metrics" if http["port"] == "metrics" else "/healthz"
                assert http["path"] == wanted, f"{where} {probe}"
            assert container["livenessProbe"]["httpGet"]["port"] == "metrics"
            annotations = doc["spec"]["template"]["metadata"].get("annotations", {})
            assert annotations.get("prometheus.io/port") == str(named["metrics"]), where


def test_pods_run_as_the_image_user_with_a_read_only_root() -> None:
    user = dockerfile_stages()[-1].all("USER")[-1]
    uid, _, gid = user.partition(":")
    for doc, pod in workloads():
        where = f"{doc['kind']} {doc['metadata']['name']}"
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, where
        assert str(context["runAsUser"]) == uid and str(context["runAsGroup"]) == gid, where
        assert pod.get("automountServiceAccountToken") is False, where
        for container in pod["containers"]:
            own = container["securityContext"]
            assert own["allowPrivilegeEscalation"] is False, where
            assert own["readOnlyRootFilesystem"] is True, where
            assert own["capabilities"]["drop"] == ["ALL"], where
            resources = container["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], where
            assert resources["limits"]["memory"], where


def test_selectors_services_and_statefulset_fit_together() -> None:
    services = {doc["metadata"]["name"]: doc for doc in by_kind("Service")}
    for doc, _pod in workloads():
        labels = doc["spec"]["template"]["metadata"]["labels"]
        if doc["kind"] != "Job":
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= labels.items(), doc["metadata"]["name"]
        if doc["kind"] == "StatefulSet":
            governing = services[doc["spec"]["serviceName"]]
            assert governing["spec"].get("clusterIP") == "None", "a headless service"
    pods = [
        (doc["spec"]["template"]["metadata"]["labels"], pod)
        for doc, pod in workloads()
        if doc["kind"] != "Job"
    ]
    for name, service in services.items():
        selected = [
            pod for labels, pod in pods if service["spec"]["selector"].items() <= labels.items()
        ]
        assert selected, f"Service {name} selects no pod"
        for port in service["spec"]["ports"]:
            for pod in selected:
                names = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in names, f"Service {name}: {port['targetPort']}"


def test_read_elsewhere_variables_are_read_by_the_code() -> None:
    code = "\n".join(
        p.read_text()
        for package in ("orchestrator", "participants")
        for p in (ROOT / package).rglob("*.py")
    )
    for name in READ_ELSEWHERE:
        assert f'"{name}"' in code, f"{name} is not read anywhere: drop it from READ_ELSEWHERE"


def test_k8s_component_labels_name_the_prometheus_jobs() -> None:
    """docs/deploy.md relabels each pod's job to ``sagaline-<component>``: the names the
    alerts and dashboards select on (infra/prometheus/prometheus.yml)."""
    jobs = {
        job["job_name"]
        for job in load_yaml(INFRA / "prometheus" / "prometheus.yml")["scrape_configs"]
    }
    for doc, pod in workloads():
        if pod["containers"][0]["args"][0] not in LONG_RUNNING:
            continue
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "sagaline"
        job = f"sagaline-{labels['app.kubernetes.io/component']}"
        assert job in jobs, f"{doc['metadata']['name']}: job {job} is not one of {sorted(jobs)}"
