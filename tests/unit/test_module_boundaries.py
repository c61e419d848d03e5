"""Participants share the transport with the orchestrator, never its runtime or engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import participants

PARTICIPANTS_DIR = Path(participants.__file__).parent
FORBIDDEN = ("orchestrator.runtime", "orchestrator.replay")


def test_importing_every_participant_module_loads_no_orchestrator_runtime() -> None:
    modules = sorted(
        f"participants.{p.stem}" for p in PARTICIPANTS_DIR.glob("*.py") if p.stem != "__init__"
    )
    assert "participants.runtime" in modules
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print('\\n'.join(m for m in sys.modules if m.startswith({FORBIDDEN!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "", f"participants pulled in: {done.stdout.split()}"
