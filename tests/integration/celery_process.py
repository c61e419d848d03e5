"""A real ``celery worker`` process for the integration tests: started in its own process
group, so kill -9 takes the main process and its pool's children together, as a machine
or container that dies would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_RECEIVED = re.compile(r"Task ([\w.]+)\[([^\]]+)\] received")


@dataclass
class CeleryWorker:
    """``celery -A app worker -Q queues`` with the prefork pool (Celery's default)."""

    app: str
    queues: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    concurrency: int = 1
    proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_within_s: float = 60) -> CeleryWorker:
        """Start the worker and wait until it says it is ready."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        begun = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    self.app,
                    "worker",
                    "-Q",
                    ",".join(self.queues),
                    "--pool",
                    "prefork",
                    "--concurrency",
                    str(self.concurrency),
                    "--loglevel",
                    "INFO",
                    "--without-mingle",
                    "--without-gossip",
                    "--without-heartbeat",
                    "-n",
                    f"{self.queues[0]}@%h",
                ],
                cwd=ROOT,
                env=dict(self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + ready_within_s
        while b" ready." not in self.log_path.read_bytes()[begun:]:
            if self.proc.poll() is not None:
                pytest.fail(f"celery worker exited:\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"celery worker not ready in {ready_within_s} s:\n{self.tail()}")
            time.sleep(0.2)  # polling a log file for a condition, with a deadline
        return self

    def alive(self) -> bool:
        """True while the worker's main process runs."""
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL to the whole process group: the main process and the pool's children."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.proc.wait(30)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to the group after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill9()

    def log(self) -> str:
        """Everything the worker logged."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def received(self) -> list[tuple[str, str]]:
        """(task name, task id) of every task the worker logged as received, in order."""
        return _RECEIVED.findall(self.log())

    def tail(self, lines: int = 40) -> str:
        """The end of its log, for failure messages."""
        return "\n".join(self.log().splitlines()[-lines:])
