"""Workflows that ask the world directly, for the determinism check's tests (never run).

Line numbers matter: tests/unit/test_check.py finds each call by the text of its line.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random as rnd
import threading
import time
import uuid
from datetime import datetime
from time import monotonic
from typing import Any

from orchestrator import WorkflowContext, WorkflowRegistry

registry = WorkflowRegistry()


def _stamp() -> float:
    return time.time()  # reached through a helper the workflow calls


def _unused_helper() -> float:
    return time.time()  # never called by a workflow: not reported


@registry.workflow("bad.clock")
async def clock(ctx: WorkflowContext, _: Any) -> Any:
    started = datetime.now()
    elapsed = monotonic()
    today = dt.date.today()
    await asyncio.sleep(1)
    return [str(started), elapsed, str(today), _stamp()]


@registry.workflow("bad.random")
async def randomness(ctx: WorkflowContext, _: Any) -> Any:
    pick = rnd.choice([1, 2, 3])
    ident = uuid.uuid4()
    region = os.environ["REGION"]
    ctx.on_query("lucky", lambda: rnd.random())  # noqa: PLW0108 - a call in a handler
    return [pick, str(ident), region]


@registry.workflow("bad.io")
async def io_and_threads(ctx: WorkflowContext, _: Any) -> Any:
    with open("/etc/hostname") as handle:
        name = handle.read()
    worker = threading.Thread(target=print)
    worker.start()
    results = await asyncio.gather(ctx.activity("a.b", 1))
    return [name, results]


@registry.workflow("good.exempt")
async def exempt(ctx: WorkflowContext, _: Any) -> Any:
    debug = os.getenv("DEBUG")  # sagaline: allow
    now = ctx.now()
    token = ctx.uuid4()
    return [debug, now, str(token), ctx.random()]
